"""Every numeric param declares its range, and every stage checks every section before any work: a value out
of range ends the stage with exit 2 and one line naming the key, the value and the range, and writes nothing.

The table walks the repository's params.yaml, so a new numeric param without a range fails here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages import evaluate, finetune, pretrain, tokenize
from tests.helpers import REPO, TINY_PARAMS, make_corpus
from transferpipe.data import per_class_indices
from transferpipe.errors import UserError, run_cli
from transferpipe.params import SECTIONS, TokenizeParams, declared_bounds, declared_range, load_params
from transferpipe.tokenization import SPECIAL_TOKENS, train_wordpiece

PARAMS = REPO / "params.yaml"


def admits_number(hint: Any) -> bool:
    return hint in (int, float) or any(option in (int, float) for option in typing.get_args(hint))


def bounds(section: str, key: str) -> dict[str, float]:
    return declared_bounds(SECTIONS[section].__pydantic_fields__[key])


def out_of_range(section: str, key: str) -> list[int | float | None]:
    """One value just below the declared range and, where it has an upper bound, one just above (None: the key
    declares no range)."""
    declared = bounds(section, key)
    if not declared:
        return [None]
    hint = typing.get_type_hints(SECTIONS[section])[key]
    integer = int in (hint, *typing.get_args(hint))
    kind, step = (int, 1) if integer else (float, 0.001)
    outside = {"gt": 0, "ge": -step, "lt": 0, "le": step}  # the bound itself where it is excluded, else one step out
    return [kind(round(limit + outside[op], 6)) for op, limit in declared.items()]


def numeric_keys() -> list[tuple[str, str]]:
    """Every key of params.yaml with a number for its value or a type that takes one (bools excluded)."""
    keys = []
    for section, values in yaml.safe_load(PARAMS.read_text()).items():
        hints = typing.get_type_hints(SECTIONS[section])
        for key, value in values.items():
            if (isinstance(value, int | float) and not isinstance(value, bool)) or admits_number(hints[key]):
                keys.append((section, key))
    return keys


CASES = [(section, key, value) for section, key in numeric_keys() for value in out_of_range(section, key)]


def params_with(tmp_path: Path, changes: dict[str, dict[str, Any]]) -> Path:
    """The repository's params.yaml with these changes, written to tmp_path/params.yaml."""
    params = yaml.safe_load(PARAMS.read_text())
    for section, values in changes.items():
        params[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# Each stage's path flags: inputs that do not exist, outputs that must not appear (all inside tmp_path).
STAGES: dict[str, tuple[Callable, dict[str, str]]] = {
    "tokenize": (tokenize.main, {"data": "none", "tokenizer": "tokenizer", "blocks": "blocks", "out": "tokenized"}),
    "pretrain": (
        pretrain.main,
        {
            "data": "none",
            "tokenizer": "none",
            "out": "pretrained",
            "scratch": "scratch",
            "metrics": "m.json",
            "plots": "p",
        },
    ),
    "finetune": (finetune.main, {"data": "none", "encoder": "none", "out": "ft", "metrics": "m.json", "plots": "p"}),
    "evaluate": (evaluate.main, {"data": "none", "models": "models/pretrained", "metrics": "m.json", "plots": "p"}),
}


def stage_argv(stage: str, params: Path) -> list[str]:
    paths = STAGES[stage][1]
    return [
        "--params",
        str(params),
        *(arg for flag, name in paths.items() for arg in (f"--{flag}", str(params.parent / name))),
    ]


def run_stage_in_process(stage: str, params: Path, capsys: pytest.CaptureFixture) -> str:
    """The stage's main through run_cli, as `python -m stages.<stage>` runs it; returns its one stderr line
    after checking exit 2, no stdout and nothing written beside the params file."""
    main = STAGES[stage][0]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, stage_argv(stage, params))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert sorted(p.name for p in params.parent.rglob("*")) == ["params.yaml"]
    return err.splitlines()[0]


@pytest.mark.parametrize(("section", "key", "value"), CASES, ids=[f"{s}.{k}={v}" for s, k, v in CASES])
def test_out_of_range_value_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, section: str, key: str, value: int | float | None
) -> None:
    assert value is not None, f"{section}.{key} declares no range: give it one with Field(default, ge=..., ...)"
    # tokenize is the first stage after prepare, so it checks every section a later stage reads.
    line = run_stage_in_process("tokenize", params_with(tmp_path, {section: {key: value}}), capsys)
    allowed = declared_range(SECTIONS[section].__pydantic_fields__[key])
    assert line == f"error: params {section}.{key}: {value!r} must be {allowed}", line


# The values the issue measured crashing, reversing the gradient or reporting loss 0 deep inside a stage.
MEASURED = {
    ("pretrain", "learning_rate", -0.001): "-0.001 must be > 0",
    ("pretrain", "batch_size", 0): "0 must be >= 1",
    ("pretrain", "max_grad_norm", -1.0): "-1.0 must be > 0",
    ("pretrain", "mlm_probability", 0.0): "0.0 must be in (0, 1)",
    ("pretrain", "eval_blocks", 0): "0 must be >= 1",
    ("pretrain", "max_steps", 0): "0 must be >= 1",
    ("pretrain", "eval_every", 0): "0 must be >= 1",
    ("tokenize", "block_size", 0): "0 must be >= 2",
    ("model", "num_hidden_layers", 0): "0 must be >= 1",
    ("tokenize", "max_windows", 0): "0 must be >= 1 or null",
    ("finetune", "labels_per_class", 0): "0 must be >= 1 or 'all'",
}


@pytest.mark.parametrize(("section", "key", "value"), list(MEASURED), ids=[f"{s}.{k}" for s, k, _ in MEASURED])
def test_measured_bad_values_are_refused(tmp_path: Path, section: str, key: str, value: float) -> None:
    with pytest.raises(UserError) as exc:
        load_params(params_with(tmp_path, {section: {key: value}}))
    assert str(exc.value) == f"params {section}.{key}: {MEASURED[section, key, value]}"


def test_the_table_covers_every_numeric_field() -> None:
    """Fields whose params.yaml value is null (num_proc) are in the table too, by their type."""
    fields = {
        (section, f.name)
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if admits_number(typing.get_type_hints(cls)[f.name])
    }
    assert fields == set(numeric_keys())


@pytest.mark.parametrize("path", [PARAMS, TINY_PARAMS], ids=lambda p: p.name)
def test_repo_params_pass_every_check(path: Path) -> None:
    load_params(path)


def test_vocab_size_floor_is_the_special_tokens_and_one_more() -> None:
    assert declared_bounds(TokenizeParams.__pydantic_fields__["vocab_size"]) == {"ge": len(SPECIAL_TOKENS) + 1}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_checks_the_last_stages_params(tmp_path: Path, capsys: pytest.CaptureFixture, stage: str) -> None:
    line = run_stage_in_process(stage, params_with(tmp_path, {"evaluate": {"baseline_C": 0.0}}), capsys)
    assert line == "error: params evaluate.baseline_C: 0.0 must be > 0"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"tokenize": {"max_length": 100000}, "model": {"max_position_embeddings": 512}},
            "error: params tokenize.max_length: 100000 must be <= model.max_position_embeddings (512)",
        ),
        (
            {"tokenize": {"block_size": 1024}},
            "error: params tokenize.block_size: 1024 must be <= model.max_position_embeddings (512)",
        ),
        (
            {"prepare": {"validation_size": 0.5, "test_size": 0.5}},
            "error: params prepare.validation_size: 0.5 must be < 1 - prepare.test_size (0.5), "
            "leaving rows to train on",
        ),
        (
            {"model": {"architecture": "bert", "hidden_size": 250, "num_attention_heads": 4}},
            "error: params model.hidden_size: 250 must be a multiple of model.num_attention_heads (4)",
        ),
        (
            # 20 / 4 = 5 dimensions per head: BERT takes it, ModernBERT's rotary positions do not.
            {"model": {"architecture": "modernbert", "hidden_size": 20, "num_attention_heads": 4}},
            "error: params model.hidden_size: 20 must be a multiple of model.num_attention_heads (4), with an even "
            "size per head (modernbert's rotary positions)",
        ),
        (
            {"finetune": {"freeze_layers": 5}},
            "error: params finetune.freeze_layers: 5 must be <= model.num_hidden_layers (4)",
        ),
    ],
    ids=["max_length", "block_size", "split_sizes", "heads", "rotary_heads", "freeze_layers"],
)
def test_cross_checks_fail_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, changes: dict, expected: str
) -> None:
    # These limits apply to an encoder built here (model.checkpoint null), not to the default's checkpoint.
    changes = {**changes, "model": {"checkpoint": None, **changes.get("model", {})}}
    assert run_stage_in_process("tokenize", params_with(tmp_path, changes), capsys) == expected


@pytest.mark.parametrize(
    "model",
    [
        {"architecture": "bert", "hidden_size": 20, "num_attention_heads": 4},
        # The LSTM has no heads and no positions; a checkpoint brings its own sizes.
        {"architecture": "lstm", "hidden_size": 250, "max_position_embeddings": 8, "num_hidden_layers": 1},
        {"checkpoint": "models/somewhere", "max_position_embeddings": 8, "num_hidden_layers": 1},
    ],
    ids=["bert_odd_heads", "lstm", "checkpoint"],
)
def test_cross_checks_that_do_not_apply(tmp_path: Path, model: dict) -> None:
    load_params(params_with(tmp_path, {"model": model, "finetune": {"freeze_layers": 1}}))


def run_module(stage: str, params: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", f"stages.{stage}", *stage_argv(stage, params)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("stage", "changes", "expected"),
    [
        (
            "pretrain",
            {"pretrain": {"learning_rate": -0.001}},
            "error: params pretrain.learning_rate: -0.001 must be > 0",
        ),
        # A later stage's param fails an earlier stage: minutes before finetune would have run.
        ("tokenize", {"finetune": {"batch_size": 0}}, "error: params finetune.batch_size: 0 must be >= 1"),
    ],
)
def test_real_stage_process_exits_2_with_one_line(tmp_path: Path, stage: str, changes: dict, expected: str) -> None:
    result = run_module(stage, params_with(tmp_path, changes))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [expected]
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["params.yaml"]


def test_labels_per_class_above_the_smallest_class() -> None:
    names = [row["label"] for row in make_corpus()]  # 12 of each of 5 classes
    labels = [sorted(set(names)).index(name) for name in names]
    assert len(per_class_indices(labels, 12, seed=0)) == 60
    with pytest.raises(UserError) as exc:
        per_class_indices(labels, 13, seed=0)
    assert str(exc.value).startswith("params finetune.labels_per_class: 13 is more than the smallest class")
    assert "12 examples" in str(exc.value) and "use at most 12" in str(exc.value)
    fewer = [label for i, label in enumerate(labels) if not (label == 3 and i % 2)]  # class 3 loses some
    with pytest.raises(UserError, match=rf"class 3: {fewer.count(3)} examples"):
        per_class_indices(fewer, 12, seed=0)


def test_vocab_size_below_the_alphabet() -> None:
    texts = [row["text"] for row in make_corpus()]
    with pytest.raises(UserError) as exc:
        train_wordpiece(texts, vocab_size=40, min_frequency=1, lowercase=True)
    message = str(exc.value)
    assert message.startswith("params tokenize.vocab_size: 40 is below what the text needs: its ")
    least = int(re.search(r"use at least (\d+)$", message).group(1))
    assert least > 40
    # The suggested size learns a subword beyond the characters; one less learns none and is refused.
    assert len(train_wordpiece(texts, vocab_size=least, min_frequency=1, lowercase=True)) == least
    with pytest.raises(UserError, match="use at least"):
        train_wordpiece(texts, vocab_size=least - 1, min_frequency=1, lowercase=True)
