"""A training stage killed with SIGKILL resumes from its last checkpoint: same weights bit for bit as an
uninterrupted run, the same MLflow run with continuous histories, and no checkpoint left afterwards."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from stages import prepare, pretrain, tokenize
from tests.helpers import REPO, tiny_params
from transferpipe.checkpoint import CHECKPOINT_DIR, Checkpoints

pytestmark = pytest.mark.slow


def stage_command(stage: str, params: Path, d: Path, out: str) -> list[str]:
    argv = {
        "pretrain": ["--data", f"{d}/b", "--tokenizer", f"{d}/tok", "--out", f"{d}/{out}", "--scratch",
                     f"{d}/{out}-scratch", "--metrics", f"{d}/{out}.json", "--plots", f"{d}/{out}-plots"],
        "finetune": ["--data", f"{d}/t", "--encoder", f"{d}/enc", "--variant", "pretrained", "--out", f"{d}/{out}",
                     "--metrics", f"{d}/{out}.json", "--plots", f"{d}/{out}-plots"],
    }[stage]  # fmt: skip
    return [sys.executable, "-m", f"stages.{stage}", "--params", str(params), *argv]


def env_for(uri: str) -> dict[str, str]:
    # PYTHONPATH keeps what a test put there (the tiny checkpoint package) after the repository's code.
    path = os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": path}


def checkpoint_files(d: Path) -> list[Path]:
    return sorted((d / CHECKPOINT_DIR).glob("*/checkpoint.pt"))


def descendants(pid: int) -> list[int]:
    """Every live process below pid (from /proc), children first found first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_after_first_checkpoint(command: list[str], d: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run command and SIGKILL it, and every process it started (torchrun's workers), once a checkpoint is on
    disk: as the OOM killer or a lost machine would."""
    proc = subprocess.Popen(command, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not checkpoint_files(d):
        assert proc.poll() is None, f"the stage ended before its first checkpoint:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    # torchrun starts its workers in sessions of their own: kill every descendant, as a lost machine would.
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(command, proc.returncode, out)


def run_stage(command: list[str], d: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(command, cwd=d, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def runs_by_name(client: MlflowClient, name: str) -> list:
    exp = client.get_experiment_by_name("transferpipe-test")
    return client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")


@pytest.fixture
def prepared(tmp_path: Path, tiny_csv: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Prepared and tokenized tiny data in tmp_path (p, tok, b, t), the working directory (the repository
    root, where .checkpoints goes)."""
    monkeypatch.chdir(tmp_path)
    params = tiny_params(tmp_path, prepare={"source": str(tiny_csv)}, tokenize={"max_length": 16})
    d = tmp_path
    prepare.main(["--params", str(params), "--out", f"{d}/p", "--stats", f"{d}/s.json"])
    tokenize.main(["--params", str(params), "--data", f"{d}/p", "--tokenizer", f"{d}/tok", "--blocks", f"{d}/b",
                   "--out", f"{d}/t"])  # fmt: skip
    return d


def pretrain_encoder(d: Path, params: Path) -> None:
    """The encoder finetune starts from (d/enc), pretrained in-process with `params`."""
    pretrain.main(
        ["--params", str(params), "--data", f"{d}/b", "--tokenizer", f"{d}/tok", "--out", f"{d}/enc",
         "--scratch", f"{d}/enc-scratch", "--metrics", f"{d}/enc.json", "--plots", f"{d}/enc-plots"]
    )  # fmt: skip


def long_pretraining(d: Path, steps: int, **model: str) -> Path:
    """The tiny profile with `steps` of pretraining, a checkpoint every 30: long enough to kill mid-run."""
    return tiny_params(
        d, prepare={"source": str(d / "tiny.csv")}, tokenize={"max_length": 16},
        pretrain={"max_steps": steps, "checkpoint_every": 30, "eval_every": 40}, model=model,
    )  # fmt: skip


@pytest.mark.parametrize("start", ["new", "checkpoint"])
def test_killed_pretraining_resumes_to_the_same_weights_in_the_same_run(
    prepared: Path, mlflow_uri: str, start: str, request: pytest.FixtureRequest
) -> None:
    """From a new encoder, and continued from a published checkpoint without a masked-LM head (the fresh head
    restored from the checkpoint too)."""
    d = prepared
    steps = 120
    model = {"checkpoint": str(request.getfixturevalue("checkpoint_package"))} if start == "checkpoint" else {}
    params = long_pretraining(d, steps, **model)
    if model:  # the checkpoint's own tokenizer and blocks
        tokenize.main(["--params", str(params), "--data", f"{d}/p", "--tokenizer", f"{d}/tok", "--blocks", f"{d}/b",
                       "--out", f"{d}/t"])  # fmt: skip
    env = env_for(mlflow_uri)
    run_stage(stage_command("pretrain", params, d, "whole"), d, env)
    assert checkpoint_files(d) == []  # a successful stage deletes its checkpoints

    killed = kill_after_first_checkpoint(stage_command("pretrain", params, d, "resumed"), d, env)
    assert killed.returncode == -signal.SIGKILL
    assert not (d / "resumed").exists()  # nothing half-written
    resumed_from = Checkpoints(checkpoint_files(d)[0].parent, None).state["progress"].step
    assert 0 < resumed_from < steps
    output = run_stage(stage_command("pretrain", params, d, "resumed"), d, env)
    assert f"resuming pretrain from step {resumed_from} of {steps}" in output
    assert checkpoint_files(d) == []

    assert_same_weights(d / "whole", d / "resumed")
    assert (d / "whole-plots/eval.csv").read_text() == (d / "resumed-plots/eval.csv").read_text()
    assert (d / "whole-plots/train.csv").read_text() == (d / "resumed-plots/train.csv").read_text()

    client = MlflowClient(mlflow_uri)
    whole, resumed = sorted(runs_by_name(client, "pretrain"), key=lambda r: r.info.start_time)
    assert resumed.info.status == whole.info.status == "FINISHED"  # one run for the killed and resumed process
    for key in ("train/loss", "train/learning_rate", "eval/loss"):
        expected = history(client, whole.info.run_id, key)
        got = history(client, resumed.info.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in expected], key  # no step missing or repeated
        assert got == expected, key


@pytest.mark.parametrize("accumulation", [1, 2])
def test_killed_finetuning_resumes_mid_epoch_to_the_same_weights(
    prepared: Path, mlflow_uri: str, accumulation: int
) -> None:
    d = prepared
    # 60 training documents in batches of 8: 8 steps an epoch, so a checkpoint every 20 steps is mid-epoch. With
    # 2 micro-batches of 4 per step, an epoch is 15 micro-batches: steps cross epochs, checkpoints stay on steps.
    params = tiny_params(
        d, prepare={"source": str(d / "tiny.csv")}, tokenize={"max_length": 16},
        finetune={"epochs": 6, "checkpoint_every": 20, "early_stopping_patience": 100,
                  "gradient_accumulation_steps": accumulation},
    )  # fmt: skip
    pretrain_encoder(d, params)
    env = env_for(mlflow_uri)
    run_stage(stage_command("finetune", params, d, "whole"), d, env)
    killed = kill_after_first_checkpoint(stage_command("finetune", params, d, "resumed"), d, env)
    assert killed.returncode == -signal.SIGKILL
    progress = Checkpoints(checkpoint_files(d)[0].parent, None).state["progress"]
    micro_batches_per_epoch = math.ceil(60 / (8 // accumulation))
    assert 0 < progress.position < micro_batches_per_epoch, "the checkpoint is not mid-epoch"
    assert progress.step == 20
    output = run_stage(stage_command("finetune", params, d, "resumed"), d, env)
    assert f"resuming finetune from step {progress.step} of " in output

    assert_same_weights(d / "whole", d / "resumed")
    assert (d / "whole-plots/eval.csv").read_text() == (d / "resumed-plots/eval.csv").read_text()
    client = MlflowClient(mlflow_uri)
    whole, resumed = sorted(runs_by_name(client, "finetune-pretrained"), key=lambda r: r.info.start_time)
    assert history(client, resumed.info.run_id, "eval/macro_f1") == history(client, whole.info.run_id, "eval/macro_f1")
    assert resumed.info.status == "FINISHED"


def test_killed_pretraining_under_torchrun_resumes_every_rank(prepared: Path, mlflow_uri: str) -> None:
    d = prepared
    steps = 120
    params = long_pretraining(d, steps)
    env = {k: v for k, v in env_for(mlflow_uri).items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["TRANSFERPIPE_NPROC"] = "2"
    run_stage(stage_command("pretrain", params, d, "whole"), d, env)
    killed = kill_after_first_checkpoint(stage_command("pretrain", params, d, "resumed"), d, env)
    assert killed.returncode == -signal.SIGKILL
    state = Checkpoints(checkpoint_files(d)[0].parent, None).state
    assert len(state["rng"]) == 2  # each rank's own RNG states
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    output = run_stage(stage_command("pretrain", params, d, "resumed"), d, env)
    assert f"resuming pretrain from step {state['progress'].step} of {steps}" in output
    assert_same_weights(d / "whole", d / "resumed")
    assert (d / "whole-plots/eval.csv").read_text() == (d / "resumed-plots/eval.csv").read_text()


def test_a_stop_signal_checkpoints_the_step_it_arrived_at_and_a_rerun_resumes_there(
    prepared: Path, mlflow_uri: str
) -> None:
    """A preemption (SIGTERM; SIGUSR1, a scheduler's warning, takes the same path) mid-epoch, with no periodic
    checkpoints: the step under way finishes, a checkpoint of it is written, the run ends KILLED with one line,
    and the rerun continues from that step to the weights of an uninterrupted run, in the same MLflow run."""
    d, signum = prepared, signal.SIGTERM
    # Steps of a few milliseconds, a few hundred in all; rows go to MLflow as they come.
    params = tiny_params(
        d, prepare={"source": str(d / "tiny.csv")}, tokenize={"max_length": 16},
        finetune={"epochs": 20, "checkpoint_every": None, "early_stopping_patience": 1000},
    )  # fmt: skip
    pretrain_encoder(d, params)
    env = env_for(mlflow_uri)
    run_stage(stage_command("finetune", params, d, "whole"), d, env)
    client = MlflowClient(mlflow_uri)
    (whole,) = runs_by_name(client, "finetune-pretrained")

    proc = subprocess.Popen(stage_command("finetune", params, d, "stopped"), cwd=d, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 240
    while not [r for r in runs_by_name(client, "finetune-pretrained") if r.info.run_id != whole.info.run_id
               and client.get_metric_history(r.info.run_id, "train/loss")]:  # fmt: skip
        assert proc.poll() is None and time.monotonic() < deadline, "no training row before the stage ended"
        time.sleep(0.05)
    os.kill(proc.pid, signum)
    signalled = time.monotonic()
    out, err = proc.communicate(timeout=120)
    seconds = time.monotonic() - signalled
    assert proc.returncode == 128 + signum, out + err
    name = signal.Signals(signum).name
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"stopped by {name}: finetune checkpointed step "), err
    step = int(line.split("step ")[1].split()[0])
    total = int(line.split(" of ")[1].split(":")[0])
    assert 0 < step < total
    assert line == f"stopped by {name}: finetune checkpointed step {step} of {total}: a rerun resumes there"
    assert "Traceback" not in err
    assert not (d / "stopped").exists()
    assert Checkpoints(checkpoint_files(d)[0].parent, None).state["progress"].step == step
    (stopped,) = [r for r in runs_by_name(client, "finetune-pretrained") if r.info.run_id != whole.info.run_id]
    assert stopped.info.status == "KILLED"
    assert history(client, stopped.info.run_id, "train/loss")[-1][0] <= step  # nothing logged past the checkpoint
    assert seconds < 60, f"{seconds:.1f} s from the signal to the exit"

    output = run_stage(stage_command("finetune", params, d, "stopped"), d, env)
    assert f"resuming finetune from step {step} of {total}" in output
    assert_same_weights(d / "whole", d / "stopped")
    resumed = client.get_run(stopped.info.run_id)
    assert resumed.info.status == "FINISHED"
    for key in ("train/loss", "eval/macro_f1"):
        assert history(client, resumed.info.run_id, key) == history(client, whole.info.run_id, key), key


def test_a_changed_param_input_or_code_never_resumes_a_stale_checkpoint(prepared: Path) -> None:
    d = prepared
    base = tiny_params(d, pretrain={"max_steps": 6})
    script = d / "pretrain.py"
    script.write_text((REPO / "stages/pretrain.py").read_text())

    def key(max_steps: int = 6, data: str = "b") -> Path:
        sections = {"pretrain": {"max_steps": max_steps}}
        return Checkpoints.for_stage("pretrain", "pretrain", sections, [d / data], 2, script).folder

    first = key()
    assert first == key()
    assert first != key(max_steps=7)
    assert first != key(data="t")
    script.write_text(script.read_text() + "# a changed line of the stage's code\n")
    assert first != key()
    assert base.exists()


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path / "ck", every=1)
    checkpoints.save({"step": 1, "weights": torch.ones(3)})
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for an unpicklable object
        checkpoints.save({"step": 2, "weights": torch.zeros(3), "bad": lambda: None})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["checkpoint.pt"]
    state = Checkpoints(tmp_path / "ck", every=1).state
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(3))


def test_a_tracking_failure_after_training_keeps_the_model_and_a_rerun_only_records_it(
    prepared: Path, mlflow_uri: str, capsys: pytest.CaptureFixture
) -> None:
    import mlflow

    from stages import finetune
    from transferpipe.errors import UserError

    d = prepared
    params = tiny_params(d, prepare={"source": str(d / "tiny.csv")}, tokenize={"max_length": 16})
    pretrain_encoder(d, params)
    # The experiment's artifact store sits below a file: every artifact write (the model) fails, metrics do not.
    (d / "blocker").write_text("not a folder")
    mlflow.set_tracking_uri(mlflow_uri)
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("transferpipe-test")
    client.rename_experiment(experiment.experiment_id, "transferpipe-test-old")
    client.create_experiment("transferpipe-test", artifact_location=(d / "blocker" / "artifacts").as_uri())
    argv = stage_command("finetune", params, d, "model")[3:]
    with pytest.raises(UserError, match=r"is complete, but MLflow could not record it") as caught:
        finetune.main(argv)
    assert "\n" not in str(caught.value)
    assert (d / "model/model.safetensors").is_file() and (d / "model.json").is_file()  # outputs kept
    first = load_file(d / "model/model.safetensors")
    assert [p.parent.name.startswith("finetune-pretrained-") for p in checkpoint_files(d)] == [True]

    (d / "blocker").unlink()  # the store is fixed
    capsys.readouterr()
    finetune.main(argv)
    captured = capsys.readouterr()
    assert "training finished earlier" in captured.out + captured.err
    second = load_file(d / "model/model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert checkpoint_files(d) == []
    run = runs_by_name(client, "finetune-pretrained")[0]
    assert run.info.status == "FINISHED"
    version = client.get_model_version_by_alias("transferpipe-test-classifier", "candidate")
    assert version.run_id == run.info.run_id


def test_a_retry_after_a_failed_registration_logs_and_registers_the_model_once(
    prepared: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The model is logged, then the registration fails (the store went away between the two calls, here
    injected): the rerun finds the logged model by its files' digest and registers it, without a second copy."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from stages import finetune
    from transferpipe.errors import UserError

    d = prepared
    params = tiny_params(d, prepare={"source": str(d / "tiny.csv")}, tokenize={"max_length": 16})
    pretrain_encoder(d, params)
    argv = stage_command("finetune", params, d, "model")[3:]
    register = mlflow.register_model

    def unreachable(*args: object, **kwargs: object) -> None:
        raise MlflowException("API request to http://tracking/api/2.0/mlflow/model-versions/create failed")

    monkeypatch.setattr(mlflow, "register_model", unreachable)
    with pytest.raises(UserError, match=r"is complete, but MLflow could not record it"):
        finetune.main(argv)
    monkeypatch.setattr(mlflow, "register_model", register)
    capsys.readouterr()
    finetune.main(argv)
    assert "the model is logged to MLflow already" in capsys.readouterr().out

    client = MlflowClient(mlflow_uri)
    (run,) = runs_by_name(client, "finetune-pretrained")
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )  # fmt: skip
    assert len(models) == 1
    (version,) = client.search_model_versions("name = 'transferpipe-test-classifier'")
    assert version.source == models[0].model_uri and version.run_id == run.info.run_id
    assert client.get_model_version_by_alias("transferpipe-test-classifier", "candidate").version == version.version
