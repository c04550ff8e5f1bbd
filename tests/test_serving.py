"""transferpipe.serving: predict_texts (raw texts to document predictions over windows) and the MLflow model that
wraps it; on the tiny pipeline, the registered model (loaded, and behind `mlflow models serve`) predicts exactly
what evaluate scored, for the transformer and for the LSTM."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from tests.helpers import dvc_commands, make_corpus, tiny_params, wait_for_http
from transferpipe.errors import UserError
from transferpipe.inference import predict_texts
from transferpipe.serving import texts_of
from transferpipe.tokenization import load_tokenizer

CPU = torch.device("cpu")
MODEL = "transferpipe-test-classifier"  # tracking.registered_model_name of the tiny profile
MAX_LENGTH, MAX_WINDOWS = 16, 4  # 16-token windows: the synthetic documents (about 20 tokens) have two or more
LONG = "bank shares market profit economy film music star award match goal team player season coach " * 3


@pytest.fixture(scope="module")
def classifier(tiny_classifier_dir: Path) -> tuple:
    """A tiny untrained BERT classifier with label names (64 positions) and its tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    return model, load_tokenizer(tiny_classifier_dir)


def window_by_hand(tokenizer, text: str, width: int) -> list[list[int]]:
    """[CLS] + each consecutive `width` content tokens + [SEP]: the windows, computed without tokenization.py."""
    content = tokenizer(text, add_special_tokens=False)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return [[cls, *content[i : i + width], sep] for i in range(0, len(content), width)]


@torch.no_grad()
def logits_alone(model, ids: list[int]) -> np.ndarray:
    """A window's logits run on its own: no padding, no batch neighbours."""
    return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_a_document_is_the_mean_of_its_window_logits(classifier: tuple) -> None:
    model, tokenizer = classifier
    texts = [LONG, "film music star"]
    out = predict_texts(model, tokenizer, texts, MAX_LENGTH, None, batch_size=3, device=CPU)
    windows = window_by_hand(tokenizer, LONG, MAX_LENGTH - 2)
    assert len(windows) > 3 and out.windows.tolist() == [len(windows), 1]
    assert windows[0] == tokenizer(LONG, truncation=True, max_length=MAX_LENGTH)["input_ids"]  # window 0: truncation
    expected = np.mean([logits_alone(model, w) for w in windows], axis=0)
    np.testing.assert_allclose(out.logits[0], expected, atol=1e-5)
    np.testing.assert_allclose(out.logits[1], logits_alone(model, tokenizer("film music star")["input_ids"]), atol=1e-5)
    # The label is the argmax of the mean logits, by name; the score its softmax probability.
    assert out.label_ids.tolist() == out.logits.argmax(-1).tolist()
    assert out.labels == [model.config.id2label[int(i)] for i in out.label_ids]
    probabilities = torch.softmax(torch.from_numpy(out.logits).double(), -1).numpy()
    np.testing.assert_allclose(out.scores, probabilities.max(-1))
    # At most max_windows: the first two windows only.
    two = predict_texts(model, tokenizer, [LONG], MAX_LENGTH, 2, batch_size=8, device=CPU)
    assert two.windows.tolist() == [2]
    np.testing.assert_allclose(two.logits[0], np.mean([logits_alone(model, w) for w in windows[:2]], 0), atol=1e-5)


def test_max_length_none_scores_each_text_whole(classifier: tuple) -> None:
    model, tokenizer = classifier
    text = LONG[: len(LONG) // 2]  # within the tiny BERT's 64 positions
    out = predict_texts(model, tokenizer, [text, "bank"], None, None, batch_size=2, device=CPU)
    assert out.windows.tolist() == [1, 1] and len(tokenizer(text)["input_ids"]) > 2 * MAX_LENGTH
    np.testing.assert_allclose(out.logits[0], logits_alone(model, tokenizer(text)["input_ids"]), atol=1e-5)


def test_predict_texts_refuses_what_is_not_a_list_of_texts(classifier: tuple) -> None:
    model, tokenizer = classifier
    with pytest.raises(UserError, match="not one string"):
        predict_texts(model, tokenizer, "bank shares", MAX_LENGTH, None, 8, CPU)
    with pytest.raises(UserError, match="text 1 is a float"):
        predict_texts(model, tokenizer, ["bank", float("nan")], MAX_LENGTH, None, 8, CPU)
    with pytest.raises(UserError, match="max_windows=0"):
        predict_texts(model, tokenizer, ["bank"], MAX_LENGTH, 0, 8, CPU)
    empty = predict_texts(model, tokenizer, [], MAX_LENGTH, None, 8, CPU)
    assert empty.labels == [] and empty.logits.shape == (0, model.config.num_labels)


def test_pyfunc_inputs_are_lists_series_or_a_text_column() -> None:
    texts = ["bank shares", "film music"]
    assert texts_of(texts) == texts
    assert texts_of(pd.Series(texts)) == texts
    assert texts_of(pd.DataFrame({"id": [1, 2], "text": texts})) == texts
    assert texts_of(pd.DataFrame({0: texts})) == texts  # how MLflow hands over a JSON list of strings
    assert texts_of("bank shares") == ["bank shares"]
    with pytest.raises(UserError, match="needs a `text` column"):
        texts_of(pd.DataFrame({"title": texts, "body": texts}))
    with pytest.raises(UserError, match="not a dict"):
        texts_of({"text": texts})


@pytest.fixture(scope="module", params=["modernbert", "lstm", "checkpoint"])
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """Every dvc.yaml command on the tiny profile (16-token windows, at most 4) with model.architecture set to
    the param, or (`checkpoint`) continued from a published BERT checkpoint without a masked-LM head pinned by a
    source file, in a folder with its own MLflow store; yields the folder and the store's URI."""
    d = tmp_path_factory.mktemp(f"pipeline-{request.param}")
    csv = d / "tiny.csv"
    pd.DataFrame(make_corpus()).to_csv(csv, index=False)
    uri = f"sqlite:///{d / 'mlflow.db'}"
    pin = request.getfixturevalue("checkpoint_site") if request.param == "checkpoint" else None
    tiny_params(
        d,
        prepare={"source": str(csv)},
        tokenize={"max_length": MAX_LENGTH, "max_windows": MAX_WINDOWS},
        model={"checkpoint": str(pin)} if pin else {"architecture": request.param},
        # The tiny BERT's scores leave uniform only after more, faster steps than the tiny profile's 10.
        finetune={"min_steps": 80, "encoder_learning_rate": 3.0e-3, "head_learning_rate": 1.0e-2} if pin else {},
    )
    with pytest.MonkeyPatch.context() as mp:
        if pin:
            mp.syspath_prepend(str(pin.parent / "site"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.chdir(d)
        for module, argv in dvc_commands():
            importlib.import_module(module).main(argv)
        yield d, uri


def evaluated(d: Path) -> tuple[list[str], list[str]]:
    """The test texts in test order and evaluate's prediction (label name) for each of them."""
    test = pd.read_parquet(d / "data/prepared/test.parquet")
    names = json.loads((d / "data/prepared/labels.json").read_text())
    rows = json.loads((d / "plots/evaluate/confusion_pretrained.json").read_text())
    assert [r["actual"] for r in rows] == [names[i] for i in test["label"]]  # rows are in test order
    return test["text"].tolist(), [r["predicted"] for r in rows]


@pytest.mark.slow
def test_registered_model_predicts_what_evaluate_scored(pipeline: tuple[Path, str]) -> None:
    d, uri = pipeline
    texts, predicted = evaluated(d)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")
    assert model.model_config == {"max_length": MAX_LENGTH, "max_windows": MAX_WINDOWS}
    served = model.predict(texts)
    assert list(served.columns) == ["label", "score"]
    assert served["label"].tolist() == predicted  # every test document, in order
    assert model.predict(pd.Series(texts))["label"].tolist() == predicted
    assert model.predict(pd.DataFrame({"text": texts}))["label"].tolist() == predicted
    # The test could fail: documents have several windows, and a first-window model scores them differently.
    folder = d / "models/finetuned/pretrained"
    clf, tok = AutoModelForSequenceClassification.from_pretrained(folder), load_tokenizer(folder)
    local = predict_texts(clf, tok, texts, MAX_LENGTH, MAX_WINDOWS, 16, CPU)
    several = local.windows > 1
    assert several.sum() >= len(texts) // 2
    np.testing.assert_allclose(served["score"], local.scores, rtol=1e-5)
    first = predict_texts(clf, tok, texts, MAX_LENGTH, 1, 16, CPU)
    assert not np.allclose(first.scores[several], local.scores[several], rtol=1e-3)
    # An LSTM loads as this package's own class (the model's code imports transferpipe): no remote code ran.
    expected_module = "transferpipe.lstm" if clf.config.model_type == "transferpipe_lstm" else "transformers.models."
    assert type(model.unwrap_python_model().model).__module__.startswith(expected_module)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_evaluates_label_names(pipeline: tuple[Path, str]) -> None:
    d, uri = pipeline
    texts, predicted = evaluated(d)
    port = free_port()
    log = (d / f"serve-{port}.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_TRACKING_URI": uri}
    command = ["mlflow", "models", "serve", "-m", f"models:/{MODEL}@candidate", "--env-manager", "local"]
    proc = subprocess.Popen(
        [sys.executable, "-m", *command, "-p", str(port), "-h", "127.0.0.1"],
        cwd=d,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the server's workers end with it
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, d / f"serve-{port}.log", timeout=180)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": texts}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())["predictions"]
        assert [row["label"] for row in answer] == predicted
        assert all(0 < row["score"] <= 1 for row in answer)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
