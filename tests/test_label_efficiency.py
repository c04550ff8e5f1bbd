"""`transferpipe label-efficiency` on real DVC experiments of a throwaway repository whose one stage writes
metrics/evaluate.json from its params (no training: the scores are a known function of labels and seed)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, sh
from transferpipe.errors import UserError
from transferpipe.label_efficiency import Experiment, experiments_from_show, plot, summarize, to_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# pretrained = 0.5 + labels/100 + seed/1000 ("all" counts as 40), scratch = pretrained - 0.2, baseline 0.9.
STAGE = """
import json, yaml
p = yaml.safe_load(open("params.yaml"))["finetune"]
n = 40 if p["labels_per_class"] == "all" else p["labels_per_class"]
f1 = 0.5 + n / 100 + p["seed"] / 1000
test = {"pretrained": {"macro_f1": f1, "accuracy": f1}, "scratch": {"macro_f1": f1 - 0.2, "accuracy": f1 - 0.2},
        "tfidf_logreg": {"macro_f1": 0.9, "accuracy": 0.9}}
json.dump({"test": test}, open("metrics/evaluate.json", "w"))
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("sweep")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))}
    env |= {"PYTHONPATH": str(REPO / "src"), "DVC_NO_ANALYTICS": "1"}
    (root / "stage.py").write_text(STAGE)
    (root / "params.yaml").write_text("finetune:\n  labels_per_class: all\n  seed: 42\n  epochs: 6\n")
    (root / "metrics").mkdir()
    (root / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [finetune]\n"
        "    metrics:\n      - metrics/evaluate.json:\n          cache: false\n"
    )
    for args in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "test@example.com"],
        ["git", "config", "user.name", "test"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "pipeline"],
    ):
        sh(args, root, env)
    # The documented sweep: one queued experiment per (labels per class, seed), then the queue.
    sh(
        [sys.executable, "-m", "dvc", "exp", "run", "--queue"]
        + ["-S", "finetune.labels_per_class=5,20,all", "-S", "finetune.seed=1,2"],
        root,
        env,
    )
    sh([sys.executable, "-m", "dvc", "exp", "run", "--run-all", "-j", "1"], root, env)
    # Another recipe's sweep on a branch of its own (as the LSTM profile's is run), then back to main.
    (root / "params.yaml").write_text("finetune:\n  labels_per_class: all\n  seed: 42\n  epochs: 8\n")
    for args in (["git", "checkout", "-qb", "other"], ["git", "commit", "-qam", "other recipe"]):
        sh(args, root, env)
    queue = [sys.executable, "-m", "dvc", "exp", "run", "--queue"]
    sh(queue + ["-S", "finetune.labels_per_class=20", "-S", "finetune.seed=1,2,3"], root, env)
    sh([sys.executable, "-m", "dvc", "exp", "run", "--run-all", "-j", "1"], root, env)
    sh(["git", "checkout", "-q", "main"], root, env)
    return root, env


def label_efficiency(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "transferpipe.cli", "label-efficiency", *args], root, env, check=False)


def test_sweep_becomes_a_table_and_a_plot(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    proc = label_efficiency(root, env, "--out", "reports/le")
    assert proc.returncode == 0, proc.stderr
    with (root / "reports/le/label_efficiency.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["labels_per_class"] for r in rows] == ["5", "20", "all"]
    assert [r["experiments"] for r in rows] == ["2", "2", "2"]
    for row, n in zip(rows, (5, 20, 40), strict=True):
        assert float(row["pretrained_mean"]) == pytest.approx(0.5 + n / 100 + 0.0015)
        assert float(row["pretrained_std"]) == pytest.approx(0.000707, abs=1e-6)  # seeds 1 and 2
        assert float(row["scratch_mean"]) == pytest.approx(0.3 + n / 100 + 0.0015)
        assert float(row["tfidf_logreg_mean"]) == pytest.approx(0.9)
        assert float(row["pretrained_minus_scratch"]) == pytest.approx(0.2)
    md = re.sub(" +", " ", (root / "reports/le/label_efficiency.md").read_text())  # pandas pads the cells
    (row,) = [line for line in md.splitlines() if line.startswith("| 20 |")]
    assert row.startswith("| 20 | 2 | 0.70") and row.endswith(" ± 0.001 | 0.900 ± 0.000 | +0.200 |")
    assert "6 finished experiment(s)." in md  # no other param differs, so nothing is named as mixed
    assert (root / "reports/le/label_efficiency.png").read_bytes()[:8] == PNG_MAGIC
    assert "| 5 | 2 |" in re.sub(" +", " ", proc.stdout)


def test_only_keeps_the_experiments_with_a_param_value(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    proc = label_efficiency(root, env, "--out", "reports/seed1", "--only", "finetune.seed=1")
    assert proc.returncode == 0, proc.stderr
    with (root / "reports/seed1/label_efficiency.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["experiments"] for r in rows] == ["1", "1", "1"]
    assert float(rows[1]["pretrained_mean"]) == pytest.approx(0.5 + 0.2 + 0.001)
    assert "3 finished experiment(s) with finetune.seed=1." in (root / "reports/seed1/label_efficiency.md").read_text()
    proc = label_efficiency(root, env, "--out", "reports/none", "--only", "finetune.seed")
    assert proc.returncode == 2 and "expected key=value" in proc.stderr


def test_rev_reads_the_sweeps_of_other_branches(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    proc = label_efficiency(
        root, env, "--out", "reports/both", "--rev", "main", "--rev", "other", "--by", "finetune.epochs"
    )
    assert proc.returncode == 0, proc.stderr
    with (root / "reports/both/label_efficiency.csv").open() as f:
        rows = [(r["finetune.epochs"], r["labels_per_class"], r["experiments"]) for r in csv.DictReader(f)]
    assert rows == [("6", "5", "2"), ("6", "20", "2"), ("6", "all", "2"), ("8", "20", "3")]
    assert "9 finished experiment(s)." in (root / "reports/both/label_efficiency.md").read_text()
    proc = label_efficiency(root, env, "--out", "reports/twice", "--rev", "main", "--rev", "HEAD")  # one commit
    assert proc.returncode == 0, proc.stderr
    assert "6 finished experiment(s)." in (root / "reports/twice/label_efficiency.md").read_text()
    proc = label_efficiency(root, env, "--out", "reports/other", "--rev", "other")
    assert proc.returncode == 0, proc.stderr
    assert "3 finished experiment(s)." in (root / "reports/other/label_efficiency.md").read_text()
    proc = label_efficiency(root, env, "--out", "reports/nowhere", "--rev", "no-such-branch")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: dvc exp show --json --hide-queued --rev no-such-branch failed")
    assert not (root / "reports/nowhere").exists()


def test_an_experiment_running_in_the_workspace_is_unfinished() -> None:
    # The shape `dvc exp show --json` (DVC 3.67) gives while `dvc exp run` runs in the workspace: the new
    # params beside the metrics file of the last finished run, rev "workspace" and no timestamp.
    def rev(sha: str, timestamp: str | None, seed: int) -> dict:
        params = {"params.yaml": {"data": {"finetune": {"labels_per_class": 20, "seed": seed}}}}
        metrics = {"metrics/evaluate.json": {"data": {"test": {"pretrained": {"macro_f1": 0.9}}}}}
        return {"rev": sha, "name": f"exp-{seed}", "data": {"rev": sha, "timestamp": timestamp, "params": params,
                                                             "metrics": metrics}}  # fmt: skip

    shown = [{"rev": "workspace", "experiments": None}, {"rev": "f39a580", "name": "main", "experiments": [
        {"revs": [rev("workspace", None, 7)]}, {"revs": [rev("ae93833", "2026-12-06T13:38:23", 1)]}]}]  # fmt: skip
    found, unfinished = experiments_from_show(shown)
    assert [e.params["finetune.seed"] for e in found] == [1] and unfinished == 1
    # A queued experiment that failed is shown with its baseline's files, metrics included: it counts as unfinished.
    failed = {"executor": {"state": "failed"}, "revs": [rev("9c1d2e3", "2026-12-07T17:34:16", 2)]}
    shown[1]["experiments"].append(failed)
    found, unfinished = experiments_from_show(shown)
    assert [e.params["finetune.seed"] for e in found] == [1] and unfinished == 2


def test_no_experiments_is_one_line_and_exit_2(tmp_path: Path, repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    sh(["git", "clone", "-q", str(root), str(tmp_path / "clone")], tmp_path, env)
    proc = label_efficiency(tmp_path / "clone", env, "--out", "out")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: no finished DVC experiments")
    assert not (tmp_path / "clone/out").exists()


def test_summary_names_params_that_differ_besides_labels_and_seed() -> None:
    def experiment(labels: int | str, epochs: int, f1: float) -> Experiment:
        params = {"finetune.labels_per_class": labels, "finetune.seed": 1, "finetune.epochs": epochs}
        return Experiment(str(labels), params, {"pretrained": f1})

    experiments = [experiment("all", 6, 0.9), experiment(10, 3, 0.7), experiment(2, 3, 0.4)]
    rows, mixed = summarize(experiments)
    assert [r["labels_per_class"] for r in rows] == [2, 10, "all"]  # numeric order, `all` last
    assert mixed == ["finetune.epochs"]
    assert "pretrained_minus_scratch" not in rows[0]  # no scratch scores, no difference column
    with pytest.raises(UserError, match="no finished DVC experiments"):
        summarize([])


def test_by_puts_systems_side_by_side_and_names_only_differences_within_one(tmp_path: Path) -> None:
    def experiment(arch: str, vocab: int, labels: int | str, seed: int, f1: float, epochs: int = 4) -> Experiment:
        params = {"model.architecture": arch, "tokenize.vocab_size": vocab, "finetune.epochs": epochs}
        params |= {"finetune.labels_per_class": labels, "finetune.seed": seed}
        return Experiment(f"{arch}{labels}{seed}", params, {"pretrained": f1, "scratch": f1 - 0.1, "tfidf_logreg": 0.9})

    experiments = [
        experiment(arch, vocab, labels, seed, base + (0.1 if labels == "all" else 0) + seed / 100)
        for arch, vocab, base in (("modernbert", 8192, 0.7), ("lstm", 4096, 0.5))
        for labels in (5, "all")
        for seed in (1, 2)
    ]
    rows, mixed = summarize(experiments, by="model.architecture")
    assert [(r["model.architecture"], r["labels_per_class"]) for r in rows] == [
        ("lstm", 5),
        ("lstm", "all"),
        ("modernbert", 5),
        ("modernbert", "all"),
    ]
    assert rows[1]["pretrained_mean"] == pytest.approx(0.615) and rows[1]["experiments"] == 2
    assert rows[2]["pretrained_minus_scratch"] == pytest.approx(0.1)
    assert mixed == []  # the vocabularies differ between the systems, not within one
    _, mixed = summarize([*experiments, experiment("lstm", 4096, 5, 3, 0.5, epochs=9)], by="model.architecture")
    assert mixed == ["finetune.epochs"]
    _, mixed = summarize(experiments)  # without --by the two systems are one mixture
    assert mixed == ["model.architecture", "tokenize.vocab_size"]
    md = re.sub(" +", " ", to_markdown(rows, by="model.architecture"))
    assert md.splitlines()[0].startswith("| model.architecture | labels per class | experiments |")
    assert "| modernbert | all | 2 | 0.815 ± 0.007 |" in md
    plot(rows, tmp_path / "le.png", by="model.architecture")
    assert (tmp_path / "le.png").read_bytes()[:8] == PNG_MAGIC
