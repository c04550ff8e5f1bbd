"""The MLM encoder and the sequence classifier for both architectures, freezing and parameter groups."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, ModernBertConfig, PreTrainedModel, PreTrainedTokenizerFast

from tests.conftest import make_corpus
from transferpipe.errors import UserError
from transferpipe.modeling import (
    encoder_layers,
    encoder_of,
    freeze,
    new_encoder_config,
    param_groups,
    pretraining_model,
    sequence_classifier,
)
from transferpipe.params import ModelParams
from transferpipe.tokenization import train_wordpiece

ARCHITECTURES = ["modernbert", "bert"]
LABELS = ["business", "sport", "tech"]
TINY = ModelParams(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    texts = [row["text"] for row in make_corpus()]
    return train_wordpiece(texts, vocab_size=150, min_frequency=1, lowercase=True)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def encoder_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast
) -> Path:
    """A tiny MLM encoder of each architecture, saved as a pretrained checkpoint."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    pretraining_model(dataclasses.replace(TINY, architecture=request.param), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def classifier(encoder_dir: Path) -> PreTrainedModel:
    return sequence_classifier(encoder_dir, LABELS, classifier_dropout=0.1)


def mlm_batch(tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    batch = tokenizer(
        ["Bank shares rose in the market.", "The team won the cup match with a late goal."],
        padding=True,
        return_tensors="pt",
    )
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 2] = batch["input_ids"][:, 2]  # predict one position per sequence
    batch["input_ids"][:, 2] = tokenizer.mask_token_id
    return {**batch, "labels": labels}


@pytest.mark.parametrize(("architecture", "config_class"), [("modernbert", ModernBertConfig), ("bert", BertConfig)])
def test_new_encoder_config_takes_sizes_from_params(
    tokenizer: PreTrainedTokenizerFast, architecture: str, config_class: type
) -> None:
    config = new_encoder_config(dataclasses.replace(TINY, architecture=architecture), tokenizer)
    assert type(config) is config_class
    assert config.vocab_size == len(tokenizer)
    assert config.pad_token_id == tokenizer.pad_token_id
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert (config.intermediate_size, config.max_position_embeddings) == (64, 64)


def test_new_encoder_config_rejects_heads_not_dividing_hidden_size(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(UserError, match=r"model\.hidden_size 30 must be a multiple of model\.num_attention_heads 4"):
        new_encoder_config(dataclasses.replace(TINY, hidden_size=30, num_attention_heads=4), tokenizer)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_masked_lm_forward_gives_a_finite_loss(tokenizer: PreTrainedTokenizerFast, architecture: str) -> None:
    torch.manual_seed(0)
    model = pretraining_model(dataclasses.replace(TINY, architecture=architecture), tokenizer)
    output = model(**mlm_batch(tokenizer))
    assert output.loss.ndim == 0
    assert torch.isfinite(output.loss)
    # An untrained model guesses about uniformly: the loss is near log(vocab size).
    assert abs(output.loss.item() - torch.log(torch.tensor(len(tokenizer))).item()) < 1.5
    output.loss.backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_masked_lm_continues_from_a_checkpoint(encoder_dir: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    model = pretraining_model(dataclasses.replace(TINY, checkpoint=str(encoder_dir)), tokenizer)
    assert model.config.hidden_size == 32
    assert torch.isfinite(model(**mlm_batch(tokenizer)).loss)


def test_masked_lm_from_a_missing_checkpoint_is_a_user_error(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    with pytest.raises(UserError, match="could not load a model to pretrain"):
        pretraining_model(dataclasses.replace(TINY, checkpoint=str(tmp_path / "missing")), tokenizer)


def test_sequence_classifier_carries_label_names_and_the_pretrained_encoder(
    encoder_dir: Path, classifier: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    assert classifier.config.num_labels == 3
    assert classifier.config.id2label == {0: "business", 1: "sport", 2: "tech"}
    assert classifier.config.label2id == {"business": 0, "sport": 1, "tech": 2}
    assert classifier.config.classifier_dropout == 0.1
    # The encoder weights are the saved ones, not a fresh initialisation.
    mlm = pretraining_model(dataclasses.replace(TINY, checkpoint=str(encoder_dir)), tokenizer)
    saved = encoder_of(mlm).state_dict()
    loaded = encoder_of(classifier).state_dict()
    assert set(saved) <= set(loaded)  # BERT's classifier adds a pooler the MLM model lacks
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    batch = tokenizer(["Bank shares rose.", "A goal."], padding=True, return_tensors="pt")
    assert classifier(**batch).logits.shape == (2, 3)


def test_freeze_embeddings_and_lowest_layers(classifier: PreTrainedModel) -> None:
    layers = encoder_layers(classifier)
    assert len(layers) == 2
    expected_frozen = {id(p) for p in encoder_of(classifier).embeddings.parameters()}
    expected_frozen |= {id(p) for p in layers[0].parameters()}

    frozen = freeze(classifier, embeddings=True, num_layers=1)

    for name, p in classifier.named_parameters():
        assert p.requires_grad == (id(p) not in expected_frozen), name
    assert frozen == sum(p.numel() for p in classifier.parameters() if not p.requires_grad)
    assert frozen > 0


def test_freeze_layers_only(classifier: PreTrainedModel) -> None:
    freeze(classifier, embeddings=False, num_layers=2)
    assert all(p.requires_grad for p in encoder_of(classifier).embeddings.parameters())
    assert not any(p.requires_grad for layer in encoder_layers(classifier) for p in layer.parameters())


def test_freeze_more_layers_than_the_encoder_has(classifier: PreTrainedModel) -> None:
    with pytest.raises(UserError, match="freeze_layers=3 but the encoder has 2 layers"):
        freeze(classifier, embeddings=False, num_layers=3)
    assert all(p.requires_grad for p in classifier.parameters())


def test_param_groups(classifier: PreTrainedModel) -> None:
    freeze(classifier, embeddings=True, num_layers=1)
    groups = param_groups(classifier, encoder_lr=1e-4, head_lr=1e-3, weight_decay=0.01)

    names = {id(p): name for name, p in classifier.named_parameters()}
    encoder_ids = {id(p) for p in encoder_of(classifier).parameters()}
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))  # no parameter twice
    assert set(grouped) == {id(p) for p in classifier.parameters() if p.requires_grad}  # frozen ones skipped

    seen = {"encoder": False, "head": False, "decay": False, "no_decay": False}
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            in_encoder = id(p) in encoder_ids
            assert group["lr"] == (1e-4 if in_encoder else 1e-3), name
            no_decay = name.endswith("bias") or "norm" in name.lower()
            assert group["weight_decay"] == (0.0 if no_decay else 0.01), name
            seen["encoder" if in_encoder else "head"] = True
            seen["no_decay" if no_decay else "decay"] = True
    assert all(seen.values()), seen
