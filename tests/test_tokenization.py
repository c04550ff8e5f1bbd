"""WordPiece training, block packing for MLM, and truncated (unpadded) classification inputs."""

from __future__ import annotations

from pathlib import Path

import datasets
import pandas as pd
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from stages import prepare, tokenize
from tests.helpers import make_corpus, tiny_params
from transferpipe.data import parquet_as_dataset
from transferpipe.errors import UserError
from transferpipe.tokenization import (
    SPECIAL_TOKENS,
    load_tokenizer,
    pack_blocks,
    renumbered,
    text_batches,
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


def test_renumbering_fixes_the_ids_and_keeps_the_trainers_split(texts: list[str]) -> None:
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizers.BertNormalizer(lowercase=True)
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False)
    trained.train_from_iterator(texts, trainer)
    vocab = renumbered(trained.get_vocab())
    tokens = sorted(trained.get_vocab(), key=trained.get_vocab().get)
    assert tokens[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert sorted(vocab, key=vocab.get) == [*SPECIAL_TOKENS, *sorted(tokens[len(SPECIAL_TOKENS) :])]
    again = Tokenizer.from_str(trained.to_str())
    again.model = models.WordPiece(vocab, unk_token="[UNK]")
    for text in texts[:50]:
        assert again.encode(text).tokens == trained.encode(text).tokens
    # The same tokens numbered in another order (as another training run numbers them) get the same ids.
    assert renumbered(reversed(tokens)) == vocab


# The trainer's own tie-break, made deterministic: one vocabulary from one text, in every process.
# Upstream's reproducer (huggingface/tokenizers#1794): on this text the bare trainer learns two vocabularies.
REPRODUCER = ["Wel come to the \U0001f917 Tok en izers libr ary."]
TRAIN_IN_A_LOOP = """
import hashlib, json, sys
from transferpipe.tokenization import train_wordpiece
texts = json.loads(sys.argv[1])
for _ in range(int(sys.argv[2])):
    tok = train_wordpiece(texts, vocab_size=int(sys.argv[3]), min_frequency=1, lowercase=True)
    print(hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest())
"""


@pytest.mark.parametrize(("corpus", "vocab_size"), [("reproducer", 30000), ("tiny", VOCAB_SIZE)])
def test_training_on_the_same_text_gives_one_tokenizer_in_every_process(
    texts: list[str], corpus: str, vocab_size: int
) -> None:
    import json
    import os
    import subprocess
    import sys

    data = json.dumps(REPRODUCER if corpus == "reproducer" else texts)
    digests = []
    for seed in ("0", "1", "2"):  # each process its own hash seeds (Rust's and Python's)
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", TRAIN_IN_A_LOOP, data, "10", str(vocab_size)],
            env=env, capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        digests += proc.stdout.split()
    assert len(digests) == 30
    assert len(set(digests)) == 1  # the whole tokenizer.json: tokens, ids, normalizer, specials


def test_the_reproducers_text_still_splits_as_the_trainer_learned_it() -> None:
    tok = train_wordpiece(REPRODUCER, vocab_size=30000, min_frequency=1, lowercase=False)
    pieces = tok.tokenize("Tokenizers")
    assert "".join(p.removeprefix("##") for p in pieces) == "Tokenizers" and pieces[0] == "Tok"


def test_one_shot_iterators_are_refused_and_factories_are_read_twice(texts: list[str]) -> None:
    batches = [texts[i : i + 10] for i in range(0, len(texts), 10)]
    with pytest.raises(TypeError, match="reads its texts twice"):
        train_wordpiece(iter(batches), vocab_size=VOCAB_SIZE, min_frequency=1, lowercase=True)
    from_list = train_wordpiece(batches, vocab_size=VOCAB_SIZE, min_frequency=1, lowercase=True)
    from_factory = train_wordpiece(lambda: iter(batches), vocab_size=VOCAB_SIZE, min_frequency=1, lowercase=True)
    assert from_list.backend_tokenizer.to_str() == from_factory.backend_tokenizer.to_str()
    assert len(from_list) == VOCAB_SIZE


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
    assert set(ds.column_names) == {"labels", "input_ids", "attention_mask", "document", "window"}
    assert ds["document"] == list(range(len(labels) + 1)) and set(ds["window"]) == {0}  # one window each
    lengths = [len(ids) for ids in ds["input_ids"]]
    assert max(lengths) == max_length  # long documents were cut
    assert lengths[-1] < max_length and len(set(lengths)) > 1  # short ones were not padded
    assert all(tokenizer.pad_token_id not in ids for ids in ds["input_ids"])
    assert all(ids[-1] == tokenizer.sep_token_id for ids in ds["input_ids"])  # truncation keeps [SEP]
    assert ds["labels"] == labels + [0]


def test_classification_truncation_matches_the_tokenizers_own(
    texts: list[str], tokenizer: PreTrainedTokenizerFast
) -> None:
    """Truncation is done on the ids of whole documents; it must equal tokenizer(..., truncation=True)."""
    long_texts = texts + [" ".join(texts[:5]), "Short."]
    for max_length in (3, 8, 20, 512):
        ds = tokenize_for_classification(tokenizer, long_texts, [0] * len(long_texts), max_length)
        expected = tokenizer(long_texts, truncation=True, max_length=max_length)
        assert ds["input_ids"] == expected["input_ids"]
        assert ds["attention_mask"] == expected["attention_mask"]
    assert ds.features["input_ids"].feature.dtype == "int32"  # the types datasets gives tokenizer output
    assert ds.features["attention_mask"].feature.dtype == "int8"


def test_windows_cover_each_document_in_order(tokenizer: PreTrainedTokenizerFast) -> None:
    """Every id of a document lands in exactly one window, in order; window 0 is the plain truncation."""
    texts = [row["text"] for row in make_corpus(n_per_class=300)]  # 1500 documents: two map batches
    texts[1200] = " ".join(texts[:40])  # a long one in the second batch
    labels = [i % 5 for i in range(len(texts))]
    max_length = 12
    ds = tokenize_for_classification(tokenizer, texts, labels, max_length, max_windows=None)
    whole = tokenizer(texts)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert ds["document"] == sorted(ds["document"]) and set(ds["document"]) == set(range(len(texts)))
    rows: dict[int, list[dict]] = {}
    for row in ds:
        rows.setdefault(row["document"], []).append(row)
    assert len(rows[1200]) > 40  # the long document in the second batch is indexed globally
    for doc, windows in rows.items():
        assert [w["window"] for w in windows] == list(range(len(windows)))
        assert all(w["labels"] == labels[doc] for w in windows)
        assert all(w["input_ids"][0] == cls and w["input_ids"][-1] == sep for w in windows)
        assert all(len(w["input_ids"]) <= max_length for w in windows)
        assert [t for w in windows for t in w["input_ids"][1:-1]] == whole[doc][1:-1]
    truncated = tokenize_for_classification(tokenizer, texts, labels, max_length)
    assert truncated["input_ids"] == [rows[d][0]["input_ids"] for d in range(len(texts))]
    capped = tokenize_for_classification(tokenizer, texts, labels, max_length, max_windows=3)
    assert capped["input_ids"] == [w["input_ids"] for d in range(len(texts)) for w in rows[d][:3]]


def test_max_windows_below_one_is_one_line(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(UserError, match="tokenize.max_windows=0 must be at least 1"):
        tokenize_for_classification(tokenizer, ["a text"], [0], 12, max_windows=0)
    with pytest.raises(UserError, match="tokenize.max_length=2 leaves no room beside 2 special tokens"):
        tokenize_for_classification(tokenizer, ["a text"], [0], 2)


def test_num_proc_does_not_change_the_output(tokenizer: PreTrainedTokenizerFast) -> None:
    texts = [row["text"] for row in make_corpus(n_per_class=500)]  # 2500 documents: shards not on batch edges
    labels = [i % 5 for i in range(len(texts))]
    for num_proc in (2, 3):
        assert pack_blocks(tokenizer, texts, 16, num_proc).to_dict() == pack_blocks(tokenizer, texts, 16).to_dict()
        parallel = tokenize_for_classification(tokenizer, texts, labels, 12, num_proc)
        assert parallel.to_dict() == tokenize_for_classification(tokenizer, texts, labels, 12).to_dict()


def test_a_prepared_corpus_streams_through_memory_mapped_files(tmp_path: Path, texts: list[str]) -> None:
    """Parquet in, Arrow files out: the text is read batch by batch and tokenized to files in the scratch folder."""
    pd.DataFrame({"text": texts * 30}).to_parquet(tmp_path / "unlabeled.parquet")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ds = parquet_as_dataset(tmp_path / "unlabeled.parquet", scratch)
    assert ds.column_names == ["text"] and len(ds) == len(texts) * 30
    assert ds.cache_files and all(Path(f["filename"]).parent == scratch for f in ds.cache_files)
    batches = list(text_batches([ds], batch_size=1000))
    assert [len(b) for b in batches] == [1000] * (len(ds) // 1000) + ([len(ds) % 1000] if len(ds) % 1000 else [])
    # Trained from batches of the Arrow file: the very tokenizer a list of the same texts gives.
    tokenizer = train_wordpiece(lambda: text_batches([ds]), vocab_size=VOCAB_SIZE, min_frequency=1, lowercase=True)
    from_list = train_wordpiece(texts * 30, vocab_size=VOCAB_SIZE, min_frequency=1, lowercase=True)
    assert tokenizer.backend_tokenizer.to_str() == from_list.backend_tokenizer.to_str()
    assert 50 < len(tokenizer) <= VOCAB_SIZE
    assert tokenizer.unk_token_id not in tokenizer("Bank shares rose in the market")["input_ids"]
    blocks = pack_blocks(tokenizer, ds, 16)
    assert blocks.cache_files and all(Path(f["filename"]).parent == scratch for f in blocks.cache_files)
    assert blocks["input_ids"] == pack_blocks(tokenizer, texts * 30, 16)["input_ids"]


def test_tokenize_stage_with_unlabeled_text_and_num_proc(tmp_path: Path, tiny_csv: Path) -> None:
    """The stage reads the prepared Parquet files as Arrow; num_proc 2 writes what in-process tokenizing writes."""
    extra = tmp_path / "extra.txt"
    extra.write_text("\n".join(row["text"] + " extra" for row in make_corpus(n_per_class=40, seed=1)), "utf-8")
    params = tiny_params(tmp_path, prepare={"source": str(tiny_csv), "unlabeled_source": str(extra)})
    prepare.main(["--params", str(params), "--out", f"{tmp_path}/p", "--stats", f"{tmp_path}/s.json"])
    first = tokenize.main(["--params", str(params), "--data", f"{tmp_path}/p", "--tokenizer", f"{tmp_path}/tok",
                           "--blocks", f"{tmp_path}/b", "--out", f"{tmp_path}/t"])  # fmt: skip
    outputs = {}
    for num_proc in (None, 2):  # the tiny corpus's ties change which tokens the trainer learns: reuse its tokenizer
        p = tiny_params(tmp_path, prepare={"source": str(tiny_csv), "unlabeled_source": str(extra)},
                        tokenize={"num_proc": num_proc}, model={"checkpoint": f"{tmp_path}/tok"})  # fmt: skip
        summary = tokenize.main(["--params", str(p), "--data", f"{tmp_path}/p", "--tokenizer", f"{tmp_path}/tok2",
                                 "--blocks", f"{tmp_path}/b{num_proc}",
                                 "--out", f"{tmp_path}/t{num_proc}"])  # fmt: skip
        assert summary == first
        outputs[num_proc] = {
            **datasets.load_from_disk(f"{tmp_path}/b{num_proc}"),
            **datasets.load_from_disk(f"{tmp_path}/t{num_proc}"),
        }
    # The same tokenizer writes the very same files (DVC sees no change), state.json's fingerprint included.
    for folder in ("b", "t"):
        files = sorted(p.relative_to(tmp_path / folder) for p in (tmp_path / folder).rglob("*") if p.is_file())
        assert files and all(
            (tmp_path / folder / f).read_bytes() == (tmp_path / f"{folder}None" / f).read_bytes() for f in files
        )
    reference = {**datasets.load_from_disk(f"{tmp_path}/b"), **datasets.load_from_disk(f"{tmp_path}/t")}
    assert set(reference) == {"mlm_train", "mlm_validation", "train", "validation", "test"}
    for split in reference:
        assert outputs[2][split].to_dict() == outputs[None][split].to_dict() == reference[split].to_dict()
    # The unlabeled documents (about 240 of 20 tokens each) are in the packed pretraining text.
    train_tokens = sum(len(ids) for ids in reference["train"]["input_ids"])
    assert first["pretraining_tokens"] > train_tokens + 200 * 16
    assert not list(tmp_path.glob(".t*.work"))  # the work folder is gone


@pytest.mark.slow
def test_a_classification_window_param_leaves_the_tokenizer_and_blocks_so_pretraining_does_not_rerun(
    tmp_path: Path,
) -> None:
    """`-S tokenize.max_windows=1` (or max_length) changes the classification inputs only: tokenize reruns and
    writes the very same tokenizer and blocks, byte for byte, so the real dvc skips pretraining."""
    import hashlib
    import subprocess
    import sys

    import yaml

    from tests.helpers import committed_tiny_repo

    root = tmp_path / "repo"
    root.mkdir()
    env = committed_tiny_repo(root)

    def dvc(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def digests() -> dict[str, str]:
        files = sorted(p for folder in ("models/tokenizer", "data/blocks") for p in (root / folder).rglob("*"))
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}

    dvc("repro", "pretrain")
    before = digests()
    for key, value in (("max_windows", 1), ("max_length", 24)):
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["tokenize"][key] = value
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        ran = dvc("repro", "pretrain")
        assert "Running stage 'tokenize'" in ran, key  # the new tokenize process trains its tokenizer again
        assert "Running stage 'pretrain'" not in ran and "Stage 'pretrain' didn't change" in ran, key
        assert digests() == before, key
