"""Data-parallel training under torchrun: two CPU processes (gloo) against one process with the same global batch.

The two-process runs go through the real path a user (or dvc.yaml's command) takes: `python -m stages.<name>`
with TRANSFERPIPE_NPROC=2, which relaunches itself under `torch.distributed.run`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM

from stages import finetune, pretrain
from tests.helpers import REPO, files_in, make_corpus, run_short, tiny_params
from transferpipe import distributed

# The tiny profile, long enough for the loss to move: 20 steps of global batches of 8 blocks.
PRETRAIN = {"max_steps": 20, "eval_every": 10}
# With dropout off, fine-tuning draws no random numbers after the (seeded) shuffle, so one process and two
# must agree to float rounding: the same examples in every global batch, gradients averaged over the ranks.
FINETUNE = {"classifier_dropout": 0.0, "epochs": 3}
# Masks differ: each process draws its own for its half of the batch, so pretraining agrees only
# statistically. Measured: held-out loss 5.279 (one process) vs 5.252 (two), a 0.027 gap after 20 steps.
PRETRAIN_LOSS_TOLERANCE = 0.1


def run_stage(module: str, argv: list[str], uri: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env |= {"TRANSFERPIPE_NPROC": str(nproc), "MLFLOW_TRACKING_URI": uri}
    return subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def runs_in(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def csv_column(path: Path, column: str) -> list[float]:
    header, *rows = path.read_text().splitlines()
    i = header.split(",").index(column)
    return [float(row.split(",")[i]) for row in rows]


def pretrain_argv(d: Path, out: Path) -> list[str]:
    return ["--params", str(d / "params.yaml"), "--data", str(d / "b"), "--tokenizer", str(d / "tok"),
            "--out", str(out / "m"), "--scratch", str(out / "s"), "--metrics", str(out / "m.json"),
            "--plots", str(out / "pl")]  # fmt: skip


def finetune_argv(d: Path, out: Path) -> list[str]:
    return ["--params", str(d / "params.yaml"), "--data", str(d / "t"), "--encoder", str(d / "m"),
            "--out", str(out / "f"), "--metrics", str(out / "f.json"), "--plots", str(out / "fp")]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile (PRETRAIN, FINETUNE) as params.yaml beside prepared and tokenized tiny data."""
    d = tmp_path_factory.mktemp("tiny")
    pd.DataFrame(make_corpus()).to_csv(d / "tiny.csv", index=False)
    params = tiny_params(d, prepare={"source": str(d / "tiny.csv")}, pretrain=PRETRAIN, finetune=FINETUNE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        run_short(str(params), d, through="tokenize")
    return d


@pytest.fixture(scope="module")
def tiny(data: Path) -> Path:
    """One-process pretrain and finetune of the tiny data, in this process with its own MLflow store: the
    references the two-process runs are compared with."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{data / 'one.db'}")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("DVC_ROOT", raising=False)
        pretrain.main(pretrain_argv(data, data))
        finetune.main(finetune_argv(data, data))
    return data


@pytest.mark.slow
def test_pretrain_on_two_processes_matches_one_and_writes_one_mlflow_run(tiny: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'two.db'}"
    done = run_stage("stages.pretrain", pretrain_argv(tiny, tmp_path), uri)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = json.loads((tiny / "m.json").read_text()), json.loads((tmp_path / "m.json").read_text())
    assert two["train"]["steps"] == one["train"]["steps"] == 20
    assert abs(two["eval"]["loss"] - one["eval"]["loss"]) < PRETRAIN_LOSS_TOLERANCE
    train_one, train_two = csv_column(tiny / "pl/train.csv", "loss"), csv_column(tmp_path / "pl/train.csv", "loss")
    assert abs(train_two[-1] - train_one[-1]) < PRETRAIN_LOSS_TOLERANCE
    assert csv_column(tmp_path / "pl/train.csv", "learning_rate") == csv_column(tiny / "pl/train.csv", "learning_rate")

    # Rank 0 alone wrote the outputs (complete, loadable) and opened the one MLflow run.
    assert files_in(tmp_path / "m") == files_in(tiny / "m")
    AutoModelForMaskedLM.from_pretrained(tmp_path / "m")
    (run,) = runs_in(uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    history = MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "train/loss")
    assert [m.value for m in history] == pytest.approx(train_two, rel=1e-5)
    assert json.loads((tmp_path / "m/training_run.json").read_text())["mlflow_run_id"] == run.info.run_id


@pytest.mark.slow
def test_finetune_on_two_processes_matches_one_to_rounding(tiny: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'two.db'}"
    done = run_stage("stages.finetune", finetune_argv(tiny, tmp_path), uri)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = json.loads((tiny / "f.json").read_text()), json.loads((tmp_path / "f.json").read_text())
    assert two["validation"] == pytest.approx(one["validation"], rel=1e-4)
    assert two["train"]["best_epoch"] == one["train"]["best_epoch"] and two["train"]["steps"] == one["train"]["steps"]
    for curve, column in (("train.csv", "loss"), ("eval.csv", "loss"), ("eval.csv", "macro_f1")):
        assert csv_column(tmp_path / "fp" / curve, column) == pytest.approx(
            csv_column(tiny / "fp" / curve, column), rel=1e-4
        )
    # The kept (best epoch's) weights, restored through the DDP-wrapped training, saved with plain keys.
    weights_one, weights_two = load_file(tiny / "f/model.safetensors"), load_file(tmp_path / "f/model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_two[key], value, rtol=1e-4, atol=1e-5, msg=key)
    (run,) = runs_in(uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "finetune-pretrained"


def test_a_global_batch_that_does_not_split_evenly_stops_every_process_with_one_line(
    data: Path, tmp_path: Path
) -> None:
    params = yaml.safe_load((data / "params.yaml").read_text())
    params["pretrain"]["batch_size"] = 7
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = pretrain_argv(data, tmp_path)
    argv[1] = str(tmp_path / "params.yaml")
    done = run_stage("stages.pretrain", argv, f"sqlite:///{tmp_path / 'two.db'}")
    assert done.returncode != 0
    assert "error: params pretrain.batch_size=7 must be divisible by the 2 processes" in done.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.json").exists()


def test_a_bad_process_count_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "TRANSFERPIPE_NPROC": "two"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, "-m", "stages.pretrain", *pretrain_argv(tmp_path, tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: TRANSFERPIPE_NPROC='two' must be a number")


@pytest.mark.parametrize("n", [0, 1, 5, 12, 13])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_of_the_ranks_in_order_make_up_everything(n: int, world: int, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = []
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shards.append(distributed.shard_range(n))
    assert [i for shard in shards for i in shard] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.slow
def test_pretrain_with_torch_compile_and_loader_workers(data: Path, tmp_path: Path, mlflow_uri: str) -> None:
    """On this CPU inductor's first compile takes about a minute, hence slow."""
    params = tiny_params(tmp_path, pretrain={**PRETRAIN, "max_steps": 4, "torch_compile": True, "num_workers": 2})
    argv = pretrain_argv(data, tmp_path)
    argv[1] = str(params)
    metrics = pretrain.main(argv)
    assert metrics["train"]["steps"] == 4 and metrics["eval"]["loss"] < 10
    # Saved from the model itself: plain keys that transformers loads without warnings of missing weights.
    assert not any(key.startswith("_orig_mod") for key in load_file(tmp_path / "m/model.safetensors"))
    AutoModelForMaskedLM.from_pretrained(tmp_path / "m")
