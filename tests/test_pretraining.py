"""The pretraining objectives: masks drawn on the device with static shapes, and losses equal to the models' own."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tests.helpers import TINY_ENCODER as TINY
from tests.helpers import make_corpus
from transferpipe.modeling import pretraining_model
from transferpipe.params import PretrainParams
from transferpipe.pretraining import MaskedLM, held_out_batches, held_out_loss, objective
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
