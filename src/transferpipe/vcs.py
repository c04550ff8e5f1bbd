"""The repository the pipeline runs in, and the one way the package calls git and dvc (the report, the sweep
tables, the git commit a run records)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from transferpipe.errors import UserError


def repo_root() -> Path:
    """Where a running stage's repository is: DVC_ROOT (set by DVC for stage commands) or the working directory,
    lifted out of .dvc/tmp copies (DVC's experiment queue). Needs no git: stages also run outside a clone."""
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    if ".dvc" in root.parts:
        root = Path(*root.parts[: root.parts.index(".dvc")])
    return root


def git_toplevel(path: Path) -> Path:
    """The top folder of the git clone that holds `path` (the report and the sweep tables read git history)."""
    try:
        return Path(git(Path(path), "rev-parse", "--show-toplevel").strip())
    except UserError:
        raise UserError(f"{path} is not inside a git repository; run transferpipe in a clone") from None


def git(root: Path, *args: str, timeout: int = 60) -> str:
    """`git args` in root: its stdout, or one UserError line with git's first line of complaint."""
    return _run(["git", *args], root, "git", args, timeout, first_line=True)


def dvc(root: Path, *args: str, timeout: int = 300) -> str:
    """`dvc args` in root (this Python's dvc): its stdout, or one UserError line with dvc's last line."""
    return _run([sys.executable, "-m", "dvc", *args], root, "dvc", args, timeout, first_line=False)


def git_commit(root: Path) -> str | None:
    """HEAD's commit id, None outside a clone or without git."""
    try:
        return git(root, "rev-parse", "HEAD", timeout=10).strip() or None
    except UserError:
        return None


def _run(command: list[str], root: Path, tool: str, args: tuple[str, ...], timeout: int, first_line: bool) -> str:
    try:
        proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"{tool} {' '.join(args)} failed ({exc}); is {tool} installed?") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        raise UserError(f"{tool} {' '.join(args)} failed: {lines[0] if first_line else lines[-1]}")
    return proc.stdout
