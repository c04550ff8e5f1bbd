"""Shared fixtures: a tiny labeled corpus and a tiny params profile, so every test runs offline in seconds."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_PARAMS = REPO / "tests" / "fixtures" / "params-tiny.yaml"

# Five topics with their own vocabulary, so even a tiny model can learn something in a few steps.
TOPICS = {
    "business": "bank shares market profit economy trade company investors growth prices",
    "sport": "match goal team player season coach league cup score win",
    "tech": "software computer internet phone users digital network chip data online",
    "politics": "minister election party vote government labour parliament policy leader tax",
    "entertainment": "film music star award album band show actor festival singer",
}


def make_corpus(n_per_class: int = 12, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    common = ["the", "a", "of", "in", "and", "to", "said", "on", "for", "with", "was", "by", "it"]
    rows = []
    for label, words in TOPICS.items():
        vocab = words.split()
        for _ in range(n_per_class):
            n = rng.randint(12, 30)
            text = " ".join(rng.choice(vocab) if rng.random() < 0.5 else rng.choice(common) for _ in range(n))
            rows.append({"text": text.capitalize() + ".", "label": label})
    rng.shuffle(rows)
    return rows


@pytest.fixture
def tiny_csv(tmp_path: Path) -> Path:
    import pandas as pd

    path = tmp_path / "tiny.csv"
    pd.DataFrame(make_corpus()).to_csv(path, index=False)
    return path


def tiny_params(tmp_path: Path, **overrides: dict) -> Path:
    """The tiny profile with per-section overrides, written to tmp_path/params.yaml."""
    params = yaml.safe_load(TINY_PARAMS.read_text())
    for key in ("source", "unlabeled_source"):  # the repository's data, wherever the test runs from
        params["prepare"][key] = str(REPO / params["prepare"][key])
    for section, values in overrides.items():
        params[section].update(values)
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return out


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store for this test only."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Tests never reach the hub: a missing local file must fail fast, not retry over the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    # A test's checkpoints stay its own, never in the repository where another test could resume them.
    monkeypatch.setenv("TRANSFERPIPE_CHECKPOINT_DIR", str(tmp_path / ".checkpoints"))


def copy_repo(dest: Path) -> Path:
    """The tracked pipeline files copied into dest (for tests that run the real dvc)."""
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml", "stages", "src", "data/sources", "data/unlabeled"):
        src = REPO / name
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def clean_env(root: Path) -> dict[str, str]:
    """The environment for real `dvc` / `git` processes in a repository copy: its own code, offline, no
    MLflow or DVC variables leaking in from the test run."""
    import os
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DVC_")) and k != "TRANSFERPIPE_CHECKPOINT_DIR"
    }
    env |= {"PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def committed_tiny_repo(root: Path) -> dict[str, str]:
    """A copy of the pipeline with the tiny profile in root, git- and dvc-initialized and committed (not
    reproduced); returns the environment to run dvc in it with."""
    import subprocess
    import sys

    copy_repo(root)
    shutil.copy2(TINY_PARAMS, root / "params.yaml")
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())
    env = clean_env(root)
    for args in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "test@example.com"],
        ["git", "config", "user.name", "test"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        ["cp", str(REPO / ".dvcignore"), ".dvcignore"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "pipeline"],
    ):
        subprocess.run(args, cwd=root, env=env, check=True, capture_output=True, timeout=120)
    return env


def wait_for_http(url: str, proc, log: Path, timeout: float) -> None:
    """Poll url until it answers 200; fail with the end of log if proc exits first or timeout passes."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout:.0f} s"
        time.sleep(0.5)
