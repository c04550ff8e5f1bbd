"""Windows against first-window input on the same encoder: the label-efficiency points scored on first windows.

For each labels_per_class x seed, fine-tunes models/pretrained and models/scratch with params.yaml's finetune
section as the finetune stage does (the same seeding, so the same subsample, head and order), except that
validation and test keep only each document's first window. Prints test macro-F1 per run and the mean ± std
per point, to set beside `transferpipe label-efficiency` (which scores the mean logits over all windows).

Run: python -m bench.first_window [--labels-per-class 5 20 all] [--seeds 1 2 3] [--out first_window.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import datasets
import torch
from sklearn.metrics import f1_score

from bench.common import REPO
from transferpipe.finetuning import finetune
from transferpipe.inference import collator_for, document_logits, first_windows, predict_logits
from transferpipe.io import read_json
from transferpipe.modeling import sequence_classifier
from transferpipe.params import FinetuneParams, load_section
from transferpipe.tokenization import load_tokenizer
from transferpipe.tracking import Run
from transferpipe.training import seed_everything

VARIANTS = ("pretrained", "scratch")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.first_window", description=__doc__.splitlines()[0])
    parser.add_argument("--labels-per-class", nargs="+", default=["5", "20", "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=None, help="also write the scores as JSON")
    args = parser.parse_args()
    tokenized = datasets.load_from_disk(str(REPO / "data/tokenized"))
    splits = datasets.DatasetDict(
        train=tokenized["train"],  # finetune trains on first windows anyway
        validation=first_windows(tokenized["validation"]),
        test=first_windows(tokenized["test"]),
    )
    label_names = read_json(REPO / "data/tokenized/labels.json")
    base = load_section(REPO / "params.yaml", "finetune", FinetuneParams)
    device = torch.device("cpu")
    scores: dict[str, dict[str, list[float]]] = {}
    for labels in args.labels_per_class:
        for seed in args.seeds:
            params = dataclasses.replace(base, labels_per_class=labels if labels == "all" else int(labels), seed=seed)
            for variant in VARIANTS:
                seed_everything(seed)  # as stages.finetune: before the head is drawn
                encoder = REPO / "models" / variant
                tokenizer = load_tokenizer(encoder)
                model = sequence_classifier(encoder, label_names, params.classifier_dropout, params.classifier_pooling)
                finetune(model, tokenizer, splits, label_names, params, Run(None), device)
                windows = predict_logits(model, splits["test"], collator_for(tokenizer, device), 64, device)
                logits, y_true = document_logits(windows, splits["test"])
                score = f1_score(y_true, logits.argmax(-1), average="macro")
                scores.setdefault(labels, {}).setdefault(variant, []).append(score)
                print(f"first_window: labels_per_class={labels} seed={seed} {variant} test macro-F1 {score:.4f}")
    print(f"\n{'labels/class':>12} {'pretrained':>16} {'scratch':>16} {'gap':>7}")
    for labels, row in scores.items():
        mean = {v: statistics.mean(row[v]) for v in VARIANTS}
        spread = {v: statistics.stdev(row[v]) if len(row[v]) > 1 else 0.0 for v in VARIANTS}
        cells = " ".join(f"{mean[v]:>8.3f} ± {spread[v]:.3f}" for v in VARIANTS)
        print(f"{labels:>12} {cells} {mean['pretrained'] - mean['scratch']:>+7.3f}")
    if args.out:
        args.out.write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
