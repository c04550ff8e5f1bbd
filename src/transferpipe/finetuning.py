"""Fine-tuning the pretrained encoder as a sequence classifier, with validation-based early stopping."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase

from transferpipe import distributed
from transferpipe.checkpoint import Checkpoints
from transferpipe.errors import UserError
from transferpipe.evaluation import classification_metrics
from transferpipe.modeling import freeze, gradual_unfreezing, param_groups
from transferpipe.params import FinetuneParams
from transferpipe.tracking import Run
from transferpipe.training import EarlyStopping, FitResult, fit, make_optimizer, train_loader


def per_class_indices(
    labels: Sequence[int], labels_per_class: int | str, seed: int, names: Sequence[str] | None = None
) -> list[int]:
    """Sorted indices of labels_per_class examples of each class, drawn with a seeded generator ("all": every
    index). The fine-tuned models and the evaluate stage's baseline draw the same ones. Every class must have
    that many: fewer would quietly make the subsample imbalanced. `names` (label id -> name) name the class
    that has too few."""
    if labels_per_class == "all":
        return list(range(len(labels)))
    if labels_per_class < 1:
        raise UserError(f"params finetune.labels_per_class={labels_per_class} must be at least 1 or 'all'")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) and labels_per_class > counts.min():
        smallest = classes[counts.argmin()]
        smallest = repr(names[smallest]) if names is not None else smallest
        raise UserError(
            f"params finetune.labels_per_class: {labels_per_class} is more than the smallest class of the training "
            f"split has (class {smallest}: {counts.min()} examples); use at most {counts.min()} or 'all'"
        )
    rng = np.random.default_rng(seed)
    keep = [
        i for label in classes for i in rng.choice(np.flatnonzero(labels == label), labels_per_class, replace=False)
    ]
    return sorted(int(i) for i in keep)


def subsample_per_class(train: datasets.Dataset, labels_per_class: int | str, seed: int) -> datasets.Dataset:
    """At most labels_per_class examples of each class (see per_class_indices)."""
    if labels_per_class == "all":
        return train
    return train.select(per_class_indices(train["labels"], labels_per_class, seed))


def first_windows(split: datasets.Dataset) -> datasets.Dataset:
    """The first window of each document (tokenization.window_tokenized): the rows training reads."""
    return split.select(np.flatnonzero(np.asarray(split["window"]) == 0))


def document_logits(window_logits: np.ndarray, split: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) per document of a windowed split, in document order: the mean of the logits of its
    windows (rows of window_logits, in split order), and its label."""
    documents, rows = np.unique(np.asarray(split["document"]), return_inverse=True)
    sums = np.zeros((len(documents), window_logits.shape[1]), dtype=np.float64)
    np.add.at(sums, rows, window_logits)
    labels = np.empty(len(documents), dtype=np.int64)
    labels[rows] = split["labels"]
    return (sums / np.bincount(rows, minlength=len(documents))[:, None]).astype(np.float32), labels


def collator_for(tokenizer: PreTrainedTokenizerBase, device: torch.device) -> DataCollatorWithPadding:
    """Pad each batch to its own longest sequence (multiples of 8 suit GPU tensor cores)."""
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if device.type == "cuda" else None)


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the columns a model's forward takes


def model_batches(
    dataset: datasets.Dataset, collator: DataCollatorWithPadding, batch_size: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """The model-input columns of dataset in batches, in order, padded by collator, on device."""
    columns = [c for c in MODEL_INPUTS if c in dataset.column_names]
    for batch in DataLoader(dataset.select_columns(columns), batch_size=batch_size, collate_fn=collator):
        yield {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def predict_logits(
    model: PreTrainedModel,
    dataset: datasets.Dataset,
    collator: DataCollatorWithPadding,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Logits for every example, in dataset order: (n_examples, n_labels)."""
    model.to(device).eval()
    out = []
    for batch in model_batches(dataset, collator, batch_size, device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(**batch).logits.float().cpu())
    if not out:  # an empty shard of a small validation set under torchrun
        return np.empty((0, model.config.num_labels), dtype=np.float32)
    return torch.cat(out).numpy()


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
    run.log_params({"frozen_parameters": frozen, "train_examples": len(train)})
    train = train.select_columns([c for c in (*MODEL_INPUTS, "labels") if c in train.column_names])
    loader = train_loader(
        train,
        batch_size=params.batch_size,
        seed=params.seed,
        num_workers=params.num_workers,
        collate_fn=collator,
        device=device,
        section="finetune",
    )
    groups = param_groups(
        model, params.encoder_learning_rate, params.head_learning_rate, params.weight_decay, params.layer_lr_decay
    )
    optimizer = make_optimizer(groups, params.head_learning_rate, 0.999, device)
    validation = splits["validation"]

    def compute_loss(model: PreTrainedModel, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()  # (batch, n_labels)
        return F.cross_entropy(logits, batch["labels"], label_smoothing=params.label_smoothing)

    def evaluate() -> dict[str, float]:
        # Each rank predicts its contiguous share; gathered in rank order, every rank scores all of validation.
        shard = validation.select(distributed.shard_range(len(validation)))
        windows = distributed.gather_concat(predict_logits(model, shard, collator, params.batch_size * 2, device))
        logits, labels = document_logits(windows, validation)
        loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
        scores = classification_metrics(labels, logits.argmax(-1), label_names)
        return {"loss": loss, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}

    distributed.seed_rank(params.seed)  # each rank its own dropout masks
    return fit(
        model,
        loader,
        optimizer=optimizer,
        total_steps=params.epochs * len(loader),
        warmup_ratio=params.warmup_ratio,
        max_grad_norm=params.max_grad_norm,
        eval_every=len(loader),
        evaluate=evaluate,
        run=run,
        device=device,
        stopping=EarlyStopping(params.monitor, params.monitor != "loss", params.early_stopping_patience),
        compute_loss=compute_loss,
        on_epoch=gradual_unfreezing(model) if params.gradual_unfreezing else None,
        log_every=max(1, min(10, len(loader) // 2)),
        desc="finetune",
        torch_compile=params.torch_compile,
        precision=params.precision,
        checkpoints=checkpoints,
    )
