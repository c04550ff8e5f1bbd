"""What a checkpoint costs: the time to write one of the default and of the GPU-scale encoder (weights, AdamW
state, the rest of fit()'s state), as a share of the training time between two checkpoints.

The training time between checkpoints is pretrain.checkpoint_every steps at a measured step time: for the
default configuration the one given by --default-step-seconds (from this machine's metrics/pretrain.json:
tokens per step / tokens_per_second), for the GPU-scale one 0.0985 s a step (1,000 steps in 98.5 s on one
H200, reports/gpu_scale). Both writes happen on this machine's disk: on the GPU machine's disk the GPU-scale
share will differ. The stages also record their own total in metrics (train.checkpoint_seconds).

Run: python -m bench.checkpoint_cost [--default-step-seconds 0.33] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from bench.common import REPO, load, machine, timed
from bench.gpu_scale import GPU_SCALE
from transferpipe.checkpoint import Checkpoints
from transferpipe.modeling import pretraining_model
from transferpipe.params import ModelParams

GPU_STEP_SECONDS = 98.5 / 1000


class _Vocab:
    """All that building a new encoder reads of a tokenizer: its size and special token ids."""

    def __init__(self, size: int) -> None:
        self.size, self.pad_token_id, self.cls_token_id, self.sep_token_id = size, 0, 1, 2

    def __len__(self) -> int:
        return self.size


def state_of(model_params: ModelParams, vocab_size: int) -> dict:
    model = pretraining_model(model_params, _Vocab(vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's two moments per parameter now exist, as in a real checkpoint
    return {"finished": False, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "run_id": None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-step-seconds", type=float, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    params = load(REPO / "params.yaml")
    vocab = params["tokenize"].vocab_size
    sizes = {k.split(".")[1]: v for k, v in GPU_SCALE.items() if k.startswith("model.")}
    gpu_model = dataclasses.replace(params["model"], **sizes)
    cases = [
        ("default", params["model"], params["pretrain"].checkpoint_every, args.default_step_seconds),
        ("GPU scale", gpu_model, GPU_SCALE["pretrain.checkpoint_every"], GPU_STEP_SECONDS),
    ]
    print(f"machine: {machine()}")
    for name, model_params, every, step_seconds in cases:
        state = state_of(model_params, vocab)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints = Checkpoints(Path(tmp), every)
            seconds = timed(lambda state=state, checkpoints=checkpoints: checkpoints.save(state), args.repeat)
            size = (Path(tmp) / "checkpoint.pt").stat().st_size / 2**20
        between = every * step_seconds
        print(
            f"{name}: a checkpoint is {size:,.0f} MiB, written in {seconds:.2f} s; every {every} steps "
            f"({between:.0f} s of training) that is {seconds / (seconds + between):.1%} of the stage's time"
        )


if __name__ == "__main__":
    main()
