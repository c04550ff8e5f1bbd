"""The stages against a real `mlflow server` on 127.0.0.1: runs, metric histories, served artifacts, the
model registry's versions and aliases; and an unreachable server failing a stage in seconds."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stages import evaluate, finetune, prepare, pretrain, tokenize
from tests.helpers import REPO, make_corpus, tiny_params, wait_for_http
from transferpipe import registry, tracking
from transferpipe.data import read_prepared
from transferpipe.params import TrackingParams

MODEL = "transferpipe-test-classifier"
LABELS = {"business", "sport", "tech", "politics", "entertainment"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(d: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port (SQLite backend and served artifacts under d), answering."""
    log = (d / "server.log").open("a")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{d / 'mlflow.db'}",
            "--artifacts-destination",
            str(d / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        start_new_session=True,  # its own process group: the server and the workers it starts die together
    )
    log.close()  # the child holds its own copy
    wait_for_http(f"http://127.0.0.1:{port}/health", proc, d / "server.log", timeout=120)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """The server and every process it started (its workers outlive a terminated parent)."""
    with contextlib.suppress(ProcessLookupError):  # killed already
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers that ignored SIGTERM


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real `mlflow server` (SQLite backend, served artifacts); yields its URI and its artifacts folder."""
    d = tmp_path_factory.mktemp("server")
    port = free_port()
    proc = start_server(d, port)
    try:
        yield f"http://127.0.0.1:{port}", d / "artifacts"
    finally:
        stop(proc)


def stage_args(d: Path, params: Path, stage: str, tag: str = "") -> list[str]:
    """The flags dvc.yaml passes each stage, with outputs under d (`tag` keeps a second run's apart)."""
    p = ["--params", str(params)]
    if stage == "prepare":
        return [*p, "--out", f"{d}/data/prepared", "--stats", f"{d}/metrics/data.json"]
    if stage == "tokenize":
        return [
            *p,
            *("--data", f"{d}/data/prepared", "--tokenizer", f"{d}/models/tokenizer"),
            *("--blocks", f"{d}/data/b", "--out", f"{d}/data/tok"),
        ]
    if stage == "pretrain":
        return [
            *p,
            *("--data", f"{d}/data/b", "--tokenizer", f"{d}/models/tokenizer", "--out", f"{d}/models/pretrained"),
            *("--scratch", f"{d}/models/scratch"),
            *("--metrics", f"{d}/metrics/pretrain.json", "--plots", f"{d}/plots/pretrain"),
        ]
    if stage == "finetune":
        return [
            *p,
            *("--data", f"{d}/data/tok", "--encoder", f"{d}/models/pretrained", "--out", f"{d}/models/ft{tag}"),
            *("--metrics", f"{d}/metrics/finetune{tag}.json", "--plots", f"{d}/plots/finetune{tag}"),
        ]
    return [
        *p,
        *("--data", f"{d}/data/prepared", "--models", f"{d}/models/ft{tag}"),
        *("--metrics", f"{d}/metrics/evaluate{tag}.json", "--plots", f"{d}/plots/evaluate{tag}"),
    ]


@pytest.fixture(scope="module")
def pipeline(server: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """All five stages once against the server through MLFLOW_TRACKING_URI; yields (outputs, params file)."""
    uri, _ = server
    d = tmp_path_factory.mktemp("pipeline")
    pd.DataFrame(make_corpus()).to_csv(d / "tiny.csv", index=False)
    params = tiny_params(d, prepare={"source": str(d / "tiny.csv")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("DVC_ROOT", raising=False)
        mp.delenv("DVC_EXP_NAME", raising=False)
        for stage in (prepare, tokenize, pretrain, finetune, evaluate):
            stage.main(stage_args(d, params, stage.__name__.split(".")[-1]))
        yield d, params
    mlflow.set_tracking_uri(None)  # later tests in this process pick their own store again


@pytest.fixture
def client(server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server[0])
    mlflow.set_tracking_uri(server[0])
    return MlflowClient(server[0])


def stage_runs(client: MlflowClient, stage: str) -> list:
    exp = client.get_experiment_by_name("transferpipe-test")
    return client.search_runs(
        [exp.experiment_id], f"tags.`transferpipe.stage` = '{stage}'", order_by=["attributes.start_time ASC"]
    )


def test_runs_metric_histories_and_served_artifacts(
    pipeline: tuple[Path, Path], server: tuple[str, Path], client: MlflowClient
) -> None:
    d, _ = pipeline
    (pre,), (fine,) = stage_runs(client, "pretrain"), stage_runs(client, "finetune")
    assert pre.info.status == fine.info.status == "FINISHED"
    assert fine.data.tags["transferpipe.pretrain_run_id"] == pre.info.run_id
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "eval/loss")][:2] == [3, 6]
    assert len(client.get_metric_history(pre.info.run_id, "train/loss")) >= 1
    assert len(client.get_metric_history(fine.info.run_id, "eval/macro_f1")) == 2  # two epochs
    assert 0 <= fine.data.metrics["test/macro_f1"] <= 1
    # Artifacts travel through the server into its --artifacts-destination, nowhere near the stage's folder.
    assert fine.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert {a.path for a in client.list_artifacts(pre.info.run_id, "model")} >= {"model/model.safetensors"}
    assert list(server[1].rglob("model.safetensors")) and list(server[1].rglob("MLmodel"))
    assert not (d / "mlruns").exists() and not (d / "mlartifacts").exists()


def test_first_version_is_candidate_and_champion_and_loads_by_alias(
    pipeline: tuple[Path, Path], client: MlflowClient
) -> None:
    d, _ = pipeline
    (fine,) = stage_runs(client, "finetune")
    assert json.loads((d / "models/ft/training_run.json").read_text()) == {
        "mlflow_run_id": fine.info.run_id,
        "model_version": "1",
    }
    version = client.get_model_version(MODEL, "1")
    assert version.run_id == fine.info.run_id
    assert set(version.aliases) == {"candidate", "champion"}
    pred = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(["bank shares market", "film music star"])
    assert len(pred) == 2 and set(pred["label"]) <= LABELS


def test_champion_moves_only_to_a_better_candidate(
    pipeline: tuple[Path, Path], client: MlflowClient, capsys: pytest.CaptureFixture[str]
) -> None:
    d, params = pipeline
    finetune.main(stage_args(d, params, "finetune", tag="2"))
    assert json.loads((d / "models/ft2/training_run.json").read_text())["model_version"] == "2"
    assert client.get_model_version_by_alias(MODEL, "candidate").version == "2"
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"

    # evaluate tagged version 1 with the test set it scored it on, and its score there.
    splits, labels, _ = read_prepared(d / "data/prepared")
    test_sha256 = registry.split_sha256(splits["test"]["text"].tolist(), splits["test"]["label"].tolist())
    tags = client.get_model_version(MODEL, "1").tags
    assert tags[registry.TEST_SHA256_TAG] == test_sha256 and json.loads(tags[registry.LABELS_TAG]) == labels
    evaluated = json.loads((d / "metrics/evaluate.json").read_text())["test"]["ft"]["macro_f1"]
    assert float(tags[registry.SCORE_TAG]) == evaluated

    # Whatever version 2 scores, a champion at an impossible macro-F1 of 2.0 beats it.
    client.set_model_version_tag(MODEL, "1", registry.SCORE_TAG, "2.0")
    capsys.readouterr()
    evaluate.main(stage_args(d, params, "evaluate", tag="2"))
    assert "champion stays version 1" in capsys.readouterr().out
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"

    # And a champion below any possible score loses to it.
    client.set_model_version_tag(MODEL, "1", registry.SCORE_TAG, "-1.0")
    evaluate.main(stage_args(d, params, "evaluate", tag="2"))
    assert "champion is now version 2" in capsys.readouterr().out
    assert client.get_model_version_by_alias(MODEL, "champion").version == "2"
    run2 = client.get_run(client.get_model_version(MODEL, "2").run_id)
    assert run2.info.status == "FINISHED" and "test/macro_f1" in run2.data.metrics

    # A test set changed on purpose starts another competition: version 1 scored on it is not compared with
    # champion 2, scored on the old one, and the alias stays.
    changed = d / "data/prepared-changed"
    shutil.copytree(d / "data/prepared", changed)
    test = pd.read_parquet(changed / "test.parquet")
    test.loc[test.index[0], "text"] += " market"
    test.to_parquet(changed / "test.parquet")
    args = stage_args(d, params, "evaluate")
    args[args.index("--data") + 1] = str(changed)
    evaluate.main(args)
    out = capsys.readouterr().out
    assert f"{MODEL} champion stays version 2: it was scored on another test set" in out
    assert client.get_model_version_by_alias(MODEL, "champion").version == "2"
    new_sha256 = registry.split_sha256(test["text"].tolist(), test["label"].tolist())
    assert new_sha256 != test_sha256
    assert client.get_model_version(MODEL, "1").tags[registry.TEST_SHA256_TAG] == new_sha256


def test_unreachable_server_stops_a_stage_in_seconds_with_one_line(
    tmp_path: Path, tiny_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = tiny_params(tmp_path, prepare={"source": str(tiny_csv)})
    for stage in (prepare, tokenize):
        stage.main(stage_args(tmp_path, params, stage.__name__.split(".")[-1]))
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.pretrain", *stage_args(tmp_path, params, "pretrain")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    assert uri in errors[0] and "tracking.enabled: false" in errors[0] and "MLFLOW_TRACKING_URI" in errors[0]
    # MLflow's own client would retry for minutes; the check answers within the imports' time.
    assert elapsed < 20, elapsed
    assert not (tmp_path / "models/pretrained").exists() and not (tmp_path / "metrics/pretrain.json").exists()
    assert not (tmp_path / "plots/pretrain").exists()


def test_evaluate_against_a_store_without_the_training_run_warns_and_skips_it(
    pipeline: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh clone after `dvc pull`, say, whose MLFLOW_TRACKING_URI names a store that never saw training."""
    d, params = pipeline
    fresh = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh)
    args = stage_args(d, params, "evaluate")
    args[args.index("--metrics") + 1] = str(tmp_path / "evaluate.json")
    args[args.index("--plots") + 1] = str(tmp_path / "plots")
    capsys.readouterr()
    metrics = evaluate.main(args)
    out, err = capsys.readouterr()
    run_id = json.loads((d / "models/ft/training_run.json").read_text())["mlflow_run_id"]
    (warning,) = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert run_id in warning and fresh in warning
    assert "champion" not in out and "test macro-F1" in out
    assert json.loads((tmp_path / "evaluate.json").read_text()) == metrics  # the record DVC reads is complete
    store = MlflowClient(fresh)
    assert store.search_registered_models() == []
    with pytest.raises(MlflowException, match="not found"):
        store.get_run(run_id)


# One evaluate's registry update in a process of its own: it reads a job per line (after saying it is ready),
# runs it and answers with the verdict line, so the test releases both processes' jobs at the same moment.
RACER = """
import json, sys
import mlflow.tracking  # imported before "ready", so that both racers start their jobs together
from transferpipe.params import TrackingParams
from transferpipe.registry import promote_champion
print("ready", flush=True)
for line in iter(sys.stdin.readline, ""):
    job = json.loads(line)
    params = TrackingParams(True, "transferpipe-test", job.pop("name"))
    print(json.dumps(promote_champion(job.pop("version"), job.pop("score"), params, **job)), flush=True)
"""


def test_two_evaluates_at_once_leave_champion_on_the_better_version(
    server: tuple[str, Path], client: MlflowClient
) -> None:
    uri, _ = server
    labels = sorted(LABELS)
    sha = registry.split_sha256(["bank shares", "film music"], [0, 1])
    experiment_id = client.create_experiment("race")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        for _ in range(2)
    ]
    # A racer that hangs (a server that stops answering) fails the test instead of blocking the suite.
    watchdog = threading.Timer(300, lambda: [racer.kill() for racer in racers])
    watchdog.start()
    try:
        assert [racer.stdout.readline().strip() for racer in racers] == ["ready", "ready"]
        for round_ in range(8):
            name = f"race-{round_}"
            client.create_registered_model(name)
            jobs = []
            for _ in range(3):
                run_id = client.create_run(experiment_id).info.run_id
                version = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id).version
                jobs.append({"name": name, "version": str(version), "run_id": run_id})
            earlier, *pair = jobs
            if round_ % 4 < 2:  # half the rounds start from a champion that both racers beat, half from none
                for key, value in ((registry.TEST_SHA256_TAG, sha), (registry.LABELS_TAG, json.dumps(labels))):
                    client.set_model_version_tag(name, earlier["version"], key, value)
                client.set_model_version_tag(name, earlier["version"], registry.SCORE_TAG, "0.1")
                client.set_registered_model_alias(name, "champion", earlier["version"])
            # The better version goes to either racer in turn.
            scores = (0.9, 0.5) if round_ % 2 else (0.5, 0.9)
            for racer, job, score in zip(racers, pair, scores, strict=True):
                racer.stdin.write(json.dumps({**job, "score": score, "test_sha256": sha, "labels": labels}) + "\n")
            for racer in racers:
                racer.stdin.flush()
            verdicts = [json.loads(racer.stdout.readline()) for racer in racers]
            better = pair[scores.index(0.9)]["version"]
            assert client.get_model_version_by_alias(name, "champion").version == better, (round_, verdicts)
            assert all(verdict.startswith(f"evaluate: {name} ") for verdict in verdicts), verdicts
    finally:
        watchdog.cancel()
        for racer in racers:
            racer.stdin.close()
            racer.wait(timeout=60)
    assert [racer.returncode for racer in racers] == [0, 0]


def test_a_uri_with_credentials_works_and_prints_no_password(
    server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    uri, _ = server
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.replace("http://", "http://bob:hunter2@"))
    with tracking.start_run("pretrain", TrackingParams(True, "credentials")) as run:
        run.log_metrics({"train/loss": 1.0}, step=1)
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FINISHED"
    out, err = capfd.readouterr()
    assert "hunter2" not in out + err


@pytest.mark.slow
def test_a_server_that_dies_mid_training_holds_up_nothing_and_loses_no_rows(tmp_path: Path, tiny_csv: Path) -> None:
    """The server SIGKILLed while pretrain trains: training goes on to the end with one warning line, writes its
    outputs, then stops with one error line. With the server back, the rerun records the run without training
    again: FINISHED, every row of the training curve once."""
    steps = 2000
    params = tiny_params(
        tmp_path,
        prepare={"source": str(tiny_csv)},
        pretrain={"max_steps": steps, "eval_every": 500, "checkpoint_every": 20},
    )
    for stage in (prepare, tokenize):
        stage.main(stage_args(tmp_path, params, stage.__name__.split(".")[-1]))
    (tmp_path / "server").mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path / "server", port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), "TRANSFERPIPE_CHECKPOINT_DIR": str(tmp_path / "ck")}
    command = [sys.executable, "-m", "stages.pretrain", *stage_args(tmp_path, params, "pretrain")]
    training = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = MlflowClient(uri)
        deadline = time.monotonic() + 300
        while not _logged_steps(client):  # the first checkpoint's rows have reached the server
            assert training.poll() is None and time.monotonic() < deadline, "pretrain ended before the kill"
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, as a crashed host would lose them
        server.wait()
        _, err = training.communicate(timeout=600)
        assert training.returncode == 2, err[-3000:]
        assert "Traceback" not in err
        # One warning while training, one for the run it could not end FAILED, then the error: three lines.
        warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
        assert len(warnings) == 2 and "is not answering" in warnings[0] and "training continues" in warnings[0], err
        assert warnings[1].startswith("warning: MLflow could not end run")
        (error,) = [line for line in err.splitlines() if line.startswith("error: ")]
        assert "is complete, but MLflow could not record it" in error and "rerun" in error
        written = pd.read_csv(tmp_path / "plots/pretrain/train.csv")["step"].tolist()
        assert written[-1] == steps and (tmp_path / "models/pretrained/model.safetensors").is_file()

        server = start_server(tmp_path / "server", port)
        again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "training finished earlier" in again.stderr + again.stdout
        (run,) = client.search_runs([client.get_experiment_by_name("transferpipe-test").experiment_id])
        logged = _logged_steps(client, run.info.run_id)
    finally:
        if training.poll() is None:
            training.kill()
        stop(server)
    assert run.info.status == "FINISHED"
    assert logged == written  # every row of the training curve reached the run, once each


def _logged_steps(client: MlflowClient, run_id: str | None = None) -> list[int]:
    """The steps of train/loss in the run (the only run of the experiment when run_id is None; [] before it)."""
    if run_id is None:
        experiment = client.get_experiment_by_name("transferpipe-test")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if not runs:
            return []
        run_id = runs[0].info.run_id
    return [m.step for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]


@pytest.mark.slow
def test_a_server_that_restarts_mid_training_gets_every_row_once_in_the_same_run(
    tmp_path: Path, tiny_csv: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """The server SIGKILLed after the second batch of rows reached it, and started again (same store, same port)
    when training first fails to send: one warning line, one line when it answers again, the held rows sent in
    the same run, which ends FINISHED with every row of the training curve once. The kill and the restart are
    driven by the stage's own sends (in-process, retried at once), so the test does not race training speed."""
    params = tiny_params(
        tmp_path, prepare={"source": str(tiny_csv)}, pretrain={"max_steps": 200, "checkpoint_every": 20}
    )
    for stage in (prepare, tokenize):
        stage.main(stage_args(tmp_path, params, stage.__name__.split(".")[-1]))
    (tmp_path / "server").mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    servers = [start_server(tmp_path / "server", port)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TRANSFERPIPE_CHECKPOINT_DIR", str(tmp_path / "ck"))
    monkeypatch.setattr(tracking, "RESEND_AFTER_S", 0.0)
    send_rows, events = tracking.Run.send_rows, []

    def send_and_break(self: tracking.Run, rows: list, once: bool = False, force: bool = False) -> bool:
        sent = send_rows(self, rows, once=once, force=force)
        events.append(sent)
        if events.count(True) == 2 and sent and len(servers) == 1:
            os.killpg(servers[0].pid, signal.SIGKILL)  # the server and its workers, as a crashed host loses them
            servers[0].wait()
            servers.append(None)
        elif not sent and servers[-1] is None:
            servers[-1] = start_server(tmp_path / "server", port)  # back, on the same store and port
        return sent

    monkeypatch.setattr(tracking.Run, "send_rows", send_and_break)
    try:
        capfd.readouterr()
        pretrain.main(stage_args(tmp_path, params, "pretrain"))
        err = capfd.readouterr().err
    finally:
        for server in servers:
            if server is not None:
                stop(server)
    assert False in events and events[-1] is True  # a send failed, and the last one went through
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "is not answering" in warnings[0] and "training continues" in warnings[0], err
    assert len([line for line in err.splitlines() if line.startswith("MLflow store answers again")]) == 1
    assert "Traceback" not in err
    servers = [start_server(tmp_path / "server", port)]  # to read what the store holds
    try:
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("transferpipe-test").experiment_id])
        logged = _logged_steps(client, run.info.run_id)
    finally:
        stop(servers[0])
    written = pd.read_csv(tmp_path / "plots/pretrain/train.csv")["step"].tolist()
    assert run.info.status == "FINISHED"
    assert logged == written and written[-1] == 200  # every row of the training curve, once each
