"""Is a difference between two sets of predictions of the same test documents more than noise: a paired
bootstrap of the accuracy and macro-F1 deltas, for the review of a change (transferpipe.report)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
