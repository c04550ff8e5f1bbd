"""Tokenizer training and the two tokenized views of the data.

- the pretraining corpus, packed into fixed-length blocks (no padding is ever computed on);
- the classification splits: each document cut into windows of at most max_length tokens (the first one is the
  tokenizer's own truncation), not padded (padding happens per batch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from transferpipe.errors import UserError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(
    texts: Callable[[], Iterable[str] | Iterable[list[str]]] | Sequence[str] | Sequence[list[str]],
    vocab_size: int,
    min_frequency: int,
    lowercase: bool,
) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer trained with the `tokenizers` library (Rust, batched), deterministically:
    the same text gives the same vocabulary and ids, bit for bit, in every process and on every machine.

    `texts` is read twice: a sequence (of texts or of batches), or a function returning a fresh iterator of them
    (text_batches over datasets): the trainer keeps word counts, never the corpus.

    The trainer (BPE's, which WordPiece training uses) gives a token an id when it first meets it; the
    continuing-subword tokens (`##e`) it meets while walking its word counts, a hash map whose order changes from
    process to process. Equal pair counts are broken by those ids, so a tie could pick another merge and the
    vocabulary differed in about 1 training of 8 (huggingface/tokenizers#1794). Here a first pass with no
    merges finds the `##` characters; the real pass gets them up front, sorted, as the ids it starts from.
    """
    if not callable(texts):
        if iter(texts) is texts:
            raise TypeError("train_wordpiece reads its texts twice: pass a sequence or a function making an iterator")
        texts = (lambda corpus: lambda: corpus)(texts)
    alphabet = _train_vocab(texts(), 1, min_frequency, lowercase, SPECIAL_TOKENS)  # no merges: characters only
    continuing = sorted(token for token in alphabet if token.startswith("##") and len(token) == 3)
    vocab = _train_vocab(texts(), vocab_size, min_frequency, lowercase, SPECIAL_TOKENS + continuing)
    # The trainer starts from every character of the text, word-initial and ##-continued, and keeps them all
    # even past vocab_size: a vocab_size they and the special tokens fill learns no subword at all.
    taken = len(alphabet)
    if vocab_size <= taken:
        characters = len({token.removeprefix("##") for token in alphabet} - set(SPECIAL_TOKENS))
        raise UserError(
            f"params tokenize.vocab_size: {vocab_size} is below what the text needs: its {characters} distinct "
            f"characters ({taken - len(SPECIAL_TOKENS)} tokens, word-initial and ##-continued) and "
            f"{len(SPECIAL_TOKENS)} special tokens already take {taken} entries; use at least {taken + 1}"
        )
    tok = _wordpiece(renumbered(vocab), lowercase)
    tok.add_special_tokens(SPECIAL_TOKENS)
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


def _wordpiece(vocab: dict[str, int] | None, lowercase: bool) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]") if vocab else models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def _train_vocab(
    texts: Iterable[str] | Iterable[list[str]], vocab_size: int, min_frequency: int, lowercase: bool, first: list[str]
) -> set[str]:
    """The tokens WordPieceTrainer learns, with `first` given the first ids (as special tokens, which the
    trainer numbers before anything else)."""
    tok = _wordpiece(None, lowercase)
    # The trainer's own progress bars (on a terminal only): reading the texts, counting pairs, merging.
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=first, show_progress=True
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return set(tok.get_vocab(with_added_tokens=False))


def renumbered(tokens: Iterable[str]) -> dict[str, int]:
    """Fixed ids for a WordPiece vocabulary: the special tokens first, then the others sorted. WordPiece
    splits a word by longest match in the vocabulary, which the numbering does not touch."""
    learned = sorted(set(tokens) - set(SPECIAL_TOKENS))
    return {token: i for i, token in enumerate([*SPECIAL_TOKENS, *learned])}


def save_datasets(splits: datasets.DatasetDict, folder: Path) -> None:
    """save_to_disk, with each split's fingerprint set from the bytes of its Arrow files.

    datasets derives a fingerprint from the transforms a dataset went through, and draws a random one when a
    transform cannot be hashed (ours carry a tokenizer). Left so, the same rows would be written as a
    different folder on every run, and DVC would rerun every stage that reads it.
    """
    splits.save_to_disk(str(folder))
    for name in splits:
        state_file = folder / name / "state.json"
        state = json.loads(state_file.read_text(encoding="utf-8"))
        digest = hashlib.sha256()
        for entry in state["_data_files"]:
            with open(folder / name / entry["filename"], "rb") as data:
                for chunk in iter(lambda data=data: data.read(1 << 20), b""):
                    digest.update(chunk)
        state["_fingerprint"] = digest.hexdigest()[:16]
        state_file.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def text_batches(parts: Iterable[datasets.Dataset], batch_size: int = 1000) -> Iterator[list[str]]:
    """The `text` column of each dataset in turn, batch_size texts at a time (read from its Arrow file)."""
    for part in parts:
        for batch in part.select_columns(["text"]).iter(batch_size=batch_size):
            yield batch["text"]


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


# Documents per map batch: the unit of packing (each batch drops its own tail of under block_size tokens, as in
# run_mlm.py) and of the memory a batch takes while it is tokenized.
BATCH_DOCUMENTS = 1000


def fast_backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """A copy of the Rust tokenizer behind a fast tokenizer, with no truncation or padding set (None if slow).

    A copy, because transformers sets truncation and padding on its backend per call; the copy pickles, so
    datasets.map workers get it too.
    """
    if not tokenizer.is_fast:
        return None
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def encode_documents(
    tokenizer: PreTrainedTokenizerBase, backend: Tokenizer | None, texts: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Whole documents with their special tokens as (offsets (n+1,), ids (total,)): document i is
    ids[offsets[i]:offsets[i+1]]. One batched call into Rust, which spreads the batch over every core."""
    if backend is not None:
        ids = [e.ids for e in backend.encode_batch_fast(texts)]
    else:
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=offsets[1:])
    # int32 ids and int8 masks: the types datasets itself gives these columns (vocabularies stay under 2^31).
    return offsets, np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))


def special_tokens_around(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a single text ([CLS] ... [SEP]: (1, 1))."""
    mask = "".join(map(str, tokenizer("a", return_special_tokens_mask=True)["special_tokens_mask"]))
    return len(mask) - len(mask.lstrip("1")), len(mask) - len(mask.rstrip("1"))


def windows(
    offsets: np.ndarray, ids: np.ndarray, max_length: int, head: int, tail: int, max_windows: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut each document into consecutive windows of at most max_length ids, each with the document's `head`
    special tokens before and `tail` after, at most max_windows per document (None: all).

    Window 0 is exactly the tokenizer's own truncation to max_length. Returns (window offsets, window ids,
    document of each window, index of each window in its document). Vectorized over the whole batch.
    """
    lengths = np.diff(offsets)
    width = max_length - head - tail  # content ids per window (window_tokenized checks it is at least 1)
    content = np.maximum(lengths - head - tail, 0)
    count = np.maximum(1, -(-content // width))
    if max_windows is not None:
        count = np.minimum(count, max_windows)
    document = np.repeat(np.arange(len(lengths)), count)
    first_window = np.repeat(np.cumsum(count) - count, count)
    window = np.arange(len(document)) - first_window
    start = window * width  # of the window's content, inside the document's content
    size = head + np.minimum(width, content[document] - start) + tail
    new_offsets = np.zeros(len(document) + 1, dtype=np.int64)
    np.cumsum(size, out=new_offsets[1:])
    # For each output id: its window, its position p in the window, and where it comes from in the document.
    of = np.repeat(np.arange(len(document)), size)
    p = np.arange(int(new_offsets[-1])) - new_offsets[:-1][of]
    doc = document[of]
    in_doc = np.where(
        p < head,
        p,
        np.where(p < size[of] - tail, start[of] + p, lengths[doc] - (size[of] - p)),
    )
    return new_offsets, ids[offsets[:-1][doc] + in_doc], document, window


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _parts(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, flat values) of a list column of a batch."""
    lists = column.combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], lists.flatten().to_numpy()


def _as_dataset(texts: list[str] | datasets.Dataset, labels: list[int] | None = None) -> datasets.Dataset:
    if isinstance(texts, datasets.Dataset):
        return texts
    return datasets.Dataset.from_dict({"text": texts} if labels is None else {"text": texts, "label": labels})


def _map_batches(
    ds: datasets.Dataset,
    fn: Callable[..., pa.Table],
    desc: str,
    num_proc: int | None = None,
    with_indices: bool = False,
) -> datasets.Dataset:
    """ds.map over Arrow batches of BATCH_DOCUMENTS rows; fn returns the whole new table (old columns dropped)."""
    mapped = ds.with_format("arrow").map(
        fn,
        batched=True,
        with_indices=with_indices,
        batch_size=BATCH_DOCUMENTS,
        remove_columns=ds.column_names,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        desc=desc,
    )
    return mapped.with_format(None)


def tokenize_documents(
    tokenizer: PreTrainedTokenizerBase, texts: list[str] | datasets.Dataset, num_proc: int | None = None
) -> datasets.Dataset:
    """The `text` column replaced by `input_ids`: whole documents with special tokens, not truncated.

    Batches go to Rust as Arrow and come back as Arrow arrays built from numpy, with no Python work per
    token beyond reading the ids. A file-backed dataset is mapped to a file beside it, so a corpus larger than
    memory streams through. Each document is tokenized on its own, so num_proc changes nothing in the output.
    """
    ds = _as_dataset(texts)
    backend = fast_backend(tokenizer)

    def encode(batch: pa.Table) -> pa.Table:
        offsets, ids = encode_documents(tokenizer, backend, batch.column("text").to_pylist())
        rest = {name: batch.column(name) for name in batch.column_names if name != "text"}
        return pa.table({**rest, "input_ids": _lists(offsets, ids)})

    return _map_batches(ds, encode, "tokenize", num_proc)


def pack_tokenized(documents: datasets.Dataset, block_size: int) -> datasets.Dataset:
    """Concatenate tokenized documents and cut blocks of exactly block_size tokens (no padding ever).

    As in transformers' run_mlm.py, grouping runs per batch of 1000 documents, so memory stays bounded and each
    batch drops its tail shorter than one block (under block_size tokens per 1000 documents). It runs
    in-process: it is cheap, and the same batches whatever num_proc tokenized the documents.
    """

    def group(batch: pa.Table) -> pa.Table:
        _, ids = _parts(batch.column("input_ids"))
        n = len(ids) // block_size * block_size
        return pa.table({"input_ids": _lists(np.arange(0, n + 1, block_size), ids[:n])})

    return _map_batches(documents, group, f"pack into {block_size}-token blocks")


def window_tokenized(
    tokenizer: PreTrainedTokenizerBase,
    documents: datasets.Dataset,
    max_length: int,
    max_windows: int | None = 1,
) -> datasets.Dataset:
    """Classification inputs from tokenized documents (columns input_ids, label): each document cut into windows
    of at most max_length tokens (see windows(); max_windows=1 is plain truncation), never padded.

    One row per window, in document order, with `labels`, `input_ids`, `attention_mask` (and `token_type_ids`
    if the tokenizer makes them), `document` (the row of its document in `documents`) and `window` (0 for
    the first window of each document: the one training uses).
    """
    if max_windows is not None and max_windows < 1:
        raise UserError(f"params tokenize.max_windows={max_windows} must be at least 1 (or null: every window)")
    head, tail = special_tokens_around(tokenizer)
    if max_length - head - tail < 1:
        raise UserError(f"params tokenize.max_length={max_length} leaves no room beside {head + tail} special tokens")
    token_types = "token_type_ids" in tokenizer.model_input_names

    def cut(batch: pa.Table, indices: list[int]) -> pa.Table:
        offsets, ids, document, window = windows(
            *_parts(batch.column("input_ids")), max_length, head, tail, max_windows
        )
        columns = {
            "labels": batch.column("label").take(pa.array(document)),
            "input_ids": _lists(offsets, ids),
            "attention_mask": _lists(offsets, np.ones(len(ids), dtype=np.int8)),
        }
        if token_types:
            columns["token_type_ids"] = _lists(offsets, np.zeros(len(ids), dtype=np.int8))
        columns["document"] = pa.array(np.asarray(indices, dtype=np.int64)[document])
        columns["window"] = pa.array(window.astype(np.int32))
        return pa.table(columns)

    return _map_batches(documents, cut, "cut into windows", with_indices=True)


def pack_blocks(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str] | datasets.Dataset,
    block_size: int,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenize whole documents ([CLS] doc [SEP]), concatenate them and cut blocks of block_size tokens."""
    return pack_tokenized(tokenize_documents(tokenizer, texts, num_proc), block_size)


def tokenize_for_classification(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str] | datasets.Dataset,
    labels: list[int] | None,
    max_length: int,
    num_proc: int | None = None,
    max_windows: int | None = 1,
) -> datasets.Dataset:
    """Unpadded classification inputs of (texts, labels), or of a dataset with text and label: window_tokenized
    (by default each document truncated to its first window)."""
    documents = tokenize_documents(tokenizer, _as_dataset(texts, labels), num_proc)
    return window_tokenized(tokenizer, documents, max_length, max_windows)
