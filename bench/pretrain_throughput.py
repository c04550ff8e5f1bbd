"""Pretraining throughput: our MLM path against the transformers run_mlm.py reference path.

Same width, depth, vocabulary, data and batch shape (batch_size x block_size from params.yaml):
- ours: the configured encoder (ModernBERT-style, pre-LayerNorm, MLM logits on masked positions only) on
  packed blocks, no dropout;
- reference: BertForMaskedLM (post-LayerNorm, dropout 0.1, vocabulary logits at every position) on
  documents truncated and padded to block_size (run_mlm.py --line_by_line --pad_to_max_length).
Counts real (non-padding) tokens per second of optimizer steps. Run: python -m bench.pretrain_throughput
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

from bench.common import default_data, load, machine, report
from transferpipe.modeling import pretraining_model
from transferpipe.tokenization import pack_blocks


def tokens_per_second(model: torch.nn.Module, loader: DataLoader, steps: int, warmup: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    batches = iter(loader)
    tokens, start = 0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        batch = next(batches)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    params = load()
    splits, tokenizer = default_data(params)
    texts = splits["train"]["text"].tolist()
    m, p, block = params["model"], params["pretrain"], params["tokenize"].block_size
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=p.mlm_probability)
    torch.manual_seed(0)

    blocks = pack_blocks(tokenizer, texts, block).with_format("torch")
    ours = pretraining_model(m, tokenizer)
    ours_loader = DataLoader(blocks, batch_size=p.batch_size, shuffle=True, collate_fn=collator)

    padded = [
        tokenizer(t, truncation=True, max_length=block, padding="max_length", return_special_tokens_mask=True)
        for t in texts
    ]
    reference = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=m.hidden_size,
            num_hidden_layers=m.num_hidden_layers,
            num_attention_heads=m.num_attention_heads,
            intermediate_size=m.intermediate_size,
            max_position_embeddings=m.max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    ref_loader = DataLoader(padded, batch_size=p.batch_size, shuffle=True, collate_fn=collator)

    ours_tps = tokens_per_second(ours, ours_loader, args.steps, args.warmup)
    ref_tps = tokens_per_second(reference, ref_loader, args.steps, args.warmup)
    print(
        f"machine: {machine()}; {args.steps} steps of {p.batch_size} x {block} tokens, "
        f"hidden {m.hidden_size}, {m.num_hidden_layers} layers, vocabulary {len(tokenizer)}"
    )
    report("pretraining throughput", "tokens/s", ours_tps, ref_tps, target=2)


if __name__ == "__main__":
    main()
