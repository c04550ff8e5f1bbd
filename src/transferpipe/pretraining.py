"""Masked-language-model pretraining of the encoder on packed blocks of unlabeled text."""

from __future__ import annotations

import math

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling, PreTrainedModel, PreTrainedTokenizerBase

from transferpipe.errors import UserError
from transferpipe.modeling import param_groups
from transferpipe.params import PretrainParams
from transferpipe.tracking import Run
from transferpipe.training import FitResult, fit, make_optimizer


def held_out(blocks: datasets.DatasetDict, params: PretrainParams) -> datasets.Dataset:
    validation = blocks["mlm_validation"]
    if len(validation) == 0:
        raise UserError("the validation split has no full pretraining block; lower tokenize.block_size")
    return validation.select(range(min(params.eval_blocks, len(validation))))


@torch.no_grad()
def mlm_eval_batches(
    blocks: datasets.Dataset, collator: DataCollatorForLanguageModeling, batch_size: int, seed: int
) -> list[dict]:
    """Held-out blocks masked once with a fixed seed, so every evaluation scores the same masks."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        loader = DataLoader(blocks, batch_size=batch_size, collate_fn=collator)
        return list(loader)


@torch.no_grad()
def mlm_loss(model: PreTrainedModel, batches: list[dict], device: torch.device) -> dict[str, float]:
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch["labels"] != -100).sum())
        if n == 0:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        total += loss.item() * n  # the model's loss is a mean over masked tokens
        count += n
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    blocks: datasets.DatasetDict,
    params: PretrainParams,
    run: Run,
    device: torch.device,
) -> FitResult:
    """MLM on blocks["mlm_train"], scored on blocks["mlm_validation"] every eval_every steps."""
    train, validation = blocks["mlm_train"], held_out(blocks, params)
    if len(train) == 0:
        raise UserError("the pretraining corpus has no full block; lower tokenize.block_size or add text")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=params.mlm_probability)
    loader = DataLoader(
        train.with_format("torch"),
        batch_size=params.batch_size,
        shuffle=True,
        drop_last=len(train) >= params.batch_size,
        collate_fn=collator,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(params.seed),
    )
    eval_batches = mlm_eval_batches(validation.with_format("torch"), collator, params.batch_size * 2, params.seed)
    groups = param_groups(model, params.learning_rate, params.learning_rate, params.weight_decay)
    optimizer = make_optimizer(groups, params.learning_rate, params.adam_beta2, device)
    model.to(device)
    return fit(
        model,
        loader,
        optimizer=optimizer,
        total_steps=params.max_steps,
        warmup_ratio=params.warmup_ratio,
        max_grad_norm=params.max_grad_norm,
        eval_every=params.eval_every,
        evaluate=lambda: mlm_loss(model, eval_batches, device),
        run=run,
        device=device,
        desc="pretrain",
    )


def evaluate_untrained(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    blocks: datasets.DatasetDict,
    params: PretrainParams,
    device: torch.device,
) -> FitResult:
    """The held-out MLM loss of the starting encoder, as a FitResult of zero steps (pretraining skipped)."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=params.mlm_probability)
    batches = mlm_eval_batches(
        held_out(blocks, params).with_format("torch"), collator, params.batch_size * 2, params.seed
    )
    model.to(device).eval()
    row = {"step": 0, "epoch": 0, **mlm_loss(model, batches, device)}
    return FitResult(steps=0, seconds=0.0, eval_rows=[row], best=row)
