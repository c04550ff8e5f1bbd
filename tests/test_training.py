"""The shared training loop: schedule, logging rows, early stopping and restoring the best weights."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from transferpipe import distributed
from transferpipe.checkpoint import rng_state, set_rng_state
from transferpipe.errors import UserError
from transferpipe.tracking import Run
from transferpipe.training import (
    EarlyStopping,
    LossMeter,
    cpu_has_fast_bf16,
    fit,
    make_optimizer,
    seed_everything,
    train_loader,
    train_step,
    use_bf16,
)


class Regressor(nn.Module):
    """The smallest model with a transformers-style output: forward(**batch).loss."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> object:
        loss = nn.functional.mse_loss(self.linear(input_ids.float()).squeeze(-1), labels)
        return type("Output", (), {"loss": loss})()


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    x = torch.randn(n, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    rows = [{"input_ids": x[i], "labels": y[i]} for i in range(n)]
    return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


def run_fit(model: nn.Module, scores: list[float], **kwargs: object) -> tuple[object, list[dict]]:
    """fit() with an evaluate() that returns the given scores in turn and snapshots the weights it saw."""
    seen: list[dict] = []

    def evaluate() -> dict[str, float]:
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"loss": 0.0, "score": scores[len(seen) - 1]}

    optimizer = make_optimizer([{"params": list(model.parameters())}], 0.05, 0.98, torch.device("cpu"))
    defaults = dict(total_steps=len(scores) * 4, warmup_ratio=0.25, max_grad_norm=1.0, eval_every=4)
    result = fit(
        model,
        loader(),
        optimizer=optimizer,
        evaluate=evaluate,
        run=Run(None),
        device=torch.device("cpu"),
        log_every=1,
        **{**defaults, **kwargs},
    )
    return result, seen


def test_loss_falls_and_learning_rate_warms_up_then_decays() -> None:
    seed_everything(0)
    result, _ = run_fit(Regressor(), [0.0] * 10)
    losses = [r["loss"] for r in result.train_rows]
    assert sum(losses[-4:]) < sum(losses[:4]) / 2  # batches are tiny and noisy: compare averages
    lrs = [r["learning_rate"] for r in result.train_rows]
    peak = lrs.index(max(lrs))
    assert peak == 9  # ceil(0.25 * 40) warmup steps, the last row at the peak is step 10
    assert lrs[:peak] == sorted(lrs[:peak]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert lrs[-1] == pytest.approx(0.0)
    assert [r["step"] for r in result.eval_rows] == [4 * i for i in range(1, 11)]
    assert result.steps == 40 and result.tokens_per_second > 0


def test_early_stopping_restores_the_best_weights() -> None:
    seed_everything(0)
    model = Regressor()
    result, seen = run_fit(model, [0.1, 0.5, 0.3, 0.4, 0.2, 0.9], stopping=EarlyStopping("score", patience=3))
    assert result.stopped_early and result.steps == 20  # evaluations 3, 4, 5 brought nothing better than 0.5
    assert result.best["score"] == 0.5 and result.best["step"] == 8
    for key, value in model.state_dict().items():
        assert torch.equal(value, seen[1][key]), key


def test_a_lower_is_better_monitor_keeps_the_lowest() -> None:
    """finetune.monitor: loss. The same scores as above, now losses: the best is 0.1, and the run stops after
    evaluations 2, 3 and 4 brought nothing lower."""
    seed_everything(0)
    model = Regressor()
    result, seen = run_fit(model, [0.1, 0.5, 0.3, 0.4, 0.2, 0.9], stopping=EarlyStopping("score", False, patience=3))
    assert result.stopped_early and result.steps == 16
    assert result.best["score"] == 0.1 and result.best["step"] == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, seen[0][key]), key


def test_without_monitor_the_last_evaluation_is_kept() -> None:
    result, seen = run_fit(Regressor(), [0.3, 0.2])
    assert result.best["step"] == 8 and not result.stopped_early


def test_early_stopping_keeps_the_best_row_and_weights_and_counts_patience() -> None:
    model = nn.Linear(2, 1)
    stopping = EarlyStopping("f1", patience=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert not stopping.update({"step": 1, "f1": 0.5}, model)
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert not stopping.update({"step": 2, "f1": 0.4}, model)  # one without improvement
    assert not stopping.update({"step": 3, "f1": 0.6}, model)  # better: the count starts again
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert not stopping.update({"step": 4, "f1": 0.6}, model)  # equal is not better
    assert stopping.update({"step": 5, "f1": 0.1}, model)  # the second in a row: stop
    assert stopping.best_row == {"step": 3, "f1": 0.6}
    stopping.restore_best(model)
    assert torch.equal(model.weight, torch.full((1, 2), 2.0)) and stopping.best_state is None


def test_early_stopping_without_a_monitor_keeps_the_last_row_and_never_stops() -> None:
    stopping, model = EarlyStopping(), nn.Linear(2, 1)
    assert not any(stopping.update({"step": s, "loss": 1.0}, model) for s in range(5))
    assert stopping.best_row["step"] == 4 and stopping.best_state is None


def test_the_loss_meter_counts_only_finite_steps_and_resets_its_window() -> None:
    meter = LossMeter(torch.device("cpu"))
    for loss, finite in [(1.0, True), (float("nan"), False), (3.0, True)]:
        meter.add(torch.tensor(loss), torch.tensor(finite))
    assert meter.window() == 2.0 and meter.skipped() == 1
    meter.add(torch.tensor(float("inf")), torch.tensor(False))
    assert math.isnan(meter.window()) and meter.skipped() == 2
    assert LossMeter(torch.device("cpu"), meter.state()).skipped() == 2  # a checkpoint carries it


def test_a_step_with_non_finite_gradients_is_skipped_and_counted() -> None:
    """Seen on a GPU: one batch's NaN gradients, clipped and applied, made every weight NaN. fit() skips that
    update instead and counts it; the other steps train as usual."""
    seed_everything(0)
    model = Regressor()
    poisoned = loader()
    poisoned.dataset[5]["input_ids"] = torch.tensor([float("nan"), 0.0, 0.0, 0.0])  # in one batch per epoch
    optimizer = make_optimizer([{"params": list(model.parameters())}], 0.05, 0.98, torch.device("cpu"))
    result = fit(
        model,
        poisoned,
        optimizer=optimizer,
        total_steps=40,  # 10 epochs of 4 batches
        warmup_ratio=0.25,
        max_grad_norm=1.0,
        eval_every=40,
        evaluate=lambda: {"loss": 0.0},
        run=Run(None),
        device=torch.device("cpu"),
        log_every=1,
    )
    assert result.skipped_steps == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())
    losses = [r["loss"] for r in result.train_rows]
    assert sum(math.isnan(x) for x in losses) == 10  # a logging window of skipped steps only has no loss
    finite = [x for x in losses if not math.isnan(x)]
    assert sum(finite[-4:]) < sum(finite[:4]) * 0.75  # still learning


def test_curves_are_written_as_csv(tmp_path: Path) -> None:
    result, _ = run_fit(Regressor(), [0.1, 0.2])
    result.write_curves(tmp_path / "curves")
    train = (tmp_path / "curves" / "train.csv").read_text().splitlines()
    assert train[0] == "step,loss,learning_rate" and len(train) == 9
    evals = (tmp_path / "curves" / "eval.csv").read_text().splitlines()
    assert evals[0] == "step,epoch,loss,score" and evals[1].startswith("4,0,") and evals[2].startswith("8,1,")


def test_compiled_training_matches_eager_and_keeps_plain_state_dict_keys() -> None:
    """torch.compile (inductor, on this CPU) trains the same numbers; best-weights restore and saving use the
    model itself, so its keys carry no `_orig_mod.` prefix."""
    seed_everything(0)
    eager, _ = run_fit(Regressor(), [0.1, 0.5, 0.3], stopping=EarlyStopping("score"))
    seed_everything(0)
    model = Regressor()
    compiled, seen = run_fit(model, [0.1, 0.5, 0.3], stopping=EarlyStopping("score"), torch_compile=True)
    assert [r["loss"] for r in compiled.train_rows] == pytest.approx([r["loss"] for r in eager.train_rows], rel=1e-4)
    assert list(model.state_dict()) == ["linear.weight", "linear.bias"]
    assert compiled.best["step"] == 8 and torch.equal(model.linear.weight, seen[1]["linear.weight"])


def test_train_loader_workers_give_the_same_batches_and_every_epoch_a_new_order() -> None:
    rows = [{"input_ids": torch.tensor([i])} for i in range(12)]

    def epochs(num_workers: int) -> list[list[int]]:
        loader = train_loader(
            rows,
            batch_size=4,
            seed=0,
            num_workers=num_workers,
            collate_fn=default_collate,
            device=torch.device("cpu"),
            section="pretrain",
        )
        order = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)  # as fit() does
            order.append([int(i) for batch in loader for i in batch["input_ids"]])
        return order

    in_process = epochs(0)
    assert epochs(2) == in_process
    assert sorted(in_process[0]) == list(range(12)) and in_process[0] != in_process[1]


def test_train_loader_rejects_negative_workers() -> None:
    with pytest.raises(UserError, match="finetune.num_workers=-1"):
        train_loader(
            [1],
            batch_size=1,
            seed=0,
            num_workers=-1,
            collate_fn=default_collate,
            device=torch.device("cpu"),
            section="finetune",
        )


def test_precision_decides_bf16_autocast_per_device() -> None:
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert [use_bf16(p, cpu) for p in ("auto", "bf16", "fp32")] == [cpu_has_fast_bf16(), True, False]
    assert [use_bf16(p, cuda) for p in ("auto", "bf16", "fp32")] == [True, True, False]
    assert [use_bf16(p, mps) for p in ("auto", "bf16", "fp32")] == [False, True, False]


@pytest.mark.parametrize(
    ("cuda", "mps", "auto"), [(True, True, "cuda"), (False, True, "mps"), (True, False, "cuda"), (False, False, "cpu")]
)
def test_device_auto_takes_cuda_then_mps_then_the_cpu_and_a_missing_one_is_one_line(
    cuda: bool, mps: bool, auto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The availability checks patched: no MPS (nor CUDA) has run this on real hardware here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert distributed.pick_device("auto") == torch.device(auto)
    assert distributed.pick_device("cpu") == torch.device("cpu")
    for name, present in (("cuda", cuda), ("mps", mps)):
        if present:
            assert distributed.pick_device(name, "finetune.device") == torch.device(name)
        else:
            with pytest.raises(UserError, match=rf"^params finetune.device='{name}', but this machine has no"):
                distributed.pick_device(name, "finetune.device")


def test_mps_trains_in_one_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with (
        pytest.raises(UserError, match="params pretrain.device=mps trains in one process"),
        distributed.process_group("mps", "pretrain.device"),
    ):
        pass


def test_the_checkpoint_keeps_the_mps_generator_where_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = torch.tensor([1, 2, 3], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: saved)
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    state = rng_state()
    assert state["mps"] is saved
    set_rng_state(state)
    assert restored == [saved]


def test_bf16_on_cpu_runs_the_forward_in_bf16_and_keeps_fp32_weights() -> None:
    """precision bf16 on a CPU: the linear layers compute in bf16 under autocast, the weights the optimizer
    updates stay fp32, and training still converges."""
    seed_everything(0)
    model = Regressor()
    dtypes: list[torch.dtype] = []
    model.linear.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    result, _ = run_fit(model, [0.0] * 10, precision="bf16")
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    losses = [row["loss"] for row in result.train_rows]
    assert losses[-1] < losses[0] / 2


def test_four_micro_batches_of_8_give_the_update_of_one_batch_of_32() -> None:
    """Gradient accumulation: the micro-batches' losses weighted by their share of the batch (here an uneven
    split too) give the whole batch's mean gradient, so the update matches the one batch's to float tolerance."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randn(32)
    updated = []
    for sizes in ([32], [8, 8, 8, 8], [5, 11, 16]):
        torch.manual_seed(1)
        model = Regressor()
        optimizer = make_optimizer([{"params": list(model.parameters())}], 0.05, 0.98, torch.device("cpu"))
        meter = LossMeter(torch.device("cpu"))
        bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
        batches = [{"input_ids": x[a:b], "labels": y[a:b]} for a, b in itertools.pairwise(bounds)]
        train_step(model, batches, optimizer, meter, max_grad_norm=100.0, bf16=False)
        updated.append((torch.cat([p.detach().flatten() for p in model.parameters()]), meter.window()))
    (whole, whole_loss), *accumulated = updated
    for weights, loss in accumulated:
        assert torch.allclose(weights, whole, atol=1e-6)
        assert loss == pytest.approx(whole_loss, rel=1e-5)  # the logged loss is the batch's mean too


def test_accumulation_all_reduces_once_per_optimizer_step() -> None:
    """Under DDP every micro-batch but the last runs in no_sync(): one gradient all-reduce per step."""

    class Counting(Regressor):
        synced_off = 0

        @contextlib.contextmanager
        def no_sync(self) -> Iterator[None]:
            Counting.synced_off += 1
            yield

    model = Counting()
    optimizer = make_optimizer([{"params": list(model.parameters())}], 0.05, 0.98, torch.device("cpu"))
    batches = [{"input_ids": torch.randn(8, 4), "labels": torch.randn(8)} for _ in range(4)]
    train_step(model, batches, optimizer, LossMeter(torch.device("cpu")), max_grad_norm=1.0, bf16=False)
    assert Counting.synced_off == 3


def test_fit_with_accumulation_takes_optimizer_steps_of_whole_batches() -> None:
    """8 optimizer steps of 4 micro-batches of 8 read 256 examples: 8 epochs of the 32-row loader; the batch
    size must split into the micro-batches."""
    torch.manual_seed(0)
    result, _ = run_fit(Regressor(), [1.0, 2.0], accumulation=4)
    assert result.steps == 8 and result.train_rows[-1]["step"] == 8
    with pytest.raises(UserError, match=r"batch_size=16 must be divisible by finetune.gradient_accumulation_steps=3"):
        train_loader(list(range(32)), batch_size=16, seed=0, num_workers=0, collate_fn=default_collate,
                     device=torch.device("cpu"), section="finetune", accumulation=3)  # fmt: skip
