"""The one exception type for mistakes a user can fix, and the wrapper that turns it into one line."""

from __future__ import annotations

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


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a stage's main(); a UserError prints `error: <message>` on stderr and exits 2, no traceback. A
    signal (Ctrl-C, SIGTERM, SIGUSR1, SIGHUP) prints one line and exits 128 + its number, as the shell reports it."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        where = getattr(exc, "where", None) or "a rerun resumes from the last checkpoint"
        print(f"stopped by {signal.Signals(signum).name}: {where}", file=sys.stderr)
        sys.exit(128 + signum)
