"""One plain training loop for both pretraining and fine-tuning.

Step-based: warmup then linear decay (transformers' scheduler), AdamW (fused on CUDA), gradient
clipping, bf16 autocast on CUDA, optional torch.compile, periodic evaluation, optional early stopping on a
monitored metric with the best weights kept in memory. Every logged row goes to the returned history (the
DVC plots) and to MLflow through `run`.

Under torchrun the model trains inside DistributedDataParallel: each rank's loader yields its share of the
global batch, logged losses and throughput are combined over ranks, and evaluate() must return the same
metrics on every rank (see transferpipe.distributed), so that all ranks stop at the same step.

A stop signal (SIGTERM, SIGUSR1, SIGHUP: a preemption, a scheduler's time limit) lets the step under way finish;
the loop then checkpoints and stops, so a rerun continues from the step the signal arrived at (under torchrun
the ranks agree on it at the next logged row). A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from transferpipe import distributed
from transferpipe.checkpoint import Checkpoints
from transferpipe.errors import STOP_SIGNALS, Interrupted, UserError
from transferpipe.io import atomic_dir, write_csv
from transferpipe.tracking import Run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(groups: list[dict], lr: float, beta2: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters, on CUDA and on the CPU), which lets train_step() skip a
    non-finite update on the device."""
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), fused=True)


def train_loader(
    dataset: Sized,
    *,
    batch_size: int,
    seed: int,
    num_workers: int,
    collate_fn: Callable[[list], dict] | None,
    device: torch.device,
    section: str,
    drop_last: bool = False,
    accumulation: int = 1,
) -> DataLoader:
    """This process's training micro-batches: its share of every global batch of `batch_size` (params
    `section.batch_size`), split into `accumulation` micro-batches (`section.gradient_accumulation_steps`), from
    a seeded shuffle that fit() renews every epoch (distributed.sampler)."""
    if num_workers < 0:
        raise UserError(f"params {section}.num_workers={num_workers} must be 0 (load in the training process) or more")
    local = distributed.local_batch_size(batch_size, f"{section}.batch_size")
    if local % accumulation:
        raise UserError(
            f"params {section}.batch_size={batch_size} must be divisible by {section}.gradient_accumulation_steps="
            f"{accumulation} (x {distributed.world_size()} processes); change either"
        )
    return DataLoader(
        dataset,
        batch_size=local // accumulation,
        sampler=distributed.sampler(dataset, seed),
        drop_last=drop_last,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # fit() starts a new pass every epoch: keep the workers
        pin_memory=device.type == "cuda",
        # With a sampler it only seeds the workers' RNG (their MLM masks), which must differ between ranks.
        generator=torch.Generator().manual_seed(seed + distributed.rank()),
    )


@dataclass
class FitResult:
    steps: int
    seconds: float  # wall time, evaluations included
    train_rows: list[dict] = field(default_factory=list)  # step, loss, learning_rate
    eval_rows: list[dict] = field(default_factory=list)  # step, plus what evaluate() returned
    best: dict[str, float] = field(default_factory=dict)  # the eval row that was kept
    tokens_per_second: float = 0.0  # training steps only, evaluations and checkpoints excluded
    examples_per_second: float = 0.0
    stopped_early: bool = False
    skipped_steps: int = 0  # steps whose gradients were not finite: no update was made
    checkpoint_seconds: float = 0.0  # spent writing checkpoints
    records: dict[str, Any] = field(default_factory=dict)  # what the caller adds for its metrics (class weights)

    def write_curves(self, folder: Path) -> None:
        """train.csv (step, loss, learning_rate) and eval.csv (step, epoch, eval metrics): DVC plots."""
        with atomic_dir(folder) as tmp:
            write_csv(tmp / "train.csv", self.train_rows, columns=["step", "loss", "learning_rate"])
            columns = list(self.eval_rows[0]) if self.eval_rows else ["step", "loss"]
            write_csv(tmp / "eval.csv", self.eval_rows, columns=columns)


class EarlyStopping:
    """The best evaluation and its weights. With `monitor` (a metric; higher is better unless
    higher_is_better=False), update() keeps the best row and a copy of the weights, and says stop once
    `patience` evaluations in a row brought nothing better; without one, the last evaluation is the best."""

    def __init__(self, monitor: str | None = None, higher_is_better: bool = True, patience: int | None = None):
        self.monitor, self.patience = monitor, patience
        self.sign = 1.0 if higher_is_better else -1.0
        self.best_row: dict[str, float] = {}
        self.best_score = -math.inf
        self.best_state: dict[str, torch.Tensor] | None = None  # on the CPU
        self.bad_evals = 0

    def update(self, row: dict[str, float], model: torch.nn.Module) -> bool:
        """Record one evaluation of `model`; True when training should stop."""
        if self.monitor is None:
            self.best_row = row
            return False
        if self.sign * row[self.monitor] > self.best_score:
            self.best_row, self.best_score, self.bad_evals = row, self.sign * row[self.monitor], 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return False
        self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    def restore_best(self, model: torch.nn.Module) -> None:
        """Load the best weights into `model` (if a monitor kept any) and let go of the copy."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
            self.best_state = None


class LossMeter:
    """Training loss and skipped steps summed on the device, so that a step needs no host synchronization;
    window() and skipped() sync once per logged row."""

    def __init__(self, device: torch.device, state: tuple[float, float, float] = (0.0, 0.0, 0.0)):
        self.total, self.steps, self.skips = (torch.tensor(x, device=device) for x in state)

    def add(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        """One step's loss, counted only if its update was made (`finite`: a bool tensor)."""
        self.total += torch.where(finite, loss.detach().float(), 0.0)
        self.steps += finite
        self.skips += ~finite

    def window(self) -> float:
        """The mean loss of the counted steps since the last call (NaN if every step was skipped)."""
        total, steps = self.total.item(), self.steps.item()
        self.total.zero_()
        self.steps.zero_()
        return total / steps if steps else math.nan

    def skipped(self) -> int:
        return int(self.skips.item())

    def state(self) -> tuple[float, float, float]:
        return self.total.item(), self.steps.item(), self.skips.item()


@dataclass
class _Progress:
    """fit()'s loop state beyond the model, optimizer and scheduler: what a checkpoint must carry."""

    stopping: EarlyStopping
    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of `epoch` consumed
    tokens: int = 0
    examples: int = 0
    elapsed: float = 0.0  # wall seconds before this process took over
    excluded: float = 0.0  # seconds of evaluations and checkpoints, left out of throughput
    meter: tuple[float, float, float] = (0.0, 0.0, 0.0)  # LossMeter.state()
    pending: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # MLflow rows not yet sent

    def count(self, epoch: int, batch: dict[str, torch.Tensor]) -> None:
        """One more batch of `epoch`: where the loop stands in it, and the tokens and examples trained on."""
        self.position = self.position + 1 if epoch == self.epoch else 1
        self.epoch = epoch
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.examples += len(batch["input_ids"])


class _Preemption:
    """The stop signals received during fit(): recorded by the handler, acted on at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _Preemption:
        if threading.current_thread() is threading.main_thread():  # only there can Python handle signals
            self.previous = {sig: signal.signal(sig, self._received) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _received(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise Interrupted(signum, "a second signal stopped it at once: a rerun resumes from the last checkpoint")
        self.signum = signum

    def requested(self, step: int, log_every: int, device: torch.device) -> int | None:
        """The signal to stop for after `step`: at once in one process; under torchrun at a logged row, when
        any rank has one, so that every rank stops at the same step."""
        if distributed.world_size() == 1:
            return self.signum
        if step % log_every or not distributed.all_sum([float(self.signum is not None)], device)[0]:
            return None
        return self.signum or signal.SIGTERM


def _batches(loader: DataLoader, epoch: int = 0, skip: int = 0) -> Iterator[tuple[int, dict]]:
    """Endless (epoch, batch) pairs from `epoch` on, its first `skip` batches left out: every pass re-shuffles
    and, for MLM, draws fresh masks."""
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)  # DistributedSampler: a new seeded shuffle, the same on every rank
        if skip:
            if not hasattr(loader.sampler, "start"):
                raise RuntimeError("resuming mid-epoch needs the loader of train_loader() (a ResumableSampler)")
            loader.sampler.start = skip * loader.batch_size
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16, AMX): there bf16 autocast trains about 1.8x
    faster than fp32; elsewhere it is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast. params `precision`: bf16 always, fp32 never, auto on CUDA
    and on CPUs with native bf16 (not on Apple's MPS: bf16 there needs macOS 14 and is untried here)."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return precision == "bf16"


def train_step(
    train_model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    meter: LossMeter,
    *,
    max_grad_norm: float,
    bf16: bool,
    compute_loss: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
) -> None:
    """One optimizer step over the micro-batches of a global batch: forward and backward of each, clipping, and
    an update that is skipped on the device when the gradients are not finite (one NaN or inf would make every
    weight NaN), as AMP's GradScaler does: no host synchronization. `optimizer` must be make_optimizer()'s fused
    AdamW, which reads `found_inf`.

    Each micro-batch's mean loss is weighted by its share of the global batch's examples, so the gradient is
    the whole batch's mean (not a mean of micro-batch means: the trap of transformers PR #34191); for our
    objectives that is also the mean over masked or predicted tokens, whose count per block is fixed. Under DDP
    the gradients are all-reduced once, on the last micro-batch (no_sync before it)."""
    total = sum(len(b["input_ids"]) for b in batches)
    loss = None
    for i, batch in enumerate(batches):
        share = len(batch["input_ids"]) / total
        sync = i == len(batches) - 1 or not hasattr(train_model, "no_sync")
        with contextlib.nullcontext() if sync else train_model.no_sync():
            with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
                part = train_model(**batch).loss if compute_loss is None else compute_loss(train_model, batch)
            (part * share if len(batches) > 1 else part).backward()
        loss = part.detach() * share if loss is None else loss + part.detach() * share
    # The norm is of the gradients as DDP all-reduced them, so every rank skips the same steps.
    finite = torch.isfinite(torch.nn.utils.clip_grad_norm_(train_model.parameters(), max_grad_norm))
    optimizer.found_inf = (~finite).float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    meter.add(loss, finite)


class _Recorder:
    """Where fit()'s rows go: the result's history, MLflow (at once, or after the checkpoint that covers
    them), the progress bar, and the checkpoint itself."""

    def __init__(self, run: Run, result: FitResult, progress: _Progress, checkpoints: Checkpoints | None,
                 desc: str, device: torch.device):  # fmt: skip
        self.run, self.result, self.progress, self.checkpoints = run, result, progress, checkpoints
        self.desc, self.device, self.main = desc, device, distributed.is_main()
        self.live = checkpoints is None or checkpoints.every is None  # no checkpoint to wait for: log at once

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.progress.pending.append((step, metrics))
        if self.live:  # no checkpoint to wait for: send at once
            self.flush()

    def say(self, line: str) -> None:
        if self.main:
            tqdm.write(line)

    def resumed(self, total_steps: int) -> None:
        """A resumed run: send MLflow the rows the checkpoint held back, and say where training continues."""
        if self.run.send_rows(self.progress.pending, once=True):
            self.progress.pending = []
        self.say(f"resuming {self.desc} from step {self.progress.step} of {total_steps}")

    def train_row(self, step: int, meter: LossMeter, learning_rate: float, bar: tqdm) -> None:
        # Over ranks: the global batch's loss. A window of skipped steps only has no loss (NaN).
        row = {"step": step, "loss": distributed.all_mean(meter.window(), self.device), "learning_rate": learning_rate}
        skipped = meter.skipped()
        if skipped > self.result.skipped_steps:
            self.say(f"{self.desc}: {skipped - self.result.skipped_steps} updates skipped up to step {step} "
                     "(gradients not finite)")  # fmt: skip
        self.result.skipped_steps = skipped
        self.result.train_rows.append(row)
        metrics = {"train/loss": row["loss"], "train/learning_rate": learning_rate, "train/skipped_steps": skipped}
        self.log(metrics, step)
        bar.set_postfix(loss=f"{row['loss']:.3f}")

    def eval_row(self, step: int, epoch: int, metrics: dict[str, float], seconds: float) -> dict[str, float]:
        tokens, examples = distributed.all_sum([self.progress.tokens, self.progress.examples], self.device)
        throughput = {"tokens_per_second": tokens / seconds, "examples_per_second": examples / seconds}
        row = {"step": step, "epoch": epoch, **metrics}
        self.result.eval_rows.append(row)
        evals = {f"eval/{k}": v for k, v in metrics.items()}
        self.log({**evals, **{f"train/{k}": v for k, v in throughput.items()}}, step)
        self.say(f"{self.desc} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return row

    def evaluate(self, step: int, epoch: int, model: torch.nn.Module, train_model: torch.nn.Module,
                 evaluate: Callable[[], dict[str, float]], start: float) -> bool:  # fmt: skip
        """Run evaluate() with the training model in eval mode (its time left out of throughput), record the
        row, and let the early stopping see `model`; True when training should stop."""
        evaluating = time.perf_counter()
        train_model.eval()
        metrics = evaluate()
        train_model.train()
        self.progress.excluded += time.perf_counter() - evaluating
        row = self.eval_row(step, epoch, metrics, time.perf_counter() - start - self.progress.excluded)
        stopping = self.progress.stopping
        stop = stopping.update(row, model)
        if stop:
            self.result.stopped_early = True
            self.say(f"{self.desc}: no better {stopping.monitor} for {stopping.patience} evaluations, "
                     f"stopping at step {step}")  # fmt: skip
        return stop

    def stopped_at(self, step: int, total_steps: int) -> str:
        """Where a stop signal ended training, and what a rerun continues from."""
        if self.checkpoints is None:
            return f"{self.desc} stopped at step {step} of {total_steps} without a checkpoint: a rerun starts over"
        return f"{self.desc} checkpointed step {step} of {total_steps}: a rerun resumes there"

    def finish(self, model: torch.nn.Module, step: int, meter: LossMeter, start: float) -> FitResult:
        """The result after the last step: throughput over ranks, the best weights restored into `model`, the
        final checkpoint (or the last MLflow rows)."""
        result, progress = self.result, self.progress
        result.steps, result.seconds = step, time.perf_counter() - start
        result.skipped_steps = meter.skipped()
        tokens, examples = distributed.all_sum([progress.tokens, progress.examples], self.device)
        trained = max(result.seconds - progress.excluded, 1e-9)
        result.tokens_per_second, result.examples_per_second = tokens / trained, examples / trained
        result.best = progress.stopping.best_row
        progress.stopping.restore_best(model)
        model.eval()
        if self.checkpoints is not None:
            self.checkpoint(True, {"model": model.state_dict()}, meter, result.seconds, last=True)
        else:
            self.flush(force=True)
        return result

    def checkpoint(self, finished: bool, content: dict, meter: LossMeter, elapsed: float, last: bool = False) -> None:
        """Save the whole state (`content`: the model's, and optimizer's and scheduler's unless `finished`),
        then send MLflow the rows it now covers (see Run.log_rows_once)."""
        saving = time.perf_counter()
        self.progress.elapsed, self.progress.meter = elapsed, meter.state()
        state = {"finished": finished, "result": self.result, "progress": self.progress, **content}
        self.checkpoints.save({**state, "run_id": self.run.run_id})
        spent = time.perf_counter() - saving
        self.result.checkpoint_seconds += spent
        self.progress.excluded += spent
        self.flush(force=last)

    def flush(self, force: bool = False) -> None:
        """Send the held rows; where the store does not answer they stay held (and in the next checkpoint)."""
        if self.run.send_rows(self.progress.pending, force=force):
            self.progress.pending = []


def fit(
    model: torch.nn.Module,
    loader: DataLoader,
    *,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float,
    max_grad_norm: float,
    eval_every: int,
    evaluate: Callable[[], dict[str, float]],
    run: Run,
    device: torch.device,
    stopping: EarlyStopping | None = None,
    compute_loss: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
    on_epoch: Callable[[int], None] | None = None,
    log_every: int = 10,
    desc: str = "train",
    torch_compile: bool = False,
    precision: str = "auto",
    checkpoints: Checkpoints | None = None,
    accumulation: int = 1,
) -> FitResult:
    """Train for total_steps optimizer steps of `accumulation` micro-batches each (train_step), with warmup then
    linear decay; evaluate every eval_every steps and at the end.

    `stopping` (an EarlyStopping) keeps the best evaluation's weights, restores them at the end and may stop
    early; without it the last evaluation counts. `compute_loss` replaces the model's own loss (it receives
    the model as wrapped for training); `on_epoch(epoch)` runs before the first step of every epoch (and of
    a resumed one: it must depend on the epoch only). `model` itself is never wrapped: evaluate() and saving
    use it, and its state_dict keys stay those of save_pretrained.

    With `checkpoints` (transferpipe.checkpoint) the loop saves its whole state every `checkpoints.every`
    steps and once more when training ends, and continues from the state found there: a resumed run logs to
    the same MLflow run and, on CPU at a fixed precision, ends with the same weights as an uninterrupted one.
    MLflow then gets each row after the checkpoint that covers it, so its histories never hold steps a
    resumed run repeats.
    """
    state = checkpoints.state if checkpoints is not None else None
    model.to(device)
    if state is not None and state["finished"]:
        return _finished_earlier(model, state, run, desc)
    warmup = math.ceil(warmup_ratio * total_steps)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}  # a checkpoint's keys: what it restores
    result, progress = FitResult(steps=0, seconds=0.0), _Progress(stopping or EarlyStopping())
    if state is not None:
        result, progress = _restore(state, checkpoints, parts)
    recorder = _Recorder(run, result, progress, checkpoints, desc, device)
    if state is not None:
        recorder.resumed(total_steps)

    # Gradual unfreezing leaves frozen parameters without gradients, which DDP must be told to expect.
    train_model = distributed.wrap(model, device, find_unused_parameters=on_epoch is not None)
    if torch_compile:
        train_model = torch.compile(train_model)  # compiles on the first step (and on new input shapes)
    train_model.train()
    bf16 = use_bf16(precision, device)  # decided once: on auto it asks the CPU what it supports
    meter = LossMeter(device, progress.meter)
    start = time.perf_counter() - progress.elapsed
    bar = tqdm(total=total_steps, initial=progress.step, desc=desc, unit="step", dynamic_ncols=True,
               mininterval=1.0, disable=not recorder.main)  # fmt: skip
    batches = _batches(loader, progress.epoch, progress.position)
    epoch, step = None, progress.step
    with _Preemption() as preemption:
        for step in range(progress.step + 1, total_steps + 1):
            micro = []
            for _ in range(accumulation):
                last_epoch, (epoch, batch) = epoch, next(batches)
                if epoch != last_epoch and on_epoch is not None:
                    on_epoch(epoch)
                progress.count(epoch, batch)  # on the host, before the batch moves
                micro.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            train_step(train_model, micro, optimizer, meter, max_grad_norm=max_grad_norm, bf16=bf16,
                       compute_loss=compute_loss)  # fmt: skip
            scheduler.step()
            progress.step = step
            bar.update(1)
            last = step == total_steps
            if step % log_every == 0 or last:
                recorder.train_row(step, meter, scheduler.get_last_lr()[0], bar)
            if (step % eval_every == 0 or last) and recorder.evaluate(step, epoch, model, train_model, evaluate, start):
                break  # stopped early
            if last:
                break
            signum = preemption.requested(step, log_every, device)
            if checkpoints is not None and (checkpoints.due(step) or signum is not None):
                content = {name: part.state_dict() for name, part in parts.items()}
                recorder.checkpoint(False, content, meter, time.perf_counter() - start)
            if signum is not None:
                bar.close()
                raise Interrupted(signum, recorder.stopped_at(step, total_steps))
    bar.close()
    return recorder.finish(model, step, meter, start)


def _restore(state: dict, checkpoints: Checkpoints, parts: dict) -> tuple[FitResult, _Progress]:
    """Load a mid-training checkpoint into each of `parts` (name -> object with load_state_dict: the model,
    optimizer and scheduler) and the RNGs; return its result and progress."""
    for name, part in parts.items():
        part.load_state_dict(state[name])
    checkpoints.restore_rng()
    return state["result"], state["progress"]


def _finished_earlier(model: torch.nn.Module, state: dict, run: Run, desc: str) -> FitResult:
    """A checkpoint of a run trained to the end by an earlier process (only what came after, the outputs or
    the tracking, failed): its weights and result, without training again."""
    model.load_state_dict(state["model"])
    run.send_rows(state["progress"].pending, once=True)
    if distributed.is_main():
        tqdm.write(f"{desc}: training finished earlier at step {state['result'].steps}; not training again")
    model.eval()
    return state["result"]
