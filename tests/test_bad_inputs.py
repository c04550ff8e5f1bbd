"""Every user mistake ends the real stage process with exit 2 and one `error:` line, and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import REPO, TINY_PARAMS, make_corpus, tiny_params


def flags(**paths: Path) -> list[str]:
    """`--name path` pairs, the way dvc.yaml passes paths to a stage."""
    return [arg for name, path in paths.items() for arg in (f"--{name}", str(path))]


def run_stage(stage: str, **paths: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", f"stages.{stage}", *flags(**paths)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def assert_nothing_written(folder: Path) -> None:
    """The stage's output folder holds nothing: no outputs and no temporary siblings."""
    leftovers = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert leftovers == []


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# Each case writes its data and returns the params file; the second item is what the error must name.
def unknown_key(tmp: Path) -> Path:
    return tiny_params(tmp, prepare={"sorce": "data/my.csv"})


def wrong_type(tmp: Path) -> Path:
    return tiny_params(tmp, prepare={"seed": "forty-two"})


def exponent_string(tmp: Path) -> Path:
    path = tmp / "params.yaml"
    path.write_text(TINY_PARAMS.read_text().replace("validation_size: 0.2", "validation_size: 2e-1", 1))
    return path


def missing_file(tmp: Path) -> Path:
    return tiny_params(tmp, prepare={"source": str(tmp / "nope.csv")})


def missing_text_column(tmp: Path) -> Path:
    rows = [{"body": r["text"], "label": r["label"]} for r in make_corpus()]
    return tiny_params(tmp, prepare={"source": str(write_csv(tmp / "d.csv", rows))})


def missing_label_column(tmp: Path) -> Path:
    rows = [{"text": r["text"], "topic": r["label"]} for r in make_corpus()]
    return tiny_params(tmp, prepare={"source": str(write_csv(tmp / "d.csv", rows))})


def all_texts_blank(tmp: Path) -> Path:
    rows = [{"text": " " * (i % 3 + 1), "label": r["label"]} for i, r in enumerate(make_corpus())]
    return tiny_params(tmp, prepare={"source": str(write_csv(tmp / "d.csv", rows))})


def class_too_small(tmp: Path) -> Path:
    rows = make_corpus() + [{"text": "rare one", "label": "rare"}, {"text": "rare two", "label": "rare"}]
    return tiny_params(tmp, prepare={"source": str(write_csv(tmp / "d.csv", rows))})


def not_utf8(tmp: Path) -> Path:
    path = tmp / "d.csv"
    path.write_bytes(b"text,label\n" + b"".join(b"caf\xe9 number %d,a\n" % i for i in range(30)))
    return tiny_params(tmp, prepare={"source": str(path)})


def unsupported_suffix(tmp: Path) -> Path:
    path = tmp / "d.tsv"
    path.write_text("text\tlabel\nhello\ta\n", encoding="utf-8")
    return tiny_params(tmp, prepare={"source": str(path)})


def text_column_of_lists(tmp: Path) -> Path:
    path = tmp / "d.parquet"
    pd.DataFrame({"text": [["a", "list"], ["of", "words"]] * 30, "label": ["a", "b"] * 30}).to_parquet(path)
    return tiny_params(tmp, prepare={"source": str(path)})


def hub_without_revision(tmp: Path) -> Path:
    (tmp / "ag_news.yaml").write_text("hf: ag_news\n", encoding="utf-8")
    return tiny_params(tmp, prepare={"source": str(tmp / "ag_news.yaml")})


def old_builtin_name(tmp: Path) -> Path:
    return tiny_params(tmp, prepare={"source": "bbc_news"})


def txt_as_labeled_source(tmp: Path) -> Path:
    (tmp / "d.txt").write_text("one document\nanother\n", encoding="utf-8")
    return tiny_params(tmp, prepare={"source": str(tmp / "d.txt")})


def unlabeled_source_missing(tmp: Path) -> Path:
    return tiny_params(tmp, prepare={"unlabeled_source": str(tmp / "more.txt")})


def later_stage_param(tmp: Path) -> Path:
    return tiny_params(tmp, finetune={"encoder_learning_rate": -5.0e-4})


PREPARE_MISTAKES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "unknown_key": (unknown_key, ("prepare.sorce", "unknown key")),
    "wrong_type": (wrong_type, ("prepare.seed", "integer")),
    "exponent_string": (exponent_string, ("prepare.validation_size", "2.0e-1")),
    "missing_file": (missing_file, ("nope.csv", "not found")),
    "missing_text_column": (missing_text_column, ("'text'", "prepare.text_column")),
    "missing_label_column": (missing_label_column, ("'label'", "prepare.label_column")),
    "all_texts_blank": (all_texts_blank, ("no non-empty texts",)),
    "class_too_small": (class_too_small, ("'rare'", "only 2 examples")),
    "not_utf8": (not_utf8, ("not valid UTF-8",)),
    "unsupported_suffix": (unsupported_suffix, ("d.tsv", "is not a .csv, .jsonl (either may end in")),
    "text_column_of_lists": (text_column_of_lists, ("column 'text' holds lists", "prepare.text_column")),
    "hub_without_revision": (hub_without_revision, ("ag_news", "revision")),
    "old_builtin_name": (old_builtin_name, ("bbc_news not found", "data/sources/bbc_news.yaml")),
    "txt_as_labeled_source": (txt_as_labeled_source, ("d.txt", "no labels", "prepare.unlabeled_source")),
    "unlabeled_source_missing": (unlabeled_source_missing, ("more.txt", "not found")),
    "later_stage_param": (later_stage_param, ("finetune.encoder_learning_rate", "-0.0005", "> 0")),
}


@pytest.mark.parametrize("mistake", list(PREPARE_MISTAKES))
def test_prepare_mistake(tmp_path: Path, mistake: str) -> None:
    setup, words = PREPARE_MISTAKES[mistake]
    work = tmp_path / "work"
    result = run_stage("prepare", params=setup(tmp_path), out=work / "prepared", stats=work / "data.json")
    assert_user_error(result, *words)
    assert_nothing_written(work)


def test_tokenize_with_blocks_and_out_the_same_folder(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = run_stage(
        "tokenize",
        params=tiny_params(tmp_path),
        data=tmp_path / "prepared",
        tokenizer=work / "tokenizer",
        blocks=work / "tokenized",
        out=work / "tokenized",
    )
    assert_user_error(result, "--blocks and --out")
    assert_nothing_written(work)


def test_tokenize_without_prepared_data_says_run_prepare(tmp_path: Path) -> None:
    empty = tmp_path / "prepared"
    empty.mkdir()
    work = tmp_path / "work"
    result = run_stage(
        "tokenize",
        params=tiny_params(tmp_path),
        data=empty,
        tokenizer=work / "tokenizer",
        blocks=work / "blocks",
        out=work / "tokenized",
    )
    assert_user_error(result, "prepare")
    assert_nothing_written(work)


def test_a_model_size_mistake_fails_the_first_stage_not_pretrain(tmp_path: Path, tiny_csv: Path) -> None:
    """Heads that do not divide the width would crash inside pretrain; prepare, the first stage, refuses it."""
    params = tiny_params(
        tmp_path,
        prepare={"source": str(tiny_csv)},
        model={"hidden_size": 30, "num_attention_heads": 4},
        tracking={"enabled": False},
    )
    work = tmp_path / "work"
    result = run_stage("prepare", params=params, out=work / "prepared", stats=work / "data.json")
    assert_user_error(result, "model.hidden_size", "model.num_attention_heads")
    assert_nothing_written(work)


def test_evaluate_refuses_models_with_the_same_name_before_reading_anything(tmp_path: Path) -> None:
    """Each model's metrics are keyed by its folder name: two folders both called `pretrained` would
    overwrite each other's scores."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    work = tmp_path / "out"
    command = [sys.executable, "-m", "stages.evaluate", "--params", str(tiny_params(tmp_path))]
    command += ["--data", str(tmp_path / "p")]
    command += ["--models", str(tmp_path / "a/pretrained"), str(tmp_path / "b/pretrained")]
    command += ["--metrics", str(work / "evaluate.json"), "--plots", str(work / "plots")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert_user_error(result, "--models", "distinct names")
    assert_nothing_written(work)
