"""Raw texts to document predictions: the one function that evaluate, the MLflow model and a Python user call.

A document is scored the way evaluate measures it: tokenized whole and cut into consecutive windows of at most
max_length tokens, at most max_windows of them (tokenization.tokenize_for_classification, the code the tokenize
stage runs), each window through the model in padded batches (finetuning.predict_logits), the window logits
averaged (finetuning.document_logits). Its label is the argmax of the mean logits, its score the softmax
probability of that label.

TextClassifier wraps predict_texts as an MLflow pyfunc model (tracking.Run.log_text_classifier logs it with this
package as its code), so the registered model predicts what evaluate scored:

    mlflow.pyfunc.load_model("models:/transferpipe-classifier@candidate").predict(["The striker scored twice"])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import mlflow
import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import transferpipe.lstm  # noqa: F401  registers the LSTM with the Auto classes: no trust_remote_code needed
from transferpipe.errors import UserError
from transferpipe.finetuning import collator_for, document_logits, predict_logits
from transferpipe.modeling import load_classifier, pick_device
from transferpipe.tokenization import load_tokenizer, tokenize_documents, window_tokenized

DEFAULT_BATCH_SIZE = 32  # windows per forward pass of the served model


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


def texts_of(model_input: Any) -> list[str]:
    """The texts of a pyfunc input: a list of strings, a pandas Series, or a DataFrame with a `text` column (or a
    single column, as MLflow hands over a JSON list of strings)."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            return model_input["text"].tolist()
        if len(model_input.columns) == 1:
            return model_input.iloc[:, 0].tolist()
        raise UserError(f"a DataFrame input needs a `text` column; it has {list(model_input.columns)}")
    if isinstance(model_input, pd.Series | np.ndarray | list | tuple):
        return list(model_input)
    raise UserError(
        f"the model takes a list of texts, a pandas Series or a DataFrame with a `text` column, "
        f"not a {type(model_input).__name__}"
    )


class TextClassifier(mlflow.pyfunc.PythonModel):
    """The fine-tuned model as an MLflow pyfunc: predict(texts) is predict_texts, as a DataFrame of `label` (the
    label name) and `score`.

    Artifact `model`: the fine-tuned save_pretrained folder (weights, config with label names, tokenizer).
    model_config: max_length, max_windows (the tokenize params evaluate scored with) and batch_size.
    """

    # predict() takes what texts_of() accepts: MLflow's type-hint schema (and its warning that there is none,
    # printed by every stage that imports this module) would convert inputs before they get there.
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        folder = Path(context.artifacts["model"])
        config = context.model_config or {}
        self.max_length = config.get("max_length")
        self.max_windows = config.get("max_windows")
        self.batch_size = int(config.get("batch_size", DEFAULT_BATCH_SIZE))
        self.device = pick_device()
        # transferpipe.lstm is imported above, so an LSTM loads as this package's class, without remote code.
        self.model = load_classifier(folder).to(self.device).eval()
        self.tokenizer = load_tokenizer(folder)

    # model_input has no type hint on purpose: MLflow reads one as the input schema and converts inputs to it.
    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        out = predict_texts(
            self.model,
            self.tokenizer,
            texts_of(model_input),
            self.max_length,
            self.max_windows,
            self.batch_size,
            self.device,
        )
        return pd.DataFrame({"label": out.labels, "score": out.scores})
