"""The registry's alias `champion` against a real SQLite MLflow store: chosen only among versions scored on the
same test set and label names, a store that lacks the training run, and the registered-model name check.
(Two evaluates racing through a real `mlflow server`: tests/test_mlflow_server.py.)"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.helpers import tiny_params
from transferpipe import registry, tracking
from transferpipe.errors import UserError
from transferpipe.params import TrackingParams

MODEL = "unit-model"
PARAMS = TrackingParams(enabled=True, experiment_name="unit", registered_model_name=MODEL)
LABELS = ["business", "sport", "tech"]
SHA = registry.split_sha256(["bank shares", "match goal", "phone chip"], [0, 1, 2])
OTHER_SHA = registry.split_sha256(["bank shares", "match goal"], [0, 1])


@pytest.fixture
def store(mlflow_uri: str) -> Iterator[str]:
    """A fresh SQLite store, also for MlflowClient() (MLflow's process-wide URI outranks the environment)."""
    mlflow.set_tracking_uri(mlflow_uri)
    yield mlflow_uri
    mlflow.set_tracking_uri(None)


def new_versions(tmp_path: Path, n: int, name: str = MODEL) -> list[tuple[str, str]]:
    """n versions of a new registered model, each from its own run: [(version, run_id)]."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("unit")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("unit")
    client.create_registered_model(name)
    (tmp_path / "model").mkdir(exist_ok=True)
    out = []
    for _ in range(n):
        run = client.create_run(experiment_id)
        version = client.create_model_version(name, source=str(tmp_path / "model"), run_id=run.info.run_id)
        out.append((str(version.version), run.info.run_id))
    return out


def champion(name: str = MODEL) -> str | None:
    version = MlflowClient().get_registered_model(name).aliases.get("champion")
    return None if version is None else str(version)


def promote(version: str, score: float, sha: str = SHA, labels: list[str] = LABELS, **kw: str) -> str | None:
    return registry.promote_champion(version, score, PARAMS, test_sha256=sha, labels=labels, **kw)


def test_split_sha256_is_the_documented_digest_of_texts_and_labels_in_any_order() -> None:
    texts, labels = ["Bank shares rose.", 'A "quoted" café\nline'], [0, 3]
    rows = sorted(json.dumps([t, y], ensure_ascii=False) for t, y in zip(texts, labels, strict=True))
    assert registry.split_sha256(texts, labels) == hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()
    assert registry.split_sha256(texts[::-1], labels[::-1]) == registry.split_sha256(texts, labels)
    assert registry.split_sha256(texts, [0, 2]) != registry.split_sha256(texts, labels)  # one label changed
    assert registry.split_sha256([texts[0], texts[1] + " "], labels) != registry.split_sha256(texts, labels)
    # A text cannot run into its label or the next row: ["a 1", 2] is not ["a", 12].
    assert registry.split_sha256(["a 1"], [2]) != registry.split_sha256(["a"], [12])


def test_champion_moves_only_to_a_higher_score_and_each_version_carries_its_test_set(
    tmp_path: Path, store: str
) -> None:
    (v1, _), (v2, _), (v3, _), (v4, _) = new_versions(tmp_path, 4)
    assert "champion is now version 1 (test macro-F1 0.6000; no champion before)" in promote(v1, 0.6)
    assert "already" in promote(v1, 0.6)
    assert "champion stays version 1" in promote(v2, 0.5)
    assert "champion stays version 1" in promote(v3, 0.6)  # a tie keeps the champion
    assert champion() == "1"
    assert promote(v4, 0.9) == (
        f"evaluate: {MODEL} champion is now version 4 (test macro-F1 0.9000; was version 1 with 0.6000)"
    )
    assert champion() == "4"
    tags = MlflowClient().get_model_version(MODEL, v2).tags
    assert tags["transferpipe.test_sha256"] == SHA
    assert json.loads(tags["transferpipe.labels"]) == LABELS
    assert float(tags["transferpipe.test/macro_f1"]) == 0.5


@pytest.mark.parametrize(
    ("sha", "labels", "why"),
    [
        (OTHER_SHA, LABELS, f"scored on another test set (sha256 {SHA[:12]}, this one {OTHER_SHA[:12]})"),
        (SHA, ["business", "sport", "science"], "scored with other label names"),
    ],
    ids=["test set", "labels"],
)
def test_champion_scored_on_another_test_set_or_labels_stays_and_is_not_compared(
    tmp_path: Path, store: str, sha: str, labels: list[str], why: str
) -> None:
    (v1, _), (v2, _) = new_versions(tmp_path, 2)
    promote(v1, 0.3)
    line = promote(v2, 0.99, sha=sha, labels=labels)
    assert line.startswith(f"evaluate: {MODEL} champion stays version 1: it was {why}")
    assert "candidate version 2 (test macro-F1 0.9900) is not compared" in line and "\n" not in line
    assert champion() == "1"
    # Version 2 still records what it was scored on, for the day the user moves the alias to that test set.
    assert MlflowClient().get_model_version(MODEL, v2).tags["transferpipe.test_sha256"] == sha


def test_champion_set_by_hand_on_a_version_never_scored_stays(tmp_path: Path, store: str) -> None:
    (v1, _), (v2, _) = new_versions(tmp_path, 2)
    MlflowClient().set_registered_model_alias(MODEL, "champion", v1)
    assert "champion stays version 1: it was never scored by evaluate" in promote(v2, 0.9)
    assert champion() == "1"
    # Deleting the alias starts over: the best version scored on this test set becomes champion.
    MlflowClient().delete_registered_model_alias(MODEL, "champion")
    assert "champion is now version 2" in promote(v2, 0.9)
    assert champion() == "2"


def test_without_a_champion_the_best_comparable_version_wins_not_the_last_evaluated(tmp_path: Path, store: str) -> None:
    (v1, _), (v2, _) = new_versions(tmp_path, 2)
    promote(v1, 0.8)
    MlflowClient().delete_registered_model_alias(MODEL, "champion")
    assert promote(v2, 0.7) == (
        f"evaluate: {MODEL} champion is now version 1 (test macro-F1 0.8000; no champion before); "
        "candidate version 2 scored 0.7000"
    )
    assert champion() == "1"


def test_a_version_this_store_lacks_or_got_from_another_run_is_left_alone(
    tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ((v1, run1),) = new_versions(tmp_path, 1)
    capsys.readouterr()
    assert promote("7", 0.9) is None
    assert promote(v1, 0.9, run_id="0" * 32) is None
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: ") for w in warnings)
    assert f"no version 7 of {MODEL}" in warnings[0]
    assert f"comes from run {run1}, not from run {'0' * 32}" in warnings[1]
    assert champion() is None
    assert "transferpipe.test_sha256" not in MlflowClient().get_model_version(MODEL, v1).tags
    assert "champion is now version 1" in promote(v1, 0.9, run_id=run1)


def test_metrics_for_a_run_the_store_lacks_warn_in_one_line(
    tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = "0123456789abcdef0123456789abcdef"  # a run of another store (a fresh clone after `dvc pull`)
    assert tracking.log_to_existing_run(missing, {"test/macro_f1": 0.5}, PARAMS) is False
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: ") and missing in line and store in line
    with pytest.raises(MlflowException, match="not found"):
        MlflowClient().get_run(missing)
    # A deleted run is as good as missing: no metrics land on it.
    run = MlflowClient().create_run(MlflowClient().get_experiment_by_name("unit").experiment_id)
    MlflowClient().delete_run(run.info.run_id)
    assert tracking.log_to_existing_run(run.info.run_id, {"test/macro_f1": 0.5}, PARAMS) is False
    assert MlflowClient().get_run(run.info.run_id).data.metrics == {}


# Names that MLflow's registry refuses, each for its own rule, and names it takes.
REJECTED = ["a/b", "team:classifier", "..", "..hidden", "  "]
ACCEPTED = ["transferpipe-classifier", "my model v2.1", "Team_Classifier", "klassifikator-ü", "a'b\"c"]


@pytest.mark.parametrize("name", REJECTED)
def test_a_registered_model_name_mlflow_rejects_is_one_line_naming_the_key(name: str, store: str) -> None:
    with pytest.raises(UserError) as caught:
        tracking.check_registry_name(TrackingParams(True, "unit", name))
    message = str(caught.value)
    assert message.startswith(f"tracking.registered_model_name {name!r} is not a name MLflow accepts: ")
    assert "\n" not in message
    # The real store refuses it too: the check says no more and no less than MLflow.
    with pytest.raises(MlflowException):
        MlflowClient(store).create_registered_model(name)


@pytest.mark.parametrize("name", ACCEPTED)
def test_a_registered_model_name_mlflow_accepts_passes(name: str, store: str) -> None:
    tracking.check_registry_name(TrackingParams(True, "unit", name))
    assert MlflowClient(store).create_registered_model(name).name == name


def test_empty_and_overlong_names_are_rejected_and_no_registry_is_not_checked() -> None:
    with pytest.raises(UserError, match="empty; use null for no model registry"):
        tracking.check_registry_name(TrackingParams(True, "unit", ""))
    # SQLite would store it; the registry's name columns on MySQL and PostgreSQL hold 256 characters.
    with pytest.raises(UserError, match="257 characters, the registry keeps at most 256"):
        tracking.check_registry_name(TrackingParams(True, "unit", "m" * 257))
    tracking.check_registry_name(TrackingParams(True, "unit", "m" * 256))
    tracking.check_registry_name(TrackingParams(True, "unit", None))
    tracking.check_registry_name(TrackingParams(False, "unit", "a/b"))  # tracking off: nothing is registered


def test_registry_name_check_fails_a_process_in_one_line(tmp_path: Path) -> None:
    script = (
        "from transferpipe.errors import run_cli\n"
        "from transferpipe.params import TrackingParams\n"
        "from transferpipe.tracking import check_registry_name\n"
        "run_cli(lambda argv: check_registry_name(TrackingParams(True, 'unit', 'models/classifier')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: tracking.registered_model_name 'models/classifier' is not a name MLflow accepts: "
        "Invalid model name 'models/classifier'. Names cannot contain '/' or ':'."
    ]


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "evaluate"])
def test_a_bad_registered_name_stops_each_stage_before_it_reads_anything(
    tmp_path: Path, mlflow_uri: str, stage: str
) -> None:
    import importlib

    params = tiny_params(tmp_path, tracking={"registered_model_name": "team/classifier"})
    missing = str(tmp_path / "missing")  # read first thing after the checks: any other order fails differently
    argv = {
        "pretrain": ["--data", missing, "--tokenizer", missing, "--out", missing, "--scratch", missing,
                     "--metrics", missing, "--plots", missing],
        "finetune": ["--data", missing, "--encoder", missing, "--out", missing, "--metrics", missing,
                     "--plots", missing],
        "evaluate": ["--data", missing, "--models", missing, "--metrics", missing, "--plots", missing],
    }[stage]  # fmt: skip
    with pytest.raises(UserError, match=r"^tracking.registered_model_name 'team/classifier' is not a name"):
        importlib.import_module(f"stages.{stage}").main(["--params", str(params), *argv])
    assert not (tmp_path / "missing").exists()
