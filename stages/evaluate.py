"""evaluate: test-set metrics of the fine-tuned models beside a TF-IDF + logistic-regression baseline.

The fine-tuned models (pretrained, and trained from scratch) and the baseline learn from the same training
labels and are scored with scikit-learn on the same test documents: a fine-tuned model's prediction for a
document is the mean of its logits over the document's windows (tokenize.max_windows), the baseline reads
the whole text. Each fine-tuned model's test metrics are also added to its finetune MLflow run, and the
registered model's alias `champion` moves to a registered version when its test macro-F1 beats the current
champion's.

Inputs:  --data prepared splits (raw text, for the baseline), --tokenized test split, --models folders
         (each named after its variant: models/finetuned/pretrained ...)
Outputs: --metrics JSON (DVC metrics: accuracy and macro-F1 per model), --plots folder (DVC plots:
         models.json, one row per model; per model confusion_<model>.json {actual, predicted} rows and
         per_class_<model>.json precision / recall / F1)
Params:  evaluate, tracking, finetune.labels_per_class and finetune.seed (the baseline's training labels)
Run:     python -m stages.evaluate --params params.yaml --data data/prepared --tokenized data/tokenized \
             --models models/finetuned/pretrained models/finetuned/scratch --metrics metrics/evaluate.json \
             --plots plots/evaluate
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
from transformers import AutoModelForSequenceClassification

from transferpipe.data import read_prepared
from transferpipe.errors import UserError, run_cli
from transferpipe.evaluation import classification_metrics, confusion_rows, per_class_rows, tfidf_logreg
from transferpipe.finetuning import collator_for, document_logits, per_class_indices, predict_logits
from transferpipe.io import atomic_dir, read_json, write_json
from transferpipe.modeling import pick_device
from transferpipe.params import EvaluateParams, FinetuneParams, TrackingParams, load_section
from transferpipe.tokenization import load_tokenizer
from transferpipe.tracking import check_tracking, log_to_existing_run, promote_champion

BASELINE = "tfidf_logreg"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenized", type=Path, required=True)
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args(argv)
    names = [folder.name for folder in args.models]
    if len(set(names)) < len(names) or BASELINE in names:
        raise UserError(f"--models folders need distinct names other than {BASELINE!r}: got {names}")

    params = load_section(args.params, "evaluate", EvaluateParams)
    tracking = load_section(args.params, "tracking", TrackingParams)
    selection = load_section(args.params, "finetune", FinetuneParams)  # only labels_per_class and seed
    check_tracking(tracking)
    splits, label_names, _ = read_prepared(args.data)
    test = datasets.load_from_disk(str(args.tokenized))["test"]

    device = pick_device()
    predictions = {}
    for folder in args.models:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder))
        windows = predict_logits(model, test, collator_for(load_tokenizer(folder), device), params.batch_size, device)
        logits, y_true = document_logits(windows, test)  # a document: the mean logits of its windows
        predictions[folder.name] = logits.argmax(-1).tolist()
    y_true = y_true.tolist()
    # The baseline learns from the same training labels as the fine-tuned models (finetune.labels_per_class).
    train = splits["train"].iloc[
        per_class_indices(splits["train"]["label"].tolist(), selection.labels_per_class, selection.seed)
    ]
    predictions[BASELINE] = tfidf_logreg(
        train["text"].tolist(), train["label"].tolist(), splits["test"]["text"].tolist(), params
    ).tolist()
    scores = {name: classification_metrics(y_true, pred, label_names) for name, pred in predictions.items()}
    metrics = {"test": {name: {k: s[k] for k in ("accuracy", "macro_f1")} for name, s in scores.items()}}

    write_json(args.metrics, metrics)
    with atomic_dir(args.plots) as tmp:
        write_json(tmp / "models.json", [{"model": name, **values} for name, values in metrics["test"].items()])
        for name, pred in predictions.items():
            write_json(tmp / f"confusion_{name}.json", confusion_rows(y_true, pred, label_names))
            write_json(tmp / f"per_class_{name}.json", per_class_rows(scores[name]))

    # In MLflow each fine-tuned model's run gets its scores as test/<metric> and the baseline's as
    # test/tfidf_logreg_<metric>, so runs compare on the same keys.
    baseline = {f"test/{BASELINE}_{key}": value for key, value in metrics["test"][BASELINE].items()}
    for folder in args.models:
        training_run = read_json(folder / "training_run.json")
        mirrored = {f"test/{key}": value for key, value in metrics["test"][folder.name].items()} | baseline
        log_to_existing_run(training_run.get("mlflow_run_id"), mirrored, tracking)
        verdict = promote_champion(training_run.get("model_version"), mirrored["test/macro_f1"], tracking)
        if verdict:
            print(verdict)
    print("evaluate: " + "; ".join(f"{name} test macro-F1 {s['macro_f1']:.4f}" for name, s in metrics["test"].items()))
    return metrics


if __name__ == "__main__":
    run_cli(main)
