"""The MLM encoder and the sequence classifier for both architectures, freezing and parameter groups."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AttentionInterface,
    BertConfig,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tests.helpers import ENCODER_ARCHITECTURES as ARCHITECTURES
from tests.helpers import TINY_ENCODER as TINY
from transferpipe.errors import UserError
from transferpipe.modeling import (
    PADDING_SAFE,
    encoder_layers,
    encoder_of,
    freeze,
    load_classifier,
    new_encoder_config,
    padding_safe,
    padding_safe_sdpa_mask,
    param_groups,
    pretraining_model,
)


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
    tiny_tokenizer: PreTrainedTokenizerFast, architecture: str, config_class: type
) -> None:
    config = new_encoder_config(dataclasses.replace(TINY, architecture=architecture), tiny_tokenizer)
    assert type(config) is config_class
    assert config.vocab_size == len(tiny_tokenizer)
    assert config.pad_token_id == tiny_tokenizer.pad_token_id
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert (config.intermediate_size, config.max_position_embeddings) == (64, 64)


def test_new_encoder_config_rejects_heads_not_dividing_hidden_size(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(UserError, match=r"model\.hidden_size 30 must be a multiple of model\.num_attention_heads 4"):
        new_encoder_config(dataclasses.replace(TINY, hidden_size=30, num_attention_heads=4), tiny_tokenizer)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_masked_lm_forward_gives_a_finite_loss(tiny_tokenizer: PreTrainedTokenizerFast, architecture: str) -> None:
    torch.manual_seed(0)
    model = pretraining_model(dataclasses.replace(TINY, architecture=architecture), tiny_tokenizer)
    output = model(**mlm_batch(tiny_tokenizer))
    assert output.loss.ndim == 0
    assert torch.isfinite(output.loss)
    # An untrained model guesses about uniformly: the loss is near log(vocab size).
    assert abs(output.loss.item() - torch.log(torch.tensor(len(tiny_tokenizer))).item()) < 1.5
    output.loss.backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_masked_lm_continues_from_a_checkpoint(encoder_dir: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = pretraining_model(dataclasses.replace(TINY, checkpoint=str(encoder_dir)), tiny_tokenizer)
    assert model.config.hidden_size == 32
    assert torch.isfinite(model(**mlm_batch(tiny_tokenizer)).loss)


def test_masked_lm_from_a_missing_checkpoint_is_a_user_error(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    with pytest.raises(UserError, match="could not load a model to pretrain"):
        pretraining_model(dataclasses.replace(TINY, checkpoint=str(tmp_path / "missing")), tiny_tokenizer)


def test_sequence_classifier_carries_label_names_and_the_pretrained_encoder(
    encoder_dir: Path, classifier: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    assert classifier.config.num_labels == 3
    assert classifier.config.id2label == {0: "business", 1: "sport", 2: "tech"}
    assert classifier.config.label2id == {"business": 0, "sport": 1, "tech": 2}
    assert classifier.config.classifier_dropout == 0.1
    # The encoder weights are the saved ones, not a fresh initialisation.
    mlm = pretraining_model(dataclasses.replace(TINY, checkpoint=str(encoder_dir)), tiny_tokenizer)
    saved = encoder_of(mlm).state_dict()
    loaded = encoder_of(classifier).state_dict()
    assert set(saved) <= set(loaded)  # BERT's classifier adds a pooler the MLM model lacks
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    batch = tiny_tokenizer(["Bank shares rose.", "A goal."], padding=True, return_tensors="pt")
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


def strict_attention(module, query, key, value, attention_mask, scaling, **kwargs):  # noqa: ANN001, ANN201
    """Attention that returns NaN for a query row with no key to attend to, as the fused CUDA kernels do
    (pytorch/pytorch#103749); PyTorch's CPU kernels return zeros there instead, which would hide the case."""
    scores = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, -math.inf)
    return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register("strict", strict_attention)
AttentionMaskInterface.register("strict", sdpa_mask)
AttentionInterface.register("strict_padding_safe", strict_attention)
AttentionMaskInterface.register("strict_padding_safe", padding_safe_sdpa_mask)


def padded_window_batch(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Two short texts padded next to a long one: far from their text, padded positions see no real key inside
    a sliding window."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, model.config.vocab_size, (3, 96), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 6:] = 0
    attention_mask[1, 20:] = 0
    input_ids[attention_mask == 0] = model.config.pad_token_id
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1, 0])}


def sliding_window_classifier(attention: str) -> PreTrainedModel:
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, local_attention=16, global_attn_every_n_layers=3, num_labels=2,
        pad_token_id=0, cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = padding_safe(ModernBertForSequenceClassification(config))
    if attention != PADDING_SAFE:
        model.set_attn_implementation(attention)
    return model


def logits_and_grads_finite(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[bool, bool]:
    out = model(**batch)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(out.logits).all()), all(bool(torch.isfinite(g).all()) for g in grads)


def test_heavily_padded_sliding_window_batches_give_finite_logits_and_gradients() -> None:
    """The fine-tuning NaN seen on a GPU: with the plain mask, a kernel that gives NaN for fully masked rows
    makes the logits NaN; with padding_safe_sdpa_mask, logits and gradients stay finite, and on real tokens the
    model computes exactly what plain SDPA does."""
    model = sliding_window_classifier("strict")
    assert logits_and_grads_finite(model, padded_window_batch(model)) == (False, False)  # the hazard is real

    model = sliding_window_classifier("strict_padding_safe")
    assert logits_and_grads_finite(model, padded_window_batch(model)) == (True, True)

    safe = sliding_window_classifier(PADDING_SAFE)
    assert safe.config._attn_implementation == PADDING_SAFE  # what every model of ours gets
    assert logits_and_grads_finite(safe, padded_window_batch(safe)) == (True, True)
    plain = sliding_window_classifier("sdpa")
    batch = padded_window_batch(plain)
    with torch.no_grad():
        real = batch["attention_mask"].bool()
        hidden = {m: m.model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[real]
                  for m in (safe, plain)}  # fmt: skip
    torch.testing.assert_close(hidden[safe], hidden[plain])


def test_saved_models_load_with_the_padding_safe_attention(tmp_path: Path) -> None:
    model = sliding_window_classifier(PADDING_SAFE)
    model.config.id2label, model.config.label2id = {0: "a", 1: "b"}, {"a": 0, "b": 1}
    model.save_pretrained(tmp_path)
    assert "padding_safe" not in (tmp_path / "config.json").read_text()  # plain transformers loads it
    assert load_classifier(tmp_path).config._attn_implementation == PADDING_SAFE


def test_inference_and_training_attention_agree_on_the_cpu() -> None:
    """Without gradients the CPU runs SDPA (faster for inference), with them plain matrix products (faster to
    train): on a padded batch both give the same logits to float tolerance, padded positions included."""
    model = sliding_window_classifier(PADDING_SAFE).eval()
    batch = padded_window_batch(model)
    del batch["labels"]
    with torch.no_grad():
        inference = model(**batch).logits
    training = model(**batch).logits.detach()
    torch.testing.assert_close(inference, training, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(inference).all()
