"""Shared fixtures: a tiny labeled corpus, a tiny tokenizer and tiny models built once per session, so every test
runs offline in seconds. Plain helpers and constants are in tests/helpers.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import ENCODER_ARCHITECTURES, TINY_ENCODER, TOPICS, make_corpus

if TYPE_CHECKING:  # imported in the fixtures that need them: a test module without models never loads torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


@pytest.fixture
def tiny_csv(tmp_path: Path) -> Path:
    import pandas as pd

    path = tmp_path / "tiny.csv"
    pd.DataFrame(make_corpus()).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer (150 tokens, lowercased) trained on make_corpus(), shared by the whole session:
    use it, never change it (pass `padding_side=` to a call rather than setting the attribute)."""
    from transferpipe.tokenization import train_wordpiece

    return train_wordpiece([row["text"] for row in make_corpus()], vocab_size=150, min_frequency=1, lowercase=True)


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> dict[str, Path]:
    """Untrained tiny MLM encoders (TINY_ENCODER sizes, seed 0) of each transformer architecture, saved with
    tiny_tokenizer as pretrained checkpoints: architecture -> folder. Load models from the folders; never
    write into them."""
    import torch

    from transferpipe.modeling import pretraining_model

    folders = {}
    for architecture in ENCODER_ARCHITECTURES:
        folder = tmp_path_factory.mktemp(architecture)
        with torch.random.fork_rng():  # the tests' global random state is left as it was
            torch.manual_seed(0)
            model = pretraining_model(dataclasses.replace(TINY_ENCODER, architecture=architecture), tiny_tokenizer)
        model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        folders[architecture] = folder
    return folders


@pytest.fixture(scope="module", params=ENCODER_ARCHITECTURES)
def encoder_dir(request: pytest.FixtureRequest, tiny_encoders: dict[str, Path]) -> Path:
    """A tiny MLM encoder of each architecture, saved as a pretrained checkpoint (a test per architecture)."""
    return tiny_encoders[request.param]


@pytest.fixture
def classifier(encoder_dir: Path) -> PreTrainedModel:
    """A fresh sequence classifier (labels business, sport, tech) on encoder_dir's encoder, the test's own to
    change. test_lstm.py and test_serving.py define their own `classifier`."""
    from transferpipe.modeling import sequence_classifier

    return sequence_classifier(encoder_dir, ["business", "sport", "tech"], classifier_dropout=0.1)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny untrained BERT sequence classifier (the five TOPICS as label names, 64 positions) saved with
    tiny_tokenizer: a folder to load or log, never to write into."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("clf") / "clf"
    labels = sorted(TOPICS)
    config = BertConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def checkpoint_site(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny published checkpoint installed as a package (tests.helpers.make_checkpoint_package) in a folder
    of its own; returns its source file. Put the folder on the path with `checkpoint_package`."""
    from tests.helpers import make_checkpoint_package

    return make_checkpoint_package(tmp_path_factory.mktemp("published") / "site", tiny_tokenizer)


@pytest.fixture
def checkpoint_package(checkpoint_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny checkpoint package importable in this process and in the processes it starts (PYTHONPATH);
    returns the source file that pins it (model.checkpoint)."""
    import os

    site = checkpoint_site.parent / "site"
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    return checkpoint_site


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store for this test only."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Tests never reach the hub: a missing local file must fail fast, not retry over the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    # A test's checkpoints stay its own, never in the repository where another test could resume them.
    monkeypatch.setenv("TRANSFERPIPE_CHECKPOINT_DIR", str(tmp_path / ".checkpoints"))
