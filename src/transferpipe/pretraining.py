"""Language-model pretraining on packed blocks of unlabeled text: masked LM or ELECTRA's replaced-token
detection for the transformer encoders (pretrain.objective), next-token LM for the LSTM (ULMFiT). The held-out
score is the mean loss per predicted token and its perplexity, under the same metric names (for ELECTRA, its
generator's, beside the discriminator's replaced-token loss and accuracy).

The objectives are modules around the model (MaskedLM, ReplacedTokenDetection, NextTokenLM) that take the raw
blocks: masking runs on the training device, inside forward, with a fixed number of masked positions per
block, so no shape depends on the data (torch.compile and CUDA graphs need that) and the DataLoader only
stacks token ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    BertForMaskedLM,
    ModernBertForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput, ModelOutput

from transferpipe import distributed, flops
from transferpipe.checkpoint import Checkpoints
from transferpipe.errors import UserError
from transferpipe.modeling import is_causal_lm, no_weight_decay, padding_safe, param_groups
from transferpipe.params import PretrainParams
from transferpipe.tracking import Run
from transferpipe.training import FitResult, fit, make_optimizer, train_loader, use_bf16


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
        logits = self.logits(input_ids, positions)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(batch, k, vocab) fp32 logits at `positions`: the head runs there only, where we know the head."""
        head = _masked_lm_head(self.model)
        if head is None:  # another architecture: logits at every position, then the masked ones
            logits = self.model(input_ids=input_ids).logits
            return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
        hidden = self.model.base_model(input_ids=input_ids).last_hidden_state
        picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return head(picked).float()

    @staticmethod
    def predicted(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["targets"] != -100).sum())

    score_names = ("loss",)

    @staticmethod
    def scores(output: ModelOutput) -> dict[str, torch.Tensor]:
        """The held-out terms of one batch (score_names), each a mean over its predicted tokens."""
        return {"loss": output.loss}


@dataclass
class ReplacedTokenOutput(ModelOutput):
    loss: torch.Tensor | None = None  # generator + discriminator_weight x replaced_loss: what trains
    generator_loss: torch.Tensor | None = None  # the generator's MLM loss per masked position
    replaced_loss: torch.Tensor | None = None  # the discriminator's binary cross-entropy per scored position
    replaced_accuracy: torch.Tensor | None = None  # its share of scored positions judged right


class ReplacedTokenDetection(nn.Module):
    """ELECTRA's objective (Clark et al. 2020): the encoder learns from every position, not only the masked ones.

    A small masked-LM generator (`model`'s architecture and width, generator_layers blocks, sharing the token
    embeddings and their tied output projection with `model`) fills the masked positions (MaskedLM's masks)
    with tokens sampled from its predictions; `model`, the discriminator, reads the corrupted block and a
    two-layer head on its hidden states says at every non-special position whether the token was replaced (a
    sampled token equal to the original counts as original). The loss is the generator's MLM loss plus
    discriminator_weight times the mean replaced-token binary cross-entropy; only `model` is kept after
    pretraining. Held-out blocks (eval mode) sample the replacements from a fixed seed.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: PretrainParams):
        super().__init__()
        self.model = model
        self.generator = MaskedLM(generator_for(model, params.electra_generator_layers), tokenizer,
                                  params.mlm_probability)  # fmt: skip
        width = model.config.hidden_size
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))  # ELECTRA's
        self.discriminator_weight = params.electra_discriminator_weight

    def mask(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.generator.mask(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, targets: torch.Tensor | None = None
    ) -> ReplacedTokenOutput:
        if positions is None:
            original = input_ids
            input_ids, positions, targets = self.mask(input_ids).values()
        else:  # held-out blocks come masked: put the originals back
            at = input_ids.gather(1, positions)
            original = input_ids.scatter(1, positions, torch.where(targets == -100, at, targets))
        logits = self.generator.logits(input_ids, positions)
        generator_loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        with torch.no_grad():
            rng = None if self.training else torch.Generator(logits.device).manual_seed(0)
            sampled = sample(logits, rng)
            sampled = torch.where(targets == -100, original.gather(1, positions), sampled)
            corrupted = original.scatter(1, positions, sampled)
            replaced = (corrupted != original).float()
            scored = (~torch.isin(original, self.generator.special_ids)).float()
        hidden = self.model.base_model(input_ids=corrupted).last_hidden_state
        judged = self.head(hidden).squeeze(-1).float()
        per_token = nn.functional.binary_cross_entropy_with_logits(judged, replaced, reduction="none")
        count = scored.sum().clamp(min=1.0)
        replaced_loss = (per_token * scored).sum() / count
        accuracy = (((judged > 0).float() == replaced).float() * scored).sum() / count
        return ReplacedTokenOutput(
            loss=generator_loss + self.discriminator_weight * replaced_loss,
            generator_loss=generator_loss,
            replaced_loss=replaced_loss,
            replaced_accuracy=accuracy,
        )

    predicted = staticmethod(MaskedLM.predicted)
    score_names = ("loss", "replaced_loss", "replaced_accuracy")

    @staticmethod
    def scores(output: ReplacedTokenOutput) -> dict[str, torch.Tensor]:
        return {"loss": output.generator_loss, "replaced_loss": output.replaced_loss,
                "replaced_accuracy": output.replaced_accuracy}  # fmt: skip


def sample(logits: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of (..., vocab) `logits`, drawn from their softmax by inverting its cumulative sum:
    8x faster than torch.multinomial over ELECTRA's (batch x masks, vocab) on a CPU, and no shape depends on
    the draw."""
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=rng, device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def generator_for(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """ELECTRA's generator for `model`: its masked-LM architecture and width with `num_layers` blocks, new
    weights, its token embeddings (and the output projection tied to them) shared with `model`."""
    if num_layers > model.config.num_hidden_layers:
        raise UserError(
            f"params pretrain.electra_generator_layers={num_layers} is more than the encoder's "
            f"{model.config.num_hidden_layers} layers (ELECTRA's generator is a quarter to half its size)"
        )
    generator = padding_safe(type(model)(generator_config(model.config, num_layers)))
    generator.set_input_embeddings(model.get_input_embeddings())
    generator.tie_weights()
    return generator


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
        return CausalLMOutput(loss=self.model(input_ids=input_ids, labels=input_ids, skip_logits=True).loss)

    @staticmethod
    def predicted(batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"][:, 1:].numel()

    score_names, scores = MaskedLM.score_names, staticmethod(MaskedLM.scores)


def generator_config(config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    """`config` with num_layers blocks (ModernBERT's layer_types recomputed for the new depth)."""
    sizes = config.to_dict() | {"num_hidden_layers": num_layers}
    sizes.pop("layer_types", None)
    return type(config).from_dict(sizes)


def objective(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: PretrainParams) -> nn.Module:
    """The pretraining objective of `model`: next-token for a causal LM, else pretrain.objective's."""
    if is_causal_lm(model):
        if params.objective != "mlm":
            raise UserError(
                f"params pretrain.objective={params.objective} needs a transformer encoder; "
                "model.architecture lstm pretrains as a next-token LM (leave pretrain.objective at mlm)"
            )
        return NextTokenLM(model)
    if params.objective == "electra":
        return ReplacedTokenDetection(model, tokenizer, params)
    return MaskedLM(model, tokenizer, params.mlm_probability)


def optimizer_groups(lm: nn.Module, model: PreTrainedModel, params: PretrainParams) -> list[dict]:
    """AdamW groups of the encoder (modeling.param_groups), then of the objective's own parameters (ELECTRA's
    generator and head) under the same rules."""
    groups = param_groups(model, params.learning_rate, params.learning_rate, params.weight_decay)
    placed = {id(p) for group in groups for p in group["params"]}
    own = [(name, p) for name, p in lm.named_parameters() if id(p) not in placed]
    for no_decay in (False, True):
        ps = [p for name, p in own if no_weight_decay(name, p) == no_decay]
        if ps:
            groups.append({"params": ps, "lr": params.learning_rate,
                           "weight_decay": 0.0 if no_decay else params.weight_decay})  # fmt: skip
    return groups


def utilization(
    model: PreTrainedModel, params: PretrainParams, block_size: int, tokens_per_second: float, device: torch.device
) -> dict[str, float]:
    """Model GFLOP/s and the utilization they give (transferpipe.flops): MFU and HFU on a GPU whose bf16 peak
    is known, the fraction of the measured matrix-product ceiling on a CPU. The head runs on the predicted
    positions only (MaskedLM gathers them), so it counts there in both. ELECTRA counts its generator (the head
    on the masked positions) and the encoder with its one-logit head at every position."""
    if is_causal_lm(model):
        parts = [(model.config, 1 - 1 / block_size)]
    else:
        parts = [(model.config, max(1, round(params.mlm_probability * block_size)) / block_size)]
    judge = 0.0
    if params.objective == "electra" and not is_causal_lm(model):
        parts = [(model.config, 0.0), (generator_config(model.config, params.electra_generator_layers), parts[0][1])]
        width = model.config.hidden_size
        judge = 3 * 2 * (width * width + width)  # the discriminator head's two products, trained
    useful = judge + sum(flops.training_flops_per_token(c, block_size, p) for c, p in parts)
    executed = judge + sum(flops.hardware_flops_per_token(c, block_size, p, head_fraction=p) for c, p in parts)
    batch_tokens = distributed.local_batch_size(params.batch_size, "pretrain.batch_size") * block_size
    bf16 = use_bf16(params.precision, device)
    return flops.utilization(device, tokens_per_second, useful, model.config, batch_tokens, bf16, executed)


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
    if not hasattr(lm, "mask"):  # next-token: nothing to mask
        return batches
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return [lm.mask(b["input_ids"]) for b in batches]


@torch.no_grad()
def held_out_loss(lm: nn.Module, batches: list[dict], device: torch.device) -> dict[str, float]:
    """The mean loss per predicted token over `batches` and its perplexity (and the objective's other
    scores); under torchrun each rank scores every world_size-th batch and the sums are combined, so every
    rank returns the same numbers."""
    totals: dict[str, float] = {}
    count = 0
    mine = batches[distributed.rank() :: distributed.world_size()]
    for batch in tqdm(mine, desc="held-out loss", unit="batch", leave=False, disable=not distributed.is_main()):
        n = lm.predicted(batch)
        if n == 0:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            scores = lm.scores(lm(**batch))
        for name, value in scores.items():  # each a mean over the batch's predicted tokens
            totals[name] = totals.get(name, 0.0) + value.item() * n
        count += n
    names = lm.score_names  # the same on every rank, whatever batches it had
    *sums, count = distributed.all_sum([totals.get(name, 0.0) for name in names] + [count], device)
    means = {name: total / max(count, 1) for name, total in zip(names, sums, strict=True)}
    return {"loss": means["loss"], "perplexity": math.exp(min(means["loss"], 50.0))} | means


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
        accumulation=params.gradient_accumulation_steps,
    )
    eval_batches = held_out_batches(validation, lm, params.batch_size * 2, params.seed)
    optimizer = make_optimizer(optimizer_groups(lm, model, params), params.learning_rate, params.adam_beta2, device)
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
        accumulation=params.gradient_accumulation_steps,
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
