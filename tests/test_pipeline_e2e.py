"""The real `dvc repro` in a temporary copy of the repository with the tiny profile, then the DVC commands
people use on it: a no-op second repro, metrics show, params diff, and an experiment run."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_PARAMS, copy_repo, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A committed copy of the pipeline, reproduced once with the tiny profile."""
    root = copy_repo(tmp_path_factory.mktemp("repo"))
    shutil.copy2(TINY_PARAMS, root / "params.yaml")
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    # The copy's own code, not the editable install's, runs the stages.
    env |= {"PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    sh(["git", "init", "-q", "-b", "main"], root, env)
    sh(["git", "config", "user.email", "test@example.com"], root, env)
    sh(["git", "config", "user.name", "test"], root, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "pipeline"], root, env)
    sh([sys.executable, "-m", "dvc", "repro"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "reproduced"], root, env)
    return root, env


def test_repro_writes_every_output_with_finite_metrics(repo: tuple[Path, dict]) -> None:
    root, _ = repo
    for out in (
        "data/prepared",
        "data/blocks",
        "data/tokenized",
        "models/tokenizer",
        "models/pretrained",
        "models/scratch",
        "models/finetuned/pretrained",
        "models/finetuned/scratch",
        "plots/pretrain",
        "plots/finetune",
        "plots/evaluate",
    ):
        assert (root / out).is_dir() and any((root / out).iterdir()), out
    assert (root / "dvc.lock").is_file()
    data = json.loads((root / "metrics/data.json").read_text())
    assert data["documents"]["raw"] == 2225 and data["documents"]["duplicates_removed"] > 90
    ev = json.loads((root / "metrics/evaluate.json").read_text())
    assert set(ev["test"]) == {"pretrained", "scratch", "tfidf_logreg"}
    values = [v for m in ev["test"].values() for v in m.values()]
    assert values and all(math.isfinite(v) for v in values)
    assert ev["test"]["tfidf_logreg"]["accuracy"] > 0.9  # the baseline on real BBC data


def test_second_repro_is_a_noop(repo: tuple[Path, dict]) -> None:
    root, env = repo
    out = sh([sys.executable, "-m", "dvc", "repro"], root, env).stdout
    assert "Running stage" not in out
    assert "up to date" in out.lower()


def test_mlflow_store_at_repo_root_holds_runs_and_a_loadable_model(repo: tuple[Path, dict]) -> None:
    root, env = repo
    script = f"""
import json, mlflow
from mlflow.tracking import MlflowClient
mlflow.set_tracking_uri("sqlite:///{root / "mlflow.db"}")
c = MlflowClient()
exp = c.get_experiment_by_name("transferpipe-test")
runs = c.search_runs([exp.experiment_id])
out = {{"stages": sorted(r.data.tags["transferpipe.stage"] for r in runs),
        "status": sorted({{r.info.status for r in runs}})}}
fine = next(r for r in runs if r.data.tags.get("transferpipe.variant") == "pretrained")
out["history"] = len(c.get_metric_history(fine.info.run_id, "train/loss"))
out["commit"] = fine.data.tags.get("mlflow.source.git.commit")
out["test_f1"] = fine.data.metrics.get("test/macro_f1")
out["pred"] = mlflow.pyfunc.load_model(f"runs:/{{fine.info.run_id}}/model").predict(["shares fell"])["label"].tolist()
print(json.dumps(out))
"""
    result = json.loads(sh([sys.executable, "-c", script], root, env).stdout.strip().splitlines()[-1])
    assert result["stages"] == ["finetune", "finetune", "pretrain"]
    assert result["status"] == ["FINISHED"]
    assert result["history"] >= 2
    assert result["commit"] and len(result["commit"]) == 40
    assert result["test_f1"] is not None
    assert result["pred"][0] in {"business", "entertainment", "politics", "sports", "tech"}
    assert (root / "mlartifacts").is_dir()


def test_metrics_show_and_params_diff(repo: tuple[Path, dict]) -> None:
    root, env = repo
    shown = json.loads(sh([sys.executable, "-m", "dvc", "metrics", "show", "--json"], root, env).stdout)
    files = next(iter(shown.values()))["data"]
    assert {
        "metrics/evaluate.json",
        "metrics/finetune/pretrained.json",
        "metrics/finetune/scratch.json",
        "metrics/pretrain.json",
    } <= set(files)
    params = (root / "params.yaml").read_text()
    try:
        (root / "params.yaml").write_text(params.replace("epochs: 2", "epochs: 1"))
        diff = json.loads(sh([sys.executable, "-m", "dvc", "params", "diff", "--json"], root, env).stdout)
        change = diff["params.yaml"]["finetune.epochs"]
        assert (change["old"], change["new"]) == (2, 1)
        # A finetune param reruns both finetune variants, not pretrain. A dry run shows dvc's decision without
        # training; it lists only the stages whose own params changed (evaluate reruns after them, on their
        # new outputs; test_experiment_run_lands_in_the_repo_store runs such a change for real).
        out = sh([sys.executable, "-m", "dvc", "repro", "--dry"], root, env).stdout
        assert re.findall(r"Running stage '([\w@]+)'", out) == ["finetune@pretrained", "finetune@scratch"]
    finally:
        (root / "params.yaml").write_text(params)
    assert "up to date" in sh([sys.executable, "-m", "dvc", "status"], root, env).stdout


def test_experiment_run_lands_in_the_repo_store(repo: tuple[Path, dict]) -> None:
    root, env = repo
    out = sh(
        [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", "fewer-epochs", "-S", "finetune.epochs=1"],
        root,
        env,
    ).stdout
    # A finetune param reruns both finetune variants and evaluate only.
    assert re.findall(r"Running stage '([\w@]+)'", out) == ["finetune@pretrained", "finetune@scratch", "evaluate"]
    shown = json.loads(sh([sys.executable, "-m", "dvc", "exp", "show", "--json"], root, env).stdout)
    names = json.dumps(shown)
    assert "fewer-epochs" in names
    script = f"""
import mlflow
from mlflow.tracking import MlflowClient
mlflow.set_tracking_uri("sqlite:///{root / "mlflow.db"}")
runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("transferpipe-test").experiment_id],
                                  "tags.`dvc.exp_name` = 'fewer-epochs'")
print(sorted((r.info.run_name, r.info.status, r.data.params.get("finetune.epochs")) for r in runs))
"""
    out = sh([sys.executable, "-c", script], root, env).stdout.strip().splitlines()[-1]
    assert (
        out
        == "[('finetune-pretrained-fewer-epochs', 'FINISHED', '1'), ('finetune-scratch-fewer-epochs', 'FINISHED', '1')]"
    )
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))
