"""Data-parallel training over processes launched by torchrun: the process group, and what each rank does.

Every rank runs the same stage: it loads the data and builds the model, trains its share of each global
batch inside DistributedDataParallel (gradients averaged across ranks every step), and evaluates its share
of the held-out data, combined so every rank sees the same metrics and stops at the same step. Rank 0 alone
opens the MLflow run and writes the stage's outputs. Without torchrun (no WORLD_SIZE) all of this reduces to
one process, rank 0 of 1, with no process group.

`python -m stages.pretrain ...` relaunches itself under torchrun when TRANSFERPIPE_NPROC asks for more than
one process, so dvc.yaml's commands stay the same on every machine (and DVC's cache stays valid when the
hardware changes). A torchrun started by hand (multi-node) is recognized by the WORLD_SIZE it sets.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from transferpipe.errors import UserError

NPROC_ENV = "TRANSFERPIPE_NPROC"
# A rank waits at most this long for the others at a collective before failing: a rank that died without
# torchrun noticing (another node's) must not leave the rest waiting forever. The longest legitimate wait is
# one training step plus rank 0 logging to MLflow, or the first step's torch.compile on a slower rank.
TIMEOUT = datetime.timedelta(minutes=10)


def relaunch_under_torchrun(module: str) -> None:
    """Replace this process by `torchrun --standalone --nproc-per-node N -m module <same args>` when
    TRANSFERPIPE_NPROC=N > 1 and this is not a torchrun worker already; otherwise return."""
    value = os.environ.get(NPROC_ENV, "").strip()
    if not value or "WORLD_SIZE" in os.environ:
        return
    if not value.isdigit() or int(value) < 1:  # before run_cli is there to catch a UserError: say it the same way
        print(f"error: {NPROC_ENV}={value!r} must be a number of processes per node, such as 2", file=sys.stderr)
        sys.exit(2)
    if int(value) == 1:
        return
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={value}"]
    # exec, not a child: signals from DVC (Ctrl-C, a killed queue worker) reach torchrun, which stops its workers.
    os.execv(sys.executable, [*argv, "-m", module, *sys.argv[1:]])


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that logs to MLflow and writes the stage's outputs."""
    return rank() == 0


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(choice: str = "auto", key: str = "device") -> torch.device:
    """The device of params `key` (auto | cuda | mps | cpu): auto takes CUDA, then Apple's MPS, then the CPU.
    Naming one that this machine lacks is a one-line error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    available = {"cuda": torch.cuda.is_available, "mps": mps_available, "cpu": lambda: True}
    if choice not in available:
        raise UserError(f"params {key}={choice!r} must be one of auto, cuda, mps, cpu")
    if not available[choice]():
        raise UserError(f"params {key}={choice!r}, but this machine has no {choice.upper()} device: use auto or cpu")
    return torch.device(choice)


@contextlib.contextmanager
def process_group(choice: str = "auto", key: str = "device") -> Iterator[torch.device]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) for the duration; yields this rank's device,
    the one params `key` chooses (pick_device).

    Outside torchrun (or with WORLD_SIZE 1): no group. The group is destroyed on the way out, error or not, so
    a failing rank releases the others at once.
    """
    chosen = pick_device(choice, key)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield chosen
        return
    if chosen.type == "mps":
        raise UserError(f"params {key}=mps trains in one process: torchrun's process groups have no MPS backend")
    cuda = chosen.type == "cuda"
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # device_id binds NCCL to this rank's GPU at once (and lets barrier() know which one it is).
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT, device_id=device if cuda else None)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def local_batch_size(global_batch_size: int, key: str) -> int:
    """A rank's share of the global batch: params keep meaning the same batch whatever the process count."""
    n = world_size()
    if global_batch_size % n:
        raise UserError(f"params {key}={global_batch_size} must be divisible by the {n} processes; change either")
    return global_batch_size // n


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose next pass can start part-way through its epoch's order (a resumed run)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        super().__init__(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
        self.start = 0  # indices of this rank's share to skip on the next pass only

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start :]
        self.start = 0
        return iter(indices)


def sampler(dataset: Dataset, seed: int) -> ResumableSampler:
    """A seeded shuffle of the whole dataset per epoch, of which each rank takes every world_size-th index.

    One process uses it too (as rank 0 of 1): consecutive global batches then hold the same examples
    whatever the number of processes. The training loop calls set_epoch before every pass.
    """
    return ResumableSampler(dataset, seed)


def seed_rank(seed: int) -> None:
    """Give ranks above 0 their own torch RNG stream (MLM masks, dropout); rank 0 keeps the single-process one.

    Every rank seeds alike before building the model (DDP broadcasts rank 0's weights anyway); left alike,
    each rank would then draw the very same masks for its own different examples.
    """
    if rank():
        torch.manual_seed(seed + rank())


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around model when there are several ranks; model itself otherwise."""
    if world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over ranks (float64), the same on every rank."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_mean(value: float, device: torch.device) -> float:
    return all_sum([value], device)[0] / world_size()


def shard_range(n: int) -> range:
    """This rank's contiguous share of n items; the shards of ranks 0, 1, ... in order make up range(n)."""
    per, extra = divmod(n, world_size())
    start = rank() * per + min(rank(), extra)
    return range(start, start + per + (rank() < extra))


def gather_objects(obj: object) -> list[object]:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    parts: list[object] = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def gather_concat(array: np.ndarray) -> np.ndarray:
    """Every rank's array concatenated along the first axis, in rank order, on every rank."""
    if world_size() == 1:
        return array
    parts: list[np.ndarray | None] = [None] * world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)
