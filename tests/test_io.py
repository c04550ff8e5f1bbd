"""Atomic outputs: a folder is replaced only when its block succeeds, and no temporary sibling is left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import REPO, clean_env
from transferpipe import io
from transferpipe.io import atomic_dir, read_json, temp_sibling_dir, write_csv, write_json, write_text_atomic


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_dir_creates_a_new_folder(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "model"
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        assert not out.exists()  # nothing shows at the real path while the block runs
        (tmp / "weights.bin").write_text("new")
    assert (out / "weights.bin").read_text() == "new"
    assert siblings(out) == ["model"]


def test_atomic_dir_replaces_an_existing_folder_on_success(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.bin").write_text("new")
        assert (out / "old.bin").exists()  # the old output stays until the block succeeds
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    assert siblings(out) == ["model"]


def test_atomic_dir_replaces_a_file_at_the_path(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.write_text("a stray file")
    with atomic_dir(out) as tmp:
        (tmp / "new.bin").write_text("new")
    assert out.is_dir() and (out / "new.bin").read_text() == "new"


def test_atomic_dir_leaves_the_old_folder_on_error(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with pytest.raises(RuntimeError, match="crash"), atomic_dir(out) as tmp:
        (tmp / "half.bin").write_text("half")
        raise RuntimeError("crash")
    assert sorted(p.name for p in out.iterdir()) == ["old.bin"]
    assert (out / "old.bin").read_text() == "old"
    assert siblings(out) == ["model"]


def test_atomic_dir_leaves_nothing_on_error_without_an_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "half.bin").write_text("half")
        raise KeyboardInterrupt
    assert siblings(out) == []


def test_atomic_dir_moves_the_old_folder_aside_before_the_new_one_goes_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # the portable path: rename aside, then in
    replace, calls = os.replace, []

    def checked_replace(src: str | Path, dst: str | Path) -> None:
        # At every rename a complete output is on disk: at `out`, or moved aside whole, never half-deleted.
        assert (out / "old.bin").exists() or any((p / "old.bin").exists() for p in tmp_path.glob(".model.*.tmp"))
        calls.append((Path(src), Path(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", checked_replace)
    with atomic_dir(out) as tmp:
        (tmp / "new.bin").write_text("new")
    (aside_src, aside), (new_src, new_dst) = calls
    assert aside_src == out and aside.name.startswith(".model.")  # the old one leaves first...
    assert new_src == tmp and new_dst == out  # ...then the new one comes in, and the old is deleted only after
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    assert siblings(out) == ["model"]


def test_atomic_dir_puts_the_old_folder_back_when_the_final_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    replace = os.replace

    def failing_replace(src: str | Path, dst: str | Path) -> None:
        if Path(src).name.endswith(".tmp") and (Path(src) / "new.bin").exists():
            raise OSError("disk on fire")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"), atomic_dir(out) as tmp:
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["old.bin"]
    assert siblings(out) == ["model"]


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_atomic_dir_swaps_in_one_step_so_a_reader_always_finds_an_output(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_text("0")
    missing, stop = [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if not (out / "weights.bin").exists():
                missing.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 300):
            with atomic_dir(out) as tmp:
                (tmp / "weights.bin").write_text(str(i))
    finally:
        stop.set()
        thread.join()
    assert missing == []
    assert (out / "weights.bin").read_text() == "299" and siblings(out) == ["model"]


def test_a_killed_run_leaves_a_temp_sibling_that_the_next_start_sweeps(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    crash = (
        "import os, signal, sys\n"
        "from transferpipe.io import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'half.bin').write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", crash, str(out)], stderr=subprocess.PIPE, text=True)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL, stderr
    (left,) = [p for p in tmp_path.iterdir() if p != out]
    assert left.name.startswith(f".model.{run.pid}.") and left.name.endswith(".tmp")  # the dead run's pid
    assert (left / "half.bin").exists() and (out / "old.bin").read_text() == "old"  # the old output survived

    with atomic_dir(out) as tmp:
        assert not left.exists()  # swept at the start, before the new output is written
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    assert siblings(out) == ["model"]


def test_the_sweep_keeps_live_runs_and_other_outputs_siblings(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "data"
    swept = [f".data.{dead.pid}.abcd1234.work", f".data.{dead.pid}.abcd1234.tmp", ".data.k3_x9q0z.tmp"]
    kept = [
        f".data.{os.getpid()}.abcd1234.work",  # a live concurrent run's
        f".data.{os.getpid()}.abcd1234.tmp",
        f".data.v2.{dead.pid}.abcd1234.tmp",  # another output's (data.v2)
        f".other.{dead.pid}.abcd1234.tmp",
        "data.tmp",
    ]
    for name in swept + kept:
        (tmp_path / name).mkdir()
    (tmp_path / swept[-1] / "half.bin").write_text("half")
    with temp_sibling_dir(out) as scratch:
        assert scratch.is_dir() and scratch.name.startswith(f".data.{os.getpid()}.") and scratch.suffix == ".work"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [scratch.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_outputs_get_the_permissions_of_the_umask(tmp_path: Path, umask: int, folder_mode: int, file_mode: int) -> None:
    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights.bin").write_text("new")
        write_text_atomic(tmp_path / "metrics.json", "{}\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == folder_mode
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == file_mode


def test_git_and_dvc_ignore_temp_siblings(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    env = clean_env(root)
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(args, cwd=root, env=env, check=True, capture_output=True, timeout=120)
    shutil.copy2(REPO / ".gitignore", root / ".gitignore")
    shutil.copy2(REPO / ".dvcignore", root / ".dvcignore")
    ignored = [".x.123.abc.tmp", ".x.123.abc.work", "data/.tokenized.123.abcd1234.work", "models/.m.json.1.a.tmp"]
    kept = ["data/tokenized", "x.tmp", "metrics/test.json"]
    for name in ignored + kept:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    for tool in (["git"], [sys.executable, "-m", "dvc"]):
        for name in ignored + kept:
            check = subprocess.run([*tool, "check-ignore", name], cwd=root, env=env, capture_output=True, timeout=120)
            assert check.returncode == (0 if name in ignored else 1), (tool, name, check.stderr)


def test_write_json_round_trips_and_ends_with_a_newline(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "test.json"
    data = {"test": {"accuracy": 0.5, "macro_f1": 0.25}, "labels": ["a", "b"]}
    write_json(path, data)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert json.loads(text) == data == read_json(path)
    assert list(json.loads(text)) == ["test", "labels"]  # key order kept
    assert siblings(path) == ["test.json"]


def test_write_json_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json(path, {"a": 1})
    write_json(path, {"b": 2})
    assert read_json(path) == {"b": 2}


def test_write_text_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert siblings(path) == ["m.json"]


def test_write_csv_formats_floats_and_leaves_missing_values_empty(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "train.csv"
    rows = [
        {"step": 1, "loss": 2.123456789, "learning_rate": 1e-4},
        {"step": 2, "loss": None},
        {"step": 3, "loss": 0.5, "learning_rate": 0.0, "extra": "ignored"},
    ]
    write_csv(path, rows, columns=["step", "loss", "learning_rate"])
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert lines == ["step,loss,learning_rate\n", "1,2.12346,0.0001\n", "2,,\n", "3,0.5,0\n"]


def test_write_csv_with_no_rows_writes_the_header(tmp_path: Path) -> None:
    path = tmp_path / "eval.csv"
    write_csv(path, [], columns=["step", "loss"])
    assert path.read_text(encoding="utf-8") == "step,loss\n"
