"""Atomic outputs: a crash leaves the previous output or none, never half of one."""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import functools
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transferpipe.errors import UserError, disk_full

# `.<name>.<pid>.<8 random>.tmp|work`; also the pid-less `.<name>.<8 random>.tmp` that tempfile used to make.
_TEMP_TAIL = re.compile(r"(?:(\d{1,7})\.)?[a-z0-9_]{8}\.(?:tmp|work)")


def temp_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh name beside `path` (same filesystem, so a rename is atomic), ignored by git and DVC, that
    carries this process's pid so a later start can tell a crashed run's leftovers from a live run's."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}"


def sweep_temp_siblings(path: Path) -> None:
    """Remove the temporary siblings of `path` that a killed run (SIGKILL, OOM, power loss) never cleaned up.
    A sibling whose pid is alive belongs to a concurrent run and stays."""
    prefix = f".{path.name}."
    for sibling in path.parent.iterdir():
        match = sibling.name.startswith(prefix) and _TEMP_TAIL.fullmatch(sibling.name[len(prefix) :])
        if match and not (match[1] and _alive(int(match[1]))):
            _remove(sibling)


@contextlib.contextmanager
def temp_sibling_dir(path: Path, suffix: str = ".work") -> Iterator[Path]:
    """Yield a new empty folder beside `path`, removed afterwards; a crashed run's is swept at the next start."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp_siblings(path)
    tmp = temp_sibling(path, suffix)
    tmp.mkdir()  # 0o777 less the umask, like any folder the user makes (mkdtemp would make it 0700)
    try:
        yield tmp
    finally:
        _remove(tmp)


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def free_space(path: Path) -> int:
    """Bytes free on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def size_of(path: Path) -> int:
    """Bytes of the files under `path` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def no_space(what: str, path: Path, needed: str, keeps: str) -> UserError:
    """The one line for a write that found the disk full: what, where, how much it needed and what is kept."""
    return UserError(
        f"no space left on the device for {what} {path} ({needed}; {megabytes(free_space(path))} free there): "
        f"free some space and rerun; {keeps}"
    )


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it takes the place of `path`.

    On Linux the new folder and the old output trade places in one atomic step (renameat2 RENAME_EXCHANGE),
    so at every moment `path` is the complete old output or the complete new one; the old is deleted after.
    Elsewhere the old output is renamed aside first (a moment without `path`, the old still whole beside it).
    A full disk while filling it is one line (a UserError), the temporary folder removed.
    """
    path = Path(path)
    with temp_sibling_dir(path, ".tmp") as tmp:
        try:
            yield tmp
        except Exception as exc:
            if not disk_full(exc):
                raise
            written = size_of(tmp)
            _remove(tmp)  # before measuring what is free: its bytes are free again
            kept = "the previous output is intact" if path.exists() else "nothing was written"
            raise no_space("the output", path, f"more than the {megabytes(written)} written", kept) from None
        if not (path.exists() or path.is_symlink()):
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            pass  # tmp now holds the old output, removed on leaving
        else:
            old = temp_sibling(path)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is not available."""
    renameat2 = getattr(_libc(), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (_errno.ENOSYS, _errno.EINVAL, _errno.EOPNOTSUPP):  # old kernel or a filesystem without it
        return False
    raise OSError(errno, os.strerror(errno), str(b))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp_siblings(path)
    tmp = temp_sibling(path)
    try:
        # open() creates the file 0o666 less the umask, as for any file the user writes (mkstemp makes 0600).
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # one atomic step: readers see the old file or the new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as CSV with the given header; missing values stay empty."""
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join("" if row.get(c) is None else _fmt(row[c]) for c in columns))
    write_text_atomic(path, "\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _remove(path: Path) -> None:
    """Delete a file or folder if it is still there (a concurrent sweep may have got there first)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# A model folder that a stage was told not to make (pretrain.scratch_baseline: false) holds only this file, so
# that dvc.yaml's outputs stay fixed and the stages after it skip it.
SKIPPED = "skipped.json"


def write_skipped(folder: Path, reason: str) -> None:
    """Replace `folder` atomically with a placeholder saying why there is no model."""
    with atomic_dir(folder) as tmp:
        write_json(tmp / SKIPPED, {"skipped": reason})


def skipped(folder: Path) -> str | None:
    """Why `folder` is a placeholder (write_skipped), or None for a real model folder."""
    path = Path(folder) / SKIPPED
    return read_json(path)["skipped"] if path.is_file() else None
