"""The ceiling of bench.finetune_throughput's ratio on this machine: the matrix products of one fine-tuning step
in bf16 against fp32.

With the feed-forward FLOP-matched (common.reference_bert_config), ours and the reference multiply the same
matrices; what ours can gain is the rate of its products in bf16 (autocast) over the reference's fp32, less
what the rest of a step (attention, normalization, the optimizer) takes. This times those products alone:
every linear layer of the configured encoder (params.yaml `model`) at the fine-tuning batch (`finetune.batch_size`
x `tokenize.max_length` tokens), forward and backward (input and weight gradients), in fp32 and in bf16.
Run: python -m bench.finetune_ceiling [--repeat N]
"""

from __future__ import annotations

import argparse

import torch
from transformers import ModernBertConfig

from bench.common import REPO, load, machine, report, timed
from transferpipe import flops
from transferpipe.params import FinetuneParams, load_section


def step_seconds(shapes: list[tuple[int, int]], tokens: int, dtype: torch.dtype, repeat: int) -> float:
    """Best time over `repeat` of the products of one training step: y = x W^T, then dx = dy W and dW = dy^T x."""
    pairs = [(torch.randn(tokens, i, dtype=dtype), torch.randn(o, i, dtype=dtype)) for i, o in shapes]
    grads = [torch.randn(tokens, o, dtype=dtype) for _, o in shapes]

    def one_step() -> None:
        for (x, w), dy in zip(pairs, grads, strict=True):
            torch.mm(x, w.t())
            torch.mm(dy, w)
            torch.mm(dy.t(), x)

    one_step()  # warm up the kernels
    return timed(one_step, repeat)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="steps timed per precision (the best counts)")
    args = parser.parse_args(argv)
    params = load()
    m, max_length = params["model"], params["tokenize"].max_length
    ft = load_section(REPO / "params.yaml", "finetune", FinetuneParams)
    tokens = ft.batch_size * max_length
    # The configured encoder's linear layers (transferpipe.flops counts the same products).
    config = ModernBertConfig(
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
    )
    shapes = flops.linear_shapes(config)
    step_flop = 3 * 2 * tokens * sum(i * o for i, o in shapes)
    fp32 = step_seconds(shapes, tokens, torch.float32, args.repeat)
    bf16 = step_seconds(shapes, tokens, torch.bfloat16, args.repeat)
    print(
        f"machine: {machine()}; the linear layers of {m.num_hidden_layers} blocks, hidden {m.hidden_size}, "
        f"intermediate {m.intermediate_size}, forward and backward at {ft.batch_size} x {max_length} tokens: "
        f"{step_flop / 1e9:.2f} GFLOP per step; fp32 {step_flop / fp32 / 1e9:.0f} GFLOP/s, "
        f"bf16 {step_flop / bf16 / 1e9:.0f} GFLOP/s"
    )
    report("matrix products of one fine-tuning step (ours: bf16, reference: fp32)", "steps/s", 1 / bf16, 1 / fp32)


if __name__ == "__main__":
    main()
