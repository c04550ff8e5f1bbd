"""The tracking module against a real SQLite MLflow store."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, TOPICS
from transferpipe import tracking
from transferpipe.errors import UserError
from transferpipe.params import TrackingParams

PARAMS = TrackingParams(enabled=True, experiment_name="unit")
TOPICS_SET = set(TOPICS)


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


def test_unreachable_server_is_one_clear_error_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again below: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(UserError, match=re.escape(uri)) as caught:
        tracking.check_tracking(PARAMS)
    with pytest.raises(UserError, match="start the server"), tracking.start_run("finetune", PARAMS):
        pytest.fail("the run must not start")
    assert time.monotonic() - start < 10  # MLflow's own client retries for minutes
    assert "\n" not in str(caught.value) and "tracking.enabled: false" in str(caught.value)
    tracking.check_tracking(TrackingParams(enabled=False, experiment_name="x"))  # disabled: not probed


def test_locked_writes_are_retried_then_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("wrapped") from sqlite3.OperationalError("database is locked")
        return "ok"

    assert tracking._retry_locked(flaky, delays=(0, 0, 0)) == "ok" and len(calls) == 3

    def locked() -> None:
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(UserError, match="stayed locked.*mlflow server"):
        tracking._retry_locked(locked, delays=(0, 0))

    def broken() -> None:
        calls.append(1)
        raise sqlite3.OperationalError("no such table: runs")

    calls.clear()
    with pytest.raises(sqlite3.OperationalError):
        tracking._retry_locked(broken, delays=(0, 0))
    assert len(calls) == 1  # only a lock is worth waiting for


def test_a_write_waits_for_another_process_holding_the_store_lock(tmp_path: Path, mlflow_uri: str) -> None:
    with tracking.start_run("pretrain", PARAMS) as run:
        holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")  # what a second writer's open transaction looks like
        release = threading.Timer(1.5, holder.execute, ["COMMIT"])
        release.start()
        start = time.monotonic()
        run.log_metrics({"train/loss": 1.0}, step=1)
        waited = time.monotonic() - start
        release.join()
        holder.close()
    assert waited >= 1.0  # it blocked on the lock (MLflow's busy timeout), then went through
    assert MlflowClient().get_run(run.run_id).data.metrics == {"train/loss": 1.0}


def test_processes_creating_a_fresh_store_at_once_all_succeed(tmp_path: Path) -> None:
    """Unserialized, concurrent creation of a new SQLite store breaks MLflow's migration for good."""
    script = """
import sys, time
from transferpipe.params import TrackingParams
from transferpipe.tracking import start_run
import mlflow  # imported before the barrier, so that the processes reach the store together
go = float(sys.argv[1])
time.sleep(max(0.0, go - time.time()))
with start_run("pretrain", TrackingParams(True, "race")) as run:
    run.log_metrics({"x": 1.0}, step=0)
print(run.run_id)
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    go = str(time.time() + 12)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, go], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err.decode()[-2000:] for _, err in outs]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(out.decode().split()[-1] for out, _ in outs)
    assert {r.info.status for r in runs} == {"FINISHED"}


def tiny_classifier(folder: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    from tests.conftest import TOPICS, make_corpus
    from transferpipe.tokenization import train_wordpiece

    tok = train_wordpiece([r["text"] for r in make_corpus()], 200, 1, True)
    labels = sorted(TOPICS)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_logged_classifier_is_registered_with_alias_candidate_only_when_named(tmp_path: Path, mlflow_uri: str) -> None:
    model_dir = tiny_classifier(tmp_path / "clf")
    with tracking.start_run("finetune", PARAMS) as run:
        assert run.log_text_classifier(model_dir, ["bank shares", "film music"], None) is None
    client = MlflowClient(mlflow_uri)
    assert client.search_registered_models() == []
    with tracking.start_run("finetune", PARAMS) as run:
        version = run.log_text_classifier(model_dir, ["bank shares", "film music"], "unit-model")
    assert version == "1"
    registered = client.get_model_version_by_alias("unit-model", "candidate")
    assert str(registered.version) == "1" and registered.run_id == run.run_id
    pred = mlflow.pyfunc.load_model("models:/unit-model@candidate").predict(["bank shares market"])
    assert pred["label"][0] in TOPICS_SET


def registered_versions(uri: str, scores: list[float | None], name: str = "unit-model") -> list[str]:
    """Versions of a registered model, each from a finished run with that test/macro_f1 (None: not logged)."""
    client = MlflowClient(uri)
    client.create_registered_model(name)
    versions = []
    for score in scores:
        with tracking.start_run("finetune", PARAMS) as run:
            if score is not None:
                run.log_metrics({"test/macro_f1": score})
        versions.append(client.create_model_version(name, source=f"runs:/{run.run_id}/model", run_id=run.run_id))
    return [str(v.version) for v in versions]


def test_champion_moves_only_when_the_candidate_scores_higher(mlflow_uri: str) -> None:
    params = TrackingParams(enabled=True, experiment_name="unit", registered_model_name="unit-model")
    v1, v2, v3, v4 = registered_versions(mlflow_uri, [0.6, 0.5, 0.6, 0.9])

    def champion() -> str:
        return str(MlflowClient(mlflow_uri).get_model_version_by_alias("unit-model", "champion").version)

    assert "champion is now version 1" in tracking.promote_champion(v1, 0.6, params)  # no champion yet
    assert champion() == "1"
    assert "already" in tracking.promote_champion(v1, 0.6, params)
    assert "champion stays version 1" in tracking.promote_champion(v2, 0.5, params)
    assert "champion stays version 1" in tracking.promote_champion(v3, 0.6, params)  # a tie does not beat it
    assert champion() == "1"
    assert "champion is now version 4" in tracking.promote_champion(v4, 0.9, params)
    assert champion() == "4"


def test_a_champion_never_evaluated_gives_way(mlflow_uri: str) -> None:
    params = TrackingParams(enabled=True, experiment_name="unit", registered_model_name="unit-model")
    v1, v2 = registered_versions(mlflow_uri, [None, 0.1])
    MlflowClient(mlflow_uri).set_registered_model_alias("unit-model", "champion", v1)
    assert "champion is now version 2" in tracking.promote_champion(v2, 0.1, params)


def test_no_registry_without_a_name_or_a_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    assert tracking.promote_champion("1", 0.9, TrackingParams(True, "unit", None)) is None
    assert tracking.promote_champion(None, 0.9, TrackingParams(True, "unit", "m")) is None
    assert tracking.promote_champion("1", 0.9, TrackingParams(False, "unit", "m")) is None
    assert not (tmp_path / "never.db").exists()
