"""A fresh clone's `dvc repro`, per stage, for a reference and a candidate, side by side with their test macro-F1.

Each side is a new clone (no DVC cache, no run-cache: every stage runs, as for a new user) of a git revision, with
params set on top (`--set finetune.epochs=2`, the candidate's; `--reference-set`, the reference's). The clone runs
its own code (PYTHONPATH=<clone>/src), not this checkout's. The two runs go one after the other, never together:
on 2 cores a second job would double both times.

`--avx2-fp32` approximates a CPU without AVX512 (the fp32-only AMD EPYC the project has seen) on one that has it:
PyTorch, oneDNN and MKL held to AVX2 kernels and both training stages in fp32. On an AVX512 machine that is
still faster than the real one: scale by the calibration in docs/LOG.md (2026-12-07, night) before comparing
with a budget.

Run: python -m bench.fresh_repro --set finetune.epochs=2 [--avx2-fp32] [--reference REV] [--candidate REV]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import REPO, assignments, write_params
from transferpipe.rerun import cpu_name, repro_timed

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
FP32 = ["pretrain.precision=fp32", "finetune.precision=fp32"]
LIMIT_S = 3600  # one side's `dvc repro` at most


def fresh_run(rev: str, overrides: dict[str, object], env: dict[str, str], label: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"fresh-repro-{label}-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        subprocess.run(["git", "checkout", "--quiet", rev], cwd=clone, check=True)
        params = clone / "params.yaml"
        write_params(params, yaml.safe_load(params.read_text(encoding="utf-8")), overrides)
        print(f"== {label}: {rev} {' '.join(f'{k}={v}' for k, v in overrides.items())}", flush=True)
        run_env = {**os.environ, **env, "PYTHONPATH": str(clone / "src")}
        result = repro_timed(clone, LIMIT_S, env=run_env)
        if result["outcome"] != "rerun":
            sys.exit(f"{label}: dvc repro {result['outcome']}: {result.get('error', '')}")
        result["test"] = json.loads((clone / "metrics" / "evaluate.json").read_text())["test"]
        return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="HEAD", help="git revision of the reference (default HEAD)")
    parser.add_argument("--candidate", default="HEAD", help="git revision of the candidate (default HEAD)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a param of the candidate")
    parser.add_argument("--reference-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--avx2-fp32", action="store_true", help="approximate a CPU without AVX512 (both runs)")
    args = parser.parse_args(argv)
    env, extra = (AVX2, FP32) if args.avx2_fp32 else ({}, [])
    reference = fresh_run(args.reference, assignments(extra + args.reference_set), env, "reference")
    candidate = fresh_run(args.candidate, assignments(extra + args.set), env, "candidate")
    print(f"\nmachine: {cpu_name()}{' (held to AVX2, fp32)' if args.avx2_fp32 else ''}")
    print(
        f"reference: {args.reference} {' '.join(args.reference_set)}; candidate: {args.candidate} {' '.join(args.set)}"
    )
    print(f"{'stage':<22} {'reference s':>12} {'candidate s':>12} {'ratio':>7}")
    for stage in dict.fromkeys([*reference["stages"], *candidate["stages"]]):
        ref, cand = reference["stages"].get(stage), candidate["stages"].get(stage)
        ratio = f"{cand / ref:.2f}" if ref and cand else ""
        print(f"{stage:<22} {ref or '':>12} {cand or '':>12} {ratio:>7}")
    print(f"{'total (dvc repro)':<22} {reference['seconds']:>12} {candidate['seconds']:>12} "
          f"{candidate['seconds'] / reference['seconds']:>7.2f}")  # fmt: skip
    for model in dict.fromkeys([*reference["test"], *candidate["test"]]):
        ref, cand = (side["test"].get(model, {}).get("macro_f1") for side in (reference, candidate))
        print(f"test macro-F1 {model:<8} {ref if ref is None else round(ref, 4):>12} "
              f"{cand if cand is None else round(cand, 4):>12}")  # fmt: skip


if __name__ == "__main__":
    main()
