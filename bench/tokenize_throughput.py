"""Tokenize-stage throughput: our path against a per-example Python loop.

Both produce the tokenize stage's two views of the same documents (the default data's splits) with the same
trained tokenizer: classification inputs truncated to max_length, and the pretraining text packed into blocks.
- ours: the stage's path: each document tokenized once (one batched call into Rust per 1000 documents, which
  spreads the batch over every core), ids handed to Arrow through numpy, truncation and packing vectorized;
- reference: one tokenizer call per document for the truncated ids and one more for the packing stream.
The classification ids and the first batch's blocks must be the same (checked). Run: python -m bench.tokenize_throughput
"""

from __future__ import annotations

import argparse

import datasets

from bench.common import default_data, load, machine, report, timed
from transferpipe.tokenization import BATCH_DOCUMENTS, pack_tokenized, tokenize_documents, window_tokenized


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="300 documents, one repeat (a smoke run)")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    params = load()
    splits, tokenizer = default_data(params)
    tok = params["tokenize"]
    texts = [t for frame in splits.values() for t in frame["text"]]
    labels = [int(x) for frame in splits.values() for x in frame["label"]]
    if args.quick:
        texts, labels, args.repeat = texts[:300], labels[:300], 1
    documents = datasets.Dataset.from_dict({"text": texts, "label": labels})

    def ours() -> tuple:
        tokenized = tokenize_documents(tokenizer, documents, tok.num_proc)
        return window_tokenized(tokenizer, tokenized, tok.max_length), pack_tokenized(tokenized, tok.block_size)

    def reference() -> list[list[int]]:
        # The loop people write first: one call per example, then pack in Python.
        out, stream = [], []
        for text in texts:
            out.append(tokenizer(text, truncation=True, max_length=tok.max_length)["input_ids"])
            stream.extend(tokenizer(text)["input_ids"])
        blocks = [stream[i : i + tok.block_size] for i in range(0, len(stream) - tok.block_size + 1, tok.block_size)]
        return out, blocks

    (classified, blocks), (ref_classified, ref_blocks) = ours(), reference()
    assert classified["input_ids"] == ref_classified, "both paths must produce the same ids"
    # Packing runs per batch of documents (each drops its own tail): the first batch's blocks are the same.
    head = documents.select(range(min(BATCH_DOCUMENTS, len(texts))))
    first = len(pack_tokenized(tokenize_documents(tokenizer, head), tok.block_size))
    assert blocks["input_ids"][:first] == ref_blocks[:first], "both paths must pack the same blocks"
    n_tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"]) + sum(len(i) for i in classified["input_ids"])
    t_ours, t_ref = timed(ours, args.repeat), timed(reference, args.repeat)
    print(f"machine: {machine()}; {len(texts)} documents, {n_tokens:,} tokens per pass, num_proc {tok.num_proc}")
    report("tokenize throughput", "tokens/s", n_tokens / t_ours, n_tokens / t_ref, target=10)


if __name__ == "__main__":
    main()
