"""Pretraining throughput: our MLM path against the transformers run_mlm.py reference path.

Same width, depth, vocabulary, data and batch shape (batch_size x block_size from params.yaml):
- ours: the configured encoder (ModernBERT-style, pre-LayerNorm, MLM logits on masked positions only) on
  packed blocks, no dropout;
- reference: BertForMaskedLM (post-LayerNorm, dropout 0.1, vocabulary logits at every position) on
  documents truncated and padded to block_size (run_mlm.py --line_by_line --pad_to_max_length).
Counts real (non-padding) tokens per second of optimizer steps. On CUDA ours runs as the pipeline trains
(bf16 autocast) and the reference as run_mlm.py does by default (fp32), and both print model-FLOPs
utilization against the GPU's dense bf16 peak (H100: 989 TFLOP/s), with FLOPs per token counted as
6 x (non-embedding parameters) + 12 x layers x hidden x sequence length (attention), the PaLM convention.

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
from transferpipe.modeling import count_parameters, pick_device, pretraining_model
from transferpipe.tokenization import pack_blocks
from transferpipe.training import use_bf16

# Dense bf16 peak FLOP/s by GPU name (no sparsity), for model-FLOPs utilization.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def tokens_per_second(
    model: torch.nn.Module, loader: DataLoader, steps: int, warmup: int, device: torch.device, bf16: bool
) -> float:
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
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


def flops_per_token(model: torch.nn.Module, layers: int, hidden: int, seq_len: int) -> float:
    embedding = sum(p.numel() for name, p in model.named_parameters() if "embeddings" in name)
    return 6 * (count_parameters(model) - embedding) + 12 * layers * hidden * seq_len


def mfu_line(name: str, tps: float, flops: float) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    achieved = tps * flops
    share = f", MFU {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else ""
    return f"  {name:<10} {achieved / 1e12:8.2f} TFLOP/s{share}"


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
    ours = pretraining_model(m, tokenizer)
    ours_loader = DataLoader(blocks, batch_size=p.batch_size, shuffle=True, collate_fn=collator)

    padded = [
        tokenizer(t, truncation=True, max_length=block, padding="max_length", return_special_tokens_mask=True)
        for t in texts
    ]
    reference = BertForMaskedLM(reference_bert_config(m, tokenizer))
    ref_loader = DataLoader(padded, batch_size=p.batch_size, shuffle=True, collate_fn=collator)

    cuda = device.type == "cuda"
    bf16 = use_bf16(args.precision or p.precision, device)
    ours_tps = tokens_per_second(ours, ours_loader, args.steps, args.warmup, device, bf16=bf16)
    ref_tps = tokens_per_second(reference, ref_loader, args.steps, args.warmup, device, bf16=False)
    print(
        f"machine: {machine()}; {args.steps} steps of {p.batch_size} x {block} tokens, "
        f"hidden {m.hidden_size}, {m.num_hidden_layers} layers, vocabulary {len(tokenizer)}; "
        f"ours in {'bf16 autocast' if bf16 else 'fp32'}, reference in fp32"
    )
    report("pretraining throughput", "tokens/s", ours_tps, ref_tps, target=2)
    if cuda:
        print("model FLOPs (6N + attention per token)")
        print(mfu_line("ours", ours_tps, flops_per_token(ours, m.num_hidden_layers, m.hidden_size, block)))
        print(mfu_line("reference", ref_tps, flops_per_token(reference, m.num_hidden_layers, m.hidden_size, block)))


if __name__ == "__main__":
    main()
