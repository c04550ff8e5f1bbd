"""`transferpipe rerun` on a throwaway git + DVC repository of two stages (train, then evaluate), run as a real
subprocess with the real git and dvc: a param changed and committed without a rerun is rerun within the budget
and the report says so; past the budget the stage gets Ctrl-C and the committed results come back; a failing
stage is named; outputs not here are not rerun; uncommitted changes are refused."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import sh
from transferpipe.rerun import StageClock

pytestmark = pytest.mark.slow  # real dvc runs, about 80 s in all

TRAIN = """\
import json, signal, sys, time, yaml
p = yaml.safe_load(open('params.yaml'))['train']
if p['fail']:
    sys.exit('boom: the stage failed')
def stop(*_):
    open('interrupted', 'w').write('SIGINT')
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
time.sleep(p['seconds'])
open('model.txt', 'w').write(str(p['epochs']))
json.dump({'macro_f1': 1 - 1 / (p['epochs'] + 1)}, open('scores.json', 'w'))
"""
EVALUATE = """\
import json, signal, sys, time, yaml
def stop(*_):
    open('interrupted', 'w').write('SIGINT')
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
time.sleep(yaml.safe_load(open('params.yaml'))['evaluate']['seconds'])
json.dump({'epochs': int(open('model.txt').read())}, open('evaluated.json', 'w'))
"""


def transferpipe(root: Path, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "transferpipe.cli", *args], root, env, check=check)


def commit(root: Path, env: dict[str, str], message: str) -> None:
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", message], root, env)


def set_params(root: Path, section: str = "train", **values: object) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section] |= values
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Two stages reproduced and committed on main, with a git tag `base` there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))}
    env |= {"DVC_NO_ANALYTICS": "1"}
    root = tmp_path / "repo"
    root.mkdir()
    for args in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "t@example.com"],
        ["git", "config", "user.name", "t"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.autostage", "true"],
    ):  # as the project has it
        sh(args, root, env)  # fmt: skip
    (root / "params.yaml").write_text(
        yaml.safe_dump({"train": {"epochs": 3, "seconds": 0, "fail": False}, "evaluate": {"seconds": 0}})
    )
    (root / "train.py").write_text(TRAIN)
    (root / "evaluate.py").write_text(EVALUATE)
    (root / ".gitignore").write_text("interrupted\nrerun.json\nreport.md\nreport_images/\n")
    stages = {
        "train": {"cmd": f"{sys.executable} train.py", "deps": ["train.py"], "params": ["train"],
                  "outs": ["model.txt"], "metrics": [{"scores.json": {"cache": False}}]},
        "evaluate": {"cmd": f"{sys.executable} evaluate.py", "deps": ["evaluate.py", "model.txt"],
                     "params": ["evaluate"], "metrics": [{"evaluated.json": {"cache": False}}]},
    }  # fmt: skip
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    sh([sys.executable, "-m", "dvc", "repro", "-q"], root, env)
    commit(root, env, "reproduced")
    sh(["git", "tag", "base"], root, env)
    return root, env


def test_stale_stages_rerun_within_the_budget_and_the_report_says_so(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    set_params(root, epochs=5)
    commit(root, env, "5 epochs, not rerun")
    proc = transferpipe(root, env, "rerun", "--within-minutes", "5", "--record", "rerun.json")
    assert "Running stage 'train'" in proc.stdout  # dvc's output passes through, for the CI log
    record = json.loads((root / "rerun.json").read_text())
    assert record["outcome"] == "rerun"
    assert record["stale"] == {"train": ["params.yaml: train.epochs"]}
    assert set(record["stages"]) == {"train", "evaluate"}  # the stale stage and the one downstream
    assert 0 < sum(record["stages"].values()) <= record["seconds"] < 300
    assert json.loads((root / "evaluated.json").read_text()) == {"epochs": 5}  # the rerun's results, uncommitted
    transferpipe(root, env, "report", "--base", "base", "--rerun", "rerun.json")
    report = (root / "report.md").read_text()
    first = report.splitlines()[0]
    assert first.startswith(
        "**Results were stale and are rerun here**: changed since they were run: train (params.yaml: train.epochs). "
        "`dvc repro` reran train "
    ), first
    assert "| scores.json | macro_f1 | 0.75 | 0.83333 |" in re.sub(" +", " ", report)  # the rerun's metric, compared


def test_past_the_budget_the_stage_is_stopped_and_the_committed_results_restored(
    repo: tuple[Path, dict[str, str]],
) -> None:
    """train reruns and its lock entry is staged (core.autostage); evaluate, downstream, runs past the budget."""
    root, env = repo
    set_params(root, epochs=5)
    set_params(root, "evaluate", seconds=60)
    commit(root, env, "5 epochs; an evaluation of 60 s; not rerun")
    transferpipe(root, env, "rerun", "--within-minutes", "0.2", "--record", "rerun.json")
    record = json.loads((root / "rerun.json").read_text())
    assert record["outcome"] == "timeout" and list(record["stages"]) == ["train"], record
    assert 12 <= record["seconds"] < 50  # evaluate's 60 s sleep was cut short
    assert (root / "interrupted").read_text() == "SIGINT"  # stopped as Ctrl-C stops it
    assert sh(["git", "status", "--porcelain", "--untracked-files=no"], root, env).stdout == ""
    assert (root / "model.txt").read_text() == "3"  # the committed output, back from the DVC cache
    transferpipe(root, env, "report", "--base", "base", "--rerun", "rerun.json")
    first = (root / "report.md").read_text().splitlines()[0]
    assert first.startswith(
        "**Results are stale**: changed since they were run: evaluate (params.yaml: evaluate.seconds); "
        "train (params.yaml: train.epochs)"
    ), first
    stopped = r"A rerun here did not finish within 12 s \(train \d+ s; stopped, the committed results restored\)\.$"
    assert re.search(stopped, first), first


def test_a_failing_rerun_is_named_and_the_committed_results_restored(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    set_params(root, fail=True)
    commit(root, env, "a param that breaks the stage")
    transferpipe(root, env, "rerun", "--within-minutes", "5")
    record = json.loads((root / "rerun.json").read_text())
    assert record["outcome"] == "failed" and "failed to reproduce 'train'" in record["error"], record
    assert (root / "model.txt").read_text() == "3"


def test_nothing_stale_or_outputs_not_here_is_not_rerun(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    transferpipe(root, env, "rerun", "--within-minutes", "5")
    assert json.loads((root / "rerun.json").read_text())["outcome"] == "not needed"
    # A fresh clone has no DVC cache: the outputs the stale stages start from are not here.
    set_params(root, epochs=4)
    commit(root, env, "4 epochs, not rerun")
    clone = root.parent / "clone"
    sh(["git", "clone", "-q", str(root), str(clone)], root.parent, env)
    transferpipe(clone, env, "rerun", "--within-minutes", "5")
    record = json.loads((clone / "rerun.json").read_text())
    assert record["outcome"] == "skipped" and "not here" in record["why"], record
    assert not (clone / "model.txt").exists()


def test_uncommitted_changes_are_refused_in_one_line(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    set_params(root, epochs=5)
    proc = transferpipe(root, env, "rerun", "--within-minutes", "5", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: the working tree has uncommitted changes")
    assert "Traceback" not in proc.stderr and not (root / "rerun.json").exists()
    proc = transferpipe(root, env, "report", "--base", "base", "--rerun", "missing.json", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no rerun record at missing.json")


def test_a_stage_without_a_lock_update_ends_where_the_next_one_starts() -> None:
    """DVC writes no "Updating lock file" for a stage whose lock entry comes out the same (a skipped variant's
    marker): its time ends at the next stage's start, not folded into the next stage's or lost."""
    clock = StageClock(start=0.0)
    for now, text in [
        (1.0, "Running stage 'finetune@pretrained':\n"),
        (5.0, "finetune: {...}\n"),
        (9.0, "Updating lock file 'dvc.lock'\n"),
        (9.5, "Running stage 'finetune@scratch':\n"),
        (12.0, "finetune: scratch skipped (pretrain.scratch_baseline is false)\n"),
        (13.0, "Running stage 'evaluate':\n"),
        (20.0, "Updating lock file 'dvc.lock'\n"),
        (21.0, "Running stage 'last':\n"),
    ]:
        clock.line(text, now)
    clock.end(30.0)
    assert clock.seconds == {"finetune@pretrained": 8.0, "finetune@scratch": 3.5, "evaluate": 7.0, "last": 9.0}
