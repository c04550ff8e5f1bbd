"""Models through transformers' Auto classes: the pretraining model, the sequence classifier, and their
parameter groups.

The default encoder is ModernBERT-style (pre-LayerNorm, rotary positions, GeGLU) with the MLM loss
computed on masked positions only (`sparse_prediction`), which on a CPU runs about 1.5x more tokens per
second than a post-LayerNorm BERT of the same size that projects every position onto the vocabulary.
`architecture: lstm` is ULMFiT's recipe instead (transferpipe.lstm): a next-token LSTM language model,
fine-tuned with the same heads-and-layers machinery below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    ModernBertConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging as transformers_logging

from transferpipe.errors import UserError
from transferpipe.lstm import LSTMConfig, LSTMForCausalLM
from transferpipe.params import ModelParams

PADDING_SAFE = "padding_safe"  # our attention implementation (transformers' AttentionInterface)


def padding_safe_sdpa_mask(*args: object, **kwargs: object) -> torch.Tensor | None:
    """transformers' SDPA mask in which every query position also attends to itself.

    Only padded query positions change: inside a sliding window (ModernBERT's local layers) a padded position
    far from the text sees no key at all, and for such a fully masked row the fused CUDA kernels return NaN
    (pytorch/pytorch#103749), which the next layer's attention spreads to every position of the row's
    sequence. A real token already sees itself, so its output is unchanged.
    """
    mask = sdpa_mask(*args, **kwargs)
    if mask is None:  # no padding, full attention: nothing is masked
        return None
    return mask | torch.eye(mask.shape[-2], mask.shape[-1], dtype=torch.bool, device=mask.device)


def padding_safe_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """SDPA on CUDA and for inference; to train on the CPU plain matrix products, which train our short sequences
    faster than PyTorch's CPU flash kernel, whose backward dominated a fine-tuning step (docs/LOG.md, 2026-12-02).
    Without gradients (validation, evaluate, serving) the CPU kernel is the faster: 1.4x a forward pass of the
    default classifier on 64 windows, fp32. `attention_mask` is padding_safe_sdpa_mask's (True: attend)."""
    if query.device.type != "cpu" or not torch.is_grad_enabled():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = nn.functional.dropout(scores.softmax(-1, dtype=torch.float32).to(value.dtype), dropout, module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


AttentionInterface.register(PADDING_SAFE, padding_safe_attention)
AttentionMaskInterface.register(PADDING_SAFE, padding_safe_sdpa_mask)


def padding_safe(model: PreTrainedModel) -> PreTrainedModel:
    """`model` on padding_safe_attention instead of SDPA (models on other attention, such as the LSTM, are
    returned as they are). Not saved with the model: every load goes through here."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(PADDING_SAFE)
    return model


def new_encoder_config(params: ModelParams, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    if params.architecture == "lstm":
        # The embedding is hidden_size wide too, so the output projection is tied to it (ULMFiT).
        return LSTMConfig(
            vocab_size=len(tokenizer),
            hidden_size=params.hidden_size,
            num_hidden_layers=params.num_hidden_layers,
            pad_token_id=tokenizer.pad_token_id,
            embed_dropout=params.lstm_embed_dropout,
            input_dropout=params.lstm_input_dropout,
            hidden_dropout=params.lstm_hidden_dropout,
            weight_dropout=params.lstm_weight_dropout,
            output_dropout=params.lstm_output_dropout,
        )
    if params.hidden_size % params.num_attention_heads:
        raise UserError(
            f"params model.hidden_size {params.hidden_size} must be a multiple of "
            f"model.num_attention_heads {params.num_attention_heads}"
        )
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        num_hidden_layers=params.num_hidden_layers,
        num_attention_heads=params.num_attention_heads,
        intermediate_size=params.intermediate_size,
        max_position_embeddings=params.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )
    if params.architecture == "bert":
        # No dropout while pretraining (Cramming): the corpus is seen only a few times.
        return BertConfig(**sizes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ModernBertConfig(
        **sizes,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sparse_prediction=True,  # MLM logits and loss on masked positions only
    )


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' load report (a table of missing and unexpected keys, warnings about tied weights) kept
    quiet where the pipeline says in one line what was added: a fresh pretraining head, a new classifier."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _pretraining_auto_class(config: PretrainedConfig) -> type:
    return AutoModelForCausalLM if isinstance(config, LSTMConfig) else AutoModelForMaskedLM


def pretraining_model(params: ModelParams, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A new model sized by params, or the checkpoint's, with its pretraining head: a masked-LM head on a
    transformer encoder, a next-token head on the LSTM (see is_causal_lm)."""
    if params.checkpoint is None:
        config = new_encoder_config(params, tokenizer)
        return padding_safe(_pretraining_auto_class(config).from_config(config))
    try:
        config = AutoConfig.from_pretrained(params.checkpoint)
        with quiet_loading():
            model, loading = _pretraining_auto_class(config).from_pretrained(
                params.checkpoint, output_loading_info=True
            )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"could not load a model to pretrain from {params.checkpoint!r}: {str(exc).splitlines()[0]}"
        ) from None
    head = fresh_head(model, loading["missing_keys"])
    if head:
        # A checkpoint saved without its pretraining head (a sentence encoder, a bare BertModel): the head
        # starts from the config's initialization, its decoder tied to the word embeddings.
        tied = model.get_output_embeddings() is not None and model.config.tie_word_embeddings
        print(
            f"pretrain: {params.checkpoint} has no {'next-token' if is_causal_lm(model) else 'masked-LM'} head; "
            f"a fresh one is added ({len(head)} tensors{', its decoder tied to the word embeddings' if tied else ''})"
        )
    if hasattr(model.config, "sparse_prediction"):
        model.config.sparse_prediction = True
    return padding_safe(model)


def fresh_head(model: PreTrainedModel, missing_keys: list[str]) -> list[str]:
    """The missing keys that belong to the pretraining head rather than the encoder: what from_pretrained
    initialized afresh because the checkpoint did not have them."""
    encoder = model.base_model_prefix + "."
    return [key for key in missing_keys if not key.startswith(encoder)]


def untrained_copy(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """The same architecture and config with fresh random weights: the from-scratch baseline.

    Seeded the way the pretraining stage seeds before building a new model, so for a model built from
    params (not a checkpoint) this is exactly the pretrained model's starting point. The global RNG is left
    as it was, so pretraining draws the same batches and masks with or without the copy.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return type(model)(model.config)


def is_causal_lm(model: PreTrainedModel) -> bool:
    """Pretrained on next-token prediction (labels = the inputs, shifted inside the model), not on masks."""
    return isinstance(model, LSTMForCausalLM)


def sequence_classifier(
    encoder_dir: str | Path, label_names: list[str], classifier_dropout: float, classifier_pooling: str = "mean"
) -> PreTrainedModel:
    """The pretrained encoder with a new classification head whose config carries the label names."""
    config = AutoConfig.from_pretrained(
        str(encoder_dir),
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        classifier_dropout=classifier_dropout,
    )
    if hasattr(config, "classifier_pooling"):
        config.classifier_pooling = classifier_pooling
    with quiet_loading():
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            str(encoder_dir), config=config, output_loading_info=True
        )
    new = loading["missing_keys"]
    print(f"a new classification head on the encoder of {encoder_dir} ({len(new)} tensors: {', '.join(sorted(new))})")
    return padding_safe(model)


def load_classifier(folder: str | Path) -> PreTrainedModel:
    """A fine-tuned classifier saved with save_pretrained, for prediction."""
    return padding_safe(AutoModelForSequenceClassification.from_pretrained(str(folder)))


def encoder_of(model: PreTrainedModel) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def encoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The transformer blocks, lowest first (BERT: encoder.layer; ModernBERT: layers; LSTM: layers)."""
    encoder = encoder_of(model)
    if hasattr(encoder, "layers"):
        return list(encoder.layers)
    if hasattr(encoder, "encoder") and hasattr(encoder.encoder, "layer"):
        return list(encoder.encoder.layer)
    raise UserError(f"don't know where the layers of {type(encoder).__name__} are; freezing needs them")


def freeze(model: PreTrainedModel, embeddings: bool, num_layers: int) -> int:
    """Freeze the embeddings and the lowest num_layers blocks; returns the number of frozen parameters."""
    layers = encoder_layers(model)
    if num_layers > len(layers):
        raise UserError(f"params finetune.freeze_layers={num_layers} but the encoder has {len(layers)} layers")
    modules = layers[:num_layers] + ([encoder_of(model).embeddings] if embeddings else [])
    frozen = 0
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def layer_groups(model: PreTrainedModel) -> list[list[nn.Parameter]]:
    """Encoder parameters in groups from the top down: [final norm etc. + top block], ..., [lowest block],
    [embeddings]. The unit of discriminative learning rates and of gradual unfreezing."""
    encoder = encoder_of(model)
    blocks = [list(layer.parameters()) for layer in encoder_layers(model)]
    embeddings = list(encoder.embeddings.parameters())
    placed = {id(p) for group in [*blocks, embeddings] for p in group}
    rest = [p for p in encoder.parameters() if id(p) not in placed]  # e.g. ModernBERT's final norm
    return [rest + blocks[-1], *reversed(blocks[:-1]), embeddings]


def param_groups(
    model: PreTrainedModel, encoder_lr: float, head_lr: float, weight_decay: float, layer_lr_decay: float = 1.0
) -> list[dict]:
    """Optimizer groups: the head at head_lr, encoder group k from the top at encoder_lr * layer_lr_decay^k;
    no weight decay on biases and norms; frozen parameters left out."""
    lr_of = {id(p): encoder_lr * layer_lr_decay**k for k, group in enumerate(layer_groups(model)) for p in group}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((lr_of.get(id(p), head_lr), no_weight_decay(name, p)), []).append(p)
    return [
        {"params": ps, "lr": lr, "weight_decay": 0.0 if no_decay else weight_decay}
        for (lr, no_decay), ps in groups.items()
    ]


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Biases and norms train without weight decay."""
    return p.ndim < 2 or "norm" in name.lower()


def gradual_unfreezing(model: PreTrainedModel) -> Callable[[int], None]:
    """ULMFiT's schedule as an epoch hook: at epoch e the top e encoder groups train, the rest wait frozen.

    Only parameters trainable when it is made take part: freeze_layers / freeze_embeddings stay frozen.
    """
    groups = [[p for p in group if p.requires_grad] for group in layer_groups(model)]

    def on_epoch(epoch: int) -> None:
        for k, group in enumerate(groups):
            for p in group:
                p.requires_grad_(k < epoch)

    return on_epoch


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
