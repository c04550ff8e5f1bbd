"""evaluate: test-set metrics of the fine-tuned model beside a TF-IDF + logistic-regression baseline.

Both are trained on the same training labels and scored with scikit-learn on the same test split. The
test metrics are also added to the finetune stage's MLflow run, and the registered model's alias `champion`
moves to the fine-tuned model's version when its test macro-F1 beats the current champion's.

Inputs:  --data prepared splits (raw text, for the baseline), --tokenized test split, --model folder
Outputs: --metrics JSON (DVC metrics: accuracy, macro-F1), --plots folder (DVC plots, per model:
         confusion_<model>.json {actual, predicted} rows, per_class_<model>.json precision / recall / F1)
Params:  evaluate, tracking
Run:     python -m stages.evaluate --params params.yaml --data data/prepared --tokenized data/tokenized \
             --model models/finetuned --metrics metrics/evaluate.json --plots plots/evaluate
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
from transformers import AutoModelForSequenceClassification

from transferpipe.data import read_prepared
from transferpipe.errors import run_cli
from transferpipe.evaluation import classification_metrics, confusion_rows, per_class_rows, tfidf_logreg
from transferpipe.finetuning import collator_for, predict_logits
from transferpipe.io import atomic_dir, read_json, write_json
from transferpipe.modeling import pick_device
from transferpipe.params import EvaluateParams, TrackingParams, load_section
from transferpipe.tokenization import load_tokenizer
from transferpipe.tracking import check_tracking, log_to_existing_run, promote_champion


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenized", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args(argv)

    params = load_section(args.params, "evaluate", EvaluateParams)
    tracking = load_section(args.params, "tracking", TrackingParams)
    check_tracking(tracking)
    splits, label_names, _ = read_prepared(args.data)
    test = datasets.load_from_disk(str(args.tokenized))["test"]
    y_true = test["labels"]

    device = pick_device()
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(str(args.model))
    logits = predict_logits(model, test, collator_for(tokenizer, device), params.batch_size, device)
    predictions = {
        "finetuned": logits.argmax(-1).tolist(),
        "tfidf_logreg": tfidf_logreg(
            splits["train"]["text"].tolist(), splits["train"]["label"].tolist(), splits["test"]["text"].tolist(), params
        ).tolist(),
    }
    scores = {name: classification_metrics(y_true, pred, label_names) for name, pred in predictions.items()}
    metrics = {"test": {name: {k: s[k] for k in ("accuracy", "macro_f1")} for name, s in scores.items()}}

    write_json(args.metrics, metrics)
    with atomic_dir(args.plots) as tmp:
        for name, pred in predictions.items():
            write_json(tmp / f"confusion_{name}.json", confusion_rows(y_true, pred, label_names))
            write_json(tmp / f"per_class_{name}.json", per_class_rows(scores[name]))

    # In MLflow the fine-tuned model's scores are test/<metric>, the baseline's test/<baseline>_<metric>.
    training_run = read_json(args.model / "training_run.json")
    mirrored = {
        f"test/{key}" if name == "finetuned" else f"test/{name}_{key}": value
        for name, values in metrics["test"].items()
        for key, value in values.items()
    }
    log_to_existing_run(training_run.get("mlflow_run_id"), mirrored, tracking)
    print(f"evaluate: {mirrored}")
    verdict = promote_champion(training_run.get("model_version"), mirrored["test/macro_f1"], tracking)
    if verdict:
        print(verdict)
    return metrics


if __name__ == "__main__":
    run_cli(main)
