"""Tokenize-stage throughput: our path against transformers' run_mlm.py path and a bare Rust encode.

All three tokenize the default data's documents (train, validation, test) with the same trained tokenizer,
in memory, one process (tokenize.num_proc as in params.yaml). Timed: the tokenize stage's work after its
tokenizer is trained, up to the datasets it writes (not training, not saving):
- ours: the stage's path: each split's documents tokenized once (tokenize_documents), blocks packed from
  train and from validation (pack_tokenized), every split cut into classification windows (window_tokenized,
  tokenize.max_length and max_windows);
- run_mlm: transformers' examples/pytorch/language-modeling/run_mlm.py: a batched dataset.map of
  tokenizer(texts, return_special_tokens_mask=True) over train and validation, then a second batched map of
  group_texts (concatenate, cut block_size blocks); and, for the classification windows, the examples' way to
  cut long documents (run_qa.py's): a batched map of tokenizer(truncation=True, max_length,
  return_overflowing_tokens=True) over every split, keeping each document's first max_windows windows;
- bare encode: one tokenizers encode_batch_fast call over every document (ids left in Rust): the floor.
Ours and run_mlm give the same block ids and the same windows (ids, labels, document, window): checked.
Each path runs once to warm up, then --repeat (3) times, interleaved; the median is printed. tokens/s counts
the documents' tokens (whole, special tokens included) per second, the same count for every path.
Run: python -m bench.tokenize_throughput [--quick]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from itertools import chain
from pathlib import Path

import datasets

from bench.common import default_data, load, machine
from transferpipe.tokenization import fast_backend, pack_tokenized, tokenize_documents, window_tokenized

PRETRAINING = ("train", "validation")  # the splits the stage packs into blocks (the unlabeled text is empty)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def medians(paths: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time of `repeat` calls of each path, after one warm-up call each; runs interleaved, each
    after a garbage collection (so none pays for another's garbage)."""
    for fn in paths.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeat):
        for name, fn in paths.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="300 documents a split, one run (a smoke run)")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    params = load()
    frames, tokenizer = default_data(params)
    tok = params["tokenize"]
    size = 300 if args.quick else None
    if args.quick:
        args.repeat = 1
    splits = {
        name: datasets.Dataset.from_dict(
            {"text": frame["text"].tolist()[:size], "label": [int(x) for x in frame["label"]][:size]}
        )
        for name, frame in frames.items()
    }
    texts = [t for ds in splits.values() for t in ds["text"]]
    backend = fast_backend(tokenizer)

    def ours() -> tuple[dict, dict]:
        documents = {name: tokenize_documents(tokenizer, ds, tok.num_proc) for name, ds in splits.items()}
        mlm_train = [documents["train"].select_columns(["input_ids"])]
        blocks = {
            "mlm_train": pack_tokenized(datasets.concatenate_datasets(mlm_train), tok.block_size),
            "mlm_validation": pack_tokenized(documents["validation"], tok.block_size),
        }
        windows = {
            name: window_tokenized(tokenizer, docs, tok.max_length, tok.max_windows) for name, docs in documents.items()
        }
        return blocks, windows

    def tokenize_function(examples: dict) -> dict:  # run_mlm.py's, not line_by_line
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples: dict) -> dict:  # run_mlm.py's
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // tok.block_size) * tok.block_size
        return {
            k: [t[i : i + tok.block_size] for i in range(0, total_length, tok.block_size)]
            for k, t in concatenated_examples.items()
        }

    def cut_windows(examples: dict, indices: list[int]) -> dict:  # run_qa.py's overflowing windows
        encoded = tokenizer(
            examples["text"], truncation=True, max_length=tok.max_length, return_overflowing_tokens=True
        )
        document = encoded.pop("overflow_to_sample_mapping")
        window = [0] * len(document)
        for i in range(1, len(document)):
            window[i] = window[i - 1] + 1 if document[i] == document[i - 1] else 0
        keep = [i for i, w in enumerate(window) if tok.max_windows is None or w < tok.max_windows]
        return {
            "labels": [examples["label"][document[i]] for i in keep],
            **{k: [v[i] for i in keep] for k, v in encoded.items()},
            "document": [indices[document[i]] for i in keep],
            "window": [window[i] for i in keep],
        }

    def run_mlm() -> tuple[dict, dict]:
        tokenized = {
            name: splits[name].map(tokenize_function, batched=True, remove_columns=["text", "label"])
            for name in PRETRAINING
        }
        blocks = {f"mlm_{name}": ds.map(group_texts, batched=True) for name, ds in tokenized.items()}
        windows = {
            name: ds.map(cut_windows, batched=True, with_indices=True, remove_columns=["text", "label"])
            for name, ds in splits.items()
        }
        return blocks, windows

    def bare() -> list:
        return backend.encode_batch_fast(texts)

    (blocks, windows), (ref_blocks, ref_windows) = ours(), run_mlm()
    for name in blocks:
        assert blocks[name]["input_ids"] == ref_blocks[name]["input_ids"], f"{name}: the paths' blocks differ"
    for name in windows:
        for column in ("labels", "input_ids", "attention_mask", "document", "window"):
            assert windows[name][column] == ref_windows[name][column], f"{name}: the paths' {column} differ"
    n_tokens = sum(len(e.ids) for e in bare())
    seconds = medians({"ours": ours, "run_mlm": run_mlm, "bare encode": bare}, args.repeat)

    print(
        f"machine: {machine()}, {cpu_model()}; {len(texts)} documents, {n_tokens:,} tokens (whole documents, "
        f"special tokens included), num_proc {tok.num_proc}; median of {args.repeat} after a warm-up"
    )
    print(f"{'path':<12} {'seconds':>8} {'tokens/s':>11} {'vs ours':>8}  target")
    for name, t in seconds.items():
        ratio = t / seconds["ours"]  # the path's seconds / ours
        if name == "run_mlm":
            target = f"ours >= 1.5x faster: {verdict(ratio >= 1.5)}"
        elif name == "bare encode":
            target = f"ours <= 1.15x its time (ours {1 / ratio:.2f}x): {verdict(1 / ratio <= 1.15)}"
        else:
            target = ""
        print(f"{name:<12} {t:8.3f} {n_tokens / t:11,.0f} {ratio:7.2f}x  {target}")


if __name__ == "__main__":
    main()
