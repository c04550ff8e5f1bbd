"""Tokenize-stage throughput: our batched fast tokenization against a per-example Python loop.

Both tokenize the classification splits and the pretraining text of the default data with the same trained
tokenizer and produce the same token ids (checked). Run: python -m bench.tokenize_throughput
"""

from __future__ import annotations

import argparse

from bench.common import default_data, load, machine, report, timed
from transferpipe.tokenization import pack_blocks, tokenize_for_classification


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    params = load()
    splits, tokenizer = default_data(params)
    tok = params["tokenize"]
    texts = [t for frame in splits.values() for t in frame["text"]]
    labels = [int(x) for frame in splits.values() for x in frame["label"]]

    def ours() -> tuple:
        classified = tokenize_for_classification(tokenizer, texts, labels, tok.max_length)
        blocks = pack_blocks(tokenizer, texts, tok.block_size)
        return classified, blocks

    def reference() -> list[list[int]]:
        # The loop people write first: one call per example, then pack in Python.
        out, stream = [], []
        for text in texts:
            out.append(tokenizer(text, truncation=True, max_length=tok.max_length)["input_ids"])
            stream.extend(tokenizer(text)["input_ids"])
        blocks = [stream[i : i + tok.block_size] for i in range(0, len(stream) - tok.block_size + 1, tok.block_size)]
        return out, blocks

    classified, _ = ours()
    assert classified["input_ids"] == reference()[0], "both paths must produce the same ids"
    n_tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"]) + sum(len(i) for i in classified["input_ids"])
    t_ours, t_ref = timed(ours, args.repeat), timed(reference, args.repeat)
    print(f"machine: {machine()}; {len(texts)} documents, {n_tokens:,} tokens per pass")
    report("tokenize throughput", "tokens/s", n_tokens / t_ours, n_tokens / t_ref, target=10)


if __name__ == "__main__":
    main()
