"""FLOPs per token against hand counts and against the nn.Linear layers of real models built from the configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM, ModernBertModel

from transferpipe import flops as flops_module
from transferpipe.flops import (
    attended_keys,
    forward_flops,
    hardware_flops_per_token,
    layer_types,
    linear_shapes,
    matmul_ceiling,
    mfu,
    peak_bf16,
    training_flops_per_token,
    utilization,
)
from transferpipe.lstm import LSTMConfig, LSTMForCausalLM
from transferpipe.modeling import new_encoder_config

# Layer 0 global, layers 1 and 2 sliding (window 8: 4 keys on either side), GeGLU 64 wide.
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)


def modernbert(**extra: object) -> ModernBertConfig:
    special = dict(pad_token_id=0, cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2)
    options = dict(local_attention=8, max_position_embeddings=64, sparse_prediction=True, **special)
    return ModernBertConfig(**(TINY | options | extra))


def linear_weights(module: nn.Module) -> int:
    """Weights of every nn.Linear inside module (biases are additions, not products)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def test_modernbert_by_hand() -> None:
    flops = forward_flops(modernbert(), seq_len=16, predicted_fraction=0.25)
    # 3 layers x (Wqkv 32x96 + Wo 32x32 + Wi 32x128 + mlp.Wo 64x32 = 10240 weights) x 2
    assert flops.linear == 61_440
    # Keys per query at seq_len 16, 4 on either side: 5 6 7 8, then 9 x 8, then 8 7 6 5: 124 / 16 = 7.75.
    # Global layer 4 x 16 x 32 = 2048; each sliding layer 4 x 7.75 x 32 = 992.
    assert flops.attention == 2048 + 2 * 992
    # Head dense 32x32 + decoder 32x100 = 4224 weights, x 2, on a quarter of the tokens.
    assert flops.head == 2112
    assert training_flops_per_token(modernbert(), 16, 0.25) == 3 * (61_440 + 4032 + 2112)


def test_modernbert_counts_match_the_linear_layers_of_the_real_model() -> None:
    """Fails if the formula misses (or invents) a product: counted against the modules transformers builds."""
    model = ModernBertForMaskedLM(modernbert())
    flops = forward_flops(model.config, seq_len=16, predicted_fraction=0.3)
    assert flops.linear == 2 * linear_weights(model.model)  # the embeddings hold no nn.Linear
    assert flops.head == pytest.approx(2 * (linear_weights(model.head) + linear_weights(model.decoder)) * 0.3)


def test_sliding_window_keys_match_the_models_attention() -> None:
    """The keys each query attends to, read off the attention probabilities of the real model (eager)."""
    model = ModernBertModel(modernbert(attn_implementation="eager")).eval()
    with torch.no_grad():
        out = model(torch.randint(5, 100, (1, 16)), output_attentions=True)
    kinds = layer_types(model.config)
    assert kinds == ["full_attention", "sliding_attention", "sliding_attention"]
    for kind, probs in zip(kinds, out.attentions, strict=True):  # (batch, heads, query, key)
        keys = (probs[0, 0] > 0).sum(-1).float().mean().item()
        assert keys == attended_keys(16, 4 if kind == "sliding_attention" else None)


def test_window_layers_count_less_than_global_ones() -> None:
    """At the GPU-scale shape: 12 layers, 4 of them global, 512 tokens, window 128."""
    config = modernbert(
        vocab_size=8192, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1152,
        local_attention=128, max_position_embeddings=512,
    )  # fmt: skip
    assert attended_keys(512, 64) < 129 < 512
    windowed = forward_flops(config, 512, 0.3).attention
    dense = forward_flops(config, 512, 0.3, hardware=True, attn_implementation="sdpa").attention
    assert dense == 12 * 4 * 512 * 768
    assert 4 * 4 * 512 * 768 < windowed < dense / 2  # 4 global layers plus 8 far cheaper ones
    # Flash attention skips what the window masks: hardware FLOPs are then the model FLOPs (sparse head).
    flash = hardware_flops_per_token(config, 512, 0.3, attn_implementation="flash_attention_2")
    assert flash == training_flops_per_token(config, 512, 0.3)
    assert hardware_flops_per_token(config, 512, 0.3, attn_implementation="sdpa") > flash


def test_a_head_on_every_position_is_hardware_work_only() -> None:
    config = modernbert()
    dense_head = modernbert(sparse_prediction=False)
    assert forward_flops(dense_head, 16, 0.25).head == forward_flops(config, 16, 0.25).head
    assert forward_flops(dense_head, 16, 0.25, hardware=True).head == 4 * forward_flops(config, 16, 0.25).head


def test_bert_counts_match_the_linear_layers_of_the_real_model() -> None:
    config = BertConfig(**TINY, max_position_embeddings=64)
    model = BertForMaskedLM(config)
    flops = forward_flops(config, seq_len=16, predicted_fraction=0.15)
    assert flops.linear == 2 * linear_weights(model.bert) == 2 * 3 * (4 * 32 * 32 + 2 * 32 * 64)
    assert flops.attention == 3 * 4 * 16 * 32  # every layer global
    head = 2 * linear_weights(model.cls)
    assert flops.head == pytest.approx(head * 0.15)
    assert forward_flops(config, 16, 0.15, hardware=True).head == head  # BertForMaskedLM projects every position
    # unless the objective gathers the masked positions first
    assert forward_flops(config, 16, 0.15, hardware=True, head_fraction=0.15).head == pytest.approx(head * 0.15)


def test_without_windows_it_is_the_palm_count() -> None:
    """6 x the products' weights + 12 x layers x hidden x seq_len, the convention bench/pretrain_throughput uses."""
    config = BertConfig(**TINY, max_position_embeddings=64)
    model = BertForMaskedLM(config)
    assert training_flops_per_token(config, 16, 1.0) == 6 * linear_weights(model) + 12 * 3 * 32 * 16


def test_lstm_counts_match_its_gates() -> None:
    config = LSTMConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3)
    model = LSTMForCausalLM(config)
    gates = sum(p.numel() for name, p in model.lstm.layers.named_parameters() if "weight" in name)
    flops = forward_flops(config, seq_len=16, predicted_fraction=1.0)
    assert flops.linear == 2 * gates == 2 * 3 * 8 * 32 * 32
    assert flops.attention == 0
    assert flops.head == 2 * linear_weights(model.lm_head)


@pytest.mark.parametrize("kind", ["modernbert", "bert", "lstm"])
def test_the_ceiling_multiplies_the_linear_layers_the_count_has(kind: str) -> None:
    config = {
        "modernbert": modernbert(),
        "bert": BertConfig(**TINY, max_position_embeddings=64),
        "lstm": LSTMConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3),
    }[kind]
    assert 2 * sum(i * o for i, o in linear_shapes(config)) == forward_flops(config, 16, 0.0).linear


def test_the_cpu_ceiling_is_the_flops_of_the_products_over_their_time(monkeypatch: pytest.MonkeyPatch) -> None:
    timed = []

    def seconds(shapes: list, rows: int, dtype: torch.dtype) -> float:
        timed.append((rows, dtype))
        return 0.5

    monkeypatch.setattr(flops_module, "matmul_seconds", seconds)
    config = modernbert()
    # 3 layers x 10240 weights, forward and two gradients, 2 FLOPs each, at 64 rows, in half a second
    assert matmul_ceiling(config, tokens=64, bf16=False) == 3 * 2 * 64 * 30_720 / 0.5
    matmul_ceiling(config, tokens=10**6, bf16=True)
    assert timed == [(64, torch.float32), (flops_module.MEASURED_ROWS, torch.bfloat16)]


def test_the_products_are_timed() -> None:
    assert 0 < flops_module.matmul_seconds([(32, 96), (64, 32)], 16, torch.float32) < 1


def test_cpu_utilization_is_the_model_flops_over_the_measured_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flops_module, "matmul_ceiling", lambda config, tokens, bf16: 400e9)
    rows = utilization(torch.device("cpu"), 1000.0, 1e8, modernbert(), 2048, bf16=True)
    assert rows == {
        "model_gflops_per_second": 100.0,
        "matmul_ceiling_gflops_per_second": 400.0,
        "matmul_ceiling_fraction": 0.25,
    }


def test_mfu_and_peaks() -> None:
    assert mfu(tokens_per_second=1e5, flops_per_token=4.945e8, peak=989e12) == pytest.approx(0.05)
    assert peak_bf16("NVIDIA H200") == 989e12
    assert peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16("Tesla T4") is None


def test_unknown_models_are_refused() -> None:
    config = modernbert()
    config.model_type = "gpt2"
    with pytest.raises(ValueError, match="gpt2"):
        forward_flops(config, 16, 0.3)


@pytest.mark.parametrize("size", ["default", "base"])
def test_the_benches_reference_bert_does_the_linear_work_of_ours(size: str, tiny_tokenizer) -> None:
    """bench.common.reference_bert_config widens BERT's MLP to the FLOPs of our GeGLU, so the speed ratios of
    bench.finetune_throughput and bench.pretrain_throughput compare the same products (within rounding)."""
    from bench.common import load, reference_bert_config
    from bench.pretrain_throughput import BASE

    model = load()["model"]
    model = dataclasses.replace(model, **BASE) if size == "base" else model
    ours = forward_flops(new_encoder_config(model, tiny_tokenizer), seq_len=128, predicted_fraction=0.0)
    reference = forward_flops(reference_bert_config(model, tiny_tokenizer), seq_len=128, predicted_fraction=0.0)
    assert (model.architecture, ours.linear > 0) == ("modernbert", True)
    assert reference.linear == pytest.approx(ours.linear, rel=0.005)
