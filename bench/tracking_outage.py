"""What a tracking server that goes away costs a training run: the default finetune stage at --labels-per-class
against a real `mlflow server` on 127.0.0.1, with the server killed --kill-after seconds into training and left
down, and (with --reference) once more with the server up throughout. Prints each run's wall time, exit code and
last line, and for the outage the stall: the seconds between the last progress-bar redraw before the stage's
`warning:` line and that line (training holds still while the failed send waits; the bar redraws every second
otherwise), and the seconds from the kill to the warning (rows are sent at the next checkpoint).

It reads the data/tokenized and models/pretrained of the checkout --root (default this one; `dvc repro tokenize
pretrain` first), with its params.yaml and --set overrides; --stage pretrain trains the encoder instead (from
data/blocks and models/tokenizer). The server's store and the checkpoints live in a temporary folder.

Run: python -m bench.tracking_outage [--labels-per-class 5] [--kill-after 20] [--reference]
     python -m bench.tracking_outage --root <a tiny-profile checkout> --stage pretrain --set pretrain.max_steps=4000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from bench.common import REPO, assignments, machine, write_params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(d: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
               "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("mlflow server did not start") from None
            time.sleep(0.5)


def kill(proc: subprocess.Popen) -> None:
    """The server and the workers it started (its own process group), at once."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run(d: Path, label: str, args: argparse.Namespace, kill_after: float | None) -> dict:
    port = free_port()
    server = start_server(d / label, port)
    overrides = {"finetune.labels_per_class": args.labels_per_class, **assignments(args.set)}
    write_params(d / label / "params.yaml", yaml.safe_load((args.root / "params.yaml").read_text()), overrides)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
           "TRANSFERPIPE_CHECKPOINT_DIR": str(d / label / "checkpoints")}  # fmt: skip
    out, root = d / label, args.root
    common = ["--params", str(out / "params.yaml"), "--metrics", f"{out}/metrics.json", "--plots", f"{out}/plots"]
    if args.stage == "finetune":
        command = ["--data", f"{root}/data/tokenized", "--encoder", f"{root}/models/pretrained", "--variant",
                   "pretrained", "--out", f"{out}/model"]  # fmt: skip
    else:
        command = ["--data", f"{root}/data/blocks", "--tokenizer", f"{root}/models/tokenizer", "--out",
                   f"{out}/model", "--scratch", f"{out}/scratch"]  # fmt: skip
    command = [sys.executable, "-m", f"stages.{args.stage}", *common, *command]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    seen: dict[str, float] = {}
    lines: list[str] = []

    def read() -> None:
        line = ""
        for char in iter(lambda: proc.stderr.read(1), ""):
            line += char
            if char in "\r\n":
                if "step/s" in line or "s/step" in line:
                    seen.setdefault("training", time.perf_counter())
                    if "warning" not in seen:
                        seen["redraw"] = time.perf_counter()
                if line.startswith("warning:") and "warning" not in seen:
                    seen["warning"] = time.perf_counter()
                    seen["stall"] = seen["warning"] - seen.get("redraw", seen["warning"])
                if line.strip():
                    lines.append(line.strip())
                line = ""

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = None
    if kill_after is not None:
        while "training" not in seen and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(kill_after)
        kill(server)
        killed = time.perf_counter()
    proc.wait()
    reader.join(timeout=10)
    wall = time.perf_counter() - start
    if kill_after is None:
        kill(server)
    to_warning = seen["warning"] - killed if killed is not None and "warning" in seen else None
    last = next((x for x in reversed(lines) if x.startswith(("error:", f"{args.stage}:", "warning:"))), "")
    return {"label": label, "wall": wall, "exit": proc.returncode, "stall": seen.get("stall"),
            "to_warning": to_warning, "last": last}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels-per-class", type=int, default=5)
    parser.add_argument("--kill-after", type=float, default=20.0, help="seconds of training before the kill")
    parser.add_argument("--reference", action="store_true", help="also a run with the server up throughout")
    parser.add_argument("--root", type=Path, default=REPO, help="the checkout whose params and outputs to use")
    parser.add_argument("--stage", choices=["finetune", "pretrain"], default="finetune")
    parser.add_argument("--set", action="append", default=[], help="section.key=value over its params.yaml")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for label in ("reference", "outage"):
            (d / label).mkdir()
        runs = [run(d, "outage", args, args.kill_after)]
        if args.reference:
            runs.append(run(d, "reference", args, None))
    print(machine())
    for r in runs:
        if r["stall"] is not None:
            print(f"{r['label']}: training held {r['stall']:.1f} s, warned {r['to_warning']:.1f} s after the kill")
        print(f"{r['label']}: {r['wall']:.1f} s, exit {r['exit']}; last line: {r['last'][:300]}")
    if len(runs) == 2:
        print(f"outage / reference wall time: {runs[0]['wall'] / runs[1]['wall']:.2f}")


if __name__ == "__main__":
    main()
