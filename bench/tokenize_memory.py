"""Tokenize-stage peak memory while the unlabeled corpus grows tenfold: it should stay flat.

Writes a prepared folder (the small labeled splits plus a synthetic unlabeled.parquet of SIZE MB of text) in
a temporary directory, runs the tokenize stage on it in a subprocess (tokenizer trained on the corpus, blocks
packed, everything written), and polls the stage's peak resident memory from /proc. The synthetic text
draws words from a fixed Zipf-distributed vocabulary, so the tokenizer's word counts stay the same size (real
corpora add words slowly as they grow). With num_proc > 1 the figure is the largest single process.
Run: python -m bench.tokenize_memory [--size-mb 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from bench.common import REPO, machine

WORDS_PER_DOCUMENT = 200


def write_prepared(folder: Path, size_mb: float, seed: int = 0) -> tuple[int, float]:
    """A prepared folder whose unlabeled.parquet holds about size_mb MB of text; returns (documents, MB)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = np.array(["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(20_000)])
    labels = ["business", "sport"]
    for split, n in (("train", 200), ("validation", 40), ("test", 40)):
        texts = [" ".join(rng.choice(vocab[:2000], WORDS_PER_DOCUMENT)) for _ in range(n)]
        pq.write_table(pa.table({"text": texts, "label": pa.array([i % 2 for i in range(n)], pa.int64())}),
                       folder / f"{split}.parquet")  # fmt: skip
    (folder / "labels.json").write_text(json.dumps(labels))
    documents, written = 0, 0
    with pq.ParquetWriter(folder / "unlabeled.parquet", pa.schema([("text", pa.string())])) as writer:
        while written < size_mb * 1e6:  # in chunks: this process stays small too
            ranks = np.minimum(rng.zipf(1.2, (500, WORDS_PER_DOCUMENT)), len(vocab)) - 1
            texts = [" ".join(row) for row in vocab[ranks]]
            writer.write_table(pa.table({"text": texts}))
            documents += len(texts)
            written += sum(map(len, texts))
    return documents, written / 1e6


def peak_memory_mb(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(peak RSS, peak anonymous RSS, seconds) of cmd and its worker processes, polled from /proc.

    RSS counts the pages of memory-mapped Arrow files the process has read, which the kernel drops under
    pressure like any file cache; anonymous RSS (heap, Python objects, Rust buffers) is what must fit in memory.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    peak_rss = peak_anon = 0.0
    while proc.poll() is None:
        rss = anon = 0.0
        for pid in [proc.pid, *_children(proc.pid)]:
            status = _status(pid)
            rss, anon = max(rss, status.get("VmHWM", 0.0)), max(anon, status.get("RssAnon", 0.0))
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"tokenize failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return peak_rss / 1024, peak_anon / 1024, time.perf_counter() - start


def _status(pid: int) -> dict[str, float]:
    """The kB figures of /proc/<pid>/status (empty once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: float(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if v.strip().endswith("kB")}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=10.0, help="text in the 1x corpus; the other is 10x")
    parser.add_argument("--num-proc", type=int, default=None, help="tokenize.num_proc (default: params.yaml's)")
    args = parser.parse_args(argv)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if args.num_proc is not None:
        params["tokenize"]["num_proc"] = args.num_proc
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    print(f"machine: {machine()}; tokenize.num_proc {params['tokenize']['num_proc']}")
    results = []
    with tempfile.TemporaryDirectory(prefix="tokenize-memory-") as tmp:
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params))
        for scale in (1, 10):
            d = Path(tmp) / f"x{scale}"
            start = time.perf_counter()
            documents, text_mb = write_prepared(d / "prepared", args.size_mb * scale)
            made = time.perf_counter() - start
            cmd = [sys.executable, "-m", "stages.tokenize", "--params", f"{tmp}/params.yaml", "--data",
                   f"{d}/prepared", "--tokenizer", f"{d}/tokenizer", "--blocks", f"{d}/blocks",
                   "--out", f"{d}/tokenized"]  # fmt: skip
            rss, anon, seconds = peak_memory_mb(cmd, env)
            size = sum(f.stat().st_size for part in ("blocks", "tokenized") for f in (d / part).rglob("*")) / 1e6
            print(
                f"  {scale:>2}x: {text_mb:6.0f} MB of text, {documents:,} documents (made in {made:.0f} s): "
                f"tokenize {seconds:.0f} s, peak RSS {rss:,.0f} MB (anonymous {anon:,.0f} MB), output {size:,.0f} MB"
            )
            results.append((rss, anon))
            shutil.rmtree(d)
    (rss1, anon1), (rss10, anon10) = results
    print(f"peak memory, 10x corpus / 1x corpus: RSS {rss10 / rss1:.2f}x, anonymous {anon10 / anon1:.2f}x (flat: 1x)")


if __name__ == "__main__":
    main()
