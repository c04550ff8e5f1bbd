"""Language-model pretraining on packed blocks of unlabeled text: masked LM for the transformer encoders,
next-token LM for the LSTM (ULMFiT). Either way the held-out score is the mean loss per predicted token and
its perplexity, under the same metric names."""

from __future__ import annotations

import math

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling, PreTrainedModel, PreTrainedTokenizerBase

from transferpipe import distributed
from transferpipe.checkpoint import Checkpoints
from transferpipe.errors import UserError
from transferpipe.modeling import is_causal_lm, param_groups
from transferpipe.params import PretrainParams
from transferpipe.tracking import Run
from transferpipe.training import FitResult, fit, make_optimizer, train_loader


def held_out(blocks: datasets.DatasetDict, params: PretrainParams) -> datasets.Dataset:
    validation = blocks["mlm_validation"]
    if len(validation) == 0:
        raise UserError("the validation split has no full pretraining block; lower tokenize.block_size")
    return validation.select(range(min(params.eval_blocks, len(validation))))


def lm_collator(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: PretrainParams
) -> DataCollatorForLanguageModeling:
    """Masks for an MLM; for a next-token LM the labels are the inputs (the model shifts them)."""
    if is_causal_lm(model):
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=params.mlm_probability)


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
def mlm_loss(
    model: PreTrainedModel, batches: list[dict], device: torch.device, causal: bool = False
) -> dict[str, float]:
    """The mean loss over all masked tokens of `batches` (`causal`: over every next-token prediction); under
    torchrun each rank scores every world_size-th batch and the sums are combined, so every rank returns the
    same numbers."""
    total, count = 0.0, 0
    for batch in batches[distributed.rank() :: distributed.world_size()]:
        # A next-token LM predicts labels[:, 1:] from the positions before them (the model shifts).
        n = int(((batch["labels"][:, 1:] if causal else batch["labels"]) != -100).sum())
        if n == 0:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        total += loss.item() * n  # the model's loss is a mean over masked tokens
        count += n
    total, count = distributed.all_sum([total, count], device)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    blocks: datasets.DatasetDict,
    params: PretrainParams,
    run: Run,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
) -> FitResult:
    """MLM on blocks["mlm_train"], scored on blocks["mlm_validation"] every eval_every steps."""
    train, validation = blocks["mlm_train"], held_out(blocks, params)
    if len(train) == 0:
        raise UserError("the pretraining corpus has no full block; lower tokenize.block_size or add text")
    collator = lm_collator(model, tokenizer, params)
    loader = train_loader(
        train.with_format("torch"),
        batch_size=params.batch_size,
        seed=params.seed,
        num_workers=params.num_workers,
        collate_fn=collator,
        device=device,
        section="pretrain",
        drop_last=len(train) >= params.batch_size,
    )
    eval_batches = mlm_eval_batches(validation.with_format("torch"), collator, params.batch_size * 2, params.seed)
    groups = param_groups(model, params.learning_rate, params.learning_rate, params.weight_decay)
    optimizer = make_optimizer(groups, params.learning_rate, params.adam_beta2, device)
    model.to(device)
    distributed.seed_rank(params.seed)  # after the fixed eval masks: each rank draws its own training masks
    return fit(
        model,
        loader,
        optimizer=optimizer,
        total_steps=params.max_steps,
        warmup_ratio=params.warmup_ratio,
        max_grad_norm=params.max_grad_norm,
        eval_every=params.eval_every,
        evaluate=lambda: mlm_loss(model, eval_batches, device, is_causal_lm(model)),
        run=run,
        device=device,
        desc="pretrain",
        torch_compile=params.torch_compile,
        precision=params.precision,
        checkpoints=checkpoints,
    )


def evaluate_untrained(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    blocks: datasets.DatasetDict,
    params: PretrainParams,
    device: torch.device,
) -> FitResult:
    """The held-out MLM loss of the starting encoder, as a FitResult of zero steps (pretraining skipped)."""
    collator = lm_collator(model, tokenizer, params)
    batches = mlm_eval_batches(
        held_out(blocks, params).with_format("torch"), collator, params.batch_size * 2, params.seed
    )
    model.to(device).eval()
    row = {"step": 0, "epoch": 0, **mlm_loss(model, batches, device, is_causal_lm(model))}
    return FitResult(steps=0, seconds=0.0, eval_rows=[row], best=row)
