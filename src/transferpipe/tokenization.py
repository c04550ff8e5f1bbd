"""Tokenizer training and the two tokenized views of the data.

- the pretraining corpus, packed into fixed-length blocks (no padding is ever computed on);
- the classification splits, truncated to max_length but not padded (padding happens per batch).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from transferpipe.errors import UserError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(
    texts: Iterable[str], vocab_size: int, min_frequency: int, lowercase: bool
) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer trained with the `tokenizers` library (Rust, batched)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "attention_mask"],
    )


def load_tokenizer(checkpoint: str | Path) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(str(checkpoint))
    except OSError as exc:
        raise UserError(
            f"could not load a tokenizer from {checkpoint!r}: {str(exc).splitlines()[0]}; "
            "check model.checkpoint (a save_pretrained folder, or a hub name with network access)"
        ) from None
    if tok.mask_token is None or tok.pad_token is None:
        raise UserError(f"the tokenizer of {checkpoint!r} has no mask or pad token; it cannot do MLM")
    return tok


def pack_blocks(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], block_size: int, num_proc: int | None = None
) -> datasets.Dataset:
    """Tokenize whole documents ([CLS] doc [SEP]), concatenate them and cut blocks of block_size tokens.

    As in transformers' run_mlm.py, grouping runs per batch of 1000 documents, so memory stays bounded
    and each batch drops its tail shorter than one block (under block_size tokens per 1000 documents).
    """
    ds = datasets.Dataset.from_dict({"text": texts})

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch["text"], add_special_tokens=True, return_attention_mask=False)

    def group(batch: dict) -> dict:
        ids = [t for doc in batch["input_ids"] for t in doc]
        n = (len(ids) // block_size) * block_size
        return {"input_ids": [ids[i : i + block_size] for i in range(0, n, block_size)]}

    ds = ds.map(tokenize, batched=True, remove_columns=["text"], num_proc=num_proc, desc="tokenize pretraining text")
    ds = ds.map(group, batched=True, batch_size=1000, num_proc=num_proc, desc=f"pack into {block_size}-token blocks")
    return ds


def tokenize_for_classification(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int], max_length: int
) -> datasets.Dataset:
    ds = datasets.Dataset.from_dict({"text": texts, "labels": labels})

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return ds.map(tokenize, batched=True, remove_columns=["text"], desc="tokenize classification text")
