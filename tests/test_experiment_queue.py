"""`dvc exp run --queue` experiments run by two concurrent queue workers: every stage's MLflow run lands in
the repository's one SQLite store (not in the experiment copies under .dvc/tmp/exps), finished, none lost.

The workspace has never been reproduced, so the two workers' first stages create that store at the same
time: the case that breaks MLflow's schema migration without tracking's store lock."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import committed_tiny_repo

pytestmark = pytest.mark.slow

# One experiment per worker: both start at once on a workspace with no store yet (two rounds took twice the time).
EXPERIMENTS = {"ep1": ["finetune.epochs=1"], "steps3": ["pretrain.max_steps=3"]}


def dvc(root: Path, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert not check or proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr}"
    return proc


def queue_states(root: Path, env: dict[str, str]) -> dict[str, str]:
    """`dvc queue status`: experiment name -> Queued / Running / Success / Failed."""
    out = dvc(root, env, "queue", "status").stdout
    states = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 3 and words[1] in EXPERIMENTS:
            states[words[1]] = words[-1]
    return states


def test_queued_experiments_on_two_workers_all_land_in_the_repo_store(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    env = committed_tiny_repo(root)
    for name, sets in EXPERIMENTS.items():
        dvc(root, env, "exp", "run", "--queue", "-n", name, *[a for s in sets for a in ("-S", s)])
    try:
        # The workers it starts inherit its stdout and stderr: captured through pipes, they would never close.
        with (tmp_path / "queue-start.log").open("w") as log:
            started = subprocess.run(
                [sys.executable, "-m", "dvc", "queue", "start", "-j", "2"],
                cwd=root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
        assert started.returncode == 0, (tmp_path / "queue-start.log").read_text()
        deadline = time.monotonic() + 600
        while True:
            states = queue_states(root, env)
            if set(states) == set(EXPERIMENTS) and not {"Queued", "Running"} & set(states.values()):
                break
            assert time.monotonic() < deadline, f"queue still busy after 10 minutes: {states}"
            time.sleep(5)
    finally:
        dvc(root, env, "queue", "stop", "--kill", check=False)
    logs = {name: dvc(root, env, "queue", "logs", name, check=False).stdout[-2000:] for name in EXPERIMENTS}
    assert states == dict.fromkeys(EXPERIMENTS, "Success"), logs

    script = f"""
import json
from mlflow.tracking import MlflowClient
c = MlflowClient("sqlite:///{root / "mlflow.db"}")
exp = c.get_experiment_by_name("transferpipe-test")
runs = c.search_runs([exp.experiment_id], max_results=1000)
versions = c.search_model_versions("name = 'transferpipe-test-classifier'")
print(json.dumps({{
    "runs": sorted([r.data.tags.get("dvc.exp_name"), r.data.tags["transferpipe.stage"], r.info.status,
                    r.data.params.get("finetune.epochs") or r.data.params.get("pretrain.max_steps")] for r in runs),
    "artifacts": sorted({{r.info.artifact_uri.split("/mlartifacts/")[0] for r in runs}}),
    "versions": len(versions),
    "champion": str(c.get_model_version_by_alias("transferpipe-test-classifier", "champion").version),
}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runs"] == [
        ["ep1", "finetune", "FINISHED", "1"],
        ["ep1", "finetune", "FINISHED", "1"],
        ["ep1", "pretrain", "FINISHED", "6"],
        ["steps3", "finetune", "FINISHED", "2"],
        ["steps3", "finetune", "FINISHED", "2"],
        ["steps3", "pretrain", "FINISHED", "3"],
    ]
    # Artifacts went beside the repository's store, not into an experiment copy that DVC deletes.
    assert result["artifacts"] == [root.resolve().as_uri()]
    assert result["versions"] == 2 and result["champion"] in {"1", "2"}
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))
