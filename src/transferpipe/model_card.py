"""The model card finetune writes into the model folder (README.md, Hugging Face's format): a YAML header the
hub and its tools read (language, license, base model, datasets, metrics), then what a user of the model needs:
the labels, the data it learned from with its digests, how it was trained, how it scored on validation, and how
it reads a long text (the mean of its windows' logits)."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from transferpipe.params import FinetuneParams, TokenizeParams


def model_card(
    *,
    label_names: list[str],
    variant: str,
    params: FinetuneParams,
    windows: TokenizeParams,
    data: dict[str, dict[str, Any]],
    base: dict[str, Any],
    validation: dict[str, float],
    best_epoch: int,
    run_id: str | None,
) -> str:
    """README.md for a fine-tuned model. `data`: the sources.json of its data (name -> path, sha256, ...);
    `base`: the checkpoint.json of its encoder (the published checkpoint it started from; empty for one
    pretrained here or the untrained twin)."""
    header: dict[str, Any] = {"language": ["en"], "library_name": "transformers", "pipeline_tag": "text-classification"}
    if base.get("license"):
        header["license"] = base["license"]
    if base.get("name"):
        header["base_model"] = base["name"]
    header["datasets"] = [info["path"] for info in data.values() if info.get("path")]
    header["metrics"] = ["f1", "accuracy"]
    header["tags"] = ["transferpipe", "text-classification"]
    origin = f"`{base['name']}`" if base.get("name") else f"`{base['source']}`" if base.get("source") else "an encoder"
    if variant == "scratch":
        origin = "an untrained encoder of the same architecture (the baseline that shows what pretraining is worth)"
    lineage = "\n".join(
        f"| {name} | `{info.get('path', '')}` | `{info.get('sha256', '')}` |" for name, info in data.items()
    )
    trained = {k: v for k, v in dataclasses.asdict(params).items() if v is not None}
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---

# Text classifier ({variant})

A sequence classifier fine-tuned by transferpipe from {origin}{
        f" (weights sha256 `{base['sha256']}`)" if base.get("sha256") and variant != "scratch" else ""
    }.

**Labels** ({len(label_names)}): {", ".join(f"`{n}`" for n in label_names)}

## Intended use

Topic classification of English texts like the training data. A text longer than {windows.max_length} tokens is
cut into windows of {windows.max_length} tokens (at most {windows.max_windows or "all"}); the prediction is
the mean of the windows' logits. Loaded with `transformers.pipeline("text-classification", model=<this
folder>)` it reads the first window only; the MLflow model logged beside it averages the windows as the
pipeline's evaluation does.

## Data

| source | path | sha256 |
|---|---|---|
{lineage}

## Training

{", ".join(f"`{k}`: {v}" for k, v in trained.items())}

## Validation

Best epoch {best_epoch}: macro-F1 {validation["macro_f1"]:.4f}, accuracy {validation["accuracy"]:.4f}, loss
{validation["loss"]:.4f}. Test results are written by the evaluate stage (`metrics/evaluate.json`) and into the
registered model version's description{f"; MLflow run `{run_id}`" if run_id else ""}.
"""
