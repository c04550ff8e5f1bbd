"""A torch.profiler profile of pretraining steps at the configured size, with tokens/s, MFU and HFU.

It runs transferpipe.pretraining.pretrain itself, as stages.pretrain calls it (the model from
modeling.pretraining_model, the blocks and tokenizer that tokenize wrote, the params file's model and pretrain
sections), for --warmup + --steps + 1 + --profile-steps steps, with MLflow off, no checkpoints and one small
evaluation at the end. A global optimizer-step hook counts the steps: the clock is read (after a device
synchronization) at the first and last of the --steps timed ones, which run with the profiler idle, and each
step moves the profiler's schedule on, so it records exactly the last --profile-steps. The table of operators
is sorted by CUDA time (CPU time without a GPU).

FLOPs per token come from transferpipe.flops at the blocks' length, with pretrain.mlm_probability of the
tokens predicted: model FLOPs give MFU, what the kernels compute (dense attention under SDPA's sliding-window
mask) HFU, both against the GPU's dense bf16 peak, printed on CUDA only. With --from-metrics it profiles
nothing and prints the same for the tokens/s that a pretrain stage measured (its metrics file).

Writes --out/profile.txt (what it prints) and --out/profile.json (the numbers), with --trace also
--out/trace.json.gz (a Chrome trace of the profiled steps); with --from-metrics utilization.txt and .json.

Run: python -m bench.gpu_profile --params params.yaml --data data/blocks --tokenizer models/tokenizer --out DIR
     python -m bench.gpu_profile --params params.yaml --tokenizer models/tokenizer --from-metrics metrics/pretrain.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from transferpipe.distributed import pick_device
from transferpipe.flops import forward_flops, mfu, peak_bf16
from transferpipe.modeling import pretraining_model
from transferpipe.params import ModelParams, PretrainParams, TokenizeParams, load_section
from transferpipe.pretraining import pretrain
from transferpipe.tokenization import load_tokenizer
from transferpipe.tracking import Run
from transferpipe.training import seed_everything


def palm_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6 x non-embedding parameters + 12 x layers x hidden x seq_len: the count of the earlier H200 numbers in
    docs/LOG.md (a tied decoder is the embedding matrix, so it is left out with it)."""
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)
    config = model.config
    return 6 * non_embedding + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def utilization(model: torch.nn.Module, seq_len: int, predicted: float, tokens_per_second: float, device: str) -> dict:
    """FLOPs per token (model, hardware, and palm_flops_per_token's) and, on a GPU whose peak is known, MFU
    and HFU."""
    config = model.config
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    flops = forward_flops(config, seq_len, predicted)
    hardware = forward_flops(config, seq_len, predicted, hardware=True, attn_implementation=implementation)
    palm = palm_flops_per_token(model, seq_len)
    result = {
        "device": device,
        "attn_implementation": implementation,
        "seq_len": seq_len,
        "predicted_fraction": predicted,
        "tokens_per_second": tokens_per_second,
        "model_flops_per_token": 3 * flops.total,
        "hardware_flops_per_token": 3 * hardware.total,
        "palm_flops_per_token": palm,
        "forward_flops_per_token": {"linear": flops.linear, "attention": flops.attention, "head": flops.head},
    }
    peak = peak_bf16(device) if device != "cpu" else None
    if peak is not None:
        result |= {
            "peak_bf16": peak,
            "mfu": mfu(tokens_per_second, 3 * flops.total, peak),
            "hfu": mfu(tokens_per_second, 3 * hardware.total, peak),
        }
    return result


def summary_lines(u: dict) -> list[str]:
    lines = [
        f"device {u['device']}, attention {u['attn_implementation']}, {u['seq_len']} tokens per block, "
        f"{u['predicted_fraction']:.3f} of them predicted",
        f"throughput {u['tokens_per_second']:,.0f} tokens/s",
        f"FLOPs per token: model {u['model_flops_per_token'] / 1e6:.1f}M, hardware "
        f"{u['hardware_flops_per_token'] / 1e6:.1f}M; "
        f"6N + 12Lhs (docs/LOG.md's earlier count) {u['palm_flops_per_token'] / 1e6:.1f}M",
        f"achieved: {u['tokens_per_second'] * u['model_flops_per_token'] / 1e12:.2f} model TFLOP/s, "
        f"{u['tokens_per_second'] * u['hardware_flops_per_token'] / 1e12:.2f} hardware TFLOP/s",
    ]
    if "mfu" in u:
        lines.append(
            f"MFU {u['mfu']:.1%}, HFU {u['hfu']:.1%} of the {u['peak_bf16'] / 1e12:.0f} TFLOP/s dense bf16 peak"
        )
    return lines


def from_metrics(args: argparse.Namespace) -> dict:
    model_params = load_section(args.params, "model", ModelParams)
    block = load_section(args.params, "tokenize", TokenizeParams).block_size
    predicted = load_section(args.params, "pretrain", PretrainParams).mlm_probability
    model = pretraining_model(model_params, load_tokenizer(args.tokenizer))  # built as the stage built it
    measured = json.loads(args.from_metrics.read_text(encoding="utf-8"))["train"]["tokens_per_second"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return utilization(model, block, predicted, measured, device)


def profile(args: argparse.Namespace) -> tuple[dict, str, torch.profiler.profile]:
    """transferpipe.pretraining.pretrain itself for warmup + steps + 1 + profile_steps steps (MLflow off, no
    checkpoints, one evaluation at the end): every optimizer step moves the profiler's schedule on, and the
    clock is read (after a device synchronization) at the first and last timed step only."""
    import datasets

    model_params = load_section(args.params, "model", ModelParams)
    params = load_section(args.params, "pretrain", PretrainParams)
    total = args.warmup + args.steps + 1 + args.profile_steps  # the 1: the profiler's own warm-up step
    params = dataclasses.replace(
        params, max_steps=total, eval_every=total, eval_blocks=params.batch_size, checkpoint_every=None
    )
    seed_everything(params.seed)  # as the stage does, before building the model
    tokenizer = load_tokenizer(args.tokenizer)
    blocks = datasets.load_from_disk(str(args.data))
    device = pick_device()
    model = pretraining_model(model_params, tokenizer)
    cuda = device.type == "cuda"
    marks: list[float] = []  # the clock after step `warmup` and after step `warmup + steps`
    done = 0

    def on_step(*_: object) -> None:
        nonlocal done
        done += 1
        if done in (args.warmup, args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
        prof.step()

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(wait=args.warmup + args.steps, warmup=1, active=args.profile_steps)
    hook = register_optimizer_step_post_hook(on_step)
    try:
        with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
            pretrain(model, tokenizer, blocks, params, Run(None), device)
    finally:
        hook.remove()
    seconds = marks[1] - marks[0]
    seq_len = len(blocks["mlm_train"][0]["input_ids"])
    tokens = args.steps * params.batch_size * seq_len  # packed blocks: no padding
    name = torch.cuda.get_device_name() if cuda else "cpu"
    result = utilization(model, seq_len, params.mlm_probability, tokens / seconds, name)
    result |= {"steps": args.steps, "batch_size": params.batch_size, "precision": params.precision, "seconds": seconds}
    if cuda:
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
    return result, table, prof


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/blocks"), help="pretraining blocks (tokenize)")
    parser.add_argument("--tokenizer", type=Path, default=Path("models/tokenizer"))
    parser.add_argument("--out", type=Path, help="folder for profile.txt, profile.json (and trace.json.gz)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the timed ones (at least 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (tokens/s, MFU)")
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=30, help="operators in the table")
    parser.add_argument("--trace", action="store_true", help="also write a gzipped Chrome trace")
    parser.add_argument("--from-metrics", type=Path, help="a pretrain metrics file: utilization of its tokens/s")
    args = parser.parse_args(argv)

    if args.from_metrics:
        result, table, prof = from_metrics(args), "", None
        title = f"utilization of the pipeline's pretrain ({args.from_metrics})"
    else:
        result, table, prof = profile(args)
        title = f"{args.steps} timed pretraining steps after {args.warmup} warm-up steps"
    text = "\n".join([title, *summary_lines(result)]) + "\n"
    if table:
        text += f"\n{args.profile_steps} profiled steps, top {args.rows} operators\n{table}\n"
    print(text, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "utilization" if args.from_metrics else "profile"
        (args.out / f"{stem}.txt").write_text(text, encoding="utf-8")
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        if args.trace and prof is not None:
            with tempfile.TemporaryDirectory() as scratch:
                raw = Path(scratch) / "trace.json"
                prof.export_chrome_trace(str(raw))
                with raw.open("rb") as src, gzip.open(args.out / "trace.json.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return result


if __name__ == "__main__":
    main()
