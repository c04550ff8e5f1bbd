"""Checkpoints that let a killed training stage resume where it stopped.

fit() saves everything its result depends on every `checkpoint_every` steps: the weights, optimizer and
scheduler, every RNG (python, numpy, torch CPU and CUDA, one set per rank), the position in the data, the
early-stopping state, the logged rows and counters, and the MLflow run id. A rerun of the stage (`dvc repro`
after a kill) loads it and continues: on CPU with a fixed precision the weights it ends with are bit for bit
those of an uninterrupted run (DataLoader workers only stack token ids: the MLM masks are drawn in the
training process, from the RNG the checkpoint holds).

A stage's checkpoints live in `.checkpoints/<stage>-<key>/` at the repository root (ignored by git,
never a DVC output), where the key hashes everything the stage's result depends on: its params sections, the
bytes of its inputs and its code: the stage script and the package modules it imports, directly or through
others (`code_files`, the list dvc.yaml declares as the stage's deps: tests/test_consistency.py holds them
equal). A changed param, input or line of that code therefore starts afresh instead of resuming a stale
checkpoint, exactly when DVC sees the stage changed. Each write goes to a temporary file renamed over the last one, so a
kill during a write leaves the previous checkpoint usable. When training ends, a last checkpoint marked
finished holds the final weights and result until the stage has written its outputs and MLflow has recorded
them: a tracking failure then costs a rerun of the logging, not of the training. The stage deletes its
checkpoints once everything succeeded.

Under torchrun every rank reads the same file and rank 0 writes it, with each rank's RNG states gathered into
it: on several machines, point TRANSFERPIPE_CHECKPOINT_DIR at a folder they all share.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from transferpipe import distributed
from transferpipe.distributed import mps_available
from transferpipe.errors import UserError, disk_full
from transferpipe.io import megabytes, no_space
from transferpipe.vcs import repo_root

CHECKPOINT_DIR = Path(".checkpoints")
DIR_ENV = "TRANSFERPIPE_CHECKPOINT_DIR"  # another folder for them: a faster disk, or one every node shares
FILE = "checkpoint.pt"
PACKAGE = Path(__file__).resolve().parent


def fingerprint(stage: str, sections: dict[str, Any], inputs: list[Path], script: Path) -> str:
    """A hash of what a stage's result depends on: its params (dataclasses or plain values), the bytes of
    every file under `inputs` (with their relative paths), and its code (`code_files(script)`)."""
    digest = hashlib.sha256()
    values = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in sections.items()}
    digest.update(json.dumps({"stage": stage, "params": values}, sort_keys=True, default=str).encode())
    for root in (Path(p) for p in inputs):
        for path in sorted(p for p in root.glob("**/*") if p.is_file()) if root.is_dir() else [root]:
            digest.update(str(path.relative_to(root) if root.is_dir() else path.name).encode())
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    for path in code_files(script):
        digest.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def code_files(script: Path) -> list[Path]:
    """The stage script and every package module it imports, directly or through other modules (function-local
    imports included): the code whose change makes DVC rerun the stage."""
    found, todo = {Path(script).resolve()}, [Path(script).resolve()]
    while todo:
        for module in _package_imports(todo.pop()):
            path = PACKAGE / f"{module}.py"
            if path not in found:
                found.add(path)
                todo.append(path)
    return sorted(found)


def _package_imports(path: Path) -> set[str]:
    """The transferpipe modules a file imports by name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferpipe."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "transferpipe":  # from transferpipe import x
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("transferpipe.")}
    return names


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and mps_available():
        torch.mps.set_rng_state(state["mps"])


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a (nested) state: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class Checkpoints:
    """The checkpoint folder of one stage run, and the state found there when the stage started (or None)."""

    def __init__(self, folder: Path, every: int | None) -> None:
        self.folder = Path(folder)
        self.every = every or None  # 0 or None: no periodic checkpoints
        path = self.folder / FILE
        # Our own file in an ignored local folder: it holds RNG tuples and numpy states, not only tensors.
        self.state: dict[str, Any] | None = (
            torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
        )

    @classmethod
    def for_stage(
        cls, stage: str, section: str, sections: dict[str, Any], inputs: list[Path], every: int | None, script: Path
    ) -> Checkpoints:
        """The checkpoints of `stage` for these params `sections`, `inputs` and code (`script`, the stage's file);
        `every` is params `section.checkpoint_every`."""
        if every is not None and every < 1:
            raise UserError(f"params {section}.checkpoint_every={every} must be a number of steps (1 or more) or null")
        root = Path(os.environ.get(DIR_ENV) or repo_root() / CHECKPOINT_DIR)
        return cls(root / f"{stage}-{fingerprint(stage, sections, inputs, script)}", every)

    @property
    def run_id(self) -> str | None:
        """The MLflow run the checkpointed training logged to: a resumed stage continues it."""
        return self.state.get("run_id") if self.state else None

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def save(self, state: dict[str, Any]) -> None:
        """Write `state` with every rank's RNG states (a collective under torchrun: every rank calls it)."""
        state = {**state, "rng": distributed.gather_objects(rng_state())}
        if distributed.is_main():
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{FILE}.", suffix=".tmp", dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
                os.replace(tmp, self.folder / FILE)
            except BaseException as exc:
                Path(tmp).unlink(missing_ok=True)
                if isinstance(exc, Exception) and disk_full(exc):
                    raise self._no_space(state) from None
                raise
        self.state = state

    def _no_space(self, state: dict[str, Any]) -> UserError:
        kept = "the previous checkpoint is intact" if (self.folder / FILE).is_file() else "there was no checkpoint yet"
        needed = f"about {megabytes(_tensor_bytes(state))}"
        return no_space("a checkpoint in", self.folder, needed, f"{kept} (or move them with {DIR_ENV})")

    def restore_rng(self) -> None:
        assert self.state is not None
        states = self.state["rng"]
        # With another process count than the checkpoint's, ranks beyond it keep their own seeded streams: the
        # weights and the data position still hold (a global batch is the same examples on any count).
        if distributed.rank() < len(states):
            set_rng_state(states[distributed.rank()])

    def clear(self) -> None:
        """Delete this stage's checkpoints (rank 0): call it when the stage has fully succeeded."""
        if distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)
