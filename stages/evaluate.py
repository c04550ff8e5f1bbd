"""evaluate: test-set metrics of the fine-tuned models beside a TF-IDF + logistic-regression baseline.

The fine-tuned models (pretrained, and trained from scratch) and the baseline learn from the same training
labels and are scored with scikit-learn on the same test documents: a fine-tuned model's prediction for a
document is the mean of its logits over the document's windows (tokenize.max_length tokens each, at most
tokenize.max_windows), computed from the raw text by serving.predict_texts, the very function the registered
MLflow model's predict calls; the baseline reads the whole text. Each fine-tuned model's test metrics are
also added to its finetune MLflow run (a store without that run: one warning, MLflow left alone). The
registered version is tagged with the test set's sha256, the label names and its score, and the alias
`champion` moves to the best version scored on this same test set; a champion scored on another stays.

Inputs:  --data prepared splits (raw text), --models folders (each named after its variant:
         models/finetuned/pretrained ...; a placeholder of a model not made, skipped.json, is left out),
         --encoder the pretrained encoder (read only with evaluate.setfit: SetFit trains its own copy)
Outputs: --metrics JSON (DVC metrics: accuracy and macro-F1 per model), --plots folder (DVC plots:
         models.json, one row per model; per model confusion_<model>.json {actual, predicted} rows, one per
         test document in order, and per_class_<model>.json precision / recall / F1; test_set.json, the test
         split's sha256, size and label names, which a review pairs predictions by)
Params:  evaluate, tracking, finetune.labels_per_class and finetune.seed (the baselines' training labels),
         tokenize.max_length and tokenize.max_windows (the windows a document is scored on), finetune.precision
         (SetFit's autocast)
Run:     python -m stages.evaluate --params params.yaml --data data/prepared \
             --models models/finetuned/pretrained models/finetuned/scratch --encoder models/pretrained \
             --metrics metrics/evaluate.json --plots plots/evaluate
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferpipe.data import per_class_indices, read_prepared
from transferpipe.distributed import pick_device
from transferpipe.errors import UserError, run_cli
from transferpipe.evaluation import (
    classification_metrics,
    confusion_rows,
    per_class_rows,
    setfit_predict,
    tfidf_logreg,
)
from transferpipe.inference import predict_texts
from transferpipe.io import atomic_dir, read_json, skipped, write_json
from transferpipe.modeling import load_classifier
from transferpipe.params import load_params
from transferpipe.registry import promote_champion, split_sha256
from transferpipe.tokenization import load_tokenizer
from transferpipe.tracking import Run, check_tracking, log_to_existing_run
from transferpipe.training import use_bf16

BASELINE = "tfidf_logreg"
SETFIT = "setfit"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--encoder", type=Path, help="the pretrained encoder SetFit starts from (evaluate.setfit)")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args(argv)
    names = [folder.name for folder in args.models]
    if len(set(names)) < len(names) or {BASELINE, SETFIT} & set(names):
        raise UserError(f"--models folders need distinct names other than {BASELINE!r} and {SETFIT!r}: got {names}")

    every = load_params(args.params)  # every section checked, before any model is scored
    params, tracking = every.evaluate, every.tracking
    selection = every.finetune  # only labels_per_class and seed
    windowing = every.tokenize  # only max_length and max_windows
    check_tracking(tracking)
    if params.setfit and args.encoder is None:
        raise UserError("params evaluate.setfit: true needs --encoder, the pretrained encoder SetFit starts from")
    splits, label_names, _ = read_prepared(args.data)
    test_texts, y_true = splits["test"]["text"].tolist(), splits["test"]["label"].tolist()
    # The baseline learns from the same training labels as the fine-tuned models (finetune.labels_per_class).
    train = splits["train"].iloc[
        per_class_indices(splits["train"]["label"].tolist(), selection.labels_per_class, selection.seed, label_names)
    ]

    # Placeholders of models the params said not to make (pretrain.scratch_baseline false) are left out.
    args.models = [folder for folder in args.models if not skipped(folder)]
    device = pick_device()
    predictions = {}
    for folder in args.models:
        model = load_classifier(folder)
        # A document: the mean logits of its windows, exactly as the registered model's predict scores it.
        predicted = predict_texts(
            model,
            load_tokenizer(folder),
            test_texts,
            windowing.max_length,
            windowing.max_windows,
            params.batch_size,
            device,
        )
        predictions[folder.name] = predicted.label_ids.tolist()
    predictions[BASELINE] = tfidf_logreg(train["text"].tolist(), train["label"].tolist(), test_texts, params).tolist()
    if params.setfit:
        predictions[SETFIT] = setfit_predict(
            args.encoder,
            train["text"].tolist(),
            train["label"].tolist(),
            test_texts,
            max_length=windowing.max_length,
            max_steps=params.setfit_max_steps,
            seed=selection.seed,
            bf16=use_bf16(selection.precision, device),
        ).tolist()
    scores = {name: classification_metrics(y_true, pred, label_names) for name, pred in predictions.items()}
    metrics = {"test": {name: {k: s[k] for k in ("accuracy", "macro_f1")} for name, s in scores.items()}}

    # The test set the predictions belong to, so a review pairs them only with predictions of the same documents.
    test_sha256 = split_sha256(splits["test"]["text"].tolist(), splits["test"]["label"].tolist())
    write_json(args.metrics, metrics)
    with atomic_dir(args.plots) as tmp:
        write_json(tmp / "test_set.json", {"sha256": test_sha256, "documents": len(y_true), "labels": label_names})
        write_json(tmp / "models.json", [{"model": name, **values} for name, values in metrics["test"].items()])
        for name, pred in predictions.items():
            write_json(tmp / f"confusion_{name}.json", confusion_rows(y_true, pred, label_names))
            write_json(tmp / f"per_class_{name}.json", per_class_rows(scores[name]))

    # In MLflow each fine-tuned model's run gets its scores as test/<metric> and the baselines' as
    # test/tfidf_logreg_<metric> (and test/setfit_<metric>), so runs compare on the same keys.
    baseline = {
        f"test/{name}_{key}": value
        for name in (BASELINE, SETFIT)
        if name in metrics["test"]
        for key, value in metrics["test"][name].items()
    }
    # The champion is chosen only among versions scored on this very test set with these label names.
    for folder in args.models:
        training_run = read_json(folder / "training_run.json")
        run_id = training_run.get("mlflow_run_id")
        mirrored = {f"test/{key}": value for key, value in metrics["test"][folder.name].items()} | baseline
        if not log_to_existing_run(run_id, mirrored, tracking):
            continue  # tracking off, or a store without the training run (it said so): no registry to update
        Run(run_id).log_datasets(args.data, {"test": (test_sha256[:16], len(splits["test"]), "test")})
        verdict = promote_champion(
            training_run.get("model_version"),
            mirrored["test/macro_f1"],
            tracking,
            test_sha256=test_sha256,
            labels=label_names,
            run_id=run_id,
            description=version_description(folder.name, metrics["test"], test_sha256),
        )
        if verdict:
            print(verdict)
    print("evaluate: " + "; ".join(f"{name} test macro-F1 {s['macro_f1']:.4f}" for name, s in metrics["test"].items()))
    return metrics


def version_description(model: str, test: dict[str, dict[str, float]], test_sha256: str) -> str:
    """A registered version's description: its test scores beside the baselines', on which test set."""
    names = {BASELINE: "TF-IDF + logistic regression", SETFIT: "SetFit"}
    lines = [f"Test set sha256 {test_sha256[:16]} (evaluate stage):"]
    for name in [model, *(n for n in (BASELINE, SETFIT) if n in test)]:
        scores = test[name]
        label = "this model" if name == model else names[name]
        lines.append(f"- {label}: macro-F1 {scores['macro_f1']:.4f}, accuracy {scores['accuracy']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
