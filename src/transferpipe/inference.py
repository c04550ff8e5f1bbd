"""Prediction, the same everywhere: fine-tuning's validation, evaluate, the linear probe and the served model.

A document is cut into windows of at most max_length tokens (tokenization.window_tokenized, as the tokenize
stage cuts them), each window goes through the model in padded batches (predict_logits), and the document's
logits are the mean of its windows' (document_logits). Training reads each document's first window only
(first_windows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase

from transferpipe.distributed import is_main
from transferpipe.errors import UserError
from transferpipe.tokenization import tokenize_documents, window_tokenized


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
    batches = model_batches(dataset, collator, batch_size, device)
    total = -(-len(dataset) // batch_size)
    for batch in tqdm(batches, desc="predict", total=total, unit="batch", leave=False, disable=not is_main()):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(**batch).logits.float().cpu())
    if not out:  # an empty shard of a small validation set under torchrun
        return np.empty((0, model.config.num_labels), dtype=np.float32)
    return torch.cat(out).numpy()


@dataclass(frozen=True)
class Predictions:
    """Per document, in input order."""

    logits: np.ndarray  # (documents, labels): the mean of the logits of the document's windows
    label_ids: np.ndarray  # (documents,) argmax of logits
    labels: list[str]  # the label names of label_ids (model.config.id2label)
    scores: np.ndarray  # (documents,) softmax probability of the chosen label
    windows: np.ndarray  # (documents,) how many windows each document was scored on


def predict_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int | None,
    max_windows: int | None,
    batch_size: int,
    device: torch.device,
) -> Predictions:
    """Predictions for raw texts, each scored on the mean logits of its windows of at most max_length tokens
    (at most max_windows of them; None: all). max_length None scores each text whole, as one window."""
    if isinstance(texts, str):
        raise UserError("predict_texts takes a list of texts, not one string: wrap it as [text]")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"text {i} is a {type(text).__name__}, not a string: every text must be a string")
    n_labels = model.config.num_labels
    if not texts:
        empty = np.empty(0, dtype=np.int64)
        return Predictions(np.empty((0, n_labels), dtype=np.float32), empty, [], np.empty(0), empty)
    # window_tokenized carries each document's label onto its windows; unknown here, so 0 (never read).
    documents = tokenize_documents(tokenizer, datasets.Dataset.from_dict({"text": texts, "label": [0] * len(texts)}))
    if max_length is None:
        max_length, max_windows = max(map(len, documents["input_ids"])), 1
    windowed = window_tokenized(tokenizer, documents, max_length, max_windows)
    window_logits = predict_logits(model, windowed, collator_for(tokenizer, device), batch_size, device)
    logits, _ = document_logits(window_logits, windowed)  # (documents, labels)
    label_ids = logits.argmax(-1)
    probabilities = torch.softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    return Predictions(
        logits=logits,
        label_ids=label_ids,
        labels=[model.config.id2label[int(i)] for i in label_ids],
        scores=probabilities[np.arange(len(texts)), label_ids],
        windows=np.bincount(np.asarray(windowed["document"]), minlength=len(texts)),
    )
