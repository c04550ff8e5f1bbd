"""Prepare-stage peak memory while the unlabeled corpus grows tenfold: it should stay flat.

Writes a synthetic unlabeled .txt corpus of SIZE MB (one document per line, every tenth line a repeat of an
earlier one, so de-duplication has work) and runs the prepare stage in a subprocess on the default labeled
source with that file as prepare.unlabeled_source, polling the stage's peak resident memory from /proc.
Then the same with ten times the text. The reference line is the text itself: what reading the file whole
(into pandas, as prepare did before it streamed) would need at the very least.
Run: python -m bench.prepare_memory [--size-mb 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.common import REPO, machine
from bench.tokenize_memory import peak_memory_mb
from transferpipe.io import read_json


def write_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """About size_mb MB of distinct documents (plus 10% repeats) in path; returns the number of lines."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(20_000)])
    lines = written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            docs = [" ".join(row) for row in vocab[rng.integers(0, len(vocab), (1000, 80))]]
            docs[::10] = docs[1::10][: len(docs[::10])]  # repeats within the chunk
            text = "\n".join(docs) + "\n"
            f.write(text)
            written += len(text)
            lines += len(docs)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="text in the 1x corpus; the other is 10x")
    args = parser.parse_args(argv)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["source"] = str(REPO / params["prepare"]["source"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    print(f"machine: {machine()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="prepare-memory-") as tmp:
        for scale in (1, 10):
            d = Path(tmp) / f"x{scale}"
            d.mkdir()
            start = time.perf_counter()
            lines = write_corpus(d / "unlabeled.txt", args.size_mb * scale)
            made = time.perf_counter() - start
            params["prepare"]["unlabeled_source"] = str(d / "unlabeled.txt")
            (d / "params.yaml").write_text(yaml.safe_dump(params))
            cmd = [sys.executable, "-m", "stages.prepare", "--params", str(d / "params.yaml"),
                   "--out", str(d / "prepared"), "--stats", str(d / "data.json")]  # fmt: skip
            rss, anon, seconds = peak_memory_mb(cmd, env)
            text_mb = (d / "unlabeled.txt").stat().st_size / 1e6
            kept = read_json(d / "data.json")["documents"]["unlabeled"]
            print(
                f"  {scale:>2}x: {text_mb:6,.0f} MB of text, {lines:,} lines (made in {made:.0f} s): prepare "
                f"{seconds:.0f} s, {kept:,} unlabeled documents kept, peak RSS {rss:,.0f} MB (anonymous {anon:,.0f} MB)"
            )
            results.append((rss, text_mb))
            shutil.rmtree(d)
    (rss1, text1), (rss10, text10) = results
    print(f"peak RSS, 10x corpus / 1x corpus: {rss10 / rss1:.2f}x (flat: 1x); the text grew {text10 / text1:.1f}x")
    print(f"reference, the text read whole: at least {text1:,.0f} MB and {text10:,.0f} MB")


if __name__ == "__main__":
    main()
