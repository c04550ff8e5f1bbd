"""pretrain: pretraining of the encoder (masked LM, ELECTRA or next-token LM), tracked in MLflow.

From scratch (sizes from the model section) or continued from model.checkpoint (a folder, a hub name, or a
source file that pins a published checkpoint by digest: transferpipe.model_sources). With
pretrain.enabled false the starting encoder is saved untrained, so finetune starts from it directly.
Beside it goes the same architecture untrained (--scratch): the no-pretraining baseline that finetune
also trains, so every run measures what pretraining is worth.

Inputs:  --data packed blocks from tokenize --blocks (mlm_train, mlm_validation), --tokenizer folder
Outputs: --out save_pretrained folder (safetensors + tokenizer + training_run.json),
         --scratch the same architecture with its initial random weights (same layout; with
         pretrain.scratch_baseline false a placeholder, skipped.json, that finetune and evaluate skip),
         --metrics JSON (DVC metrics), --plots folder (train.csv, eval.csv)
Params:  model, pretrain, tracking
Run:     python -m stages.pretrain --params params.yaml --data data/blocks --tokenizer models/tokenizer \
             --out models/pretrained --scratch models/scratch --metrics metrics/pretrain.json --plots plots/pretrain
Resume:  every pretrain.checkpoint_every steps a checkpoint goes to .checkpoints/ (untracked); a rerun
         after a kill continues from it, in the same MLflow run (transferpipe.checkpoint)
Scale:   TRANSFERPIPE_NPROC=N (or torchrun) trains on N processes with DistributedDataParallel; rank 0 alone
         writes the outputs and the one MLflow run (docs/gpu.md: Multi-GPU and multi-node)
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import datasets

from transferpipe.checkpoint import Checkpoints
from transferpipe.distributed import is_main, process_group, relaunch_under_torchrun
from transferpipe.errors import run_cli
from transferpipe.io import atomic_dir, write_json, write_skipped
from transferpipe.model_sources import checkpoint_lineage, resolve_checkpoint
from transferpipe.modeling import count_parameters, pretraining_model, untrained_copy
from transferpipe.params import load_params, to_flat_dict
from transferpipe.pretraining import evaluate_untrained, pretrain, utilization
from transferpipe.tokenization import load_tokenizer
from transferpipe.tracking import check_tracking, lineage_tags, lineage_to_tags, recording, rows_digest, start_run
from transferpipe.training import seed_everything


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m stages.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args(argv)

    every = load_params(args.params)  # every section checked, so a bad param of a later stage fails now
    model_params, params, tracking = every.model, every.pretrain, every.tracking
    check_tracking(tracking)
    seed_everything(params.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    blocks = datasets.load_from_disk(str(args.data))
    # A source file (models/sources/*.yaml) becomes its installed folder, its weights' digest verified.
    model = pretraining_model(replace(model_params, checkpoint=resolve_checkpoint(model_params.checkpoint)), tokenizer)
    started_from = checkpoint_lineage(model_params.checkpoint)  # recorded in metrics, the encoder and MLflow
    scratch = untrained_copy(model, params.seed) if params.scratch_baseline else None  # the no-pretraining baseline

    # Killed earlier with these params and inputs: resume from the last checkpoint, in the same MLflow run.
    checkpoints = Checkpoints.for_stage(
        "pretrain", "pretrain", {"model": model_params, "pretrain": params}, [args.data, args.tokenizer],
        params.checkpoint_every, Path(__file__),
    )  # fmt: skip
    tags = lineage_tags(args.data) | lineage_to_tags({"checkpoint": started_from})
    # Under torchrun every rank trains; rank 0 alone opens the MLflow run (is_main() once in the group).
    with (
        process_group(params.device, "pretrain.device") as device,
        start_run("pretrain", tracking, tags, primary=is_main(), resume=checkpoints.run_id) as run,
    ):
        run.log_params(
            {
                **to_flat_dict(model_params, "model"),
                **to_flat_dict(params, "pretrain"),
                "parameters": count_parameters(model),
                "device": device.type,
            }
        )
        run.log_datasets(args.data, {name: (rows_digest(blocks[name]), len(blocks[name]), context)
                                     for name, context in (("mlm_train", "training"), ("mlm_validation", "validation"))
                                     if params.enabled or context == "validation"})  # fmt: skip
        if params.enabled:
            result = pretrain(model, tokenizer, blocks, params, run, device, checkpoints)
        else:
            result = evaluate_untrained(model, tokenizer, blocks, params, device)
        # Model GFLOP/s against the GPU's bf16 peak or the CPU's measured matrix-product ceiling (transferpipe.flops).
        block_size = len(blocks["mlm_train"][0]["input_ids"]) if params.enabled else 0
        used = utilization(model, params, block_size, result.tokens_per_second, device) if params.enabled else {}
        metrics = {
            "eval": {k: v for k, v in result.best.items() if k not in ("step", "epoch")},  # loss, perplexity, ...
            "train": {
                "steps": result.steps,
                "tokens_per_second": round(result.tokens_per_second, 1),
                "skipped_steps": result.skipped_steps,
                "parameters": count_parameters(model),
                "checkpoint_seconds": round(result.checkpoint_seconds, 2),
                **used,
            },
            **({"checkpoint": started_from} if started_from else {}),
        }
        if not is_main():
            return metrics  # rank 0 writes the outputs
        # Outputs first, complete on disk; then MLflow, whose failure must not cost the trained model.
        with atomic_dir(args.out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "training_run.json", {"mlflow_run_id": run.run_id})
            if started_from:
                write_json(tmp / "checkpoint.json", started_from)  # finetune tags its runs with it
        if scratch is None:
            write_skipped(args.scratch, "pretrain.scratch_baseline is false")
        else:
            with atomic_dir(args.scratch) as tmp:
                scratch.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                write_json(tmp / "training_run.json", {"mlflow_run_id": None})
        write_json(args.metrics, metrics)
        result.write_curves(args.plots)
        with recording("pretrain", args.out):
            run.log_metrics({f"eval/{k}": v for k, v in metrics["eval"].items()})
            run.log_metrics({f"train/{k}": v for k, v in used.items()})
            run.log_artifacts(args.out, "model")
    checkpoints.clear()  # everything is recorded: nothing left to resume
    print(f"pretrain: {metrics}")
    return metrics


if __name__ == "__main__":
    relaunch_under_torchrun("stages.pretrain")  # TRANSFERPIPE_NPROC=N: N processes
    run_cli(main)
