"""Thin entry points, one per DVC stage: run as `python -m stages.<name>`.

The package code beside these scripts comes first on sys.path. A queued or `--temp` DVC experiment runs its
stages in a copy of the repository under .dvc/tmp/exps; an editable install would otherwise import
transferpipe from the workspace, whose code may have changed since the experiment was queued.
"""

import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [_SRC]:
    sys.path.insert(0, _SRC)
