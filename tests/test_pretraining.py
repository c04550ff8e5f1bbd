"""The pretraining objectives: masks drawn on the device with static shapes, losses equal to the models' own, and
ELECTRA's replaced-token detection around the same encoder."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tests.helpers import TINY_ENCODER as TINY
from tests.helpers import make_corpus
from transferpipe.errors import UserError
from transferpipe.modeling import pretraining_model
from transferpipe.params import PretrainParams
from transferpipe.pretraining import (
    MaskedLM,
    ReplacedTokenDetection,
    held_out_batches,
    held_out_loss,
    objective,
    optimizer_groups,
    sample,
)
from transferpipe.tokenization import pack_blocks


@pytest.fixture(scope="module")
def blocks(tiny_tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Packed 32-token blocks of the tiny corpus: [CLS] and [SEP] inside, where documents meet."""
    packed = pack_blocks(tiny_tokenizer, [row["text"] for row in make_corpus()], block_size=32).with_format("torch")
    return packed["input_ids"][:16]


def masked_lm(tokenizer: PreTrainedTokenizerFast, architecture: str = "modernbert") -> MaskedLM:
    torch.manual_seed(0)
    model = pretraining_model(dataclasses.replace(TINY, architecture=architecture), tokenizer)
    lm = objective(model, tokenizer, PretrainParams(mlm_probability=0.3))
    assert isinstance(lm, MaskedLM)
    return lm


def test_every_block_gets_the_same_number_of_masks_never_on_special_tokens(
    tiny_tokenizer: PreTrainedTokenizerFast, blocks: torch.Tensor
) -> None:
    lm = masked_lm(tiny_tokenizer)
    special = torch.isin(blocks, torch.tensor(tiny_tokenizer.all_special_ids))
    assert special.any()  # the case is exercised
    torch.manual_seed(1)
    draws = [lm.mask(blocks) for _ in range(200)]
    for batch in draws:
        assert batch["positions"].shape == (16, round(0.3 * 32))  # static: the same for any data
        assert (batch["positions"].sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct positions
        assert not special.gather(1, batch["positions"]).any()
        assert torch.equal(batch["targets"], blocks.gather(1, batch["positions"]))
        unmasked = torch.ones_like(blocks, dtype=torch.bool).scatter(1, batch["positions"], False)
        assert torch.equal(batch["input_ids"][unmasked], blocks[unmasked])  # only masked positions change
    picked = torch.stack([b["input_ids"].gather(1, b["positions"]) for b in draws])
    targets = torch.stack([b["targets"] for b in draws])
    as_mask = (picked == tiny_tokenizer.mask_token_id).float().mean().item()
    kept = (picked == targets).float().mean().item()  # includes random draws of the same token
    assert as_mask == pytest.approx(0.8, abs=0.01) and kept == pytest.approx(0.1, abs=0.01)


def test_a_block_with_too_few_maskable_tokens_ignores_the_extra_positions(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    lm = masked_lm(tiny_tokenizer)
    ids = torch.full((2, 20), tiny_tokenizer.pad_token_id)
    ids[:, 1:4] = torch.tensor([10, 11, 12])  # 3 real tokens, 6 masks wanted
    batch = lm.mask(ids)
    assert ((batch["targets"] != -100).sum(dim=1) == 3).all()
    assert lm.predicted(batch) == 6
    padding = ids == tiny_tokenizer.pad_token_id
    assert torch.equal(batch["input_ids"][padding], ids[padding])  # a drawn special token stays itself


@pytest.mark.parametrize("architecture", ["modernbert", "bert"])
def test_the_gathered_head_gives_the_models_own_masked_lm_loss(
    tiny_tokenizer: PreTrainedTokenizerFast, blocks: torch.Tensor, architecture: str
) -> None:
    """The head runs on the masked positions only; the loss is the one the model computes on dense labels."""
    lm = masked_lm(tiny_tokenizer, architecture)
    batch = lm.mask(blocks)
    labels = torch.full_like(blocks, -100).scatter(1, batch["positions"], batch["targets"])
    with torch.no_grad():
        expected = lm.model(input_ids=batch["input_ids"], labels=labels).loss
        assert lm(**batch).loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert held_out_loss(lm, [batch], torch.device("cpu"))["loss"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("architecture", ["modernbert", "bert"])
def test_a_training_step_traces_as_one_graph(
    tiny_tokenizer: PreTrainedTokenizerFast, blocks: torch.Tensor, architecture: str
) -> None:
    """Masking included, nothing in the objective depends on the data's values: torch.compile sees one graph
    (the model's own sparse MLM loss breaks it twice, at its boolean indexing)."""
    lm = masked_lm(tiny_tokenizer, architecture).train()
    explained = torch._dynamo.explain(lm)(blocks)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_held_out_masks_are_fixed_by_the_seed_and_leave_the_global_rng_alone(
    tiny_tokenizer: PreTrainedTokenizerFast, blocks: torch.Tensor
) -> None:
    from datasets import Dataset

    lm = masked_lm(tiny_tokenizer)
    dataset = Dataset.from_dict({"input_ids": blocks.tolist()})
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = held_out_batches(dataset, lm, batch_size=8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second = held_out_batches(dataset, lm, batch_size=8, seed=3)
    assert len(first) == 2
    for a, b in zip(first, second, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "positions", "targets"))


def electra(
    tokenizer: PreTrainedTokenizerFast, architecture: str = "modernbert", **params: object
) -> ReplacedTokenDetection:
    torch.manual_seed(0)
    model = pretraining_model(dataclasses.replace(TINY, architecture=architecture), tokenizer)
    lm = objective(model, tokenizer, PretrainParams(objective="electra", **params))
    assert isinstance(lm, ReplacedTokenDetection)
    return lm


@pytest.mark.parametrize("architecture", ["modernbert", "bert"])
def test_electra_generator_is_smaller_and_shares_the_encoders_token_embeddings(
    tiny_tokenizer: PreTrainedTokenizerFast, architecture: str
) -> None:
    lm = electra(tiny_tokenizer, architecture, electra_generator_layers=1)
    generator, encoder = lm.generator.model, lm.model
    assert generator.config.num_hidden_layers == 1 and encoder.config.num_hidden_layers == 2
    embeddings = encoder.get_input_embeddings().weight
    assert generator.get_input_embeddings().weight is embeddings
    assert generator.get_output_embeddings().weight is embeddings  # the generator's tied decoder too
    # AdamW sees every trainable parameter once: the encoder's, the generator's own and the head's.
    groups = optimizer_groups(lm, encoder, PretrainParams(objective="electra"))
    placed = [id(p) for group in groups for p in group["params"]]
    assert sorted(placed) == sorted(id(p) for p in lm.parameters())
    decayed = {id(p) for group in groups if group["weight_decay"] > 0 for p in group["params"]}
    assert id(lm.head[0].weight) in decayed and id(lm.head[0].bias) not in decayed


def test_electra_loss_is_the_generators_plus_the_weighted_replaced_token_loss(
    tiny_tokenizer: PreTrainedTokenizerFast, blocks: torch.Tensor
) -> None:
    """The discriminator judges the generator's samples at every non-special position; the loss it trains on
    is the documented sum, and both parts send gradients into the shared embeddings."""
    lm = electra(tiny_tokenizer, electra_discriminator_weight=50.0).train()
    torch.manual_seed(3)
    out = lm(blocks)
    assert out.loss.item() == pytest.approx(out.generator_loss.item() + 50.0 * out.replaced_loss.item(), rel=1e-6)
    assert 0.0 <= out.replaced_accuracy.item() <= 1.0
    # An untrained generator samples almost uniformly: nearly every masked position is replaced.
    out.generator_loss.backward(retain_graph=True)
    from_generator = lm.model.get_input_embeddings().weight.grad.clone()
    lm.zero_grad()
    out.replaced_loss.backward()
    from_discriminator = lm.model.get_input_embeddings().weight.grad
    assert from_generator.abs().sum() > 0 and from_discriminator.abs().sum() > 0
    assert all(p.grad is None for p in lm.generator.model.model.layers.parameters())  # the samples are detached


def test_electra_replaced_token_targets_are_exactly_the_changed_positions(
    tiny_tokenizer: PreTrainedTokenizerFast, blocks: torch.Tensor
) -> None:
    """With a head that says "replaced" everywhere, accuracy is the share of scored positions that changed: at
    most the masked share, and unmasked or special tokens are never called replaced."""
    from datasets import Dataset

    lm = electra(tiny_tokenizer).eval()
    batch = held_out_batches(Dataset.from_dict({"input_ids": blocks.tolist()}), lm, batch_size=16, seed=0)[0]
    with torch.no_grad():
        lm.head[2].weight.zero_()
        lm.head[2].bias.fill_(10.0)  # every position judged replaced
        out = lm(**batch)
    special = torch.isin(blocks, torch.tensor(tiny_tokenizer.all_special_ids))
    masked_share = batch["positions"].shape[1] * len(blocks) / (~special).sum().item()
    assert 0.5 * masked_share < out.replaced_accuracy.item() <= masked_share + 1e-6


def test_electra_held_out_scores_are_fixed_and_name_the_generator_loss(
    tiny_tokenizer: PreTrainedTokenizerFast, blocks: torch.Tensor
) -> None:
    from datasets import Dataset

    lm = electra(tiny_tokenizer).eval()
    batches = held_out_batches(Dataset.from_dict({"input_ids": blocks.tolist()}), lm, batch_size=8, seed=3)
    first = held_out_loss(lm, batches, torch.device("cpu"))
    assert list(first) == ["loss", "perplexity", "replaced_loss", "replaced_accuracy"]
    assert held_out_loss(lm, batches, torch.device("cpu")) == first  # replacements sampled from a fixed seed
    with torch.no_grad():
        generator = lm.generator(**batches[0]).loss.item()
    assert held_out_loss(lm, batches[:1], torch.device("cpu"))["loss"] == pytest.approx(generator, rel=1e-6)


def test_electra_training_step_traces_as_one_graph(
    tiny_tokenizer: PreTrainedTokenizerFast, blocks: torch.Tensor
) -> None:
    lm = electra(tiny_tokenizer).train()
    explained = torch._dynamo.explain(lm)(blocks)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_electra_refuses_the_lstm_and_a_generator_deeper_than_the_encoder(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    lstm = pretraining_model(dataclasses.replace(TINY, architecture="lstm"), tiny_tokenizer)
    with pytest.raises(UserError, match="pretrain.objective=electra needs a transformer encoder"):
        objective(lstm, tiny_tokenizer, PretrainParams(objective="electra"))
    model = pretraining_model(TINY, tiny_tokenizer)
    with pytest.raises(UserError, match="electra_generator_layers=3 is more than the encoder's 2 layers"):
        objective(model, tiny_tokenizer, PretrainParams(objective="electra", electra_generator_layers=3))


def test_sampling_draws_each_token_at_its_softmax_probability() -> None:
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.log().expand(200_000, 4)  # a zero-probability token (log 0 = -inf) included
    drawn = sample(logits, torch.Generator().manual_seed(0))
    assert drawn.shape == (200_000,)
    assert torch.allclose(torch.bincount(drawn, minlength=4) / 200_000, probs, atol=0.005)
    assert torch.equal(drawn, sample(logits, torch.Generator().manual_seed(0)))
