"""The LSTM architecture (transferpipe.lstm): the models themselves, their place in modeling.py's freezing and
parameter groups, and the whole pipeline with `model.architecture: lstm` down to an MLflow model that loads
in a fresh process."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
)

from tests.helpers import dvc_commands, tiny_params
from transferpipe.lstm import (
    LOSS_CHUNK,
    LSTMConfig,
    LSTMForCausalLM,
    LSTMForSequenceClassification,
    linear_cross_entropy,
    variational_dropout,
)
from transferpipe.modeling import (
    encoder_layers,
    encoder_of,
    freeze,
    gradual_unfreezing,
    is_causal_lm,
    layer_groups,
    param_groups,
    pretraining_model,
    sequence_classifier,
)
from transferpipe.params import ModelParams, PretrainParams
from transferpipe.pretraining import NextTokenLM, held_out_batches, held_out_loss, objective
from transferpipe.tokenization import pack_blocks

LABELS = ["business", "entertainment", "politics", "sport", "tech"]
TINY = ModelParams(checkpoint=None, architecture="lstm", hidden_size=32, num_hidden_layers=3)


@pytest.fixture
def lm(tiny_tokenizer: PreTrainedTokenizerFast) -> LSTMForCausalLM:
    torch.manual_seed(0)
    return pretraining_model(TINY, tiny_tokenizer)


@pytest.fixture
def lm_dir(tmp_path: Path, lm: LSTMForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


@pytest.fixture
def classifier(lm_dir: Path) -> LSTMForSequenceClassification:
    return sequence_classifier(lm_dir, LABELS, classifier_dropout=0.0)


def texts_batch(tokenizer: PreTrainedTokenizerFast, **kwargs) -> dict[str, torch.Tensor]:
    texts = ["Bank shares rose in the market.", "The team won the cup match with a late goal.", "A film."]
    return tokenizer(texts, padding=True, return_tensors="pt", **kwargs)


def test_pretraining_model_is_a_tied_next_token_lm_sized_by_params(
    lm: LSTMForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    assert type(lm) is LSTMForCausalLM and is_causal_lm(lm)
    assert (lm.config.vocab_size, lm.config.hidden_size, lm.config.num_hidden_layers) == (len(tiny_tokenizer), 32, 3)
    assert lm.config.pad_token_id == tiny_tokenizer.pad_token_id
    assert lm.lm_head.weight is lm.lstm.embeddings.weight  # ULMFiT ties the output projection to the input
    assert [type(layer).__name__ for layer in encoder_layers(lm)] == ["LSTM"] * 3
    # Cells start remembering: forget-gate biases are 1, the others 0.
    bias = lm.lstm.layers[0].bias_ih_l0
    assert torch.equal(bias[32:64], torch.ones(32)) and torch.equal(bias[:32], torch.zeros(32))


def test_lm_forward_shapes_and_shifted_loss(lm: LSTMForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    batch = texts_batch(tiny_tokenizer)
    out = lm(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tiny_tokenizer))
    # Logits at t predict token t+1; padding (attention_mask 0) is never a target.
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, len(tiny_tokenizer)), labels.reshape(-1)
    )
    assert torch.allclose(out.loss, expected)
    # An untrained model guesses about uniformly: the loss is near log(vocab size).
    assert abs(out.loss.item() - math.log(len(tiny_tokenizer))) < 0.5


def plain_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return torch.nn.functional.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, ignore_index=-100
    )


def leaves(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in shapes]


@pytest.mark.parametrize("tokens", [7, LOSS_CHUNK, 2 * LOSS_CHUNK + 37])
def test_linear_cross_entropy_is_the_plain_loss_with_its_gradients(tokens: int) -> None:
    """In float64 the chunked loss and its gradients equal the plain ones to rounding, over one chunk, exactly
    one, and several with a ragged end, with positions that have no target (-100)."""
    vocab = 50
    targets = torch.randint(0, vocab, (tokens,))
    targets[::3] = -100
    fused, plain = leaves((tokens, 16), (vocab, 16), (vocab,)), leaves((tokens, 16), (vocab, 16), (vocab,))
    scale = torch.tensor(3.0, dtype=torch.float64)  # the backward scales by the incoming gradient
    (scale * linear_cross_entropy(*fused, targets)).backward()
    expected = plain_loss(*plain, targets)
    (scale * expected).backward()
    assert torch.allclose(linear_cross_entropy(*fused, targets), expected, rtol=1e-12, atol=0)
    for ours, theirs in zip(fused, plain, strict=True):
        assert torch.allclose(ours.grad, theirs.grad, rtol=1e-10, atol=1e-14)


def test_linear_cross_entropy_under_bf16_autocast_stays_near_the_plain_loss() -> None:
    hidden, weight, bias = leaves((300, 32), (64, 32), (64,), dtype=torch.float32)
    targets = torch.randint(0, 64, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, bias, targets)
        expected = plain_loss(hidden, weight, bias, targets)
    assert loss.dtype == torch.float32 and torch.allclose(loss, expected, rtol=2e-2)
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    (expected_hidden,) = torch.autograd.grad(expected, hidden)
    assert grad_hidden.dtype == torch.float32 and torch.allclose(grad_hidden, expected_hidden, atol=2e-3)


def test_lm_skip_logits_gives_the_same_loss_and_gradients(lm: LSTMForCausalLM, tiny_tokenizer) -> None:
    """Pretraining's loss-only forward (tied head, padding masked) trains exactly as the plain one does."""
    batch = texts_batch(tiny_tokenizer)
    lm.train()
    fused = lm(**batch, labels=batch["input_ids"], skip_logits=True)
    assert fused.logits is None
    fused.loss.backward()
    fused_grads = {name: p.grad.clone() for name, p in lm.named_parameters()}
    lm.zero_grad()
    plain = lm(**batch, labels=batch["input_ids"])
    plain.loss.backward()
    assert torch.allclose(fused.loss, plain.loss, rtol=1e-6)
    for name, p in lm.named_parameters():
        assert torch.allclose(fused_grads[name], p.grad, rtol=1e-4, atol=1e-7), name
    with torch.no_grad():  # evaluation takes the plain path: the same digits as before the fused loss
        assert torch.equal(
            lm.eval()(**batch, labels=batch["input_ids"], skip_logits=True).loss,
            lm(**batch, labels=batch["input_ids"]).loss,
        )


def test_lm_loss_drops_on_tiny_data(lm: LSTMForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """A repeated sentence is predictable only from context ("the" precedes three different words)."""
    texts = ["The bank said shares rose in the market and the team won the cup."] * 20
    blocks = pack_blocks(tiny_tokenizer, texts, block_size=16)
    objective_ = objective(lm, tiny_tokenizer, PretrainParams())
    assert isinstance(objective_, NextTokenLM)  # the model shifts the inputs; no masks
    batches = held_out_batches(blocks.select(range(16)), objective_, batch_size=16, seed=0)
    assert list(batches[0]) == ["input_ids"]
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    before = held_out_loss(objective_, batches, torch.device("cpu"))["loss"]
    lm.train()
    for _ in range(30):
        objective_(**batches[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_out_loss(objective_.eval(), batches, torch.device("cpu"))["loss"]
    assert after < before / 3, (before, after)  # unigram statistics alone stop near 2.9


def test_held_out_loss_averages_over_next_token_predictions(
    lm: LSTMForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    """Batches of different sizes are weighted by their predicted tokens: seq_len - 1 per block."""
    ids = torch.randint(5, len(tiny_tokenizer), (5, 12))
    with torch.no_grad():
        whole = lm(input_ids=ids, labels=ids).loss.item()
    split = [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}]
    assert held_out_loss(NextTokenLM(lm), split, torch.device("cpu"))["loss"] == pytest.approx(whole, rel=1e-5)


def test_save_and_load_through_the_auto_classes(lm: LSTMForCausalLM, lm_dir: Path) -> None:
    config = json.loads((lm_dir / "config.json").read_text())
    assert config["model_type"] == "transferpipe_lstm"
    # The folder carries its own code for processes that never import transferpipe (trust_remote_code).
    assert config["auto_map"]["AutoModelForCausalLM"] == "lstm.LSTMForCausalLM"
    assert (lm_dir / "lstm.py").is_file()
    assert type(AutoConfig.from_pretrained(lm_dir)) is LSTMConfig
    loaded = AutoModelForCausalLM.from_pretrained(lm_dir)
    assert type(loaded) is LSTMForCausalLM
    assert loaded.lm_head.weight is loaded.lstm.embeddings.weight
    ids = torch.randint(5, lm.config.vocab_size, (2, 9))
    assert torch.equal(loaded(input_ids=ids).logits, lm.eval()(input_ids=ids).logits)
    # Continued pretraining from the folder (model.checkpoint) gives the LM back, whatever `architecture` says.
    again = pretraining_model(dataclasses.replace(TINY, architecture="modernbert", checkpoint=str(lm_dir)), None)
    assert type(again) is LSTMForCausalLM


def test_sequence_classifier_keeps_the_pretrained_lstm_and_round_trips(
    lm: LSTMForCausalLM,
    classifier: LSTMForSequenceClassification,
    tmp_path: Path,
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    assert type(classifier) is LSTMForSequenceClassification
    assert classifier.config.id2label == dict(enumerate(LABELS))
    for name, tensor in encoder_of(lm).state_dict().items():
        assert torch.equal(encoder_of(classifier).state_dict()[name], tensor), name
    batch = texts_batch(tiny_tokenizer)
    logits = classifier.eval()(**batch).logits
    assert logits.shape == (3, len(LABELS))
    classifier.save_pretrained(tmp_path / "clf")
    assert set(json.loads((tmp_path / "clf/config.json").read_text())["auto_map"]) == {
        "AutoConfig",
        "AutoModelForCausalLM",
        "AutoModelForSequenceClassification",
    }
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert torch.equal(loaded.eval()(**batch).logits, logits)


def test_classifier_logits_do_not_depend_on_right_padding(
    classifier: LSTMForSequenceClassification, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    classifier.eval()
    texts = ["Bank shares rose in the market.", "A film."]
    alone = torch.cat([classifier(**tiny_tokenizer([t], return_tensors="pt")).logits for t in texts])
    padded = classifier(**tiny_tokenizer(texts, padding="max_length", max_length=24, return_tensors="pt")).logits
    assert torch.allclose(alone, padded, atol=1e-6)
    # Max and mean pooling skip padding too: a classifier that only saw the last state would pass the above.
    batch = tiny_tokenizer(texts, padding="max_length", max_length=24, return_tensors="pt")
    hidden = classifier.lstm(batch["input_ids"]).last_hidden_state
    assert hidden[1, 10:].abs().sum() > 0  # the LSTM does run over the padding: the mask matters


def test_classifier_refuses_left_padding(
    classifier: LSTMForSequenceClassification, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    batch = texts_batch(tiny_tokenizer, padding_side="left")  # the shared tiny_tokenizer itself stays right-padding
    with pytest.raises(ValueError, match="right padding"):
        classifier(**batch)


def test_freeze_embeddings_and_lowest_lstm_layers(classifier: LSTMForSequenceClassification) -> None:
    frozen = freeze(classifier, embeddings=True, num_layers=2)
    layers = encoder_layers(classifier)
    for module in (encoder_of(classifier).embeddings, *layers[:2]):
        assert not any(p.requires_grad for p in module.parameters())
    assert all(p.requires_grad for p in layers[2].parameters())
    assert all(p.requires_grad for p in classifier.classifier.parameters())
    assert frozen == sum(p.numel() for p in classifier.parameters() if not p.requires_grad) > 0


def test_layer_groups_and_discriminative_learning_rates(classifier: LSTMForSequenceClassification) -> None:
    groups = layer_groups(classifier)
    layers = encoder_layers(classifier)
    expected = [*(list(layer.parameters()) for layer in reversed(layers)), [encoder_of(classifier).embeddings.weight]]
    assert [[id(p) for p in g] for g in groups] == [[id(p) for p in g] for g in expected]

    lr_of = {
        id(p): group["lr"]
        for group in param_groups(classifier, 1e-3, 1e-2, weight_decay=0.01, layer_lr_decay=0.5)
        for p in group["params"]
    }
    assert lr_of[id(classifier.classifier.weight)] == 1e-2
    for k, layer in enumerate(reversed(layers)):
        assert {lr_of[id(p)] for p in layer.parameters()} == {1e-3 * 0.5**k}
    assert lr_of[id(encoder_of(classifier).embeddings.weight)] == 1e-3 * 0.5**3


def test_gradual_unfreezing_opens_one_lstm_layer_per_epoch(classifier: LSTMForSequenceClassification) -> None:
    on_epoch = gradual_unfreezing(classifier)
    layers = encoder_layers(classifier)
    head = list(classifier.classifier.parameters())
    for epoch, trainable in [(0, []), (1, layers[2:]), (2, layers[1:]), (3, layers)]:
        on_epoch(epoch)
        assert all(p.requires_grad for p in head)
        for layer in layers:
            assert all(p.requires_grad == (layer in trainable) for p in layer.parameters()), (epoch, layer)
        assert encoder_of(classifier).embeddings.weight.requires_grad == (epoch >= 4)
    on_epoch(4)
    assert all(p.requires_grad for p in classifier.parameters())


def test_pipeline_with_lstm_and_a_logged_model_that_loads_in_a_fresh_process(
    tmp_path: Path, tiny_csv: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every dvc.yaml command with model.architecture lstm; then MLflow's copy of the fine-tuned model, loaded
    by a fresh process, predicts label names with the transferpipe package shipped inside the model (its
    code_paths), the LSTM being that package's class: no trust_remote_code, no copy of lstm.py executed."""
    tiny_params(tmp_path, prepare={"source": str(tiny_csv)}, model={"architecture": "lstm"})
    monkeypatch.chdir(tmp_path)
    for module, argv in dvc_commands():
        importlib.import_module(module).main(argv)

    d = tmp_path
    variants = sorted(p.name for p in (d / "models/finetuned").iterdir())
    assert variants == ["pretrained", "scratch"]  # scratch: the untrained LSTM, saved and fine-tuned the same way
    for folder in [d / "models/pretrained", *(d / "models/finetuned" / v for v in variants)]:
        assert json.loads((folder / "config.json").read_text())["model_type"] == "transferpipe_lstm"
        assert {"lstm.py", "config.json", "model.safetensors", "training_run.json"} <= {
            p.name for p in folder.iterdir()
        }
    assert json.loads((d / "models/pretrained/config.json").read_text())["architectures"] == ["LSTMForCausalLM"]
    pre = json.loads((d / "metrics/pretrain.json").read_text())
    assert pre["train"]["steps"] == 6 and 1 < pre["eval"]["perplexity"] < 300  # the tiny vocabulary is 300
    curve = (d / "plots/pretrain/eval.csv").read_text().splitlines()
    assert curve[0] == "step,epoch,loss,perplexity" and [row.split(",")[0] for row in curve[1:]] == ["3", "6"]
    tested = json.loads((d / "metrics/evaluate.json").read_text())["test"]
    for variant in variants:
        assert 0 <= tested[variant]["macro_f1"] <= 1 and 0 <= tested[variant]["accuracy"] <= 1

    client = MlflowClient()
    experiment = client.get_experiment_by_name("transferpipe-test")
    run_id = json.loads((d / "models/finetuned/pretrained/training_run.json").read_text())["mlflow_run_id"]
    finetune_run = client.get_run(run_id)
    assert finetune_run.info.experiment_id == experiment.experiment_id
    assert "test/macro_f1" in finetune_run.data.metrics
    script = (
        "import json, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "pred = model.predict(['bank shares market profit economy', 'film music star award'])\n"
        "import transferpipe\n"
        "out = {'labels': list(pred['label']), 'package': transferpipe.__file__,\n"
        "       'class': type(model.unwrap_python_model().model).__module__,\n"
        "       'remote_code': any(m.startswith('transformers_modules') for m in sys.modules)}\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, f"runs:/{run_id}/model"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["labels"]) == 2 and set(result["labels"]) <= set(LABELS)
    assert result["class"] == "transferpipe.lstm" and result["remote_code"] is False
    assert Path(result["package"]).parent.parent.name == "code"  # MLflow's copy of the package, not src/


AWD = dict(embed_dropout=0.5, input_dropout=0.5, hidden_dropout=0.5, weight_dropout=0.5, output_dropout=0.5)


def test_awd_dropouts_come_from_params_and_are_kept_by_the_classifier(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    expected = dict(zip(AWD, (0.1, 0.2, 0.3, 0.4, 0.05), strict=True))
    params = dataclasses.replace(TINY, **{f"lstm_{key}": p for key, p in expected.items()})
    lm = pretraining_model(params, tiny_tokenizer)
    assert {key: getattr(lm.config, key) for key in AWD} == expected
    lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer.save_pretrained(tmp_path / "lm")
    classifier = sequence_classifier(tmp_path / "lm", LABELS, classifier_dropout=0.0)
    assert {key: getattr(classifier.config, key) for key in AWD} == expected  # fine-tuning regularizes alike
    # DropConnect leaves the parameters those of a plain nn.LSTM: no extra state_dict keys.
    plain = LSTMForSequenceClassification(LSTMConfig(**{**classifier.config.to_dict(), **dict.fromkeys(AWD, 0.0)}))
    assert set(classifier.state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize("key", list(AWD))
def test_each_awd_dropout_acts_in_training_only(
    key: str, lm: LSTMForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    batch = texts_batch(tiny_tokenizer)
    regularized = LSTMForCausalLM(LSTMConfig(**{**lm.config.to_dict(), key: AWD[key]}))
    regularized.load_state_dict(lm.state_dict())
    lm.eval(), regularized.eval()
    assert torch.equal(regularized(**batch).logits, lm(**batch).logits)  # evaluation: no dropout at all
    lm.train(), regularized.train()
    torch.manual_seed(1)
    out = regularized(**batch, labels=batch["input_ids"])
    assert not torch.allclose(out.logits, lm(**batch).logits) and torch.isfinite(out.logits).all()
    out.loss.backward()
    recurrent = regularized.lstm.layers[0].weight_hh_l0
    assert recurrent.grad is not None and recurrent.grad.abs().sum() > 0  # DropConnect's gradient reaches it
    assert torch.equal(recurrent, lm.lstm.layers[0].weight_hh_l0)  # and the weight itself is never overwritten


def test_variational_dropout_keeps_one_mask_over_time() -> None:
    torch.manual_seed(0)
    dropped = variational_dropout(torch.ones(4, 7, 16), 0.5, training=True)
    assert torch.equal(dropped, dropped[:, :1].expand(-1, 7, -1))  # the same units at every time step
    assert set(dropped.unique().tolist()) == {0.0, 2.0}  # kept units are scaled by 1 / (1 - p)
    assert torch.equal(variational_dropout(torch.ones(4, 7, 16), 0.5, training=False), torch.ones(4, 7, 16))


def test_embedding_dropout_drops_whole_words(lm: LSTMForCausalLM) -> None:
    regularized = LSTMForCausalLM(LSTMConfig(**{**lm.config.to_dict(), "embed_dropout": 0.5})).train()
    seen: list[torch.Tensor] = []
    regularized.lstm.layers[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    ids = torch.tensor([[5, 6, 5, 7, 5, 6, 8, 9, 10, 11, 12, 13]])
    torch.manual_seed(0)
    regularized(input_ids=ids)
    embedded = seen[0][0]  # (seq_len, hidden): the first layer's input
    zero = (embedded == 0).all(-1)
    assert zero.any() and not zero.all()
    for token in (5, 6):  # every occurrence of a word is dropped, or none is
        positions = (ids[0] == token).nonzero().flatten()
        assert torch.equal(embedded[positions], embedded[positions[:1]].expand(len(positions), -1))
