"""WordPiece training, block packing for MLM, and truncated (unpadded) classification inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tests.conftest import make_corpus
from transferpipe.errors import UserError
from transferpipe.tokenization import (
    SPECIAL_TOKENS,
    load_tokenizer,
    pack_blocks,
    tokenize_for_classification,
    train_wordpiece,
)

VOCAB_SIZE = 120


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [row["text"] for row in make_corpus()]


@pytest.fixture(scope="module")
def tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    return train_wordpiece(texts, vocab_size=VOCAB_SIZE, min_frequency=1, lowercase=True)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    return tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id


def test_vocab_is_bounded_and_holds_the_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    assert 50 < len(tokenizer) <= VOCAB_SIZE
    vocab = tokenizer.get_vocab()
    assert all(token in vocab for token in SPECIAL_TOKENS)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.mask_token == "[MASK]"
    assert tokenizer.pad_token_id != tokenizer.mask_token_id


def test_encoding_adds_cls_and_sep(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer("Bank shares rose in the market")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id
    assert ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids  # every word of the corpus is in the vocabulary
    assert tokenizer.decode(ids, skip_special_tokens=True) == "bank shares rose in the market"


def test_lowercase_flag(texts: list[str], tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenizer("BANK Shares")["input_ids"] == tokenizer("bank shares")["input_ids"]
    cased = train_wordpiece(texts, vocab_size=VOCAB_SIZE, min_frequency=1, lowercase=False)
    assert cased("BANK Shares")["input_ids"] != cased("bank shares")["input_ids"]


def test_min_frequency_shrinks_the_vocabulary(texts: list[str]) -> None:
    loose = train_wordpiece(texts, vocab_size=1000, min_frequency=1, lowercase=True)
    strict = train_wordpiece(texts, vocab_size=1000, min_frequency=50, lowercase=True)
    assert len(strict) < len(loose)


def test_save_and_reload_gives_identical_ids(
    tmp_path: Path, texts: list[str], tokenizer: PreTrainedTokenizerFast
) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert special_ids(reloaded) == special_ids(tokenizer)
    assert load_tokenizer(tmp_path)(texts[0])["input_ids"] == tokenizer(texts[0])["input_ids"]


def test_load_tokenizer_from_a_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="could not load a tokenizer"):
        load_tokenizer(tmp_path / "no-such-tokenizer")


def test_pack_blocks_cuts_exact_blocks_of_the_concatenated_documents(
    texts: list[str], tokenizer: PreTrainedTokenizerFast
) -> None:
    block_size = 16
    per_doc = tokenizer(texts)["input_ids"]
    stream = [t for doc in per_doc for t in doc]
    blocks = pack_blocks(tokenizer, texts, block_size)["input_ids"]
    assert all(len(block) == block_size for block in blocks)
    assert len(blocks) * block_size == len(stream) // block_size * block_size
    assert [t for block in blocks for t in block] == stream[: len(blocks) * block_size]


def test_pack_blocks_drops_at_most_one_tail_per_map_batch(tokenizer: PreTrainedTokenizerFast) -> None:
    """Grouping runs per 1000-document batch (memory stays bounded), so each batch drops its own tail."""
    block_size = 64
    texts = [row["text"] for row in make_corpus(n_per_class=500)]  # 2500 documents: three map batches
    n_tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    blocks = pack_blocks(tokenizer, texts, block_size)
    assert all(len(ids) == block_size for ids in blocks["input_ids"])
    assert n_tokens // block_size - 2 <= len(blocks) <= n_tokens // block_size


def test_classification_inputs_are_truncated_not_padded(texts: list[str], tokenizer: PreTrainedTokenizerFast) -> None:
    labels = list(range(len(texts)))
    max_length = 12
    ds = tokenize_for_classification(tokenizer, texts + ["Short."], labels + [0], max_length)
    assert set(ds.column_names) == {"labels", "input_ids", "attention_mask"}
    lengths = [len(ids) for ids in ds["input_ids"]]
    assert max(lengths) == max_length  # long documents were cut
    assert lengths[-1] < max_length and len(set(lengths)) > 1  # short ones were not padded
    assert all(tokenizer.pad_token_id not in ids for ids in ds["input_ids"])
    assert all(ids[-1] == tokenizer.sep_token_id for ids in ds["input_ids"])  # truncation keeps [SEP]
    assert ds["labels"] == labels + [0]
