"""FLOPs per token of a training step of our encoders, and the utilization they give: on a GPU against its
datasheet bf16 peak, on a CPU against the measured throughput of the step's own matrix products.

Only matrix products are counted, at 2 FLOPs per multiply-add; norms, activations, softmax, rotary
embeddings, the loss and the optimizer are left out (a few percent at our sizes), and embedding lookups cost
nothing. A training step is 3 forward passes' worth: the backward pass computes the gradients of both the
inputs and the weights of every product (2x the forward pass). No activations are recomputed.

Forward FLOPs per token of one layer of width h, intermediate size i:

- linear layers, 2 x the weights of the layer's nn.Linear modules:
    ModernBERT  Wqkv h x 3h, Wo h x h, Wi h x 2i (GeGLU: value and gate), mlp.Wo i x h   2 (4h² + 3hi)
    BERT        query, key, value, output h x h each, intermediate h x i, output i x h    2 (4h² + 2hi)
    LSTM        weight_ih and weight_hh, 4h x h each (four gates)                          2 (8h²)
- attention scores QKᵀ and the weighted sum of V: 2 x 2 x keys x h, where keys is how many positions a query
  attends to: seq_len on a global layer; on a ModernBERT sliding-window layer (all but every
  global_attn_every_n_layers-th, `layer_types` in the config) the keys within local_attention // 2 on either
  side, averaged over the queries (129 in the middle of a long sequence for local_attention 128).
- the output head: the MLM head's dense h x h and decoder h x vocab (the LSTM: its h x vocab projection),
  2 x (h² + h x vocab), at predicted_fraction of the tokens.

A CPU has no datasheet peak that its kernels reach, so its ceiling is measured (matmul_ceiling): the products of
every linear layer of the encoder at the step's batch, forward and both gradients, in the training precision,
at the end of the stage. The fraction of it a stage reaches says how much of the
step is matrix products at their best speed: the rest is attention, norms, the optimizer and overhead.

Model FLOPs (training_flops_per_token) are the useful work: windowed attention at its window, the head on
the predicted positions only (the masked ones, mlm_probability of the tokens). Hardware FLOPs
(hardware_flops_per_token) are what the kernels compute: SDPA, eager attention and modeling's padding_safe
attention apply a sliding window as a dense (seq_len, seq_len) mask, so every layer pays for seq_len keys
(flash and flex attention skip the masked blocks: the window is counted there); and a model without `sparse_prediction`
(BERT, the LSTM) runs its head at every position. MFU divides model FLOPs per second by the chip's peak,
HFU hardware FLOPs per second (PaLM, Chowdhery et al. 2022, appendix B).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from transferpipe import distributed

# Dense (no sparsity) bf16 tensor-core peaks by the vendor's datasheets, in FLOP/s. Keys are matched against
# torch.cuda.get_device_name() ("NVIDIA H200", "NVIDIA H100 80GB HBM3"), longest first, so "H100 PCIe" wins
# over "H100".
PEAK_BF16 = {
    "H100": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,  # SXM
    "H200 NVL": 835e12,
    "A100": 312e12,
}

# Attention implementations whose kernels skip the blocks a sliding window masks out.
WINDOWED_KERNELS = ("flash", "flex")


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs per token, by part."""

    linear: float  # the encoder's nn.Linear layers
    attention: float  # QKᵀ and attention x V
    head: float  # the output head, averaged over all tokens

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.head


def attended_keys(seq_len: int, half_window: int | None) -> float:
    """Mean number of keys a query attends to: seq_len, or with a bidirectional window those at most
    half_window positions away (transformers' sliding-window mask: |query - key| <= half_window)."""
    if half_window is None or half_window >= seq_len - 1:
        return float(seq_len)
    total = sum(min(q, half_window) + min(seq_len - 1 - q, half_window) + 1 for q in range(seq_len))
    return total / seq_len


def layer_types(config: PretrainedConfig) -> list[str]:
    """full_attention or sliding_attention per layer; a config without windows is all full_attention."""
    if getattr(config, "layer_types", None):
        return list(config.layer_types)
    every = getattr(config, "global_attn_every_n_layers", None)
    if every is None:  # BERT
        return ["full_attention"] * config.num_hidden_layers
    # ModernBERT configs of transformers 4.x: layer k is global when k is a multiple of `every`.
    return ["sliding_attention" if k % every else "full_attention" for k in range(config.num_hidden_layers)]


def forward_flops(
    config: PretrainedConfig,
    seq_len: int,
    predicted_fraction: float,
    *,
    hardware: bool = False,
    attn_implementation: str | None = None,
    head_fraction: float | None = None,
) -> Flops:
    """Forward FLOPs per token (module docstring): model FLOPs, or with `hardware` what the kernels compute.

    attn_implementation (default: the config's, else "sdpa", transformers' default) decides whether windowed
    layers cost their window or the whole sequence in hardware FLOPs; head_fraction, the share of positions
    the head runs on there, where the caller knows it (an objective that gathers the masked positions before
    the head, for BERT too); by default every position unless the config has `sparse_prediction`.
    """
    h, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    if config.model_type == "transferpipe_lstm":
        # One token through every layer's four gates, then the tied projection at every position.
        share = (1.0 if head_fraction is None else head_fraction) if hardware else predicted_fraction
        return Flops(linear=2 * layers * 8 * h * h, attention=0.0, head=2 * h * vocab * share)
    i = config.intermediate_size
    if config.model_type == "modernbert":
        per_layer = 4 * h * h + 3 * h * i  # Wqkv, Wo, Wi (2i wide: GeGLU), mlp.Wo
        sparse = bool(getattr(config, "sparse_prediction", False))
        half_window = config.local_attention // 2
    elif config.model_type == "bert":
        per_layer = 4 * h * h + 2 * h * i  # query, key, value, attention output, intermediate, output
        sparse, half_window = False, None
    else:
        raise ValueError(f"no FLOPs count for model_type {config.model_type!r}")
    implementation = attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"
    dense_window = hardware and not any(kind in implementation for kind in WINDOWED_KERNELS)
    attention = 0.0
    for kind in layer_types(config):
        windowed = kind == "sliding_attention" and not dense_window
        attention += 4 * attended_keys(seq_len, half_window if windowed else None) * h
    share = predicted_fraction
    if hardware:
        share = head_fraction if head_fraction is not None else predicted_fraction if sparse else 1.0
    return Flops(linear=2 * layers * per_layer, attention=attention, head=2 * (h * h + h * vocab) * share)


def training_flops_per_token(config: PretrainedConfig, seq_len: int, predicted_fraction: float) -> float:
    """Model FLOPs of one training step per token: 3 x the useful forward FLOPs (window attention at its
    window, the head on the predicted_fraction of positions that carry a label)."""
    return 3 * forward_flops(config, seq_len, predicted_fraction).total


def hardware_flops_per_token(
    config: PretrainedConfig,
    seq_len: int,
    predicted_fraction: float,
    attn_implementation: str | None = None,
    head_fraction: float | None = None,
) -> float:
    """Hardware FLOPs of one training step per token: 3 x the forward FLOPs the kernels execute (dense
    attention over seq_len under SDPA's or eager's mask, the head at every position unless sparse or
    head_fraction says otherwise)."""
    kernels = dict(attn_implementation=attn_implementation, head_fraction=head_fraction)
    return 3 * forward_flops(config, seq_len, predicted_fraction, hardware=True, **kernels).total


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """Utilization: tokens_per_second x flops_per_token / peak (model FLOPs give MFU, hardware FLOPs HFU)."""
    return tokens_per_second * flops_per_token / peak


def peak_bf16(device_name: str | None = None) -> float | None:
    """The dense bf16 peak of a GPU by its name (default: CUDA device 0's), None when unknown or no GPU."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16[key]
    return None


# The ceiling is timed at no more rows than this: products this tall already run at their full rate, and the
# measurement stays near a second on a 2-core CPU.
MEASURED_ROWS = 1024


def linear_shapes(config: PretrainedConfig) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of the encoder's blocks (the products forward_flops counts as `linear`)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    if config.model_type == "transferpipe_lstm":
        return [(h, 4 * h), (h, 4 * h)] * layers  # weight_ih, weight_hh
    i = config.intermediate_size
    if config.model_type == "modernbert":
        return [(h, 3 * h), (h, h), (h, 2 * i), (i, h)] * layers  # Wqkv, Wo, Wi (GeGLU), mlp.Wo
    if config.model_type == "bert":
        return [(h, h)] * 4 * layers + [(h, i), (i, h)] * layers
    raise ValueError(f"no FLOPs count for model_type {config.model_type!r}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def matmul_seconds(shapes: list[tuple[int, int]], tokens: int, dtype: torch.dtype, budget: float = 1.0) -> float:
    """Best time of the products of one training step (y = x Wᵀ, dx = dy W, dW = dyᵀ x for every layer) at
    `tokens` rows, over repeats within `budget` seconds (at least 2, after one warm-up)."""
    pairs = [(torch.randn(tokens, i, dtype=dtype), torch.randn(o, i, dtype=dtype)) for i, o in shapes]
    grads = [torch.randn(tokens, o, dtype=dtype) for _, o in shapes]

    def one_step() -> float:
        start = time.perf_counter()
        for (x, w), dy in zip(pairs, grads, strict=True):
            torch.mm(x, w.t())
            torch.mm(dy, w)
            torch.mm(dy.t(), x)
        return time.perf_counter() - start

    one_step()  # warm up the kernels
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 2 or (spent < budget and runs < 20):
        took = one_step()
        best, spent, runs = min(best, took), spent + took, runs + 1
    return best


def matmul_ceiling(config: PretrainedConfig, tokens: int, bf16: bool) -> float:
    """FLOP/s of this CPU's matrix products in the shapes of a training step of `config` at `tokens` rows per
    process (at most MEASURED_ROWS), in bf16 or fp32, measured now: under a second or two on a 2-core CPU, and
    under the same load as the run it is set against (a cached figure would keep a busy moment's ceiling)."""
    shapes = linear_shapes(config)
    rows = min(tokens, MEASURED_ROWS)
    seconds = matmul_seconds(shapes, rows, torch.bfloat16 if bf16 else torch.float32)
    return 3 * 2 * rows * sum(i * o for i, o in shapes) / seconds


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def utilization(
    device: torch.device,
    tokens_per_second: float,
    flops_per_token: float,
    config: PretrainedConfig,
    batch_tokens: int,
    bf16: bool,
    hardware_flops_per_token: float | None = None,
) -> dict[str, float]:
    """The utilization rows of a training stage: model GFLOP/s per process, and on a GPU of known peak MFU (and
    HFU given hardware FLOPs), on a CPU the fraction of matmul_ceiling() at the process's batch of
    `batch_tokens` tokens. `tokens_per_second` counts every process; empty on other devices."""
    per_process = tokens_per_second / distributed.world_size()
    rows = {"model_gflops_per_second": significant(per_process * flops_per_token / 1e9)}
    if device.type == "cuda":
        peak = peak_bf16()
        if peak is None:
            return rows
        rows["mfu"] = mfu(per_process, flops_per_token, peak)
        if hardware_flops_per_token is not None:
            rows["hfu"] = mfu(per_process, hardware_flops_per_token, peak)
        return rows
    if device.type != "cpu":
        return rows
    ceiling = matmul_ceiling(config, batch_tokens, bf16)
    rows["matmul_ceiling_gflops_per_second"] = significant(ceiling / 1e9)
    rows["matmul_ceiling_fraction"] = significant(per_process * flops_per_token / ceiling)
    return rows
