"""The one exception type for mistakes a user can fix, and the wrapper that turns it into one line."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A mistake in params, data or environment: the message names the problem and the fix."""


class Interrupted(SystemExit):
    """A signal asked the stage to stop (SIGTERM, SIGHUP): like KeyboardInterrupt for Ctrl-C, not an error.
    Uncaught, it exits with 128 + the signal's number, as the shell reports a process a signal ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a stage's main(); a UserError prints `error: <message>` on stderr and exits 2, no traceback. A
    signal (Ctrl-C, SIGTERM, SIGHUP) prints one line and exits 128 + its number, as the shell reports it."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(
            f"stopped by {signal.Signals(signum).name}; a rerun resumes from the last checkpoint",
            file=sys.stderr,
        )
        sys.exit(128 + signum)
