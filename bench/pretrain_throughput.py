"""Pretraining throughput: our MLM path against the transformers run_mlm.py reference path.

Same width, depth, feed-forward FLOPs (common.reference_bert_config), vocabulary, data and batch shape
(batch_size x block_size from params.yaml):
- ours: the pretrain stage's objective (pretraining.MaskedLM: the configured ModernBERT-style encoder, a fixed
  number of masks per packed block drawn on the device, the head on the masked positions only), no dropout,
  the fused AdamW;
- reference: BertForMaskedLM (post-LayerNorm, dropout 0.1, vocabulary logits at every position) on
  documents truncated and padded to block_size (run_mlm.py --line_by_line --pad_to_max_length).
Counts real (non-padding) tokens per second of optimizer steps. On CUDA ours runs as the pipeline trains
(bf16 autocast) and the reference as run_mlm.py does by default (fp32), and both print model and hardware
FLOPs utilization against the GPU's dense bf16 peak (transferpipe.flops: window attention at its window and
the head on predicted positions only in model FLOPs).

Run: python -m bench.pretrain_throughput [--size base]   (base: a BERT-base-sized encoder, 768 x 12, 512 tokens)
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch.utils.data import DataLoader
from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

from bench.common import default_data, load, machine, reference_bert_config, report
from transferpipe import flops
from transferpipe.distributed import pick_device
from transferpipe.modeling import pretraining_model
from transferpipe.pretraining import objective
from transferpipe.tokenization import pack_blocks
from transferpipe.training import use_bf16

# BERT-base's shape; ours' GeGLU at 2048 costs the FLOPs of BERT-base's 3072-wide MLP, the reference's.
BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 2048}


def tokens_per_second(
    model: torch.nn.Module, loader: DataLoader, steps: int, warmup: int, device: torch.device, bf16: bool, fused: bool
) -> float:
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or device.type == "cuda")
    batches = iter(loader)
    tokens, start = 0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def utilization_lines(name: str, tps: float, config: object, block: int, predicted: float, head: float) -> str:
    peak = flops.peak_bf16()
    useful = flops.training_flops_per_token(config, block, predicted)
    executed = flops.hardware_flops_per_token(config, block, predicted, head_fraction=head)
    share = ""
    if peak:
        mfu, hfu = flops.mfu(tps, useful, peak), flops.mfu(tps, executed, peak)
        share = f", MFU {mfu:.1%}, HFU {hfu:.1%} of {peak / 1e12:.0f} TFLOP/s"
    return f"  {name:<10} {tps * useful / 1e12:8.2f} model TFLOP/s, {tps * executed / 1e12:8.2f} hardware{share}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", choices=["default", "base"], default="default", help="params.yaml's or BERT-base")
    parser.add_argument("--batch-size", type=int, help="default: pretrain.batch_size")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="ours; default: pretrain.precision")
    args = parser.parse_args(argv)
    params = load()
    splits, tokenizer = default_data(params)
    texts = splits["train"]["text"].tolist()
    m, p, block = params["model"], params["pretrain"], params["tokenize"].block_size
    if args.size == "base":
        m, block = dataclasses.replace(m, **BASE), 512
    if args.batch_size:
        p = dataclasses.replace(p, batch_size=args.batch_size)
    device = pick_device()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=p.mlm_probability)
    torch.manual_seed(0)

    blocks = pack_blocks(tokenizer, texts, block).with_format("torch")
    ours = objective(pretraining_model(m, tokenizer), tokenizer, p)
    ours_loader = DataLoader(blocks.with_format("torch", columns=["input_ids"]), batch_size=p.batch_size, shuffle=True)

    padded = [
        tokenizer(t, truncation=True, max_length=block, padding="max_length", return_special_tokens_mask=True)
        for t in texts
    ]
    reference = BertForMaskedLM(reference_bert_config(m, tokenizer))
    ref_loader = DataLoader(padded, batch_size=p.batch_size, shuffle=True, collate_fn=collator)

    cuda = device.type == "cuda"
    bf16 = use_bf16(args.precision or p.precision, device)
    ours_tps = tokens_per_second(ours, ours_loader, args.steps, args.warmup, device, bf16=bf16, fused=True)
    ref_tps = tokens_per_second(reference, ref_loader, args.steps, args.warmup, device, bf16=False, fused=False)
    print(
        f"machine: {machine()}; {args.steps} steps of {p.batch_size} x {block} tokens, "
        f"hidden {m.hidden_size}, {m.num_hidden_layers} layers, vocabulary {len(tokenizer)}; "
        f"ours in {'bf16 autocast' if bf16 else 'fp32'}, reference in fp32"
    )
    report("pretraining throughput", "tokens/s", ours_tps, ref_tps, target=2)
    predicted = max(1, round(p.mlm_probability * block)) / block
    if cuda:
        print("FLOPs (transferpipe.flops: model FLOPs count useful work, hardware FLOPs what the kernels run)")
        print(utilization_lines("ours", ours_tps, ours.model.config, block, predicted, head=predicted))
        print(utilization_lines("reference", ref_tps, reference.config, block, p.mlm_probability, head=1.0))
    else:
        print(f"model FLOPs against this CPU's measured matmul ceiling ({flops.cpu_name()}, transferpipe.flops)")
        for name, tps, config, share, half in (
            ("ours", ours_tps, ours.model.config, predicted, bf16),
            ("reference", ref_tps, reference.config, p.mlm_probability, False),
        ):
            rows = flops.utilization(device, tps, flops.training_flops_per_token(config, block, share), config,
                                     p.batch_size * block, half)  # fmt: skip
            print(f"  {name:<10} {rows['model_gflops_per_second']:8.1f} model GFLOP/s, "
                  f"{rows['matmul_ceiling_fraction']:.0%} of the {'bf16' if half else 'fp32'} ceiling "
                  f"({rows['matmul_ceiling_gflops_per_second']:.0f} GFLOP/s)")  # fmt: skip


if __name__ == "__main__":
    main()
