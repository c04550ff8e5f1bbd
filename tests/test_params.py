"""params.yaml sections load into frozen dataclasses; every user mistake is a UserError naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, TINY_PARAMS, tiny_params
from transferpipe.errors import UserError
from transferpipe.params import (
    SECTIONS,
    EvaluateParams,
    FinetuneParams,
    ModelParams,
    PrepareParams,
    PretrainParams,
    TokenizeParams,
    TrackingParams,
    load_section,
    to_flat_dict,
)

PARAMS_FILES = [REPO / "params.yaml", TINY_PARAMS]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def tiny_with(tmp_path: Path, old: str, new: str) -> Path:
    """The tiny profile with one line of YAML replaced verbatim (to test what PyYAML itself makes of it)."""
    text = TINY_PARAMS.read_text()
    assert old in text
    return write(tmp_path, text.replace(old, new, 1))


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_key_of_the_repo_params_loads(path: Path, section: str) -> None:
    raw = yaml.safe_load(path.read_text())
    cls = SECTIONS[section]
    loaded = load_section(path, section, cls)
    assert isinstance(loaded, cls)
    assert set(raw[section]) == {f.name for f in dataclasses.fields(cls)}
    for key, value in raw[section].items():
        assert getattr(loaded, key) == value, f"{section}.{key}"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_the_dataclass_defaults_are_the_pipelines_params(section: str) -> None:
    """One source of defaults: what a bench or test gets from Params() is what `dvc repro` runs."""
    assert dataclasses.asdict(SECTIONS[section]()) == yaml.safe_load((REPO / "params.yaml").read_text())[section]


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_repo_params_have_exactly_the_known_sections(path: Path) -> None:
    assert set(yaml.safe_load(path.read_text())) == set(SECTIONS)


def test_sections_load_with_their_types(tmp_path: Path) -> None:
    path = tiny_params(tmp_path)
    pretrain = load_section(path, "pretrain", PretrainParams)
    assert pretrain.learning_rate == pytest.approx(1.0e-3)
    assert isinstance(pretrain.learning_rate, float)
    assert pretrain.enabled is True
    assert load_section(path, "model", ModelParams).checkpoint is None
    assert load_section(path, "tokenize", TokenizeParams).block_size == 16
    assert load_section(path, "finetune", FinetuneParams).freeze_embeddings is False
    assert load_section(path, "evaluate", EvaluateParams).baseline_C == 10.0
    assert load_section(path, "tracking", TrackingParams).experiment_name == "transferpipe-test"
    assert load_section(path, "prepare", PrepareParams).unlabeled_source == str(REPO / "data/unlabeled")


def test_params_are_frozen(tmp_path: Path) -> None:
    params = load_section(tiny_params(tmp_path), "prepare", PrepareParams)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 1  # type: ignore[misc]


def test_flat_dict_prefixes_every_key(tmp_path: Path) -> None:
    params = load_section(tiny_params(tmp_path), "finetune", FinetuneParams)
    flat = to_flat_dict(params, "finetune")
    assert flat["finetune.encoder_learning_rate"] == pytest.approx(1.0e-4)
    assert len(flat) == len(dataclasses.fields(FinetuneParams))
    assert all(k.startswith("finetune.") for k in flat)


def test_unknown_key_names_section_and_key(tmp_path: Path) -> None:
    path = tiny_params(tmp_path, pretrain={"learning_rat": 0.1})
    with pytest.raises(UserError, match=r"pretrain\.learning_rat: unknown key; did you mean learning_rate\? ") as exc:
        load_section(path, "pretrain", PretrainParams)
    assert "pretrain accepts enabled, scratch_baseline, max_steps," in str(exc.value)  # the accepted keys are listed


def test_unknown_key_far_from_every_key_gets_no_suggestion(tmp_path: Path) -> None:
    path = tiny_params(tmp_path, evaluate={"xyz": 1})
    with pytest.raises(UserError) as exc:
        load_section(path, "evaluate", EvaluateParams)
    assert str(exc.value).startswith("params evaluate.xyz: unknown key; evaluate accepts batch_size, ")


def test_missing_key_is_named(tmp_path: Path) -> None:
    params = yaml.safe_load(TINY_PARAMS.read_text())
    del params["finetune"]["freeze_layers"]
    path = write(tmp_path, yaml.safe_dump(params))
    with pytest.raises(UserError, match=r"finetune\.freeze_layers: key is missing"):
        load_section(path, "finetune", FinetuneParams)


def test_missing_section(tmp_path: Path) -> None:
    params = yaml.safe_load(TINY_PARAMS.read_text())
    del params["evaluate"]
    path = write(tmp_path, yaml.safe_dump(params))
    with pytest.raises(UserError, match="section 'evaluate' is missing"):
        load_section(path, "evaluate", EvaluateParams)


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    params = yaml.safe_load(TINY_PARAMS.read_text())
    params["evaluate"] = 3
    path = write(tmp_path, yaml.safe_dump(params))
    with pytest.raises(UserError, match="params evaluate: expected a mapping"):
        load_section(path, "evaluate", EvaluateParams)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("pretrain", "max_steps", "ten", r"pretrain\.max_steps: expected an integer"),
        ("pretrain", "max_steps", "10", r"pretrain\.max_steps: expected an integer"),
        ("pretrain", "max_steps", 10.0, r"pretrain\.max_steps: expected an integer"),
        ("pretrain", "max_steps", True, r"pretrain\.max_steps: expected an integer"),
        ("pretrain", "enabled", 1, r"pretrain\.enabled: expected true or false"),
        ("pretrain", "enabled", "yes please", r"pretrain\.enabled: expected true or false"),
        ("pretrain", "learning_rate", "fast", r"pretrain\.learning_rate: expected a number"),
        ("pretrain", "learning_rate", True, r"pretrain\.learning_rate: expected a number"),
        ("tracking", "experiment_name", 7, r"tracking\.experiment_name: expected a string"),
        ("model", "checkpoint", 7, r"model\.checkpoint: expected a string"),
    ],
)
def test_wrong_type_names_the_key(tmp_path: Path, section: str, key: str, value: object, message: str) -> None:
    path = tiny_params(tmp_path, **{section: {key: value}})
    with pytest.raises(UserError, match=message):
        load_section(path, section, SECTIONS[section])


def test_exponent_without_dot_says_how_to_write_it(tmp_path: Path) -> None:
    path = tiny_with(tmp_path, "learning_rate: 1.0e-3", "learning_rate: 1e-3")
    assert yaml.safe_load(path.read_text())["pretrain"]["learning_rate"] == "1e-3"  # PyYAML's reading
    with pytest.raises(UserError, match=r"pretrain\.learning_rate") as exc:
        load_section(path, "pretrain", PretrainParams)
    assert "write it as 1.0e-3" in str(exc.value)


def test_exponent_with_dot_in_mantissa_is_still_rejected(tmp_path: Path) -> None:
    # PyYAML reads any exponent float without a dot in the mantissa as a string, not just `1e-3`.
    path = tiny_with(tmp_path, "encoder_learning_rate: 1.0e-4", "encoder_learning_rate: 25e-5")
    with pytest.raises(UserError, match=r"write it as 25\.0e-5"):
        load_section(path, "finetune", FinetuneParams)


def test_int_is_accepted_for_float(tmp_path: Path) -> None:
    path = tiny_with(tmp_path, "baseline_C: 10.0", "baseline_C: 10")
    params = load_section(path, "evaluate", EvaluateParams)
    assert params.baseline_C == 10.0
    assert isinstance(params.baseline_C, float)


def test_literal_rejects_other_values_listing_the_allowed(tmp_path: Path) -> None:
    path = tiny_params(tmp_path, model={"architecture": "gpt2"})
    with pytest.raises(UserError, match=r"model\.architecture: 'gpt2' is not one of") as exc:
        load_section(path, "model", ModelParams)
    assert "'modernbert'" in str(exc.value) and "'bert'" in str(exc.value)


def test_literal_accepts_bert(tmp_path: Path) -> None:
    path = tiny_params(tmp_path, model={"architecture": "bert"})
    assert load_section(path, "model", ModelParams).architecture == "bert"


def test_unknown_section(tmp_path: Path) -> None:
    path = tiny_with(tmp_path, "evaluate:\n", "evalute:\n  batch_size: 3\nevaluate:\n")
    with pytest.raises(UserError, match="unknown section 'evalute'"):
        load_section(path, "prepare", PrepareParams)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "prepare:\n  source: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML") as exc:
        load_section(path, "prepare", PrepareParams)
    assert "\n" not in str(exc.value)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(UserError, match="must be a mapping of sections"):
        load_section(path, "prepare", PrepareParams)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_section(tmp_path / "nope.yaml", "prepare", PrepareParams)
