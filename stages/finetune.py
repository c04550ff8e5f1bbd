"""finetune: the pretrained encoder plus a classification head, trained on the labeled train split.

Separate learning rates for encoder and head, warmup then linear decay, optional freezing, evaluation on
validation every epoch with early stopping on macro-F1, the best epoch's weights kept. The saved model
carries its label names: transformers.pipeline("text-classification", model=<out>) returns them.

Inputs:  --data tokenized datasets (train, validation, labels.json), --pretrained encoder folder
Outputs: --out save_pretrained folder (+ training_run.json: MLflow run id and registered model version),
         --metrics JSON, --plots folder
Params:  finetune, tracking
Run:     python -m stages.finetune --params params.yaml --data data/tokenized --pretrained models/pretrained \
             --out models/finetuned --metrics metrics/finetune.json --plots plots/finetune
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets

from transferpipe.errors import run_cli
from transferpipe.finetuning import finetune
from transferpipe.io import atomic_dir, read_json, write_json
from transferpipe.modeling import count_parameters, pick_device, sequence_classifier
from transferpipe.params import FinetuneParams, TrackingParams, load_section, to_flat_dict
from transferpipe.tokenization import load_tokenizer
from transferpipe.tracking import check_tracking, start_run
from transferpipe.training import seed_everything


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m stages.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--pretrained", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args(argv)

    params = load_section(args.params, "finetune", FinetuneParams)
    tracking = load_section(args.params, "tracking", TrackingParams)
    check_tracking(tracking)
    seed_everything(params.seed)
    splits = datasets.load_from_disk(str(args.data))
    label_names = read_json(args.data / "labels.json")
    tokenizer = load_tokenizer(args.pretrained)
    model = sequence_classifier(args.pretrained, label_names, params.classifier_dropout, params.classifier_pooling)
    device = pick_device()
    pretrain_run = read_json(args.pretrained / "training_run.json").get("mlflow_run_id")

    tags = {"transferpipe.pretrain_run_id": pretrain_run} if pretrain_run else {}
    with start_run("finetune", tracking, tags) as run:
        run.log_params(
            {
                **to_flat_dict(params, "finetune"),
                "parameters": count_parameters(model),
                "labels": ",".join(label_names),
                "device": device.type,
            }
        )
        result = finetune(model, tokenizer, splits, label_names, params, run, device)
        best = result.best
        metrics = {
            "validation": {"macro_f1": best["macro_f1"], "accuracy": best["accuracy"], "loss": best["loss"]},
            "train": {
                "best_epoch": best["epoch"] + 1,
                "steps": result.steps,
                "examples_per_second": round(result.examples_per_second, 1),
            },
        }
        run.log_metrics({"best/validation_macro_f1": best["macro_f1"], "best/epoch": best["epoch"] + 1})
        examples = tokenizer.batch_decode(splits["validation"][:2]["input_ids"], skip_special_tokens=True)
        with atomic_dir(args.out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # Logged and registered before the folder is in place: its training_run.json names the version.
            version = run.log_text_classifier(tmp, examples, tracking.registered_model_name)
            write_json(tmp / "training_run.json", {"mlflow_run_id": run.run_id, "model_version": version})
        write_json(args.metrics, metrics)
        result.write_curves(args.plots)
    print(f"finetune: {metrics}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
