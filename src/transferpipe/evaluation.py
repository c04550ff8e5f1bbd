"""Test-set metrics with scikit-learn, the TF-IDF + logistic-regression baseline, and SetFit."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.pipeline import make_pipeline

from transferpipe.errors import UserError
from transferpipe.modeling import quiet_loading
from transferpipe.params import EvaluateParams


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], label_names: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision / recall / F1 / support, keyed by label name."""
    labels = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(label_names)
        },
    }


def confusion_rows(y_true: Sequence[int], y_pred: Sequence[int], label_names: list[str]) -> list[dict]:
    """One {actual, predicted} row per example: the input of DVC's confusion template."""
    return [{"actual": label_names[t], "predicted": label_names[p]} for t, p in zip(y_true, y_pred, strict=True)]


def per_class_rows(scores: dict) -> list[dict]:
    """classification_metrics()["per_class"] as rows {label, precision, recall, f1, support}: a DVC bar plot."""
    return [{"label": name, **values} for name, values in scores["per_class"].items()]


def confusion(y_true: Sequence, y_pred: Sequence, labels: Sequence) -> np.ndarray:
    """Counts of (actual, predicted) in the order of `labels` (ids or names); absent labels count zero."""
    return confusion_matrix(y_true, y_pred, labels=list(labels))


def tfidf_logreg(
    train_texts: list[str], train_labels: list[int], test_texts: list[str], params: EvaluateParams
) -> np.ndarray:
    """Predictions of TF-IDF (word 1-2 grams, sublinear tf) + logistic regression trained on the same labels."""
    model = make_pipeline(
        TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), max_features=params.baseline_max_features),
        LogisticRegression(C=params.baseline_C, max_iter=2000),
    )
    model.fit(train_texts, train_labels)
    return model.predict(test_texts)


def setfit_predict(
    encoder_dir: Path,
    train_texts: list[str],
    train_labels: list[int],
    test_texts: list[str],
    *,
    max_length: int,
    max_steps: int,
    seed: int,
    bf16: bool,
) -> np.ndarray:
    """Predictions of SetFit (Tunstall et al. 2022, through the `setfit` library) on the same labels: the encoder,
    mean-pooled (as sentence-transformers pools), fine-tuned contrastively on pairs of the training texts (same
    label: similar; 20 pairs per text, at most max_steps batches of 16), then a logistic regression on its
    embeddings. Texts are truncated to max_length tokens, for training and prediction alike."""
    try:
        from setfit import SetFitModel, Trainer, TrainingArguments
    except ImportError:
        raise UserError("params evaluate.setfit: true needs the setfit package: pip install -e '.[setfit]'") from None
    import datasets

    setfit_logger = logging.getLogger("setfit")
    level = setfit_logger.level
    setfit_logger.setLevel(logging.ERROR)  # "model_head.pkl not found": the head is trained below
    try:
        with quiet_loading():
            model = SetFitModel.from_pretrained(str(encoder_dir))
    finally:
        setfit_logger.setLevel(level)
    model.model_body.max_seq_length = max_length
    train = datasets.Dataset.from_dict({"text": train_texts, "label": train_labels})
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        args = TrainingArguments(
            output_dir=out,
            batch_size=16,
            num_epochs=1,
            num_iterations=20,
            max_steps=max_steps,
            seed=seed,
            use_amp=bf16,
            report_to="none",
            save_strategy="no",
        )
        Trainer(model=model, args=args, train_dataset=train).train()
    return np.asarray(model.predict(test_texts, batch_size=64))
