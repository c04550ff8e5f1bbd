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
    tokens_per_second: float = 0.0  # training steps only, evaluations excluded
    examples_per_second: float = 0.0
    stopped_early: bool = False
    skipped_steps: int = 0  # steps whose gradients were not finite: no update was made

    def write_curves(self, folder: Path) -> None:
        """train.csv (step, loss, learning_rate) and eval.csv (step, epoch, eval metrics): DVC plots."""
        with atomic_dir(folder) as tmp:
            write_csv(tmp / "train.csv", self.train_rows, columns=["step", "loss", "learning_rate"])
            columns = list(self.eval_rows[0]) if self.eval_rows else ["step", "loss"]
            write_csv(tmp / "eval.csv", self.eval_rows, columns=columns)


def _batches(loader: DataLoader) -> Iterator[tuple[int, dict]]:
    """Endless (epoch, batch) pairs: every pass re-shuffles and, for MLM, draws fresh masks."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)  # DistributedSampler: a new seeded shuffle, the same on every rank
        for batch in loader:
            yield epoch, batch
        epoch += 1


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
) -> FitResult:
    """Train for total_steps; evaluate every eval_every steps and at the end.

    With `monitor` (a key of evaluate()'s result; higher is better unless higher_is_better=False) the best
    weights are restored at the end, and training stops once `patience` evaluations in a row brought no
    improvement. `compute_loss` replaces the model's own loss (it receives the model as wrapped for
    training); `on_epoch(epoch)` runs before the first step of every epoch. `model` itself is never
    wrapped: evaluate() and saving use it, and its state_dict keys stay those of save_pretrained.
    """
    scheduler = get_scheduler(
        "linear",
        optimizer,
        num_warmup_steps=math.ceil(warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    result = FitResult(steps=0, seconds=0.0)
    sign = 1.0 if higher_is_better else -1.0
    best_score, best_state, bad_evals = -math.inf, None, 0
    tokens = examples = 0
    eval_seconds = 0.0  # excluded from throughput
    running, running_n = 0.0, 0
    model.to(device)
    # Gradual unfreezing leaves frozen parameters without gradients, which DDP must be told to expect.
    train_model = distributed.wrap(model, device, find_unused_parameters=on_epoch is not None)
    if torch_compile:
        train_model = torch.compile(train_model)  # compiles on the first step (and on new input shapes)
    train_model.train()
    bf16 = use_bf16(precision, device)  # decided once: on auto it asks the CPU what it supports
    main = distributed.is_main()
    start = time.perf_counter()
    progress = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0, disable=not main)
    batches = _batches(loader)
    current_epoch = -1
    for step in range(1, total_steps + 1):
        epoch, batch = next(batches)
        if epoch != current_epoch and on_epoch is not None:
            on_epoch(epoch)
        current_epoch = epoch
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = train_model(**batch).loss if compute_loss is None else compute_loss(train_model, batch)
        loss.backward()
        # The norm is of the gradients as DDP all-reduced them, so every rank takes the same branch.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if torch.isfinite(grad_norm):
            optimizer.step()
            running += loss.item()
            running_n += 1
        else:  # one NaN or inf gradient would make every weight NaN: skip the update, as AMP's GradScaler does
            result.skipped_steps += 1
            if main:
                tqdm.write(f"{desc} step {step}: gradients are not finite (loss {loss.item():.4g}); update skipped")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        examples += batch["input_ids"].shape[0]
        progress.update(1)
        if step % log_every == 0 or step == total_steps:
            # Over ranks: the global batch's. A window of skipped steps only has no loss (NaN).
            loss_mean = distributed.all_mean(running / running_n if running_n else math.nan, device)
            row = {"step": step, "loss": loss_mean, "learning_rate": scheduler.get_last_lr()[0]}
            result.train_rows.append(row)
            run.log_metrics(
                {
                    "train/loss": row["loss"],
                    "train/learning_rate": row["learning_rate"],
                    "train/skipped_steps": result.skipped_steps,
                },
                step,
            )
            progress.set_postfix(loss=f"{row['loss']:.3f}")
            running, running_n = 0.0, 0

        if step % eval_every == 0 or step == total_steps:
            eval_start = time.perf_counter()
            train_model.eval()
            metrics = evaluate()
            train_model.train()
            eval_seconds += time.perf_counter() - eval_start
            elapsed = time.perf_counter() - start - eval_seconds
            all_tokens, all_examples = distributed.all_sum([tokens, examples], device)
            throughput = {"tokens_per_second": all_tokens / elapsed, "examples_per_second": all_examples / elapsed}
            row = {"step": step, "epoch": epoch, **metrics}
            result.eval_rows.append(row)
            run.log_metrics(
                {**{f"eval/{k}": v for k, v in metrics.items()}, **{f"train/{k}": v for k, v in throughput.items()}},
                step,
            )
            if main:
                tqdm.write(f"{desc} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if monitor is None:
                result.best = row
            elif sign * metrics[monitor] > best_score:
                best_score, bad_evals, result.best = sign * metrics[monitor], 0, row
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                bad_evals += 1
                if patience is not None and bad_evals >= patience:
                    result.stopped_early = True
                    if main:
                        tqdm.write(f"{desc}: no better {monitor} for {patience} evaluations, stopping at step {step}")
                    break
    progress.close()
    result.steps = step
    result.seconds = time.perf_counter() - start
    tokens, examples = distributed.all_sum([tokens, examples], device)
    result.tokens_per_second = tokens / (result.seconds - eval_seconds)
    result.examples_per_second = examples / (result.seconds - eval_seconds)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result
