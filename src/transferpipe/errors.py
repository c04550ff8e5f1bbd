"""The one exception type for mistakes a user can fix, and the wrapper that turns it (a full disk, a stop signal)
into one line."""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Callable
from typing import Any

# The signals that ask a stage to stop, besides Ctrl-C: a killed `dvc repro` or queue worker, a preemption or a
# scheduler's time limit (SIGTERM), SLURM's warning ahead of it (SIGUSR1, with --signal=USR1@60), a lost terminal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


class UserError(Exception):
    """A mistake in params, data or environment: the message names the problem and the fix."""


class Interrupted(SystemExit):
    """A signal asked the stage to stop (SIGTERM, SIGUSR1, SIGHUP): like KeyboardInterrupt for Ctrl-C, not an
    error. Uncaught, it exits with 128 + the signal's number, as the shell reports a process a signal ended.
    `where` says where training stopped and what a rerun continues from, if it checkpointed on the way."""

    def __init__(self, signum: int, where: str | None = None) -> None:
        super().__init__(128 + signum)
        self.signum, self.where = signum, where


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# How libraries that wrap the OSError in their own exception (torch.save, safetensors, SQLite) still say it.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "database or disk is full")


def disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception that led to it, is a full disk (ENOSPC) or an exhausted quota."""
    seen: BaseException | None = exc
    for _ in range(10):  # a chain, not a cycle
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL or any(t in str(seen) for t in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a stage's main(); a UserError (or a full disk) prints `error: <message>` on stderr and exits 2, no
    traceback. A signal (Ctrl-C, SIGTERM, SIGUSR1, SIGHUP) prints one line and exits 128 + its number, as the shell
    reports it."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        if not disk_full(exc):
            raise
        # A write the stage did not name (a library's cache, the MLflow store): outputs are atomic, so still one line.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        print(f"error: no space left on the device ({first}): free some space and rerun; outputs are written "
              "whole or not at all, so the previous ones are intact", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        where = getattr(exc, "where", None) or "a rerun resumes from the last checkpoint"
        print(f"stopped by {signal.Signals(signum).name}: {where}", file=sys.stderr)
        sys.exit(128 + signum)
