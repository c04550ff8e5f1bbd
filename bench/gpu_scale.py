"""The GPU-scale configuration end to end: test macro-F1 of pretrained, from-scratch and TF-IDF by labels per class.

Runs the pipeline's own stages (tokenize, pretrain, then finetune x 2 and evaluate for each labels_per_class x
seed) in one process, with the params of params.yaml plus GPU_SCALE (what the README's `dvc exp run -S ...`
GPU command sets) and MLflow off, so it needs neither DVC nor MLflow: a GPU machine with torch, transformers,
datasets and scikit-learn will do. It reads the prepared data (data/prepared, from `dvc repro prepare`).

pretrain.max_steps is GPU_SCALE's unless --pretrain-minutes is given: then a 30-step run measures tokens per
second first and max_steps is set so that pretraining takes about that long (printed, to be written into the
documented command). Runs are ordered seed by seed, so that a --deadline-minutes cut still covers every
labels_per_class; results.json is rewritten after each evaluate.

Run: python -m bench.gpu_scale --out /tmp/gpu_scale [--labels-per-class 5 20] [--seeds 1 2 3]
         [--pretrain-minutes 3] [--deadline-minutes 9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.common import REPO, assignments, write_params
from stages import evaluate, finetune, pretrain, tokenize
from transferpipe.params import read_params_file

# The GPU-scale overrides of params.yaml (docs/gpu.md's command sets the same; tests/test_consistency.py).
GPU_SCALE = {
    "model.checkpoint": None,  # the encoder pretrained here (the default fine-tunes a published checkpoint)
    "pretrain.enabled": True,
    "pretrain.scratch_baseline": True,
    "finetune.min_steps": 0,
    "tokenize.max_length": 512,
    "tokenize.block_size": 512,
    "tokenize.num_proc": 8,
    "model.hidden_size": 768,
    "model.num_hidden_layers": 12,
    "model.num_attention_heads": 12,
    "model.intermediate_size": 1152,
    "pretrain.max_steps": 1000,
    "pretrain.batch_size": 64,
    "pretrain.learning_rate": 5.0e-4,
    "pretrain.eval_every": 250,
    "pretrain.checkpoint_every": 500,  # about 50 s of H200 work; a checkpoint of this size takes a few seconds
    "pretrain.num_workers": 4,
    "finetune.epochs": 10,
    "finetune.batch_size": 16,
    "finetune.encoder_learning_rate": 1.0e-4,
    "finetune.head_learning_rate": 1.0e-3,
    "finetune.early_stopping_patience": 3,
    "finetune.num_workers": 2,
}


def pretrain_stage(params: Path, out: Path, tag: str) -> dict:
    return pretrain.main(
        ["--params", str(params), "--data", str(out / "blocks"), "--tokenizer", str(out / "tokenizer"),
         "--out", str(out / tag / "pretrained"), "--scratch", str(out / tag / "scratch"),
         "--metrics", str(out / tag / "pretrain.json"), "--plots", str(out / tag / "plots")]
    )  # fmt: skip


def summary(results: list[dict]) -> dict:
    table = {}
    for labels in dict.fromkeys(r["labels_per_class"] for r in results):
        runs = [r for r in results if r["labels_per_class"] == labels]
        table[str(labels)] = {"seeds": [r["seed"] for r in runs]}
        for model in runs[0]["test"]:
            scores = [r["test"][model]["macro_f1"] for r in runs]
            spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
            table[str(labels)][model] = {"mean": statistics.mean(scores), "std": spread}
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=REPO / "data/prepared")
    parser.add_argument("--labels-per-class", nargs="+", default=["5", "20"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", choices=finetune.VARIANTS, default=list(finetune.VARIANTS))
    parser.add_argument("--pretrain-minutes", type=float, default=None)
    parser.add_argument("--deadline-minutes", type=float, default=None, help="start no finetune after this")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=YAML", help="more overrides")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = {**GPU_SCALE, "tracking.enabled": False}
    overrides.update(assignments(args.set))
    base = read_params_file(REPO / "params.yaml")
    params = write_params(args.out / "params.yaml", base, overrides)
    timings = {}

    tokenize.main(["--params", str(params), "--data", str(args.data), "--tokenizer", str(args.out / "tokenizer"),
                   "--blocks", str(args.out / "blocks"), "--out", str(args.out / "tokenized")])  # fmt: skip
    timings["tokenize_s"] = time.perf_counter() - start

    if args.pretrain_minutes:
        probe = write_params(args.out / "probe.yaml", base, {**overrides, "pretrain.max_steps": 30})
        measured = pretrain_stage(probe, args.out, "probe")["train"]["tokens_per_second"]
        tokens_per_step = overrides["pretrain.batch_size"] * overrides["tokenize.block_size"]
        overrides["pretrain.max_steps"] = max(100, int(args.pretrain_minutes * 60 * measured / tokens_per_step))
        print(
            f"gpu_scale: {measured:,.0f} tokens/s in 30 steps -> pretrain.max_steps={overrides['pretrain.max_steps']}"
        )
        params = write_params(args.out / "params.yaml", base, overrides)
    mark = time.perf_counter()
    pretrained = pretrain_stage(params, args.out, "pretrain")
    timings["pretrain_s"] = time.perf_counter() - mark

    results: list[dict] = []
    report = {"overrides": overrides, "pretrain": pretrained, "timings": timings, "runs": results}
    for seed in args.seeds:
        for labels in args.labels_per_class:
            if args.deadline_minutes and time.perf_counter() - start > args.deadline_minutes * 60:
                print(f"gpu_scale: deadline reached, skipping labels_per_class={labels} seed={seed}")
                continue
            labels = labels if labels == "all" else int(labels)
            run = args.out / f"run_{labels}_{seed}"
            run_params = write_params(
                run.with_suffix(".yaml"),
                base,
                {**overrides, "finetune.labels_per_class": labels, "finetune.seed": seed},
            )
            mark = time.perf_counter()
            for variant in args.variants:
                finetune.main(
                    ["--params", str(run_params), "--data", str(args.out / "tokenized"),
                     "--encoder", str(args.out / "pretrain" / variant), "--variant", variant,
                     "--out", str(run / variant), "--metrics", str(run / f"finetune_{variant}.json"),
                     "--plots", str(run / f"plots_{variant}")]
                )  # fmt: skip
            scores = evaluate.main(
                ["--params", str(run_params), "--data", str(args.data),
                 "--models", *(str(run / variant) for variant in args.variants),
                 "--metrics", str(run / "evaluate.json"), "--plots", str(run / "plots_evaluate")]
            )  # fmt: skip
            results.append({"labels_per_class": labels, "seed": seed, "seconds": time.perf_counter() - mark, **scores})
            report["summary"] = summary(results)
            (args.out / "results.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    timings["total_s"] = time.perf_counter() - start

    models = [*args.variants, evaluate.BASELINE]
    print(f"\n{'labels/class':>12} " + " ".join(f"{m:>18}" for m in models) + "  seeds")
    for labels, row in summary(results).items():
        cells = " ".join(f"{row[m]['mean']:>9.3f} ± {row[m]['std']:.3f}" for m in models)
        print(f"{labels:>12} {cells}  {row['seeds']}")
    print(f"pretrain: {pretrained}\ntimings: { {k: round(v, 1) for k, v in timings.items()} }")
    return report


if __name__ == "__main__":
    main()
