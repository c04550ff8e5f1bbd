"""Test-set metrics with scikit-learn, the TF-IDF + logistic-regression baseline, and SetFit."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PairedDelta:
    """head - base of one metric on the same test documents, with its paired-bootstrap 95% interval."""

    metric: str
    base: float
    head: float
    low: float
    high: float

    @property
    def delta(self) -> float:
        return self.head - self.base

    @property
    def verdict(self) -> str:
        """better / worse when the interval excludes 0, else within noise."""
        return "better" if self.low > 0 else "worse" if self.high < 0 else "within noise"


def paired_bootstrap(
    y_true: Sequence[int],
    base: Sequence[int],
    head: Sequence[int],
    num_labels: int,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, PairedDelta]:
    """Accuracy and macro-F1 deltas (head - base) of two sets of predictions of the same documents, each with
    the 2.5 and 97.5 percentiles of the delta over `resamples` bootstrap draws of the documents (paired: one
    draw scores both). Macro-F1 as classification_metrics computes it (every label, 0 where undefined)."""
    y_true, base, head = (np.asarray(a, dtype=np.int64) for a in (y_true, base, head))
    if not len(y_true) == len(base) == len(head) > 0:
        raise ValueError(f"paired predictions need the same documents: {len(y_true)}, {len(base)}, {len(head)}")
    rng = np.random.default_rng(seed)
    # One row per draw: how often each document was drawn (a draw of n documents with replacement).
    counts = rng.multinomial(len(y_true), np.full(len(y_true), 1 / len(y_true)), size=resamples).astype(np.float64)
    counts = np.vstack([np.ones(len(y_true)), counts])  # row 0: the test set as it is
    result = {}
    for metric in ("accuracy", "macro_f1"):
        scores = [_weighted_scores(metric, y_true, pred, num_labels, counts) for pred in (base, head)]
        deltas = scores[1][1:] - scores[0][1:]
        low, high = np.percentile(deltas, [2.5, 97.5])
        result[metric] = PairedDelta(metric, float(scores[0][0]), float(scores[1][0]), float(low), float(high))
    return result


def _weighted_scores(
    metric: str, y_true: np.ndarray, pred: np.ndarray, num_labels: int, counts: np.ndarray
) -> np.ndarray:
    """The metric under each row of document weights (counts: draws x documents)."""
    if metric == "accuracy":
        return counts @ (y_true == pred) / counts.sum(axis=1)
    labels = np.arange(num_labels)
    true_is, pred_is = y_true[:, None] == labels, pred[:, None] == labels  # documents x labels
    tp = counts @ (true_is & pred_is)
    fp = counts @ (~true_is & pred_is)
    fn = counts @ (true_is & ~pred_is)
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1.mean(axis=1)
