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

from tests.helpers import REPO, TOPICS
from transferpipe import registry, tracking, vcs
from transferpipe.errors import UserError
from transferpipe.params import TrackingParams
from transferpipe.serving import TextClassifier

PARAMS = TrackingParams(enabled=True, experiment_name="unit")
TOPICS_SET = set(TOPICS)


def test_repo_root_is_lifted_out_of_dvc_temp_experiment_copies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"))
    assert vcs.repo_root() == tmp_path.resolve()
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT])
def test_a_signal_ends_the_run_killed_with_one_line(tmp_path: Path, mlflow_uri: str, signum: int) -> None:
    # A child of a process that ignores SIGINT (a background job of a non-interactive shell, some CI runners)
    # inherits SIG_IGN, and Python then leaves Ctrl-C ignored; give the child the handler a terminal gives it.
    script = f"""
import os, signal, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from transferpipe.errors import run_cli
from transferpipe.tracking import start_run
from transferpipe.params import TrackingParams
def main(argv):
    with start_run("pretrain", TrackingParams(True, "unit")) as run:
        print(run.run_id, flush=True)
        os.kill(os.getpid(), {int(signum)})
        time.sleep(30)
run_cli(main)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
    )
    assert proc.returncode == 128 + signum
    assert proc.stderr.strip().splitlines() == [
        f"stopped by {signal.Signals(signum).name}: a rerun resumes from the last checkpoint"
    ]
    run_id = proc.stdout.strip().splitlines()[-1]
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["transferpipe.host"] == socket.gethostname()
    assert run.data.tags["transferpipe.pid"].isdigit()


def test_runs_left_running_by_a_dead_process_are_ended_killed(tmp_path: Path, mlflow_uri: str) -> None:
    script = """
import os, signal
from transferpipe.tracking import start_run
from transferpipe.params import TrackingParams
with start_run("pretrain", TrackingParams(True, "unit")) as run:
    print(run.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
        for _ in range(2)
    ]
    assert [proc.returncode for proc in runs] == [-signal.SIGKILL] * 2
    orphans = [proc.stdout.strip().splitlines()[-1] for proc in runs]
    client = MlflowClient(mlflow_uri)
    # The second process, starting, ended the first one's run; its own is left RUNNING.
    assert [client.get_run(r).info.status for r in orphans] == ["KILLED", "RUNNING"]
    # A run of a live process (this one) of the same stage is left alone.
    with tracking.start_run("pretrain", TrackingParams(True, "unit")) as live:
        assert client.get_run(live.run_id).info.status == "RUNNING"
        assert [client.get_run(r).info.status for r in orphans] == ["KILLED", "KILLED"]
        assert tracking.end_orphaned_runs("pretrain", "unit") == []
        assert client.get_run(live.run_id).info.status == "RUNNING"


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


def test_logged_classifier_is_registered_with_alias_candidate_only_when_named(
    tiny_classifier_dir: Path, mlflow_uri: str
) -> None:
    model_dir = tiny_classifier_dir
    with tracking.start_run("finetune", PARAMS) as run:
        assert run.log_text_classifier(model_dir, ["bank shares", "film music"], TextClassifier(), None) is None
    client = MlflowClient(mlflow_uri)
    assert client.search_registered_models() == []
    with tracking.start_run("finetune", PARAMS) as run:
        version = run.log_text_classifier(model_dir, ["bank shares", "film music"], TextClassifier(), "unit-model")
    assert version == "1"
    registered = client.get_model_version_by_alias("unit-model", "candidate")
    assert str(registered.version) == "1" and registered.run_id == run.run_id
    pred = mlflow.pyfunc.load_model("models:/unit-model@candidate").predict(["bank shares market"])
    assert pred["label"][0] in TOPICS_SET


# How evaluate moves alias `champion`: tests/test_champion.py.
def test_no_registry_without_a_name_or_a_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    scored_on = {"test_sha256": "0" * 64, "labels": ["a", "b"]}
    assert registry.promote_champion("1", 0.9, TrackingParams(True, "unit", None), **scored_on) is None
    assert registry.promote_champion(None, 0.9, TrackingParams(True, "unit", "m"), **scored_on) is None
    assert registry.promote_champion("1", 0.9, TrackingParams(False, "unit", "m"), **scored_on) is None
    assert not (tmp_path / "never.db").exists()


def test_credentials_in_the_uri_never_reach_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cr%40t@127.0.0.1:{port}")
    with pytest.raises(UserError) as caught:
        tracking.check_tracking(PARAMS)
    assert "s3cr" not in str(caught.value) and f"http://127.0.0.1:{port}" in str(caught.value)
    # MLflow's client sends them as basic auth from these variables instead.
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr@t"
    assert "s3cr" not in os.environ["MLFLOW_TRACKING_URI"]


@pytest.mark.parametrize("on", [True, False])
def test_system_metrics_are_logged_only_when_asked(on: bool, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    params = TrackingParams(experiment_name="transferpipe-test", registered_model_name=None, system_metrics=on)
    with tracking.start_run("pretrain", params) as run:
        time.sleep(2.0)
    keys = set(MlflowClient().get_run(run.run_id).data.metrics)
    system = {k for k in keys if k.startswith("system/")}
    assert ("system/cpu_utilization_percentage" in system) if on else not system, keys
