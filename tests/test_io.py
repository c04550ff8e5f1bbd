"""Atomic outputs: a folder is replaced only when its block succeeds, and no temporary sibling is left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from transferpipe.io import atomic_dir, read_json, write_csv, write_json, write_text_atomic


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_dir_creates_a_new_folder(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "model"
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        assert not out.exists()  # nothing shows at the real path while the block runs
        (tmp / "weights.bin").write_text("new")
    assert (out / "weights.bin").read_text() == "new"
    assert siblings(out) == ["model"]


def test_atomic_dir_replaces_an_existing_folder_on_success(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.bin").write_text("new")
        assert (out / "old.bin").exists()  # the old output stays until the block succeeds
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    assert siblings(out) == ["model"]


def test_atomic_dir_replaces_a_file_at_the_path(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.write_text("a stray file")
    with atomic_dir(out) as tmp:
        (tmp / "new.bin").write_text("new")
    assert out.is_dir() and (out / "new.bin").read_text() == "new"


def test_atomic_dir_leaves_the_old_folder_on_error(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with pytest.raises(RuntimeError, match="crash"), atomic_dir(out) as tmp:
        (tmp / "half.bin").write_text("half")
        raise RuntimeError("crash")
    assert sorted(p.name for p in out.iterdir()) == ["old.bin"]
    assert (out / "old.bin").read_text() == "old"
    assert siblings(out) == ["model"]


def test_atomic_dir_leaves_nothing_on_error_without_an_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "half.bin").write_text("half")
        raise KeyboardInterrupt
    assert siblings(out) == []


def test_write_json_round_trips_and_ends_with_a_newline(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "test.json"
    data = {"test": {"accuracy": 0.5, "macro_f1": 0.25}, "labels": ["a", "b"]}
    write_json(path, data)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert json.loads(text) == data == read_json(path)
    assert list(json.loads(text)) == ["test", "labels"]  # key order kept
    assert siblings(path) == ["test.json"]


def test_write_json_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json(path, {"a": 1})
    write_json(path, {"b": 2})
    assert read_json(path) == {"b": 2}


def test_write_text_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert siblings(path) == ["m.json"]


def test_write_csv_formats_floats_and_leaves_missing_values_empty(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "train.csv"
    rows = [
        {"step": 1, "loss": 2.123456789, "learning_rate": 1e-4},
        {"step": 2, "loss": None},
        {"step": 3, "loss": 0.5, "learning_rate": 0.0, "extra": "ignored"},
    ]
    write_csv(path, rows, columns=["step", "loss", "learning_rate"])
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert lines == ["step,loss,learning_rate\n", "1,2.12346,0.0001\n", "2,,\n", "3,0.5,0\n"]


def test_write_csv_with_no_rows_writes_the_header(tmp_path: Path) -> None:
    path = tmp_path / "eval.csv"
    write_csv(path, [], columns=["step", "loss"])
    assert path.read_text(encoding="utf-8") == "step,loss\n"
