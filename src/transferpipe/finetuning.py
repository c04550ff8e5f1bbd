"""Fine-tuning the pretrained encoder as a sequence classifier, with validation-based early stopping."""

from __future__ import annotations

import math

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from transferpipe import distributed, flops
from transferpipe.checkpoint import Checkpoints
from transferpipe.data import per_class_indices
from transferpipe.evaluation import classification_metrics
from transferpipe.inference import MODEL_INPUTS, collator_for, document_logits, first_windows, predict_logits
from transferpipe.modeling import freeze, gradual_unfreezing, param_groups
from transferpipe.params import FinetuneParams
from transferpipe.tracking import Run
from transferpipe.training import EarlyStopping, FitResult, fit, make_optimizer, train_loader, use_bf16


def subsample_per_class(train: datasets.Dataset, labels_per_class: int | str, seed: int) -> datasets.Dataset:
    """At most labels_per_class examples of each class (see per_class_indices)."""
    if labels_per_class == "all":
        return train
    return train.select(per_class_indices(train["labels"], labels_per_class, seed))


def loss_weights(labels: list[int], label_names: list[str], mode: str) -> torch.Tensor | None:
    """Per-class weights of the cross-entropy: None for `none`; for `balanced` n / (classes x count) from
    `labels` (scikit-learn's compute_class_weight), a class absent from them weighing nothing."""
    if mode == "none":
        return None
    present = np.unique(labels)
    weights = np.zeros(len(label_names))
    weights[present] = compute_class_weight("balanced", classes=present, y=np.asarray(labels))
    return torch.tensor(weights, dtype=torch.float32)


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    splits: datasets.DatasetDict,
    label_names: list[str],
    params: FinetuneParams,
    run: Run,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
) -> FitResult:
    """Train on the first window of each document of splits["train"]; every epoch, score macro-F1 on the
    documents of splits["validation"] (the mean logits of each document's windows) and keep the best."""
    frozen = freeze(model, params.freeze_embeddings, params.freeze_layers)
    collator = collator_for(tokenizer, device)
    train = subsample_per_class(first_windows(splits["train"]), params.labels_per_class, params.seed)
    weights = loss_weights(train["labels"], label_names, params.class_weights)
    records = {} if weights is None else {"class_weights": dict(zip(label_names, weights.tolist(), strict=True))}
    run.log_params({"frozen_parameters": frozen, "train_examples": len(train)})
    run.log_params({f"class_weight.{name}": round(w, 4) for name, w in records.get("class_weights", {}).items()})
    weights = None if weights is None else weights.to(device)
    train = train.select_columns([c for c in (*MODEL_INPUTS, "labels") if c in train.column_names])
    loader = train_loader(
        train,
        batch_size=params.batch_size,
        seed=params.seed,
        num_workers=params.num_workers,
        collate_fn=collator,
        device=device,
        section="finetune",
        accumulation=params.gradient_accumulation_steps,
    )
    groups = param_groups(
        model, params.encoder_learning_rate, params.head_learning_rate, params.weight_decay, params.layer_lr_decay
    )
    optimizer = make_optimizer(groups, params.head_learning_rate, 0.999, device)
    validation = splits["validation"]

    def compute_loss(model: PreTrainedModel, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()  # (batch, n_labels)
        return F.cross_entropy(logits, batch["labels"], weight=weights, label_smoothing=params.label_smoothing)

    def evaluate() -> dict[str, float]:
        # Each rank predicts its contiguous share; gathered in rank order, every rank scores all of validation.
        shard = validation.select(distributed.shard_range(len(validation)))
        windows = distributed.gather_concat(predict_logits(model, shard, collator, params.batch_size * 2, device))
        logits, labels = document_logits(windows, validation)
        loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
        scores = classification_metrics(labels, logits.argmax(-1), label_names)
        return {"loss": loss, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}

    # A few labels make a short epoch: repeat it up to min_steps, still validating `epochs` times.
    epoch_steps = math.ceil(len(loader) / params.gradient_accumulation_steps)
    total_steps = max(params.epochs * epoch_steps, params.min_steps)
    eval_every = max(epoch_steps, math.ceil(params.min_steps / params.epochs))
    distributed.seed_rank(params.seed)  # each rank its own dropout masks
    result = fit(
        model,
        loader,
        optimizer=optimizer,
        total_steps=total_steps,
        warmup_ratio=params.warmup_ratio,
        max_grad_norm=params.max_grad_norm,
        eval_every=eval_every,
        evaluate=evaluate,
        run=run,
        device=device,
        stopping=EarlyStopping(params.monitor, params.monitor != "loss", params.early_stopping_patience),
        compute_loss=compute_loss,
        on_epoch=gradual_unfreezing(model) if params.gradual_unfreezing else None,
        log_every=max(1, min(10, epoch_steps // 2)),
        desc="finetune",
        torch_compile=params.torch_compile,
        precision=params.precision,
        checkpoints=checkpoints,
        accumulation=params.gradient_accumulation_steps,
    )
    result.records |= records
    return result


def utilization(
    model: PreTrainedModel, params: FinetuneParams, max_length: int, tokens_per_second: float, device: torch.device
) -> dict[str, float]:
    """Model GFLOP/s of fine-tuning and the utilization they give (transferpipe.flops): the encoder's products
    at windows of `max_length` tokens (most first windows are full), counted as if every layer trains (freezing
    saves weight gradients the count still includes); the head, once per document, is left out."""
    per_token = flops.training_flops_per_token(model.config, max_length, 0.0)
    batch_tokens = distributed.local_batch_size(params.batch_size, "finetune.batch_size") * max_length
    bf16 = use_bf16(params.precision, device)
    return flops.utilization(device, tokens_per_second, per_token, model.config, batch_tokens, bf16)
