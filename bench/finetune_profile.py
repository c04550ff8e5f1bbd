"""Where the default fine-tuning's time goes on this CPU: seconds per optimizer step of the configured encoder
(params.yaml `model.checkpoint`, the stage's own train_step and precision) on the first windows of
data/tokenized, one validation pass, the projection of a whole `finetune` stage from them, the model FLOPs
against this CPU's measured matmul ceiling, and the operators that take the time (torch.profiler).

On a CPU without AVX512, or to see one from a machine with it, the kernels can be held to AVX2:
  ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
      python -m bench.finetune_profile --precision fp32
Run `dvc repro tokenize` first. Run: python -m bench.finetune_profile [--steps N] [--precision auto|bf16|fp32]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

import datasets
import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import REPO, machine
from transferpipe import flops
from transferpipe.finetuning import utilization
from transferpipe.inference import collator_for, first_windows, predict_logits
from transferpipe.io import read_json
from transferpipe.model_sources import resolve_checkpoint
from transferpipe.modeling import sequence_classifier
from transferpipe.params import FinetuneParams, ModelParams, TokenizeParams, load_section
from transferpipe.tokenization import load_tokenizer
from transferpipe.training import LossMeter, make_optimizer, train_step, use_bf16


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps timed (after 2 warm-up steps)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="default: finetune.precision")
    args = parser.parse_args(argv)
    ft = load_section(REPO / "params.yaml", "finetune", FinetuneParams)
    ft = dataclasses.replace(ft, precision=args.precision or ft.precision)  # the ceiling's precision too
    windows = load_section(REPO / "params.yaml", "tokenize", TokenizeParams)
    checkpoint = load_section(REPO / "params.yaml", "model", ModelParams).checkpoint
    device, bf16 = torch.device("cpu"), use_bf16(ft.precision, torch.device("cpu"))
    data = datasets.load_from_disk(str(REPO / "data/tokenized"))
    labels = read_json(REPO / "data/tokenized/labels.json")
    model = sequence_classifier(resolve_checkpoint(checkpoint) or REPO / "models/pretrained", labels, 0.1)
    collate = collator_for(load_tokenizer(REPO / "models/tokenizer"), device)
    train = first_windows(data["train"]).select_columns(["input_ids", "attention_mask", "labels"])
    optimizer = make_optimizer([{"params": list(model.parameters())}], 1e-5, 0.999, device)
    meter = LossMeter(device)
    batches = [collate([train[i] for i in range(k * ft.batch_size, (k + 1) * ft.batch_size)])
               for k in range(args.steps + 2)]  # fmt: skip
    model.train()
    for batch in batches[:2]:
        train_step(model, [batch], optimizer, meter, max_grad_norm=1.0, bf16=bf16)
    start = time.perf_counter()
    for batch in batches[2:]:
        train_step(model, [batch], optimizer, meter, max_grad_norm=1.0, bf16=bf16)
    step = (time.perf_counter() - start) / args.steps
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[2:]) / (step * args.steps)
    start = time.perf_counter()
    predict_logits(model, data["validation"], collate, ft.batch_size * 2, device)
    validation = time.perf_counter() - start
    steps = max(ft.epochs * math.ceil(len(train) / ft.batch_size), ft.min_steps)
    used = utilization(model, ft, windows.max_length, tokens, device)
    print(f"machine: {machine()}, {flops.cpu_name()}; {'bf16 autocast' if bf16 else 'fp32'}; "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}")  # fmt: skip
    print(
        f"  {checkpoint}: {step:.2f} s per step of {ft.batch_size} first windows ({tokens:,.0f} tokens/s); "
        f"one validation pass over {len(data['validation'])} windows {validation:.1f} s"
    )
    print(
        f"  a finetune stage of {steps} steps and {ft.epochs} validations: about "
        f"{(steps * step + ft.epochs * validation) / 60:.1f} min"
    )
    print(
        f"  {used['model_gflops_per_second']:.0f} model GFLOP/s, {used['matmul_ceiling_fraction']:.0%} of the "
        f"matmul ceiling ({used['matmul_ceiling_gflops_per_second']:.0f} GFLOP/s)"
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[2:5]:
            train_step(model, [batch], optimizer, meter, max_grad_norm=1.0, bf16=bf16)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
