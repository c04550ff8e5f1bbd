"""The tracking module against a real SQLite MLflow store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from transferpipe import tracking
from transferpipe.errors import UserError
from transferpipe.params import TrackingParams

PARAMS = TrackingParams(enabled=True, experiment_name="unit")


def test_repo_root_is_lifted_out_of_dvc_temp_experiment_copies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"))
    assert tracking.repo_root() == tmp_path.resolve()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_env_uri_overrides_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri() == "http://127.0.0.1:5999"


def test_run_is_tagged_and_artifacts_go_next_to_the_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mlflow_uri: str
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "exp-one")
    monkeypatch.setenv("DVC_ROOT", str(REPO))
    with tracking.start_run("pretrain", PARAMS, {"extra": "x"}) as run:
        run.log_params({"a": 1, "b": None})
        run.log_metrics({"train/loss": 2.5}, step=3)
    r = MlflowClient().get_run(run.run_id)
    assert r.info.status == "FINISHED"
    assert r.info.run_name == "pretrain-exp-one"
    assert r.data.tags["transferpipe.stage"] == "pretrain"
    assert r.data.tags["dvc.exp_name"] == "exp-one"
    assert r.data.tags["extra"] == "x"
    assert len(r.data.tags["mlflow.source.git.commit"]) == 40
    assert r.data.params == {"a": "1", "b": "None"}
    assert r.data.metrics == {"train/loss": 2.5}
    assert r.info.artifact_uri.startswith((tmp_path / "mlartifacts").resolve().as_uri())


def test_exception_ends_the_run_failed(mlflow_uri: str) -> None:
    with pytest.raises(RuntimeError), tracking.start_run("finetune", PARAMS) as run:
        raise RuntimeError("boom")
    assert MlflowClient().get_run(run.run_id).info.status == "FAILED"


def test_sigterm_ends_the_run_failed(tmp_path: Path, mlflow_uri: str) -> None:
    script = """
import os, signal, time
from transferpipe.tracking import start_run
from transferpipe.params import TrackingParams
with start_run("pretrain", TrackingParams(True, "unit")) as run:
    print(run.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
    )
    assert proc.returncode == 128 + signal.SIGTERM
    run_id = proc.stdout.strip().splitlines()[-1]
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FAILED"


def test_disabled_tracking_is_a_noop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    with tracking.start_run("pretrain", TrackingParams(enabled=False, experiment_name="x")) as run:
        run.log_metrics({"a": 1.0}, step=1)
        run.log_params({"a": 1})
    assert run.run_id is None
    assert not (tmp_path / "never.db").exists()
    assert tracking.log_to_existing_run(None, {"a": 1.0}, PARAMS) is False


def test_log_to_existing_run_adds_metrics(mlflow_uri: str) -> None:
    with tracking.start_run("finetune", PARAMS) as run:
        pass
    assert tracking.log_to_existing_run(run.run_id, {"test/macro_f1": 0.5}, PARAMS)
    assert MlflowClient().get_run(run.run_id).data.metrics["test/macro_f1"] == 0.5


def test_unusable_store_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'file' / 'sub' / 'mlflow.db'}")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI"), tracking.start_run("pretrain", PARAMS):
        pass
