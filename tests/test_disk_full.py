"""A full disk ends a stage with one line that says what could not be written, how much it needed and that the
previous output or checkpoint is intact; nothing temporary is left behind, and with room again the stage
completes. On a real small filesystem (a tmpfs this test mounts, where it may) and with an injected ENOSPC."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, tiny_params
from transferpipe import checkpoint
from transferpipe.checkpoint import Checkpoints
from transferpipe.errors import UserError, disk_full
from transferpipe.io import atomic_dir


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs at tmp_path/disk: skipped where mounting needs privileges this process lacks."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or mounted.returncode})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves about `leave` bytes free on `disk`."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - leave, 0))
    return filler


def test_full_disk_is_recognized_through_the_exceptions_libraries_wrap_it_in() -> None:
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8576 vs 8470")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")  # torch.save
    assert disk_full(wrapped)
    assert disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert disk_full(Exception("(sqlite3.OperationalError) database or disk is full"))
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(RuntimeError("unexpected pos 8576 vs 8470"))


def test_an_injected_enospc_on_a_checkpoint_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = Checkpoints(tmp_path / "ck", every=1)
    checkpoints.save({"step": 1, "weights": torch.ones(3)})

    def save_half(obj: object, f) -> None:  # noqa: ANN001 - torch.save's file argument
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", save_half)
    with pytest.raises(UserError, match=r"^no space left on the device for a checkpoint in .*\(about 0\.0 MB; ") as e:
        checkpoints.save({"step": 2, "weights": torch.zeros(3)})
    assert "the previous checkpoint is intact" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["checkpoint.pt"]
    assert Checkpoints(tmp_path / "ck", every=1).state["step"] == 1


def test_a_checkpoint_and_an_output_that_do_not_fit_leave_the_previous_ones(small_disk: Path) -> None:
    checkpoints = Checkpoints(small_disk / "ck", every=1)
    checkpoints.save({"step": 1, "weights": torch.ones(3)})
    with pytest.raises(UserError, match=r"for a checkpoint in .* \(about 4\.0 MB; .* free there\)") as e:
        checkpoints.save({"step": 2, "weights": torch.zeros(1_000_000)})  # 4 MB on a 1 MB disk
    assert "the previous checkpoint is intact" in str(e.value)
    assert sorted(p.name for p in (small_disk / "ck").iterdir()) == ["checkpoint.pt"]
    assert Checkpoints(small_disk / "ck", every=1).state["step"] == 1

    with atomic_dir(small_disk / "out") as tmp:
        (tmp / "a.bin").write_text("previous")
    written = r"for the output .*out \(more than the .* MB written; .* free there\)"
    with pytest.raises(UserError, match=written) as e, atomic_dir(small_disk / "out") as tmp:
        (tmp / "a.bin").write_bytes(b"x" * 2_000_000)
    assert "the previous output is intact" in str(e.value)
    assert sorted(p.name for p in small_disk.iterdir()) == ["ck", "out"]  # no temporary sibling
    assert (small_disk / "out/a.bin").read_text() == "previous"


def test_a_stage_on_a_full_disk_says_so_in_one_line_and_completes_once_there_is_room(
    small_disk: Path, tiny_csv: Path
) -> None:
    params = tiny_params(small_disk.parent, prepare={"source": str(tiny_csv)})
    command = [sys.executable, "-m", "stages.prepare", "--params", str(params), "--out", str(small_disk / "prepared"),
               "--stats", str(small_disk / "data.json")]  # fmt: skip
    filler = fill(small_disk, leave=8192)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    full = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 2, full.stdout + full.stderr
    assert "Traceback" not in full.stderr
    (line,) = full.stderr.strip().splitlines()
    assert line.startswith(f"error: no space left on the device for the output {small_disk / 'prepared'} (more than")
    assert "nothing was written" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no half-written output, no sibling

    filler.unlink()
    room = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert room.returncode == 0, room.stderr
    assert (small_disk / "data.json").is_file() and any((small_disk / "prepared").iterdir())
