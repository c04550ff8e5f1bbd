"""What a preemption costs: the seconds from SIGTERM to the exit of the default finetune stage, which finishes
the step under way, writes a checkpoint of it and stops (transferpipe.training), and the step a rerun resumes
from.

It runs the finetune stage of params.yaml on this checkout's data/tokenized and models/pretrained (`dvc repro
tokenize pretrain` first), with its checkpoints and MLflow store in a temporary folder, signals it --after
seconds into training (the first training row), and prints the stage's last line and the time to exit.

Run: python -m bench.preemption [--after 30] [--signal SIGTERM]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, machine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=float, default=30.0, help="seconds of training before the signal")
    parser.add_argument("--signal", default="SIGTERM", choices=["SIGTERM", "SIGUSR1", "SIGHUP"])
    args = parser.parse_args(argv)
    signum = signal.Signals[args.signal]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{d}/mlflow.db", "TRANSFERPIPE_CHECKPOINT_DIR": str(d)}
        command = [sys.executable, "-m", "stages.finetune", "--params", "params.yaml", "--data", "data/tokenized",
                   "--encoder", "models/pretrained", "--variant", "pretrained", "--out", f"{d}/model",
                   "--metrics", f"{d}/metrics.json", "--plots", f"{d}/plots"]  # fmt: skip
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, bufsize=1)  # fmt: skip
        lines = []
        for chunk in iter(lambda: proc.stderr.read(1), ""):  # tqdm redraws with \r: wait for the first step
            lines.append(chunk)
            if "step/s" in "".join(lines[-200:]) or "s/step" in "".join(lines[-200:]):
                break
        time.sleep(args.after)
        proc.send_signal(signum)
        signalled = time.perf_counter()
        err = proc.stderr.read()
        proc.wait()
        seconds = time.perf_counter() - signalled
    print(machine())
    print(f"exit {proc.returncode} (128 + {int(signum)} expected) {seconds:.1f} s after {args.signal}")
    print("last line:", err.strip().splitlines()[-1] if err.strip() else "(none)")


if __name__ == "__main__":
    main()
