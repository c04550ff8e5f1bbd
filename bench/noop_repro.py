"""Wall time of `dvc repro` when nothing changed (the pipeline must already be reproduced).

Run: python -m bench.noop_repro [--repeat 5]. Target: under 3 seconds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import REPO, machine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=REPO, capture_output=True, text=True)
    if status.returncode != 0 or status.stdout.strip() not in ("{}", ""):
        sys.exit(f"the pipeline is not up to date (dvc status: {status.stdout.strip()[:300]}); run dvc repro first")
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=REPO, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if out.returncode != 0 or "Running stage" in out.stdout:
            sys.exit(f"dvc repro was not a no-op; run it once first:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    times.sort()
    print(f"machine: {machine()}")
    print(
        f"no-op dvc repro: median {times[len(times) // 2]:.2f} s, best {times[0]:.2f} s over {args.repeat} runs "
        f"(target < 3 s: {'met' if times[len(times) // 2] < 3 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
