"""Pretraining objectives at equal CPU time: seconds per optimizer step of masked LM and ELECTRA, side by side.

Both train the configured encoder (params.yaml's model and pretrain sections) on the pipeline's packed blocks
(run `dvc repro tokenize` first) with the stage's own objective modules, optimizer groups and precision.
Prints each objective's steady-state seconds per step, their ratio, and the ELECTRA `pretrain.max_steps`
that costs what pretrain.max_steps of MLM costs: the equal-time budget of the comparison in
docs/pretraining.md.

Run: python -m bench.pretrain_objectives [--steps 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import datasets
import torch

from bench.common import REPO, load, machine
from transferpipe.modeling import pretraining_model
from transferpipe.pretraining import objective, optimizer_groups
from transferpipe.tokenization import load_tokenizer
from transferpipe.training import make_optimizer, use_bf16


def seconds_per_step(name: str, blocks: torch.Tensor, params: dict, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    tokenizer = load_tokenizer(REPO / "models/tokenizer")
    model = pretraining_model(params["model"], tokenizer)
    pretrain = dataclasses.replace(params["pretrain"], objective=name)
    lm = objective(model, tokenizer, pretrain).train()
    device = torch.device("cpu")
    optimizer = make_optimizer(optimizer_groups(lm, model, pretrain), pretrain.learning_rate, 0.98, device)
    bf16 = use_bf16(pretrain.precision, device)
    batch_size = pretrain.batch_size
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        first = (step * batch_size) % (len(blocks) - batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = lm(blocks[first : first + batch_size]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    params = load()
    blocks = datasets.load_from_disk(str(REPO / "data/blocks"))["mlm_train"].with_format("torch")["input_ids"]
    print(machine())
    mlm = seconds_per_step("mlm", blocks, params, args.steps, args.warmup)
    electra = seconds_per_step("electra", blocks, params, args.steps, args.warmup)
    budget = params["pretrain"].max_steps
    print(f"{'objective':<10} {'s/step':>8} {'ratio':>6}")
    print(f"{'mlm':<10} {mlm:8.3f} {1.0:6.2f}")
    print(f"{'electra':<10} {electra:8.3f} {electra / mlm:6.2f}")
    print(f"equal time: pretrain.max_steps {budget} of mlm = {round(budget * mlm / electra)} of electra")


if __name__ == "__main__":
    main()
