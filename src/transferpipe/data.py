"""Cleaning, labels, de-duplication and the stratified split: a source becomes the prepared splits.

Texts are Unicode-NFC with collapsed whitespace, the form duplicates are compared in. Labels are what the
user meant: stripped, NFC, numbers by value (`1`, `1.0` and ` 1` are one class), and the missing-value
spellings (empty, NA, NaN, null, None, real nulls) mean "unlabeled": such rows never become a class and join
the pretraining text when prepare.pretrain_on_unlabeled_rows is true. A text that occurs with different
labels keeps its majority label; a tie drops it. Exact duplicates go before splitting, so no article sits
in both train and test. Unlabeled text streams through in batches with a hash-based de-duplication, so an
unlabeled corpus larger than memory passes through in bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from transferpipe.errors import UserError
from transferpipe.params import NUMBER, PrepareParams
from transferpipe.sources import batched, describe, is_missing, iter_unlabeled, lineage, read_labeled

SPLITS = ("train", "validation", "test")
MISSING_LABELS = {"", "na", "n/a", "nan", "null", "none"}  # compared case-insensitively


@dataclass(frozen=True)
class PreparedData:
    splits: dict[str, pd.DataFrame]  # columns: text (str), label (int id into label_names)
    label_names: list[str]
    stats: dict  # document counts and source hashes: the DVC metrics of prepare
    class_counts: dict[str, dict[str, int]]  # split -> label name -> examples


def normalize_text(text: str) -> str:
    """Unicode NFC and collapsed whitespace: the form duplicates are compared in."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def normalize_label(value: Any) -> str | None:
    """A label as the user meant it, or None for a missing one: see the module docstring."""
    if is_missing(value):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float | np.integer | np.floating):
        raise UserError(f"labels must be strings or numbers, found {describe(value)} ({str(value)[:40]})")
    text = normalize_text(str(value))
    if text.lower() in MISSING_LABELS:
        return None
    if NUMBER.match(text):
        try:
            number = Decimal(text)
        except InvalidOperation:
            return text
        # 1, 1.0, 1e0 and +1 are one value; normalize() writes 10 as 1E+1, so integers go through int.
        return str(int(number)) if number == number.to_integral_value() else format(number.normalize(), "f")
    return text


def clean(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str], dict[str, int]]:
    """Normalize texts and labels; drop empty texts and exact duplicates; resolve conflicting labels.

    Returns the labeled rows (text, label: str), the texts of the unlabeled rows (not among the labeled
    texts, de-duplicated), and the counts that say what happened to every row."""
    texts = ["" if is_missing(t) else normalize_text(t) for t in df["text"].tolist()]
    labels = [normalize_label(v) for v in df["label"].tolist()] if "label" in df else [None] * len(texts)
    votes: dict[str, Counter] = {}
    unlabeled: dict[str, None] = {}  # insertion-ordered set
    empty = 0
    for text, label in zip(texts, labels, strict=True):
        if not text:
            empty += 1
        elif label is None:
            unlabeled.setdefault(text)
        else:
            votes.setdefault(text, Counter())[label] += 1
    rows, conflicting, dropped = [], 0, 0
    for text, counter in votes.items():
        ranked = counter.most_common()
        if len(ranked) > 1:
            conflicting += 1
            if ranked[0][1] == ranked[1][1]:  # a tie: no label is the majority's
                dropped += 1
                continue
        rows.append((text, ranked[0][0]))
    kept = pd.DataFrame(rows, columns=["text", "label"])
    n_labeled = sum(sum(c.values()) for c in votes.values())
    counts = {
        "raw": len(texts),
        "empty_removed": empty,
        "unlabeled_rows": len(texts) - empty - n_labeled,
        "duplicates_removed": n_labeled - len(votes),
        "conflicting_labels": conflicting,
        "conflicts_dropped": dropped,
    }
    return kept, [t for t in unlabeled if t not in votes], counts


def split(df: pd.DataFrame, validation_size: float, test_size: float, seed: int) -> dict[str, pd.DataFrame]:
    """Stratified, seeded train / validation / test split."""
    for name, size in (("validation_size", validation_size), ("test_size", test_size)):
        if not 0 < size < 1:
            raise UserError(f"params prepare.{name}: {size} must be between 0 and 1")
    if validation_size + test_size >= 1:
        raise UserError("params prepare.validation_size + test_size must leave some data for training")
    counts = df["label"].value_counts()
    # Each split needs every class at least once; with the two cuts below that takes about 1/min(size).
    needed = max(3, int(1 / min(validation_size, test_size)) + 1)
    small = counts[counts < needed]
    if len(small):
        label, n = small.index[0], int(small.iloc[0])
        raise UserError(
            f"class {label!r} has only {n} examples after cleaning; a stratified split needs at least "
            f"{needed}: add examples, drop the class, or raise validation_size/test_size"
        )
    rest, test = train_test_split(df, test_size=test_size, stratify=df["label"], random_state=seed)
    train, validation = train_test_split(
        rest, test_size=validation_size / (1 - test_size), stratify=rest["label"], random_state=seed
    )
    return {
        "train": train.reset_index(drop=True),
        "validation": validation.reset_index(drop=True),
        "test": test.reset_index(drop=True),
    }


def prepare(params: PrepareParams, out_dir: Path) -> PreparedData:
    """Read, clean and split the source into out_dir (filled by the caller's atomic_dir), with the unlabeled
    text streamed into out_dir/unlabeled.parquet."""
    raw = read_labeled(params.source, params.text_column, params.label_column, params.hf_split)
    df, unlabeled_rows, counts = clean(raw)
    if df.empty:
        raise UserError(f"{params.source} has no non-empty texts with labels after cleaning")
    if df["label"].nunique() < 2:
        raise UserError(f"{params.source} has a single label {df['label'].iloc[0]!r}; a classifier needs two")
    _warn_about_case(df["label"])
    parts = split(df, params.validation_size, params.test_size, params.seed)
    label_names = sorted(df["label"].unique())
    label_ids = {name: i for i, name in enumerate(label_names)}
    splits = {k: v.assign(label=v["label"].map(label_ids).astype("int64")) for k, v in parts.items()}

    # Pretraining text never holds a labeled text again (train's are pretraining text already; validation's
    # and test's must not leak), nor any text twice.
    seen = HashSet()
    seen.add(df["text"])
    batches: list[Iterable[list[str | None]]] = []
    if params.pretrain_on_unlabeled_rows:
        batches.append(batched(unlabeled_rows))
    batches.append(iter_unlabeled(params.unlabeled_source, params.text_column, params.hf_split))
    n_unlabeled = write_texts(out_dir / "unlabeled.parquet", (b for it in batches for b in it), seen)

    for name, frame in splits.items():
        frame.to_parquet(out_dir / f"{name}.parquet", index=False)
    class_counts = {k: {name: int(n) for name, n in sorted(Counter(v["label"]).items())} for k, v in parts.items()}
    sources = {"source": lineage(params.source), "unlabeled_source": lineage(params.unlabeled_source)}
    stats = {
        "documents": {**counts, "kept": len(df), "unlabeled": n_unlabeled},
        "split": {k: len(v) for k, v in parts.items()},
        "sources": sources,
    }
    for name, value in (("labels", label_names), ("class_counts", class_counts), ("sources", sources)):
        (out_dir / f"{name}.json").write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    return PreparedData(splits=splits, label_names=label_names, stats=stats, class_counts=class_counts)


def _warn_about_case(labels: pd.Series) -> None:
    groups: dict[str, list[str]] = {}
    for name in sorted(labels.unique()):
        groups.setdefault(name.casefold(), []).append(name)
    alike = [" and ".join(map(repr, names)) for names in groups.values() if len(names) > 1]
    if alike:
        print(
            f"warning: labels that differ only in case are separate classes: {'; '.join(alike)} "
            "(make them one in the data if they mean the same)",
            file=sys.stderr,
        )


class HashSet:
    """The 64-bit BLAKE2 digests of texts in a few sorted arrays: 8 bytes a text, so de-duplicating millions
    of documents takes megabytes (two different texts collide with odds of about n^2 / 2^65). A new batch's
    array merges with the last one while that is not twice its size, so every digest is merged about
    log2(n / batch) times and a lookup searches that many arrays."""

    def __init__(self) -> None:
        self.levels: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(level) for level in self.levels)

    def add(self, texts: Iterable[str]) -> np.ndarray:
        """Add texts; return the mask of those not seen before (the first copy within `texts` counts as new)."""
        digests = np.fromiter(
            (int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts),
            dtype=np.uint64,
        )
        _, first = np.unique(digests, return_index=True)
        new = np.zeros(len(digests), dtype=bool)
        new[first] = True
        for level in self.levels:
            position = np.minimum(np.searchsorted(level, digests), len(level) - 1)
            new &= level[position] != digests
        if new.any():
            self.levels.append(np.sort(digests[new]))
        while len(self.levels) > 1 and len(self.levels[-2]) <= 2 * len(self.levels[-1]):
            last = self.levels.pop()
            self.levels[-1] = np.sort(np.concatenate([self.levels[-1], last]), kind="stable")
        return new


def write_texts(path: Path, batches: Iterable[list[str | None]], seen: HashSet) -> int:
    """Normalize each batch, drop empty and already seen texts, append the rest to a Parquet file (column
    text); returns how many were written. Memory holds one batch and the digests, never the file."""
    schema = pa.schema([("text", pa.string())])
    written = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in batches:
            texts = [t for t in (normalize_text(v) for v in batch if v) if t]
            if not texts:
                continue
            keep = [t for t, new in zip(texts, seen.add(texts), strict=True) if new]
            if keep:
                writer.write_table(pa.table({"text": keep}, schema=schema))
                written += len(keep)
    return written


def read_prepared(folder: Path) -> tuple[dict[str, pd.DataFrame], list[str], list[str]]:
    folder = Path(folder)
    if not (folder / "labels.json").is_file():
        raise UserError(f"{folder} holds no prepared data; run the prepare stage first (dvc repro prepare)")
    splits = {name: pd.read_parquet(folder / f"{name}.parquet") for name in SPLITS}
    unlabeled = pd.read_parquet(folder / "unlabeled.parquet")["text"].tolist()
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    return splits, labels, unlabeled


def parquet_as_dataset(path: Path, work_dir: Path) -> datasets.Dataset:
    """A Parquet file as a memory-mapped Arrow dataset: copied into an Arrow file in `work_dir` one record batch
    at a time, so a file larger than memory never has to fit in it."""
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow.remove_metadata()  # pandas' index metadata means nothing here
    arrow_path = Path(work_dir) / f"{Path(path).stem}.arrow"
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in parquet.iter_batches(batch_size=10_000):
            writer.write_batch(batch.replace_schema_metadata(None))
    return datasets.Dataset.from_file(str(arrow_path))


def open_prepared(folder: Path, work_dir: Path) -> tuple[dict[str, datasets.Dataset], list[str], datasets.Dataset]:
    """read_prepared for corpora larger than memory: the splits and the unlabeled text as memory-mapped
    datasets (columns text, label / text) whose Arrow files live in `work_dir`."""
    folder = Path(folder)
    if not (folder / "labels.json").is_file():
        raise UserError(f"{folder} holds no prepared data; run the prepare stage first (dvc repro prepare)")
    splits = {name: parquet_as_dataset(folder / f"{name}.parquet", work_dir) for name in SPLITS}
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    return splits, labels, parquet_as_dataset(folder / "unlabeled.parquet", work_dir)


def per_class_indices(
    labels: Sequence[int], labels_per_class: int | str, seed: int, names: Sequence[str] | None = None
) -> list[int]:
    """Sorted indices of labels_per_class examples of each class, drawn with a seeded generator ("all": every
    index). The fine-tuned models and the evaluate stage's baseline draw the same ones. Every class must have
    that many: fewer would quietly make the subsample imbalanced. `names` (label id -> name) name the class
    that has too few."""
    if labels_per_class == "all":
        return list(range(len(labels)))
    if labels_per_class < 1:
        raise UserError(f"params finetune.labels_per_class={labels_per_class} must be at least 1 or 'all'")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) and labels_per_class > counts.min():
        smallest = classes[counts.argmin()]
        smallest = repr(names[smallest]) if names is not None else smallest
        raise UserError(
            f"params finetune.labels_per_class: {labels_per_class} is more than the smallest class of the training "
            f"split has (class {smallest}: {counts.min()} examples); use at most {counts.min()} or 'all'"
        )
    rng = np.random.default_rng(seed)
    keep = [
        i for label in classes for i in rng.choice(np.flatnonzero(labels == label), labels_per_class, replace=False)
    ]
    return sorted(int(i) for i in keep)
