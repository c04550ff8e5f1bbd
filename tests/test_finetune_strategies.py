"""The fine-tuning strategies of the method: discriminative learning rates, gradual unfreezing, label
subsampling, label smoothing, for both architectures."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from transformers import PreTrainedModel

from tests.helpers import run_short, tiny_params
from transferpipe.errors import UserError
from transferpipe.finetuning import loss_weights, subsample_per_class
from transferpipe.modeling import (
    encoder_layers,
    encoder_of,
    freeze,
    gradual_unfreezing,
    layer_groups,
    param_groups,
)
from transferpipe.params import FinetuneParams, from_dict


def test_layer_groups_cover_the_encoder_once_top_down(classifier: PreTrainedModel) -> None:
    groups = layer_groups(classifier)
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in encoder_of(classifier).parameters()}
    layers = encoder_layers(classifier)
    assert len(groups) == len(layers) + 1
    assert {id(p) for p in layers[-1].parameters()} <= {id(p) for p in groups[0]}
    assert {id(p) for p in layers[0].parameters()} == {id(p) for p in groups[-2]}
    assert {id(p) for p in encoder_of(classifier).embeddings.parameters()} == {id(p) for p in groups[-1]}


def test_layer_lr_decay_scales_each_group_down_from_the_top(classifier: PreTrainedModel) -> None:
    groups = param_groups(classifier, encoder_lr=1e-3, head_lr=1e-2, weight_decay=0.0, layer_lr_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for k, group in enumerate(layer_groups(classifier)):
        assert [lr_of[id(p)] for p in group] == pytest.approx([1e-3 * 0.5**k] * len(group)), k
    encoder_ids = {id(p) for p in encoder_of(classifier).parameters()}
    head = [p for p in classifier.parameters() if id(p) not in encoder_ids]
    assert head and {lr_of[id(p)] for p in head} == {1e-2}


def test_gradual_unfreezing_opens_one_group_per_epoch_and_keeps_frozen_ones(classifier: PreTrainedModel) -> None:
    freeze(classifier, embeddings=True, num_layers=0)
    on_epoch = gradual_unfreezing(classifier)
    groups = layer_groups(classifier)
    embeddings = {id(p) for p in encoder_of(classifier).embeddings.parameters()}
    encoder_ids = {id(p) for p in encoder_of(classifier).parameters()}
    for epoch in range(len(groups) + 2):
        on_epoch(epoch)
        for k, group in enumerate(groups):
            for p in group:
                expected = k < epoch and id(p) not in embeddings
                assert p.requires_grad == expected, (epoch, k)
        assert all(p.requires_grad for p in classifier.parameters() if id(p) not in encoder_ids)  # the head


def train_set(counts: dict[int, int]) -> datasets.Dataset:
    labels = [label for label, n in counts.items() for _ in range(n)]
    return datasets.Dataset.from_dict({"input_ids": [[i] for i in range(len(labels))], "labels": labels})


def test_labels_per_class_is_a_stratified_seeded_subsample() -> None:
    ds = train_set({0: 10, 1: 4, 2: 7})
    small = subsample_per_class(ds, 4, seed=1)
    assert Counter(small["labels"]) == {0: 4, 1: 4, 2: 4}
    assert subsample_per_class(ds, 4, seed=1)["input_ids"] == small["input_ids"]
    assert subsample_per_class(ds, 4, seed=2)["input_ids"] != small["input_ids"]
    with pytest.raises(UserError, match=r"labels_per_class: 5 is more than .* \(class 1: 4 examples\)"):
        subsample_per_class(ds, 5, seed=1)
    assert subsample_per_class(ds, "all", seed=1) is ds
    with pytest.raises(UserError, match="labels_per_class=0"):
        subsample_per_class(ds, 0, seed=1)


def test_labels_per_class_param_takes_all_or_an_integer() -> None:
    base = {f: getattr(FinetuneParams(), f) for f in FinetuneParams.__dataclass_fields__}
    assert from_dict(FinetuneParams, {**base, "labels_per_class": 20}, "finetune").labels_per_class == 20
    assert from_dict(FinetuneParams, {**base, "labels_per_class": "all"}, "finetune").labels_per_class == "all"
    with pytest.raises(UserError, match="labels_per_class"):
        from_dict(FinetuneParams, {**base, "labels_per_class": "some"}, "finetune")


def test_strategies_together_in_the_finetune_stage(tmp_path: Path, tiny_csv: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    params = str(
        tiny_params(
            tmp_path,
            prepare={"source": str(tiny_csv)},
            finetune={
                "epochs": 3,
                "layer_lr_decay": 0.8,
                "gradual_unfreezing": True,
                "label_smoothing": 0.1,
                "labels_per_class": 3,
                "monitor": "loss",
            },
        )
    )
    metrics = run_short(params, tmp_path, through="finetune")
    # 5 classes x 3 labels, batch size 8: 2 steps an epoch.
    assert metrics["train"]["steps"] == 6
    run = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("transferpipe-test").experiment_id],
        "tags.`transferpipe.stage` = 'finetune'",
    )[0]
    assert run.data.params["train_examples"] == "15"
    assert run.data.params["finetune.label_smoothing"] == "0.1"
    assert run.data.params["finetune.monitor"] == "loss"
    # The epoch kept is the one with the lowest validation loss.
    eval_rows = (tmp_path / "fp/eval.csv").read_text().splitlines()
    losses = [float(row.split(",")[2]) for row in eval_rows[1:]]
    assert metrics["validation"]["loss"] == pytest.approx(min(losses), rel=1e-5)


def test_min_steps_repeats_few_labels_and_still_validates_epochs_times(
    tmp_path: Path, tiny_csv: Path, mlflow_uri: str
) -> None:
    """5 classes x 3 labels in batches of 8 are 2 steps an epoch: min_steps 21 trains 21 steps (11 epochs),
    validated 3 times (every 7 steps), early stopping counting validations."""
    params = tiny_params(
        tmp_path,
        prepare={"source": str(tiny_csv)},
        finetune={"epochs": 3, "min_steps": 21, "labels_per_class": 3, "early_stopping_patience": 5},
    )
    metrics = run_short(str(params), tmp_path, through="finetune")
    assert metrics["train"]["steps"] == 21
    steps = [int(row.split(",")[0]) for row in (tmp_path / "fp/eval.csv").read_text().splitlines()[1:]]
    assert steps == [7, 14, 21]
    # Without min_steps the same data trains epochs x 2 steps, validated each epoch.
    params = tiny_params(tmp_path, prepare={"source": str(tiny_csv)}, finetune={"epochs": 3, "labels_per_class": 3})
    from stages import finetune

    d = tmp_path
    metrics = finetune.main(["--params", str(params), "--data", f"{d}/t", "--encoder", f"{d}/m", "--out", f"{d}/f2",
                             "--metrics", f"{d}/f2.json", "--plots", f"{d}/fp2"])  # fmt: skip
    assert metrics["train"]["steps"] == 6


def test_balanced_weights_follow_scikit_learn_and_an_absent_class_weighs_nothing() -> None:
    weights = loss_weights([0] * 10 + [1] * 2, ["a", "b", "c"], "balanced")
    # n / (classes present x count): 12 / (2 x 10), 12 / (2 x 2)
    assert weights.tolist() == pytest.approx([0.6, 3.0, 0.0])
    assert loss_weights([0, 1], ["a", "b"], "none") is None


def imbalanced_split(counts: dict[int, int], seed: int) -> datasets.Dataset:
    """Documents of 12 tokens: the minority class (1) opens with token 7 four times, a third of the majority
    (0) with it twice: a signal an unweighted loss learns too little of in a short run."""
    rng = np.random.default_rng(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": [], "document": [], "window": []}
    for label, n in counts.items():
        for _ in range(n):
            ids = rng.integers(20, 150, size=12).tolist()
            if label == 1:
                ids[:4] = [7, 7, 7, 7]
            elif rng.random() < 1 / 3:
                ids[:2] = [7, 7]
            rows["input_ids"].append([2, *ids, 3])
            rows["attention_mask"].append([1] * 14)
            rows["labels"].append(label)
            rows["document"].append(len(rows["document"]))
            rows["window"].append(0)
    return datasets.Dataset.from_dict(rows)


def test_balanced_class_weights_raise_the_minority_recall_on_a_ten_to_one_set(
    tiny_encoders: dict[str, Path], tiny_tokenizer
) -> None:
    """10:1 imbalance: weighting the loss by the inverse class frequency raises the minority class's recall
    on held-out documents, and the weights are recorded with the result."""
    import torch
    from sklearn.metrics import recall_score

    from transferpipe.finetuning import finetune
    from transferpipe.inference import collator_for, predict_logits
    from transferpipe.modeling import sequence_classifier
    from transferpipe.tracking import Run

    splits = datasets.DatasetDict(
        {"train": imbalanced_split({0: 200, 1: 20}, seed=0), "validation": imbalanced_split({0: 50, 1: 5}, seed=1)}
    )
    held_out = imbalanced_split({0: 200, 1: 200}, seed=2)
    cpu = torch.device("cpu")
    base = {f: getattr(FinetuneParams(), f) for f in FinetuneParams.__dataclass_fields__}
    recall = {}
    for mode in ("none", "balanced"):
        params = from_dict(
            FinetuneParams,
            {**base, "epochs": 4, "min_steps": 0, "batch_size": 16, "class_weights": mode, "head_learning_rate": 3.0e-3,
             "encoder_learning_rate": 3.0e-3, "checkpoint_every": None, "precision": "fp32", "seed": 0},
            "finetune",
        )  # fmt: skip
        torch.manual_seed(0)
        model = sequence_classifier(tiny_encoders["bert"], ["majority", "minority"], classifier_dropout=0.0)
        result = finetune(model, tiny_tokenizer, splits, ["majority", "minority"], params, Run(None), cpu)
        logits = predict_logits(model, held_out, collator_for(tiny_tokenizer, cpu), 64, cpu)
        recall[mode] = recall_score(held_out["labels"], logits.argmax(-1), pos_label=1)
        if mode == "balanced":
            assert result.records["class_weights"] == pytest.approx({"majority": 220 / 400, "minority": 220 / 40})
        else:
            assert "class_weights" not in result.records
    assert recall["balanced"] > recall["none"] + 0.2, recall
