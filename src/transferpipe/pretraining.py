"""Language-model pretraining on packed blocks of unlabeled text: masked LM for the transformer encoders,
next-token LM for the LSTM (ULMFiT). Either way the held-out score is the mean loss per predicted token and
its perplexity, under the same metric names.

Both objectives are modules around the model (MaskedLM, NextTokenLM) that take the raw blocks: masking runs
on the training device, inside forward, with a fixed number of masked positions per block, so no shape
depends on the data (torch.compile and CUDA graphs need that) and the DataLoader only stacks token ids.
"""

from __future__ import annotations

import math

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import BertForMaskedLM, ModernBertForMaskedLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput

from transferpipe import distributed, flops
from transferpipe.checkpoint import Checkpoints
from transferpipe.errors import UserError
from transferpipe.modeling import is_causal_lm, param_groups
from transferpipe.params import PretrainParams
from transferpipe.tracking import Run
from transferpipe.training import FitResult, fit, make_optimizer, train_loader


class MaskedLM(nn.Module):
    """BERT's masked-LM objective with static shapes.

    Each block gets exactly round(mlm_probability * block length) masked positions, drawn uniformly among its
    non-special tokens with the device's RNG (the same rate as BERT's per-token coin, without its variance);
    80% of them become [MASK], 10% a random token, 10% stay. The loss gathers the masked positions' hidden
    states before the output head, so the head runs on those only, with a shape known in advance.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mlm_probability: float):
        super().__init__()
        self.model = model
        self.mlm_probability = mlm_probability
        self.mask_token_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)
        self.register_buffer("special_ids", torch.tensor(sorted(tokenizer.all_special_ids)), persistent=False)

    def mask(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Masked inputs, the masked `positions` (batch, k) and their `targets` (-100 where a block had fewer
        than k maskable tokens and a special token was drawn)."""
        k = max(1, round(self.mlm_probability * input_ids.shape[1]))
        special = torch.isin(input_ids, self.special_ids.to(input_ids.device))
        scores = torch.rand(input_ids.shape, device=input_ids.device).masked_fill(special, 2.0)
        positions = scores.topk(k, dim=1, largest=False).indices
        original = input_ids.gather(1, positions)
        targets = original.masked_fill(special.gather(1, positions), -100)
        draw = torch.rand(positions.shape, device=input_ids.device)
        random_tokens = torch.randint(self.vocab_size, positions.shape, device=input_ids.device)
        replaced = torch.where(draw < 0.8, self.mask_token_id, torch.where(draw < 0.9, random_tokens, original))
        replaced = torch.where(targets == -100, original, replaced)  # a drawn special token stays itself
        return {"input_ids": input_ids.scatter(1, positions, replaced), "positions": positions, "targets": targets}

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, targets: torch.Tensor | None = None
    ) -> MaskedLMOutput:
        """The mean loss over masked positions; masks are drawn here unless given (fixed held-out masks)."""
        if positions is None:
            input_ids, positions, targets = self.mask(input_ids).values()
        head = _masked_lm_head(self.model)
        if head is None:  # another architecture: its own loss on dense labels
            labels = torch.full_like(input_ids, -100).scatter(1, positions, targets)
            return MaskedLMOutput(loss=self.model(input_ids=input_ids, labels=labels).loss)
        hidden = self.model.base_model(input_ids=input_ids).last_hidden_state
        picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = head(picked).float()
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss)

    @staticmethod
    def predicted(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["targets"] != -100).sum())


def _masked_lm_head(model: PreTrainedModel) -> nn.Module | None:
    """The output head from hidden states to vocabulary logits, where we know the architecture."""
    if isinstance(model, ModernBertForMaskedLM):
        return nn.Sequential(model.head, model.decoder)
    if isinstance(model, BertForMaskedLM):
        return model.cls
    return None


class NextTokenLM(nn.Module):
    """The LSTM's objective (ULMFiT): predict every next token of the block (the model shifts the labels)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> CausalLMOutput:
        return CausalLMOutput(loss=self.model(input_ids=input_ids, labels=input_ids).loss)

    @staticmethod
    def predicted(batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"][:, 1:].numel()


def objective(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: PretrainParams) -> nn.Module:
    """The pretraining objective of `model`: next-token for a causal LM, masked LM otherwise."""
    return NextTokenLM(model) if is_causal_lm(model) else MaskedLM(model, tokenizer, params.mlm_probability)


def utilization(
    model: PreTrainedModel, params: PretrainParams, block_size: int, tokens_per_second: float
) -> dict[str, float]:
    """Model and hardware FLOPs utilization (MFU, HFU; transferpipe.flops) of pretraining at
    `tokens_per_second`, on a GPU whose bf16 peak is known; empty elsewhere. The head runs on the predicted
    positions only (MaskedLM gathers them), so it counts there in both."""
    peak = flops.peak_bf16()
    if peak is None:
        return {}
    if is_causal_lm(model):
        predicted = 1 - 1 / block_size
    else:
        predicted = max(1, round(params.mlm_probability * block_size)) / block_size
    useful = flops.training_flops_per_token(model.config, block_size, predicted)
    executed = flops.hardware_flops_per_token(model.config, block_size, predicted, head_fraction=predicted)
    return {"mfu": flops.mfu(tokens_per_second, useful, peak), "hfu": flops.mfu(tokens_per_second, executed, peak)}


def held_out(blocks: datasets.DatasetDict, params: PretrainParams) -> datasets.Dataset:
    validation = blocks["mlm_validation"]
    if len(validation) == 0:
        raise UserError("the validation split has no full pretraining block; lower tokenize.block_size")
    return validation.select(range(min(params.eval_blocks, len(validation))))


@torch.no_grad()
def held_out_batches(blocks: datasets.Dataset, lm: nn.Module, batch_size: int, seed: int) -> list[dict]:
    """Held-out blocks, masked once (on the CPU) with a fixed seed, so every evaluation scores the same masks."""
    ids = blocks.with_format("torch")["input_ids"]
    batches = [{"input_ids": ids[i : i + batch_size]} for i in range(0, len(ids), batch_size)]
    if not isinstance(lm, MaskedLM):
        return batches
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return [lm.mask(b["input_ids"]) for b in batches]


@torch.no_grad()
def held_out_loss(lm: nn.Module, batches: list[dict], device: torch.device) -> dict[str, float]:
    """The mean loss per predicted token over `batches` and its perplexity; under torchrun each rank scores
    every world_size-th batch and the sums are combined, so every rank returns the same numbers."""
    total, count = 0.0, 0
    mine = batches[distributed.rank() :: distributed.world_size()]
    for batch in tqdm(mine, desc="held-out loss", unit="batch", leave=False, disable=not distributed.is_main()):
        n = lm.predicted(batch)
        if n == 0:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = lm(**batch).loss
        total += loss.item() * n  # the loss is a mean over predicted tokens
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
    """The LM objective on blocks["mlm_train"], scored on blocks["mlm_validation"] every eval_every steps."""
    train, validation = blocks["mlm_train"], held_out(blocks, params)
    if len(train) == 0:
        raise UserError("the pretraining corpus has no full block; lower tokenize.block_size or add text")
    lm = objective(model, tokenizer, params)
    loader = train_loader(
        train.with_format("torch", columns=["input_ids"]),
        batch_size=params.batch_size,
        seed=params.seed,
        num_workers=params.num_workers,
        collate_fn=None,
        device=device,
        section="pretrain",
        drop_last=len(train) >= params.batch_size,
    )
    eval_batches = held_out_batches(validation, lm, params.batch_size * 2, params.seed)
    groups = param_groups(model, params.learning_rate, params.learning_rate, params.weight_decay)
    optimizer = make_optimizer(groups, params.learning_rate, params.adam_beta2, device)
    lm.to(device)
    distributed.seed_rank(params.seed)  # after the fixed eval masks: each rank draws its own training masks
    return fit(
        lm,
        loader,
        optimizer=optimizer,
        total_steps=params.max_steps,
        warmup_ratio=params.warmup_ratio,
        max_grad_norm=params.max_grad_norm,
        eval_every=params.eval_every,
        evaluate=lambda: held_out_loss(lm, eval_batches, device),
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
    """The held-out loss of the starting encoder, as a FitResult of zero steps (pretraining skipped)."""
    lm = objective(model, tokenizer, params)
    batches = held_out_batches(held_out(blocks, params), lm, params.batch_size * 2, params.seed)
    lm.to(device).eval()
    row = {"step": 0, "epoch": 0, **held_out_loss(lm, batches, device)}
    return FitResult(steps=0, seconds=0.0, eval_rows=[row], best=row)
