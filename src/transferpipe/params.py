"""Typed, frozen params: one pydantic dataclass per params.yaml section.

Only stages read params.yaml; the package receives these objects. Loading (from_dict) rejects unknown keys,
missing keys, wrong types (strict: no "10" for 10, 10.0 for 10 or 1 for true; an int passes for a float) and
numbers out of the range declared with each field (`Field(default, ge=..., lt=...)`) with one line that names the
key and the whole range, and refuses the strings that PyYAML makes of exponent floats without a dot (`1e-3`),
which would otherwise travel on as text. load_params also checks the limits that span keys (check_params).
A section built in code is checked for the same types and ranges (pydantic's ValidationError).

The string under each field is its row of docs/params.md, which params_reference writes (`make docs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from transferpipe.errors import UserError

T = TypeVar("T")

# A decimal number as written in text (1, -2.5, 1e-3): params that YAML read as strings, labels compared by value
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

# strict: the YAML type is the type. extra="forbid": a misspelled keyword in code fails, as for a plain dataclass
# (pydantic's dataclasses drop unknown keywords by default). The docstring under a field is its description.
STRICT = ConfigDict(strict=True, extra="forbid", use_attribute_docstrings=True)


@dataclass(frozen=True, config=STRICT)
class PrepareParams:
    source: str = "data/sources/bbc_news.yaml"
    """the labeled data: a `.csv` / `.jsonl` / `.parquet` file, a `save_to_disk` folder, or a source file (`.yaml`)
    pinning a built-in corpus or a hub dataset. A path, and a dependency of prepare in dvc.yaml ([data.md](data.md))"""
    text_column: str = "text"
    """the column that holds the text"""
    label_column: str = "label"
    """the column that holds the label"""
    hf_split: str = "train"
    """the split to read from a `DatasetDict` folder"""
    unlabeled_source: str = "data/unlabeled"
    """extra text for pretraining only (never validation or test): a `.txt` file (one document per line), a table, or a
    folder of them. The default folder holds only its README"""
    pretrain_on_unlabeled_rows: bool = True
    """rows of `source` without a label (empty, NA, NaN, null, None) join the pretraining text; `false` drops them"""
    validation_size: float = Field(0.1, gt=0, lt=1)
    """share of the labeled rows for validation (stratified)"""
    test_size: float = Field(0.2, gt=0, lt=1)
    """share of the labeled rows for test (stratified)"""
    seed: int = Field(42, ge=0, lt=2**32)
    """seed of the split"""


@dataclass(frozen=True, config=STRICT)
class ModelParams:
    checkpoint: str | None = "models/sources/all-minilm-l6-v2.yaml"
    """a `save_pretrained` folder, a hub name (e.g. `bert-base-uncased`) or a source file pinning a published
    checkpoint by digest (`models/sources/all-minilm-l6-v2.yaml`) to start from, with its own tokenizer and
    sizes; `null` builds a new encoder from the keys below
    ([checkpoint](pipeline.md#starting-from-a-published-checkpoint))"""
    architecture: Literal["modernbert", "bert", "lstm"] = "modernbert"
    """used when `checkpoint` is null: ModernBERT-style (pre-LayerNorm), BERT, or a ULMFiT-style LSTM language model
    ([lstm.md](lstm.md)), which reads `hidden_size`, `num_hidden_layers` and the `lstm_` keys only"""
    hidden_size: int = Field(256, ge=1)
    """hidden size (for `lstm`: units per layer and the embedding size)"""
    num_hidden_layers: int = Field(4, ge=1)
    """encoder blocks (for `lstm`: LSTM layers)"""
    num_attention_heads: int = Field(4, ge=1)
    """attention heads per block"""
    intermediate_size: int = Field(344, ge=1)
    """feed-forward size per block (`modernbert`'s GeGLU has three matrices to BERT's MLP's two: 344 costs the FLOPs
    of a 512-wide MLP)"""
    max_position_embeddings: int = Field(512, ge=1)
    """longest input the encoder accepts"""
    lstm_embed_dropout: float = Field(0.0, ge=0, lt=1)
    """`lstm` only, AWD-LSTM's regularization, in pretraining and fine-tuning alike: dropout of whole embedding rows
    (every occurrence of a word in a batch) on the input ([lstm.md](lstm.md#regularization))"""
    lstm_input_dropout: float = Field(0.0, ge=0, lt=1)
    """`lstm` only: variational dropout (one mask per sequence, shared by its time steps) on the embedding output"""
    lstm_hidden_dropout: float = Field(0.0, ge=0, lt=1)
    """`lstm` only: variational dropout between LSTM layers"""
    lstm_weight_dropout: float = Field(0.0, ge=0, lt=1)
    """`lstm` only: DropConnect on each layer's hidden-to-hidden weights (a new mask every forward pass)"""
    lstm_output_dropout: float = Field(0.0, ge=0, lt=1)
    """`lstm` only: variational dropout on the last layer's output, before the language-model head and the
    classifier's pooling"""


@dataclass(frozen=True, config=STRICT)
class TokenizeParams:
    vocab_size: int = Field(8192, ge=6)
    """WordPiece vocabulary size (at least the special tokens and one more; training also checks room beside the text's
    characters)"""
    min_frequency: int = Field(2, ge=1)
    """least count of a pair the WordPiece trainer merges"""
    lowercase: bool = True
    """lowercase before tokenizing"""
    max_length: int = Field(128, ge=3)
    """classification inputs are windows of at most this many tokens (`[CLS]` + `[SEP]` + one at least), never padded on
    disk"""
    max_windows: int | None = Field(8, ge=1)
    """each document is cut into at most this many consecutive windows (`null`: all; `1`: plain truncation). Training
    reads the first; a prediction averages the logits of all of them ([windows](pipeline.md#long-documents-windows))"""
    block_size: int = Field(128, ge=2)
    """pretraining text is packed into blocks of exactly this many tokens"""
    num_proc: int | None = Field(None, ge=1)
    """tokenizing worker processes (`datasets.map`); `null` or `1`: in-process (the fast tokenizer still uses every
    core). The output is the same whatever the value"""


@dataclass(frozen=True, config=STRICT)
class PretrainParams:
    enabled: bool = False
    """`false`: save the starting encoder untrained (skip pretraining)"""
    scratch_baseline: bool = False
    """also save the same architecture untrained (`models/scratch`), which finetune and evaluate score beside the
    pretrained encoder: what pretraining is worth. `false`: a placeholder instead, and finetune@scratch and evaluate
    skip it (a published checkpoint's random twin costs a full fine-tuning and tells nothing new)"""
    max_steps: int = Field(900, ge=1)
    """optimizer steps"""
    batch_size: int = Field(32, ge=1)
    """blocks per step, the global batch over all processes ([gpu.md](gpu.md#multi-gpu-and-multi-node))"""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """micro-batches per optimizer step: `batch_size` stays the batch of one step, computed in this many parts
    that fit a smaller memory (the loss is the whole batch's mean)"""
    learning_rate: float = Field(2.0e-3, gt=0)
    """peak learning rate (warmup, then linear decay); 1.0e-3 and 2.0e-3 are compared in
    [LOG.md](LOG.md#2026-11-25-the-cpu-recipe)"""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """share of the steps spent warming up"""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay"""
    adam_beta2: float = Field(0.98, gt=0, lt=1)
    """AdamW beta2"""
    max_grad_norm: float = Field(1.0, gt=0)
    """gradient clipping norm"""
    objective: Literal["mlm", "electra"] = "mlm"
    """the transformer's objective: `mlm` masked LM; `electra` replaced-token detection, a small generator
    filling the masks and the encoder judging every token ([pretraining.md](pretraining.md)); `lstm` is always a
    next-token LM"""
    mlm_probability: float = Field(0.3, gt=0, lt=1)
    """share of tokens masked (unused by `lstm`, a next-token model)"""
    electra_generator_layers: int = Field(1, ge=1)
    """`electra`: blocks of the generator (the encoder's width, sharing its token embeddings); at most the
    encoder's"""
    electra_discriminator_weight: float = Field(50.0, gt=0)
    """`electra`: weight of the replaced-token loss against the generator's MLM loss (ELECTRA's 50)"""
    eval_every: int = Field(100, ge=1)
    """steps between held-out evaluations"""
    eval_blocks: int = Field(256, ge=1)
    """held-out blocks scored at each evaluation (the first N, fixed masks)"""
    checkpoint_every: int | None = Field(100, ge=1)
    """steps between checkpoints a killed `dvc repro` resumes from; `null`: none until the end
    ([resume](pipeline.md#killed-runs-resume))"""
    seed: int = Field(42, ge=0, lt=2**32)
    """seed of initialization, masks and order"""
    torch_compile: bool = False
    """`torch.compile` the model for training (a one-off compile at the start)"""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per training process that load batches (masks are drawn on the training device)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`auto`: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), fp32 elsewhere; `bf16`: autocast
    on any device; `fp32`: never ([gpu.md](gpu.md#speed-settings))"""
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    """where training runs; `auto`: CUDA, else Apple's MPS, else the CPU ([gpu.md](gpu.md#devices))"""


@dataclass(frozen=True, config=STRICT)
class FinetuneParams:
    epochs: int = Field(2, ge=1)
    """most epochs (early stopping may end sooner); the number of validations when `min_steps` adds epochs. 2 and 4
    score the same over 3 seeds at 5, 20 and all labels per class ([LOG.md](LOG.md)); 2 takes half the steps"""
    min_steps: int = Field(100, ge=0)
    """at least this many optimizer steps: a small training set (few `labels_per_class`) is repeated for more
    epochs, validated `epochs` times at even intervals, so 25 examples train as long as a recipe needs"""
    batch_size: int = Field(16, ge=1)
    """examples per step, the global batch over all processes"""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """micro-batches per optimizer step: `batch_size` stays the batch of one step, computed in this many parts
    that fit a smaller memory (the loss is the whole batch's mean)"""
    encoder_learning_rate: float = Field(5.0e-5, gt=0)
    """peak learning rate of the encoder"""
    head_learning_rate: float = Field(1.0e-3, gt=0)
    """peak learning rate of the new classification head"""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """share of the steps spent warming up, then linear decay"""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay"""
    classifier_dropout: float = Field(0.1, ge=0, lt=1)
    """dropout before the head"""
    classifier_pooling: Literal["mean", "cls"] = "mean"
    """ModernBERT's pooling for the head: mean over tokens or the `[CLS]` position (BERT always uses its pooler)"""
    freeze_embeddings: bool = False
    """freeze the embeddings for the whole run"""
    freeze_layers: int = Field(0, ge=0)
    """freeze the lowest N encoder blocks for the whole run"""
    layer_lr_decay: float = Field(1.0, gt=0, le=1)
    """discriminative fine-tuning: block i of L learns at `encoder_learning_rate * decay^(L-1-i)`, the embeddings at
    `decay^L`; 1.0 gives every encoder parameter the same rate"""
    gradual_unfreezing: bool = False
    """ULMFiT: the first epoch trains the head alone, each later epoch unfreezes one more block from the top"""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """label smoothing of the cross-entropy"""
    class_weights: Literal["none", "balanced"] = "none"
    """`balanced`: each class's loss weighted by n / (classes x its count) in the training labels (scikit-learn's
    `balanced`), for imbalanced data; `none`: every example counts the same"""
    labels_per_class: Annotated[int, Field(ge=1)] | Literal["all"] = "all"
    """train on a stratified, seeded subsample of N labels per class (at most the smallest class), or on all ([label
    efficiency](experiments.md#label-efficiency))"""
    monitor: Literal["macro_f1", "loss"] = "macro_f1"
    """the validation metric that picks the epoch kept and stops early: macro-F1 (higher is better) or cross-entropy
    (lower is better; smoother on a small validation set)"""
    early_stopping_patience: int = Field(4, ge=1)
    """validations (one per epoch, or per `min_steps / epochs` steps) without a better `monitor` before stopping;
    the best one's weights are kept"""
    max_grad_norm: float = Field(1.0, gt=0)
    """gradient clipping norm"""
    checkpoint_every: int | None = Field(50, ge=1)
    """steps between checkpoints, as in `pretrain.checkpoint_every`"""
    seed: int = Field(42, ge=0, lt=2**32)
    """seed of the label subsample, the head and the order"""
    torch_compile: bool = False
    """`torch.compile` the model for training (recompiles for each new padded length)"""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per training process"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """as `pretrain.precision`"""
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    """as `pretrain.device`"""


@dataclass(frozen=True, config=STRICT)
class EvaluateParams:
    batch_size: int = Field(64, ge=1)
    """windows per batch when scoring the test set"""
    baseline_max_features: int = Field(50000, ge=1)
    """TF-IDF vocabulary size of the baseline"""
    baseline_C: float = Field(10.0, gt=0)
    """inverse regularization strength of the baseline's logistic regression"""
    setfit: bool = False
    """also SetFit (the `setfit` library; `pip install -e '.[setfit]'`): the pretrained encoder, mean-pooled, trained
    contrastively on pairs of the same training labels, then logistic regression on its embeddings; a transformer
    encoder only ([pipeline.md](pipeline.md#setfit))"""
    setfit_max_steps: int = Field(100, ge=1)
    """SetFit's contrastive steps (batches of 16 pairs; 20 pairs per training example, at most this many batches)"""


@dataclass(frozen=True, config=STRICT)
class TrackingParams:
    enabled: bool = True
    """`false`: no MLflow at all (no store, no runs, no registry)"""
    experiment_name: str = "transferpipe"
    """the MLflow experiment the runs go to"""
    registered_model_name: str | None = "transferpipe-classifier"
    """finetune registers its model under this name (alias `candidate`); evaluate moves alias `champion` to it when its
    test macro-F1 beats the champion's. `null`: no model registry ([mlflow.md](mlflow.md#the-model-registry))"""
    system_metrics: bool = False
    """pretrain and finetune runs also log MLflow's system metrics (CPU, memory, disk, network, GPU: `system/...`,
    every 10 s); off by default ([mlflow.md](mlflow.md#system-metrics))"""


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

SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
EXPECTED = {"int_type": "an integer", "bool_type": "true or false", "float_type": "a number", "string_type": "a string"}
REFERENCE_MARKER = "<!-- The tables below are generated from src/transferpipe/params.py by `make docs`. -->"


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


def check_params(params: Params) -> None:
    """The limits that span keys; each key's own range is checked by from_dict."""
    prepare, tokenize, model = params.prepare, params.tokenize, params.model
    _require(
        prepare.validation_size + prepare.test_size < 1,
        "prepare.validation_size",
        prepare.validation_size,
        f"< 1 - prepare.test_size ({prepare.test_size}), leaving rows to train on",
    )
    _require(
        not (params.evaluate.setfit and model.checkpoint is None and model.architecture == "lstm"),
        "evaluate.setfit",
        params.evaluate.setfit,
        "false with model.architecture lstm (SetFit trains a transformer encoder)",
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
    """One section from its mapping in params.yaml; each mistake is a UserError that names `prefix.key`."""
    if not isinstance(values, dict):
        raise UserError(f"params {prefix}: expected a mapping of keys, got {values!r}")
    names = list(cls.__pydantic_fields__)
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"params {prefix}.{key}: unknown key; {hint}{prefix} accepts {', '.join(names)}")
    missing = [n for n in names if n not in values]  # every field has a default, so pydantic would take it
    if missing:
        raise UserError(f"params {prefix}.{missing[0]}: key is missing from params.yaml")
    try:
        return cls(**values)
    except ValidationError as exc:
        key = exc.errors()[0]["loc"][0]
        errors = [e for e in exc.errors() if e["loc"][0] == key]  # one per member where a union refused the value
        raise UserError(f"params {prefix}.{key}: {_problem(cls.__pydantic_fields__[key], errors)}") from None


def _problem(field: FieldInfo, errors: list[Any]) -> str:
    """What is wrong with one value, from pydantic's errors about it."""
    value, kinds = errors[0]["input"], {e["type"] for e in errors}
    if kinds & BOUND_ERRORS:  # pydantic names the one bound that failed; the whole range says what to write
        return f"{float(value) if field.annotation is float else value!r} must be {declared_range(field)}"
    if len(errors) > 1:
        return f"{value!r} is not a valid value"
    if kinds == {"literal_error"}:
        return f"{value!r} is not one of {', '.join(map(repr, typing.get_args(field.annotation)))}"
    if kinds == {"float_type"} and isinstance(value, str) and NUMBER.match(value.strip()):
        return f"{value!r} was read as a string (YAML needs a dot in exponent floats); write it as {_with_dot(value)}"
    kind = errors[0]["type"]
    return f"expected {EXPECTED[kind]}, got {value!r}" if kind in EXPECTED else errors[0]["msg"]


def declared_bounds(field: FieldInfo) -> dict[str, float]:
    """A field's bounds as declared, e.g. {"gt": 0, "lt": 1} (empty: none): its Field's, or in a union such as
    `Annotated[int, Field(ge=1)] | Literal["all"]` its number's."""
    inner = [arg.__metadata__[0] for arg in typing.get_args(field.annotation) if typing.get_origin(arg) is Annotated]
    return {op: getattr(m, op) for info in (field, *inner) for m in info.metadata for op in SIGNS if hasattr(m, op)}


def declared_range(field: FieldInfo) -> str:
    """The values a numeric field takes, as messages say it: '> 0', 'in [0, 1)', '>= 1 or null', ">= 1 or 'all'"."""
    bounds = declared_bounds(field)
    if len(bounds) == 1:
        ((op, limit),) = bounds.items()
        text = f"{SIGNS[op]} {limit}"
    else:
        low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
        text = f"in {'[' if 'ge' in bounds else '('}{low}, {high}{']' if 'le' in bounds else ')'}"
    for option in typing.get_args(field.annotation):  # what else it takes besides numbers
        if option is type(None):
            text += " or null"
        elif typing.get_origin(option) is Literal:
            text += "".join(f" or {value!r}" for value in typing.get_args(option))
    return text


def _with_dot(text: str) -> str:
    mantissa, _, exponent = text.strip().lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exponent}" if exponent else mantissa


def to_flat_dict(obj: Any, prefix: str) -> dict[str, Any]:
    """`{"finetune.learning_rate": 1e-4, ...}`: the shape MLflow params take."""
    return {f"{prefix}.{k}": v for k, v in dataclasses.asdict(obj).items()}


def params_reference(page: str) -> str:
    """docs/params.md as it should read: `page`'s hand-written text down to the marker line, then a table per
    section with a row per key: its default, its range (or Literal options) and the docstring under its field."""
    intro, marker, _ = page.partition(REFERENCE_MARKER)
    if not marker:
        raise ValueError(f"no line {REFERENCE_MARKER!r} to write the tables below")
    tables = []
    for section, cls in SECTIONS.items():
        rows = [
            f"| `{section}.{key}` | `{_as_yaml(field.default)}` | {_range_column(field)} | "
            f"{' '.join(field.description.split())} |"
            for key, field in cls.__pydantic_fields__.items()
        ]
        tables.append(
            f"## {section}\n\n| key | default | range | what it does |\n|---|---|---|---|\n" + "\n".join(rows)
        )
    return intro + marker + "\n\n" + "\n\n".join(tables) + "\n"


def _range_column(field: FieldInfo) -> str:
    if declared_bounds(field):
        return re.sub(r"'(\w+)'", r"`\1`", declared_range(field)).replace(str(2**32), "2^32")
    if typing.get_origin(field.annotation) is Literal:
        return ", ".join(f"`{value}`" for value in typing.get_args(field.annotation))
    return "-"  # the type alone decides


def _as_yaml(value: Any) -> str:
    """A default as params.yaml writes it: true, null, 0.01, below that 2.0e-3 (YAML needs the dot)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float) and (0 < abs(value) < 0.01 or "e" in repr(value)):
        mantissa, exponent = f"{value:e}".split("e")
        return f"{float(mantissa)}e{int(exponent)}"
    return str(value)


if __name__ == "__main__":  # make docs
    reference = Path("docs/params.md")
    reference.write_text(params_reference(reference.read_text(encoding="utf-8")), encoding="utf-8")
