"""The fine-tuned model as an MLflow pyfunc: TextClassifier.predict(texts) is inference.predict_texts, the
function evaluate scores the test set with, returned as a DataFrame of `label` and `score`.

tracking.Run.log_text_classifier logs it with this package as its code, so the registered model predicts what
evaluate scored:

    mlflow.pyfunc.load_model("models:/transferpipe-classifier@candidate").predict(["The striker scored twice"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

import transferpipe.lstm  # noqa: F401  registers the LSTM with the Auto classes: no trust_remote_code needed
from transferpipe.distributed import pick_device
from transferpipe.errors import UserError
from transferpipe.inference import predict_texts
from transferpipe.modeling import load_classifier
from transferpipe.tokenization import load_tokenizer

DEFAULT_BATCH_SIZE = 32  # windows per forward pass of the served model


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
