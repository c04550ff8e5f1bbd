"""Tokenizer training: one vocabulary from one text, and what the determinism costs.

Prepares the default data, then trains the WordPiece tokenizer on its pretraining text (the train split) in N
separate processes (each with its own hash seeds), both as tokenize does (transferpipe.tokenization
.train_wordpiece: a first pass for the characters, then the trainer with its ids fixed) and with the bare
`tokenizers` trainer (one pass, what tokenize did before). Prints how many distinct tokenizers each gave, the
training times, and the tokenize stage's time on the default data with the share the extra pass adds.
Run: python -m bench.tokenizer_determinism [--runs 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

from bench.common import REPO, machine

CHILD = """
import hashlib, sys, time
import pandas as pd
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transferpipe.tokenization import SPECIAL_TOKENS, renumbered, train_wordpiece
texts = pd.read_parquet(sys.argv[1])["text"].tolist()
batches = [texts[i : i + 1000] for i in range(0, len(texts), 1000)]
vocab_size, min_frequency = int(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
ours = train_wordpiece(batches, vocab_size, min_frequency, True).backend_tokenizer.to_str()
ours_seconds = time.perf_counter() - start
start = time.perf_counter()
bare = Tokenizer(models.WordPiece(unk_token="[UNK]"))
bare.normalizer = normalizers.BertNormalizer(lowercase=True)
bare.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                    special_tokens=SPECIAL_TOKENS, show_progress=False)
bare.train_from_iterator(batches, trainer)
bare_seconds = time.perf_counter() - start
digest = lambda text: hashlib.sha256(text.encode()).hexdigest()[:12]
print(digest(ours), ours_seconds, digest(str(sorted(renumbered(bare.get_vocab()).items()))), bare_seconds)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args(argv)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    tok = params["tokenize"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    print(f"machine: {machine()}; vocab_size {tok['vocab_size']}, min_frequency {tok['min_frequency']}")
    with tempfile.TemporaryDirectory(prefix="tokenizer-determinism-") as tmp:
        params["prepare"]["source"] = str(REPO / params["prepare"]["source"])
        params["prepare"]["unlabeled_source"] = str(REPO / params["prepare"]["unlabeled_source"])
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params))
        run = [sys.executable, "-m", "stages.prepare", "--params", f"{tmp}/params.yaml", "--out",
               f"{tmp}/prepared", "--stats", f"{tmp}/data.json"]  # fmt: skip
        subprocess.run(run, env=env, check=True, capture_output=True, cwd=tmp)
        ours, bare, ours_s, bare_s = Counter(), Counter(), [], []
        for i in range(args.runs):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, f"{tmp}/prepared/train.parquet", str(tok["vocab_size"]),
                 str(tok["min_frequency"])],
                env={**env, "PYTHONHASHSEED": str(i)}, check=True, capture_output=True, text=True,
            ).stdout.split()  # fmt: skip
            ours[out[0]] += 1
            bare[out[2]] += 1
            ours_s.append(float(out[1]))
            bare_s.append(float(out[3]))
        stage = [sys.executable, "-m", "stages.tokenize", "--params", f"{tmp}/params.yaml", "--data",
                 f"{tmp}/prepared", "--tokenizer", f"{tmp}/tokenizer", "--blocks", f"{tmp}/blocks",
                 "--out", f"{tmp}/tokenized"]  # fmt: skip
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(stage, env=env, check=True, capture_output=True, cwd=tmp)
            seconds.append(time.perf_counter() - start)
    print(f"  ours (train_wordpiece):     {len(ours)} distinct tokenizer(s) in {args.runs} processes {dict(ours)}")
    print(f"  the bare trainer (before):  {len(bare)} distinct vocabularies in {args.runs} processes {dict(bare)}")
    median_ours, median_bare = statistics.median(ours_s), statistics.median(bare_s)
    print(f"  training time, median: ours {median_ours:.2f} s, bare trainer {median_bare:.2f} s "
          f"({median_ours / median_bare:.2f}x)")  # fmt: skip
    stage_s = statistics.median(seconds)
    before = stage_s - (median_ours - median_bare)
    print(f"  tokenize stage on the default data, median of 3: {stage_s:.1f} s; without the extra pass "
          f"{before:.1f} s: {stage_s / before:.2f}x (target: at most 1.10x)")  # fmt: skip


if __name__ == "__main__":
    main()
