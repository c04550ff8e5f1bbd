"""`transferpipe rerun`: rerun the stale stages here, within a time budget, for a pull request's review.

A pull request's committed results are stale when its code, params or data changed after its author ran them
(`transferpipe.report.stale_stages`). On the CI runner, with the pull request's DVC outputs pulled, this runs
`dvc repro` (DVC reruns the stale stages and the ones downstream, nothing else) under a deadline. If it finishes,
the working tree holds the rerun's results, uncommitted, and the review compares them with the base's; if it
runs out of time or fails, it is stopped as Ctrl-C stops it (DVC and the stages end cleanly) and the committed
results are restored (`git reset --hard`, `dvc checkout`), so the review still shows what the author committed. The
record (JSON) says which it was, which stages ran and for how long, and on what CPU; the report's first line
reads it (`transferpipe report --rerun`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from transferpipe.errors import UserError
from transferpipe.io import write_json
from transferpipe.report import stale_stages
from transferpipe.vcs import dvc, git

RUNNING = re.compile(r"Running stage '([^']+)'")
LOCKED = re.compile(r"Updating lock file")
STOP_GRACE_S = 60  # after Ctrl-C, how long DVC and the stage get to stop before SIGKILL


def rerun_stale(root: Path, within_seconds: float, record: Path) -> dict:
    """Rerun the stale stages of the clean working tree at `root` if they finish within `within_seconds`; write
    and return the record: outcome (rerun, timeout, failed, not needed, skipped), the stale stages with why, each
    stage that ran with its seconds, the total, the budget and the CPU."""
    root = Path(root)
    if git(root, "status", "--porcelain", "--untracked-files=no").strip():
        raise UserError(
            "the working tree has uncommitted changes; commit or stash them first (a rerun that does not finish "
            "restores the committed results, which would discard them)"
        )
    stale, unverified = stale_stages(root)
    result: dict = {"stale": stale, "within_seconds": within_seconds, "cpu": cpu_name(), "stages": {}, "seconds": 0}
    if not stale:
        result |= {"outcome": "not needed", "why": "no stage is stale"}
    elif unverified:
        result |= {
            "outcome": "skipped",
            "why": "the outputs the stale stages start from are not here (no DVC remote to pull them from)",
        }
    else:
        result |= repro_timed(root, within_seconds)
        if result["outcome"] != "rerun":
            # The tree was clean, so this undoes exactly the rerun's changes, staged ones too (core.autostage).
            git(root, "reset", "--quiet", "--hard", "HEAD")
            dvc(root, "checkout", "--force", "--quiet")
    write_json(record, result)
    return result


def repro_timed(root: Path, within_seconds: float, env: dict[str, str] | None = None) -> dict:
    """`dvc repro` in root (with env, default this process's), its output passed through, stopped like Ctrl-C at
    the deadline: the outcome (rerun, timeout or failed), each stage's seconds, the total and dvc's error line."""
    start = time.monotonic()
    clock = StageClock(start)
    tail: deque[str] = deque(maxlen=20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the stop reaches the stage DVC runs
        env=env,
    )

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.strip())
            clock.line(line, time.monotonic())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=within_seconds)
        outcome = "rerun" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        _stop(proc)
        outcome = "timeout"
    reader.join(timeout=10)
    if outcome == "rerun":
        clock.end(time.monotonic())  # a last stage without a lock update finished; a stopped one did not
    result = {"outcome": outcome, "stages": dict(clock.seconds), "seconds": round(time.monotonic() - start, 1)}
    if outcome == "failed":
        errors = [line for line in tail if line.startswith("ERROR")] or [line for line in tail if line]
        result["error"] = (errors or ["dvc repro failed"])[-1][:300]
    return result


class StageClock:
    """Each finished stage's seconds from `dvc repro`'s output: from its "Running stage" line to the "Updating lock
    file" after it, or, where DVC writes no lock update (a stage whose lock entry came out the same), to the next
    stage's start, or to `end` (called once `dvc repro` succeeded)."""

    def __init__(self, start: float) -> None:
        self.seconds: dict[str, float] = {}
        self.running: str | None = None
        self.since = start

    def line(self, text: str, now: float) -> None:
        if match := RUNNING.search(text):
            self.end(now)
            self.running, self.since = match.group(1), now
        elif LOCKED.search(text):
            self.end(now)

    def end(self, now: float) -> None:
        if self.running is not None:
            self.seconds[self.running] = round(now - self.since, 1)
            self.running = None


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to `dvc repro`'s process group (the stage checkpoints and DVC releases its lock), then SIGKILL."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_name() -> str:
    """The CPU's model name (`flops.cpu_name`, as `lscpu` gives it) and this process's cores, as `nproc` does."""
    from transferpipe.flops import cpu_name as model_name

    return f"{model_name()}, {len(os.sched_getaffinity(0))} cores"
