"""Test-set metrics against hand-computed values, confusion rows, and the TF-IDF baseline."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tests.helpers import TOPICS, make_corpus
from transferpipe.evaluation import classification_metrics, confusion, confusion_rows, tfidf_logreg
from transferpipe.params import EvaluateParams
from transferpipe.significance import _weighted_scores, paired_bootstrap

# Six examples, three classes. By hand:
#   a: predicted at 0,1 (both right) -> precision 2/2, recall 2/3, F1 0.8,  support 3
#   b: predicted at 2,3 (3 right)    -> precision 1/2, recall 1/2, F1 0.5,  support 2
#   c: predicted at 4,5 (5 right)    -> precision 1/2, recall 1/1, F1 2/3,  support 1
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]
NAMES = ["a", "b", "c"]


def test_classification_metrics_match_hand_computed_values() -> None:
    metrics = classification_metrics(Y_TRUE, Y_PRED, NAMES)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    expected = {
        "a": {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3},
        "b": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "c": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1},
    }
    assert list(metrics["per_class"]) == NAMES
    for name, values in expected.items():
        assert metrics["per_class"][name] == pytest.approx(values), name
        assert isinstance(metrics["per_class"][name]["support"], int)


def test_a_class_absent_from_the_test_set_counts_as_zero_in_macro_f1() -> None:
    metrics = classification_metrics(Y_TRUE, Y_PRED, NAMES + ["d"])
    assert metrics["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)


def test_perfect_predictions() -> None:
    metrics = classification_metrics(Y_TRUE, Y_TRUE, NAMES)
    assert metrics["accuracy"] == 1.0
    assert metrics["macro_f1"] == 1.0


def test_confusion_rows_name_actual_and_predicted() -> None:
    rows = confusion_rows(Y_TRUE, Y_PRED, NAMES)
    assert len(rows) == 6
    assert rows[2] == {"actual": "a", "predicted": "b"}
    assert rows[4] == {"actual": "b", "predicted": "c"}
    assert sum(r["actual"] == r["predicted"] for r in rows) == 4
    with pytest.raises(ValueError):
        confusion_rows(Y_TRUE, Y_PRED[:-1], NAMES)


def test_confusion_matrix_counts() -> None:
    expected = np.array([[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(confusion(Y_TRUE, Y_PRED, range(3)), expected)
    assert confusion(Y_TRUE, Y_PRED, range(4)).shape == (4, 4)


def test_tfidf_logreg_learns_the_topics() -> None:
    rows = make_corpus(n_per_class=30, seed=1)
    label_ids = {name: i for i, name in enumerate(TOPICS)}
    texts = [r["text"] for r in rows]
    labels = [label_ids[r["label"]] for r in rows]
    params = EvaluateParams(batch_size=8, baseline_max_features=1000, baseline_C=10.0)

    predictions = tfidf_logreg(texts[:100], labels[:100], texts[100:], params)

    assert len(predictions) == 50
    accuracy = float(np.mean(predictions == np.array(labels[100:])))
    assert accuracy > 0.8


def test_a_document_is_scored_by_the_mean_logits_of_its_windows() -> None:
    import datasets

    from transferpipe.inference import document_logits

    # Document 0 has three windows, 1 one, 2 two; rows in split order, as window_tokenized writes them.
    split = datasets.Dataset.from_dict({"document": [0, 0, 0, 1, 2, 2], "labels": [2, 2, 2, 0, 1, 1]})
    windows = np.array([[0.0, 0.0, 3.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0, 5, 0], [0, -1, 0]])
    logits, labels = document_logits(windows.astype(np.float32), split)
    np.testing.assert_allclose(logits, [[2.0, 0.0, 1.0], [1.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
    assert labels.tolist() == [2, 0, 1]
    # A shard (a selection) keeps its own documents, in order.
    logits, labels = document_logits(windows[3:].astype(np.float32), split.select(range(3, 6)))
    assert logits.shape == (2, 3) and labels.tolist() == [0, 1]


def test_paired_bootstrap_matches_the_hand_computed_distribution() -> None:
    """Four documents, one fixed by the head: a draw's accuracy delta is K/4 with K ~ Binomial(4, 1/4), so
    P(0) = 0.316, P(<= 1/4) = 0.738, P(<= 2/4) = 0.949, P(<= 3/4) = 0.996: the 2.5th percentile is 0 and the
    97.5th is 3/4. The interval includes 0, so the verdict is within noise."""
    deltas = paired_bootstrap([0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 1, 1], num_labels=2)
    acc = deltas["accuracy"]
    assert (acc.base, acc.head, acc.delta, acc.low, acc.high) == (0.75, 1.0, 0.25, 0.0, 0.75)
    assert acc.verdict == "within noise"
    # Macro-F1 at the test set as it is equals classification_metrics' (sklearn's) value.
    f1 = deltas["macro_f1"]
    assert f1.base == pytest.approx(classification_metrics([0, 0, 1, 1], [0, 0, 1, 0], ["a", "b"])["macro_f1"])
    assert f1.head == 1.0


def test_paired_bootstrap_macro_f1_under_weights_equals_sklearn_on_the_resampled_set() -> None:
    """A draw weights documents by how often they were drawn; the score equals sklearn's on the expanded set."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 60)
    pred = np.where(rng.random(60) < 0.7, y, rng.integers(0, 4, 60))
    counts = rng.multinomial(60, np.full(60, 1 / 60), size=5).astype(float)
    ours = _weighted_scores("macro_f1", y, pred, 4, counts)
    for row, score in zip(counts.astype(int), ours, strict=True):
        idx = np.repeat(np.arange(60), row)
        assert score == pytest.approx(f1_score(y[idx], pred[idx], labels=range(4), average="macro", zero_division=0))
