"""One plain training loop for both pretraining and fine-tuning.

Step-based: warmup then linear decay (transformers' scheduler), AdamW (fused on CUDA), gradient
clipping, bf16 autocast on CUDA, optional torch.compile, periodic evaluation, optional early stopping on a
monitored metric with the best weights kept in memory. Every logged row goes to the returned history (the
DVC plots) and to MLflow through `run`.

Under torchrun the model trains inside DistributedDataParallel: each rank's loader yields its share of the
global batch, logged losses and throughput are combined over ranks, and evaluate() must return the same
metrics on every rank (see transferpipe.distributed), so that all ranks stop at the same step.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from transferpipe import distributed
from transferpipe.checkpoint import Checkpoints
from transferpipe.errors import UserError
from transferpipe.io import atomic_dir, write_csv
from transferpipe.tracking import Run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(groups: list[dict], lr: float, beta2: float, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), fused=device.type == "cuda")


def train_loader(
    dataset: Sized,
    *,
    batch_size: int,
    seed: int,
    num_workers: int,
    collate_fn: Callable[[list], dict],
    device: torch.device,
    section: str,
    drop_last: bool = False,
) -> DataLoader:
    """This process's training batches: its share of every global batch of `batch_size` (params
    `section.batch_size`), from a seeded shuffle that fit() renews every epoch (distributed.sampler)."""
    if num_workers < 0:
        raise UserError(f"params {section}.num_workers={num_workers} must be 0 (load in the training process) or more")
    return DataLoader(
        dataset,
        batch_size=distributed.local_batch_size(batch_size, f"{section}.batch_size"),
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

    def write_curves(self, folder: Path) -> None:
        """train.csv (step, loss, learning_rate) and eval.csv (step, epoch, eval metrics): DVC plots."""
        with atomic_dir(folder) as tmp:
            write_csv(tmp / "train.csv", self.train_rows, columns=["step", "loss", "learning_rate"])
            columns = list(self.eval_rows[0]) if self.eval_rows else ["step", "loss"]
            write_csv(tmp / "eval.csv", self.eval_rows, columns=columns)


@dataclass
class _Progress:
    """fit()'s loop state beyond the model, optimizer and scheduler: what a checkpoint must carry."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of `epoch` consumed
    best_score: float = -math.inf
    best_state: dict | None = None
    bad_evals: int = 0
    tokens: int = 0
    examples: int = 0
    elapsed: float = 0.0  # wall seconds before this process took over
    excluded: float = 0.0  # seconds of evaluations and checkpoints, left out of throughput
    running: float = 0.0
    running_n: int = 0
    pending: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # MLflow rows not yet sent


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
    and on CPUs with native bf16."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return precision == "bf16"


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
    monitor: str | None = None,
    higher_is_better: bool = True,
    patience: int | None = None,
    compute_loss: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
    on_epoch: Callable[[int], None] | None = None,
    log_every: int = 10,
    desc: str = "train",
    torch_compile: bool = False,
    precision: str = "auto",
    checkpoints: Checkpoints | None = None,
) -> FitResult:
    """Train for total_steps; evaluate every eval_every steps and at the end.

    With `monitor` (a key of evaluate()'s result; higher is better unless higher_is_better=False) the best
    weights are restored at the end, and training stops once `patience` evaluations in a row brought no
    improvement. `compute_loss` replaces the model's own loss (it receives the model as wrapped for
    training); `on_epoch(epoch)` runs before the first step of every epoch (and of a resumed one: it must
    depend on the epoch only). `model` itself is never wrapped: evaluate() and saving use it, and its
    state_dict keys stay those of save_pretrained.

    With `checkpoints` (transferpipe.checkpoint) the loop saves its whole state every `checkpoints.every`
    steps and once more when training ends, and continues from the state found there: a resumed run logs to
    the same MLflow run and, on CPU at a fixed precision, ends with the same weights as an uninterrupted one.
    MLflow then gets each row after the checkpoint that covers it, so its histories never hold steps a
    resumed run repeats.
    """
    main = distributed.is_main()
    state = checkpoints.state if checkpoints is not None else None
    model.to(device)
    if state is not None and state["finished"]:
        # Trained to the end by an earlier process; only what came after (outputs, tracking) failed.
        model.load_state_dict(state["model"])
        run.log_rows_once(state["progress"].pending)
        if main:
            tqdm.write(f"{desc}: training finished earlier at step {state['result'].steps}; not training again")
        model.eval()
        return state["result"]

    scheduler = get_scheduler(
        "linear",
        optimizer,
        num_warmup_steps=math.ceil(warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    result = FitResult(steps=0, seconds=0.0)
    progress = _Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result, progress = state["result"], state["progress"]
        run.log_rows_once(progress.pending)
        progress.pending = []
        checkpoints.restore_rng()
        if main:
            tqdm.write(f"resuming {desc} from step {progress.step} of {total_steps}")
    sign = 1.0 if higher_is_better else -1.0
    live = checkpoints is None or checkpoints.every is None  # no checkpoint to wait for: log at once

    def log(metrics: dict[str, float], step: int) -> None:
        if live:
            run.log_metrics(metrics, step)
        else:
            progress.pending.append((step, metrics))

    def save_checkpoint(finished: bool) -> None:
        saving = time.perf_counter()
        progress.elapsed = saving - start
        content = {"finished": finished, "model": model.state_dict(), "result": result, "progress": progress}
        if not finished:  # a finished run is never trained further
            content |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        checkpoints.save({**content, "run_id": run.run_id})
        result.checkpoint_seconds += time.perf_counter() - saving
        progress.excluded += time.perf_counter() - saving
        run.log_rows(progress.pending)  # only now that the checkpoint holds them (see log_rows_once)
        progress.pending = []

    # Gradual unfreezing leaves frozen parameters without gradients, which DDP must be told to expect.
    train_model = distributed.wrap(model, device, find_unused_parameters=on_epoch is not None)
    if torch_compile:
        train_model = torch.compile(train_model)  # compiles on the first step (and on new input shapes)
    train_model.train()
    bf16 = use_bf16(precision, device)  # decided once: on auto it asks the CPU what it supports
    start = time.perf_counter() - progress.elapsed
    progress_bar = tqdm(
        total=total_steps,
        initial=progress.step,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not main,
    )
    batches = _batches(loader, progress.epoch, progress.position)
    current_epoch = None
    step = progress.step
    for step in range(progress.step + 1, total_steps + 1):
        epoch, batch = next(batches)
        if epoch != current_epoch and on_epoch is not None:
            on_epoch(epoch)
        current_epoch = epoch
        if epoch != progress.epoch:
            progress.epoch, progress.position = epoch, 0
        progress.position += 1
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = train_model(**batch).loss if compute_loss is None else compute_loss(train_model, batch)
        loss.backward()
        # The norm is of the gradients as DDP all-reduced them, so every rank takes the same branch.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if torch.isfinite(grad_norm):
            optimizer.step()
            progress.running += loss.item()
            progress.running_n += 1
        else:  # one NaN or inf gradient would make every weight NaN: skip the update, as AMP's GradScaler does
            result.skipped_steps += 1
            if main:
                tqdm.write(f"{desc} step {step}: gradients are not finite (loss {loss.item():.4g}); update skipped")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step = step

        has_mask = "attention_mask" in batch
        progress.tokens += int(batch["attention_mask"].sum()) if has_mask else batch["input_ids"].numel()
        progress.examples += batch["input_ids"].shape[0]
        progress_bar.update(1)
        if step % log_every == 0 or step == total_steps:
            # Over ranks: the global batch's. A window of skipped steps only has no loss (NaN).
            window = progress.running / progress.running_n if progress.running_n else math.nan
            row = {"step": step, "loss": distributed.all_mean(window, device)}
            row["learning_rate"] = scheduler.get_last_lr()[0]
            result.train_rows.append(row)
            log(
                {
                    "train/loss": row["loss"],
                    "train/learning_rate": row["learning_rate"],
                    "train/skipped_steps": result.skipped_steps,
                },
                step,
            )
            progress_bar.set_postfix(loss=f"{row['loss']:.3f}")
            progress.running, progress.running_n = 0.0, 0

        if step % eval_every == 0 or step == total_steps:
            eval_start = time.perf_counter()
            train_model.eval()
            metrics = evaluate()
            train_model.train()
            progress.excluded += time.perf_counter() - eval_start
            elapsed = time.perf_counter() - start - progress.excluded
            all_tokens, all_examples = distributed.all_sum([progress.tokens, progress.examples], device)
            throughput = {"tokens_per_second": all_tokens / elapsed, "examples_per_second": all_examples / elapsed}
            row = {"step": step, "epoch": epoch, **metrics}
            result.eval_rows.append(row)
            log(
                {**{f"eval/{k}": v for k, v in metrics.items()}, **{f"train/{k}": v for k, v in throughput.items()}},
                step,
            )
            if main:
                tqdm.write(f"{desc} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if monitor is None:
                result.best = row
            elif sign * metrics[monitor] > progress.best_score:
                progress.best_score, progress.bad_evals, result.best = sign * metrics[monitor], 0, row
                progress.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                progress.bad_evals += 1
                if patience is not None and progress.bad_evals >= patience:
                    result.stopped_early = True
                    if main:
                        tqdm.write(f"{desc}: no better {monitor} for {patience} evaluations, stopping at step {step}")
                    break
        if checkpoints is not None and checkpoints.due(step) and step < total_steps:
            save_checkpoint(finished=False)
    progress_bar.close()
    result.steps = step
    result.seconds = time.perf_counter() - start
    tokens, examples = distributed.all_sum([progress.tokens, progress.examples], device)
    trained = max(result.seconds - progress.excluded, 1e-9)
    result.tokens_per_second = tokens / trained
    result.examples_per_second = examples / trained
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)
        progress.best_state = None
    model.eval()
    if checkpoints is not None:
        save_checkpoint(finished=True)
    else:
        run.log_rows(progress.pending)
    return result
