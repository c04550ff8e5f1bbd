"""The one exception type for mistakes a user can fix, and the wrapper that turns it into one line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A mistake in params, data or environment: the message names the problem and the fix."""


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a stage's main(); a UserError prints `error: <message>` on stderr and exits 2, no traceback."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
