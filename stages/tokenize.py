"""tokenize: train (or load) the tokenizer, pack the pretraining text, tokenize the classification splits.

The WordPiece tokenizer is trained on pretraining text only (train split plus extra unlabeled text),
never on validation or test. With model.checkpoint set (a folder, a hub name or a source file in
models/sources/), that checkpoint's tokenizer is used instead.
The prepared Parquet files are read as memory-mapped Arrow datasets and every step writes Arrow files to a
work folder beside --out, so a corpus larger than memory streams through (tokenize.num_proc workers).

Inputs:  --data folder from prepare
Outputs: --tokenizer folder (save_pretrained),
         --blocks datasets folder with splits mlm_train, mlm_validation (packed blocks: what pretrain reads),
         --out datasets folder with splits train, validation, test (one row per window of a document,
         unpadded: columns labels, input_ids, attention_mask, document, window) and labels.json.
         Apart, so that a param of the classification inputs (max_length, max_windows) leaves the blocks,
         and with them the pretrained encoder, as they were.
Params:  tokenize, model.checkpoint
Run:     python -m stages.tokenize --params params.yaml --data data/prepared --tokenizer models/tokenizer \
             --blocks data/blocks --out data/tokenized
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import datasets

from transferpipe.data import open_prepared
from transferpipe.errors import UserError, run_cli
from transferpipe.io import atomic_dir, temp_sibling_dir
from transferpipe.model_sources import resolve_checkpoint
from transferpipe.params import load_params
from transferpipe.tokenization import (
    load_tokenizer,
    pack_tokenized,
    save_datasets,
    text_batches,
    tokenize_documents,
    train_wordpiece,
    window_tokenized,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m stages.tokenize", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--blocks", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.blocks.resolve() == args.out.resolve():
        raise UserError(f"--blocks and --out must be different folders, both are {args.out}")

    every = load_params(args.params)  # every section checked, so a bad param of a later stage fails now
    params, checkpoint = every.tokenize, every.model.checkpoint
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Every intermediate dataset is an Arrow file in this work folder, memory-mapped, never all in memory.
    # A killed run's work folder is swept here, at the next start.
    with temp_sibling_dir(args.out) as work:
        splits, label_names, unlabeled = open_prepared(args.data, work)
        pretraining = [splits["train"]] + ([unlabeled] if len(unlabeled) else [])
        if checkpoint is None:
            tokenizer = train_wordpiece(
                lambda: text_batches(pretraining), params.vocab_size, params.min_frequency, params.lowercase
            )
        else:
            tokenizer = load_tokenizer(resolve_checkpoint(checkpoint))  # a source file: its verified folder

        # Each document is tokenized once: train and validation feed both the packed blocks and the
        # classification inputs.
        documents = {name: tokenize_documents(tokenizer, ds, params.num_proc) for name, ds in splits.items()}
        mlm_train = [documents["train"].select_columns(["input_ids"])]
        if len(unlabeled):
            mlm_train.append(tokenize_documents(tokenizer, unlabeled, params.num_proc))
        blocks = datasets.DatasetDict(
            mlm_train=pack_tokenized(datasets.concatenate_datasets(mlm_train), params.block_size),
            # Held-out MLM loss is measured on validation articles, which the tokenizer never saw.
            mlm_validation=pack_tokenized(documents["validation"], params.block_size),
        )
        tokenized = datasets.DatasetDict(
            {
                name: window_tokenized(tokenizer, docs, params.max_length, params.max_windows)
                for name, docs in documents.items()
            }
        )
        with atomic_dir(args.tokenizer) as tmp:
            tokenizer.save_pretrained(tmp)
        with atomic_dir(args.blocks) as tmp:
            save_datasets(blocks, tmp)
            copy_lineage(args.data, tmp)
        with atomic_dir(args.out) as tmp:
            save_datasets(tokenized, tmp)
            (tmp / "labels.json").write_text(json.dumps(label_names, indent=2) + "\n", encoding="utf-8")
            copy_lineage(args.data, tmp)
        summary = {
            "vocab_size": len(tokenizer),
            "pretraining_tokens": len(blocks["mlm_train"]) * params.block_size,
            **{f"{name}_documents": len(splits[name]) for name in splits},
            **{f"{name}_windows": len(tokenized[name]) for name in splits},
        }
    print(f"tokenize: {summary}")
    return summary


def copy_lineage(prepared: Path, out: Path) -> None:
    """prepare's sources.json travels with the data, so the training stages tag their MLflow runs with it."""
    if (prepared / "sources.json").is_file():
        shutil.copy2(prepared / "sources.json", out / "sources.json")


if __name__ == "__main__":
    run_cli(main)
