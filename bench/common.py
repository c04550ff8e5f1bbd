"""Shared setup of the benchmarks: the default data and a tokenizer trained on it, as the pipeline makes them."""

from __future__ import annotations

import copy
import dataclasses
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from transformers import BertConfig, PreTrainedTokenizerBase

from transferpipe.data import prepare
from transferpipe.params import ModelParams, PrepareParams, PretrainParams, TokenizeParams, load_section
from transferpipe.tokenization import train_wordpiece

REPO = Path(__file__).resolve().parents[1]


def load(params: Path = REPO / "params.yaml") -> dict:
    """The params the benches measure: params.yaml's, with the encoder pretrained here at its `model` sizes
    (checkpoint null), whichever encoder the default starts from."""
    return {
        "prepare": load_section(params, "prepare", PrepareParams),
        "tokenize": load_section(params, "tokenize", TokenizeParams),
        "model": dataclasses.replace(load_section(params, "model", ModelParams), checkpoint=None),
        "pretrain": load_section(params, "pretrain", PretrainParams),
    }


def assignments(texts: list[str]) -> dict[str, object]:
    """`dvc exp run -S`'s KEY=VALUE (a dotted params key, a YAML value) as {key: value}."""
    pairs = [text.partition("=") for text in texts]
    for text, (_, sep, _) in zip(texts, pairs, strict=True):
        if not sep:
            sys.exit(f"--set {text!r}: expected KEY=VALUE, e.g. finetune.epochs=2")
    return {key: yaml.safe_load(value) for key, _, value in pairs}


def write_params(path: Path, base: dict, overrides: dict[str, object]) -> Path:
    """`base` (a params file read as a mapping) with `overrides` ({"finetune.epochs": 2}) set, written to path."""
    raw = copy.deepcopy(base)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name not in raw.get(section, {}):
            sys.exit(f"{key}: not a key of params.yaml (SECTION.KEY, e.g. finetune.epochs)")
        raw[section][name] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def default_data(params: dict) -> tuple[dict, list[str]]:
    with tempfile.TemporaryDirectory(prefix="bench-prepared-") as out:
        data = prepare(params["prepare"], Path(out))
    tok = params["tokenize"]
    tokenizer = train_wordpiece(data.splits["train"]["text"].tolist(), tok.vocab_size, tok.min_frequency, tok.lowercase)
    return data.splits, tokenizer


def reference_bert_config(model: ModelParams, tokenizer: PreTrainedTokenizerBase, **extra: object) -> BertConfig:
    """The reference paths' BERT at the configured sizes. Its MLP costs the FLOPs of ours: a ModernBERT GeGLU
    multiplies by three matrices to the MLP's two, so the reference's MLP is 3/2 as wide (344 -> 516, about the
    512 every figure before 2026-12-06 used). Unlike modeling.new_encoder_config it keeps BERT's default dropout
    (0.1), as the reference scripts train it."""
    glu = model.architecture == "modernbert" and model.checkpoint is None
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        intermediate_size=model.intermediate_size * 3 // 2 if glu else model.intermediate_size,
        max_position_embeddings=model.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.node()} ({device}), torch {torch.__version__}"


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Best wall time of `repeat` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def report(title: str, unit: str, ours: float, reference: float, target: float | None = None) -> None:
    ratio = ours / reference
    goal = f" (target {target:g}x: {'met' if ratio >= target else 'NOT met'})" if target else ""
    print(title)
    print(f"  ours       {ours:12,.1f} {unit}")
    print(f"  reference  {reference:12,.1f} {unit}")
    print(f"  ratio      {ratio:12.2f}x{goal}")
