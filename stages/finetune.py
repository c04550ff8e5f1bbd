"""finetune: an encoder plus a classification head, trained on the labeled train split.

dvc.yaml runs it twice (a foreach): on the pretrained encoder, and on the same architecture untrained
(`scratch`), the baseline that shows what pretraining is worth. Both are logged to MLflow (tag
transferpipe.variant); only the pretrained variant is registered in the model registry.

Separate learning rates for encoder and head, warmup then linear decay, optional freezing, evaluation on
validation every epoch with early stopping on finetune.monitor, the best epoch's weights kept. Training reads
the first window (tokenize.max_length tokens) of each document; validation scores each document by the mean
logits of all its windows (tokenize.max_windows). The saved model carries its label names:
transformers.pipeline("text-classification", model=<out>) returns them.

Inputs:  --data tokenized datasets (train, validation, labels.json), --encoder folder (from pretrain),
         --variant pretrained | scratch
Outputs: --out save_pretrained folder (+ training_run.json: MLflow run id and registered model version),
         --metrics JSON, --plots folder
Params:  finetune, tracking, tokenize.max_length and max_windows (how the logged MLflow model cuts long texts)
Run:     python -m stages.finetune --params params.yaml --data data/tokenized --encoder models/pretrained \
             --variant pretrained --out models/finetuned/pretrained --metrics metrics/finetune/pretrained.json \
             --plots plots/finetune/pretrained
Resume:  every finetune.checkpoint_every steps a checkpoint goes to .checkpoints/ (untracked); a rerun
         after a kill continues from it, in the same MLflow run (transferpipe.checkpoint)
Scale:   TRANSFERPIPE_NPROC=N (or torchrun) trains on N processes with DistributedDataParallel; rank 0 alone
         writes the outputs and the one MLflow run (docs/gpu.md: Multi-GPU and multi-node)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets

from transferpipe.checkpoint import Checkpoints
from transferpipe.data import per_class_indices
from transferpipe.distributed import is_main, process_group, relaunch_under_torchrun
from transferpipe.errors import run_cli
from transferpipe.finetuning import finetune, utilization
from transferpipe.inference import first_windows
from transferpipe.io import atomic_dir, read_json, skipped, write_json, write_skipped
from transferpipe.model_card import model_card
from transferpipe.modeling import count_parameters, sequence_classifier
from transferpipe.params import load_params, to_flat_dict
from transferpipe.serving import TextClassifier
from transferpipe.tokenization import load_tokenizer
from transferpipe.tracking import (
    SEED_GROUP_TAG,
    check_tracking,
    lineage_tags,
    recording,
    rows_digest,
    seed_group,
    start_run,
)
from transferpipe.training import FitResult, seed_everything

VARIANTS = ("pretrained", "scratch")  # the encoder pretrain wrote, and the same architecture untrained


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m stages.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--encoder", type=Path, required=True)
    parser.add_argument("--variant", choices=VARIANTS, default="pretrained")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args(argv)

    every = load_params(args.params)  # every section checked, so a bad param of a later stage fails now
    params, tracking = every.finetune, every.tracking
    windows = every.tokenize  # how the MLflow model cuts long texts
    check_tracking(tracking)
    seed_everything(params.seed)
    if reason := skipped(args.encoder):  # pretrain.scratch_baseline false: no model to train
        write_skipped(args.out, reason)
        write_json(args.metrics, {})
        FitResult(steps=0, seconds=0.0).write_curves(args.plots)
        print(f"finetune: {args.variant} skipped ({reason})")
        return {}
    splits = datasets.load_from_disk(str(args.data))
    label_names = read_json(args.data / "labels.json")
    # The subsample finetune() draws, checked now: too few examples of a class fails before any model loads.
    per_class_indices(first_windows(splits["train"])["labels"], params.labels_per_class, params.seed, label_names)
    tokenizer = load_tokenizer(args.encoder)
    model = sequence_classifier(args.encoder, label_names, params.classifier_dropout, params.classifier_pooling)
    pretrain_run = read_json(args.encoder / "training_run.json").get("mlflow_run_id")

    tags = {"transferpipe.variant": args.variant, **lineage_tags(args.data), **lineage_tags(args.encoder),
            SEED_GROUP_TAG: seed_group(args.params, args.variant)}  # fmt: skip
    if pretrain_run:
        tags["transferpipe.pretrain_run_id"] = pretrain_run
    # Killed earlier with these params and inputs: resume from the last checkpoint, in the same MLflow run.
    checkpoints = Checkpoints.for_stage(
        f"finetune-{args.variant}", "finetune", {"finetune": params}, [args.data, args.encoder],
        params.checkpoint_every, Path(__file__),
    )  # fmt: skip
    # Under torchrun every rank trains; rank 0 alone opens the MLflow run (is_main() once in the group).
    with (
        process_group(params.device, "finetune.device") as device,
        start_run(
            "finetune", tracking, tags, name=f"finetune-{args.variant}", primary=is_main(), resume=checkpoints.run_id
        ) as run,
    ):
        run.log_params(
            {
                **to_flat_dict(params, "finetune"),
                "parameters": count_parameters(model),
                "labels": ",".join(label_names),
                "device": device.type,
            }
        )
        read = {"train": "training", "validation": "validation"}  # the splits and the MLflow context they are read in
        run.log_datasets(args.data, {n: (rows_digest(splits[n]), len(splits[n]), c) for n, c in read.items()})
        result = finetune(model, tokenizer, splits, label_names, params, run, device, checkpoints)
        best = result.best
        # Model GFLOP/s against the GPU's bf16 peak or the CPU's measured matrix-product ceiling (transferpipe.flops).
        used = utilization(model, params, windows.max_length, result.tokens_per_second, device)
        metrics = {
            "validation": {"macro_f1": best["macro_f1"], "accuracy": best["accuracy"], "loss": best["loss"]},
            "train": {
                "best_epoch": best["epoch"] + 1,
                "steps": result.steps,
                "examples_per_second": round(result.examples_per_second, 1),
                "skipped_steps": result.skipped_steps,
                "checkpoint_seconds": round(result.checkpoint_seconds, 2),
                **used,
                **result.records,
            },
        }
        if not is_main():
            return metrics  # rank 0 writes the outputs
        # Outputs first, complete on disk; then MLflow, whose failure must not cost the trained model.
        with atomic_dir(args.out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "training_run.json", {"mlflow_run_id": run.run_id, "model_version": None})
            base = args.encoder / "checkpoint.json"  # the published checkpoint pretrain started from, if any
            card = model_card(
                label_names=label_names, variant=args.variant, params=params, windows=windows,
                data=read_json(args.data / "sources.json"), base=read_json(base) if base.is_file() else {},
                validation=metrics["validation"], best_epoch=best["epoch"] + 1, run_id=run.run_id,
            )  # fmt: skip
            (tmp / "README.md").write_text(card, encoding="utf-8")
        write_json(args.metrics, metrics)
        result.write_curves(args.plots)
        with recording("finetune", args.out):
            run.log_metrics({"best/validation_macro_f1": best["macro_f1"], "best/epoch": best["epoch"] + 1})
            run.log_metrics({f"train/{k}": v for k, v in used.items()})
            examples = tokenizer.batch_decode(
                first_windows(splits["validation"])[:2]["input_ids"], skip_special_tokens=True
            )
            registry_name = tracking.registered_model_name if args.variant == "pretrained" else None
            version = run.log_text_classifier(
                args.out, examples, TextClassifier(), registry_name, windows.max_length, windows.max_windows
            )
            # The folder names the registered version it became (evaluate reads it to move `champion`).
            write_json(args.out / "training_run.json", {"mlflow_run_id": run.run_id, "model_version": version})
    checkpoints.clear()  # everything is recorded: nothing left to resume
    print(f"finetune: {metrics}")
    return metrics


if __name__ == "__main__":
    relaunch_under_torchrun("stages.finetune")  # TRANSFERPIPE_NPROC=N: N processes
    run_cli(main)
