"""Each stage's main() on tiny data with the tiny profile: the exact files it writes, and what MLflow holds."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import datasets
import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from transformers import PreTrainedTokenizerFast

from stages import evaluate, finetune, pretrain
from tests.helpers import dvc_commands, files_in, make_corpus, run_short, tiny_params
from transferpipe.data import read_prepared
from transferpipe.errors import UserError
from transferpipe.registry import split_sha256
from transferpipe.sources import sha256_of
from transferpipe.tracking import rows_digest

LABELS = {"business", "sport", "tech", "politics", "entertainment"}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Every command of dvc.yaml run once for the module, in a folder holding the tiny profile as params.yaml and
    the tiny CSV as the source, with its own MLflow store; returns the folder and the store's URI. Tests read it
    and write only new paths inside it."""
    d = tmp_path_factory.mktemp("pipeline")
    source = d / "tiny.csv"
    pd.DataFrame(make_corpus()).to_csv(source, index=False)
    uri = f"sqlite:///{d / 'mlflow.db'}"
    # 16-token windows: the synthetic documents (about 20 tokens) are cut into two.
    tiny_params(d, prepare={"source": str(source)}, tokenize={"max_length": 16})
    with pytest.MonkeyPatch.context() as patch:  # what conftest's _offline and mlflow_uri give a test
        for key, value in {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TRANSFERPIPE_CHECKPOINT_DIR": str(d / ".checkpoints"),
            "MLFLOW_TRACKING_URI": uri,
        }.items():
            patch.setenv(key, value)  # fmt: skip
        patch.delenv("DVC_ROOT", raising=False)
        patch.delenv("DVC_EXP_NAME", raising=False)
        patch.chdir(d)
        for module, argv in dvc_commands():
            importlib.import_module(module).main(argv)
    return d, uri


@pytest.fixture
def pipeline_dir(pipeline_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """The module's pipeline folder as the working directory, its MLflow store as the tracking URI."""
    d, uri = pipeline_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(d)
    return d


def test_stages_write_exactly_their_outputs(pipeline_dir: Path) -> None:
    d = pipeline_dir
    assert files_in(d / "data/prepared") == {
        "train.parquet",
        "validation.parquet",
        "test.parquet",
        "unlabeled.parquet",
        "class_counts.json",
        "labels.json",
        "sources.json",
    }
    assert json.loads((d / "data/prepared/labels.json").read_text()) == sorted(LABELS)
    blocks = files_in(d / "data/blocks")
    assert "dataset_dict.json" in blocks
    assert {p.split("/")[0] for p in blocks if "/" in p} == {"mlm_train", "mlm_validation"}
    tokenized = files_in(d / "data/tokenized")
    assert {"dataset_dict.json", "labels.json"} <= tokenized
    assert {p.split("/")[0] for p in tokenized if "/" in p} == {"train", "validation", "test"}
    assert files_in(d / "models/tokenizer") == {"tokenizer.json", "tokenizer_config.json"}
    model_files = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_run.json"}
    for model in ("pretrained", "scratch"):
        assert files_in(d / "models" / model) == model_files, model
    model_files.add("README.md")  # a fine-tuned model's card
    assert set(files_in(d / "models/finetuned")) == {f"{v}/{f}" for v in ("pretrained", "scratch") for f in model_files}
    assert files_in(d / "plots/pretrain") == {"train.csv", "eval.csv"}
    assert files_in(d / "plots/finetune") == {
        f"{v}/{f}" for v in ("pretrained", "scratch") for f in ("train.csv", "eval.csv")
    }
    assert files_in(d / "plots/evaluate") == {
        "models.json",
        "test_set.json",
        *(
            f"{kind}_{model}.json"
            for kind in ("confusion", "per_class")
            for model in ("pretrained", "scratch", "tfidf_logreg")
        ),
    }
    assert files_in(d / "metrics") == {
        "data.json",
        "pretrain.json",
        "finetune/pretrained.json",
        "finetune/scratch.json",
        "evaluate.json",
    }
    # No temporary siblings are left behind by the atomic writes.
    assert not [p for p in d.rglob(".*.tmp")]


def test_scratch_is_the_pretrained_encoders_own_starting_point(tmp_path: Path, pipeline_dir: Path) -> None:
    """With no checkpoint, models/scratch holds exactly the weights pretraining started from: rebuilding the
    encoder with the same seed (pretrain.enabled false skips training) reproduces them bit for bit."""
    from transformers import AutoModelForMaskedLM

    d = pipeline_dir
    (tmp_path / "again").mkdir()
    params = str(tiny_params(tmp_path / "again", prepare={"source": "unused"}, pretrain={"enabled": False}))
    pretrain.main(
        ["--params", params, "--data", f"{d}/data/blocks", "--tokenizer", f"{d}/models/tokenizer",
         "--out", f"{d}/again/m", "--scratch", f"{d}/again/s", "--metrics", f"{d}/again/m.json",
         "--plots", f"{d}/again/pl"]
    )  # fmt: skip
    scratch = AutoModelForMaskedLM.from_pretrained(d / "models/scratch").state_dict()
    untrained = AutoModelForMaskedLM.from_pretrained(d / "again/m").state_dict()
    pretrained = AutoModelForMaskedLM.from_pretrained(d / "models/pretrained").state_dict()
    assert scratch.keys() == untrained.keys()
    assert all(torch.equal(scratch[k], untrained[k]) for k in scratch)
    assert not all(torch.equal(scratch[k], pretrained[k]) for k in scratch)  # pretraining changed the weights
    assert json.loads((d / "models/scratch/training_run.json").read_text()) == {"mlflow_run_id": None}


def test_metrics_are_finite_and_complete(pipeline_dir: Path) -> None:
    d = pipeline_dir
    stats = json.loads((d / "metrics/data.json").read_text())
    assert stats["documents"]["kept"] == sum(stats["split"].values()) == 60
    pre = json.loads((d / "metrics/pretrain.json").read_text())
    assert math.isfinite(pre["eval"]["loss"]) and pre["eval"]["perplexity"] > 1
    assert pre["train"]["steps"] == 6
    for variant in ("pretrained", "scratch"):
        fine = json.loads((d / f"metrics/finetune/{variant}.json").read_text())
        assert 0 <= fine["validation"]["macro_f1"] <= 1
    for train in (pre["train"], fine["train"]):  # on the CPU: model FLOP/s against the measured matmul ceiling
        achieved, ceiling = train["model_gflops_per_second"], train["matmul_ceiling_gflops_per_second"]
        assert achieved > 0 and ceiling > 0  # (the tiny models' products are too small for a meaningful fraction)
        assert train["matmul_ceiling_fraction"] == pytest.approx(achieved / ceiling, rel=1e-3)
    ev = json.loads((d / "metrics/evaluate.json").read_text())
    assert list(ev["test"]) == ["pretrained", "scratch", "tfidf_logreg"]
    for model in ("pretrained", "scratch", "tfidf_logreg"):
        scores = ev["test"][model]
        assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["macro_f1"] <= 1
        assert set(scores) == {"accuracy", "macro_f1"}
        per_class = json.loads((d / f"plots/evaluate/per_class_{model}.json").read_text())
        assert {r["label"] for r in per_class} == LABELS
        assert sum(r["support"] for r in per_class) == 12  # documents, not windows
    windows = datasets.load_from_disk(str(d / "data/tokenized"))["test"]
    assert len(windows) > 12 and sorted(set(windows["document"])) == list(range(12))  # several windows each
    # One row per model for the side-by-side bar plot, the same numbers as the metrics file.
    rows = json.loads((d / "plots/evaluate/models.json").read_text())
    assert rows == [{"model": m, **ev["test"][m]} for m in ("pretrained", "scratch", "tfidf_logreg")]
    # The baseline separates these synthetic topics easily: a sanity check of the evaluation itself.
    assert ev["test"]["tfidf_logreg"]["accuracy"] >= 0.8
    rows = json.loads((d / "plots/evaluate/confusion_pretrained.json").read_text())
    assert len(rows) == 12 and set(rows[0]) == {"actual", "predicted"}
    # What a review pairs predictions by: the test split's digest (the one the registry tags), size and labels.
    test_set = json.loads((d / "plots/evaluate/test_set.json").read_text())
    test = pd.read_parquet(d / "data/prepared/test.parquet")
    assert test_set == {
        "sha256": split_sha256(test["text"].tolist(), test["label"].tolist()),
        "documents": 12,
        "labels": sorted(LABELS),
    }
    curve = (d / "plots/pretrain/eval.csv").read_text().splitlines()
    assert curve[0] == "step,epoch,loss,perplexity" and [r.split(",")[0] for r in curve[1:]] == ["3", "6"]


def test_finetuned_model_predicts_label_names_with_transformers_pipeline(pipeline_dir: Path) -> None:
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(pipeline_dir / "models/finetuned/pretrained"))
    out = clf(["bank shares market profit", "match goal team player"])
    assert {o["label"] for o in out} <= LABELS


def test_mlflow_holds_the_runs_linked_with_histories_and_a_pyfunc_model(pipeline_dir: Path) -> None:
    client = MlflowClient()
    exp = client.get_experiment_by_name("transferpipe-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"pretrain", "finetune-pretrained", "finetune-scratch"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    pre, fine, scratch = runs["pretrain"], runs["finetune-pretrained"], runs["finetune-scratch"]
    assert fine.data.tags["transferpipe.stage"] == scratch.data.tags["transferpipe.stage"] == "finetune"
    assert (fine.data.tags["transferpipe.variant"], scratch.data.tags["transferpipe.variant"]) == (
        "pretrained",
        "scratch",
    )
    assert fine.data.tags["transferpipe.pretrain_run_id"] == pre.info.run_id
    groups = fine.data.tags["transferpipe.seed_group"], scratch.data.tags["transferpipe.seed_group"]
    assert len(set(groups)) == 2 and all(len(g) == 12 for g in groups)  # a group per variant, for the MLflow UI
    # Each training run names the data it learned from: the source's path and content hash.
    source = json.loads((pipeline_dir / "metrics/data.json").read_text())["sources"]["source"]
    for run in (pre, fine, scratch):
        assert run.data.tags["transferpipe.source.sha256"] == source["sha256"] == sha256_of(Path(source["path"]))
        assert "transferpipe.unlabeled_source.sha256" in run.data.tags
    assert "transferpipe.pretrain_run_id" not in scratch.data.tags

    # ... and as MLflow datasets (the run page's Datasets): each split read, its context, rows and digest.
    def inputs(run: object) -> dict[str, tuple[str, str, str]]:
        found = {}
        for dataset_input in run.inputs.dataset_inputs:
            tags = {t.key: t.value for t in dataset_input.tags}
            dataset = dataset_input.dataset
            assert tags["transferpipe.source_sha256"] == source["sha256"] and dataset.source_type == "local"
            found[dataset.name] = (tags["mlflow.data.context"], tags["transferpipe.rows"], dataset.digest)
        return found

    tokenized = datasets.load_from_disk(str(pipeline_dir / "data/tokenized"))
    blocks = datasets.load_from_disk(str(pipeline_dir / "data/blocks"))
    test = read_prepared(pipeline_dir / "data/prepared")[0]["test"]
    test_digest = split_sha256(test["text"].tolist(), test["label"].tolist())[:16]
    name = Path(source["path"]).stem

    def expected(splits: datasets.DatasetDict, train: str, validation: str) -> dict[str, tuple[str, str, str]]:
        read = {train: "training", validation: "validation"}
        return {f"{name}/{s}": (c, str(len(splits[s])), rows_digest(splits[s])) for s, c in read.items()}

    assert inputs(pre) == expected(blocks, "mlm_train", "mlm_validation")
    for run in (fine, scratch):
        assert inputs(run) == expected(tokenized, "train", "validation") | {f"{name}/test": ("test", "12", test_digest)}
    # Only the pretrained variant is registered; the scratch baseline is logged, not a registry candidate.
    assert json.loads((pipeline_dir / "models/finetuned/pretrained/training_run.json").read_text()) == {
        "mlflow_run_id": fine.info.run_id,
        "model_version": "1",
    }
    assert json.loads((pipeline_dir / "models/finetuned/scratch/training_run.json").read_text()) == {
        "mlflow_run_id": scratch.info.run_id,
        "model_version": None,
    }
    assert [str(v.version) for v in client.search_model_versions("name = 'transferpipe-test-classifier'")] == ["1"]
    # evaluate wrote the version's test results beside the baseline's into its description
    described = client.get_model_version("transferpipe-test-classifier", "1").description
    scores = json.loads((pipeline_dir / "metrics/evaluate.json").read_text())["test"]
    assert f"this model: macro-F1 {scores['pretrained']['macro_f1']:.4f}" in described
    assert f"TF-IDF + logistic regression: macro-F1 {scores['tfidf_logreg']['macro_f1']:.4f}" in described
    assert pre.data.params["pretrain.max_steps"] == "6"
    assert fine.data.params["finetune.head_learning_rate"] == "0.001"
    assert len(client.get_metric_history(pre.info.run_id, "train/loss")) >= 1
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "eval/loss")][:2] == [3, 6]
    assert len(client.get_metric_history(fine.info.run_id, "eval/macro_f1")) >= 1
    # evaluate added each model's test metrics (and the baseline's) to its finetune run
    ev = json.loads((pipeline_dir / "metrics/evaluate.json").read_text())["test"]
    for run, variant in ((fine, "pretrained"), (scratch, "scratch")):
        assert run.data.metrics["test/macro_f1"] == pytest.approx(ev[variant]["macro_f1"])
        assert run.data.metrics["test/tfidf_logreg_macro_f1"] == pytest.approx(ev["tfidf_logreg"]["macro_f1"])
    model = mlflow.pyfunc.load_model(f"runs:/{fine.info.run_id}/model")
    pred = model.predict(["bank shares market profit economy", "film music star award"])
    assert set(pred["label"]) <= LABELS
    assert len(pred) == 2
    # A text far longer than a window is scored as evaluate scores it: the mean logits of its first
    # tokenize.max_windows (4) windows of tokenize.max_length (16) tokens, not its first window alone.
    from transformers import AutoModelForSequenceClassification, pipeline

    from transferpipe.inference import predict_texts
    from transferpipe.tokenization import load_tokenizer

    long_text = "bank shares market profit economy film music star award " * 20
    folder = pipeline_dir / "models/finetuned/pretrained"
    classifier, tokenizer = AutoModelForSequenceClassification.from_pretrained(folder), load_tokenizer(folder)
    windowed = predict_texts(classifier, tokenizer, [long_text], 16, 4, 8, torch.device("cpu"))
    assert windowed.windows.tolist() == [4]
    assert model.predict([long_text])["score"][0] == pytest.approx(windowed.scores[0], rel=1e-4)
    first_window = pipeline("text-classification", model=str(folder))(long_text, truncation=True, max_length=16)
    assert windowed.scores[0] != pytest.approx(first_window[0]["score"], rel=1e-4)  # the first window differs


def test_tracking_disabled_writes_no_store(tmp_path: Path, tiny_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    params = str(tiny_params(tmp_path, prepare={"source": str(tiny_csv)}, tracking={"enabled": False}))
    d = tmp_path
    run_short(params, d)
    assert json.loads((d / "m/training_run.json").read_text()) == {"mlflow_run_id": None}
    assert not (tmp_path / "mlflow.db").exists()


def test_start_from_a_local_checkpoint_with_pretraining_skipped(
    tmp_path: Path, tiny_csv: Path, mlflow_uri: str, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    """model.checkpoint: its tokenizer is reused by tokenize, and pretrain.enabled false saves it untrained."""
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    ckpt = tmp_path / "my-bert"
    config = BertConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(ckpt)
    tiny_tokenizer.save_pretrained(ckpt)

    params = str(
        tiny_params(
            tmp_path, prepare={"source": str(tiny_csv)}, model={"checkpoint": str(ckpt)}, pretrain={"enabled": False}
        )
    )
    d = tmp_path
    metrics = run_short(params, d)
    assert (
        json.loads((d / "tok/tokenizer.json").read_text())["model"]["vocab"]
        == json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    )
    assert metrics["train"]["steps"] == 0 and math.isfinite(metrics["eval"]["loss"])
    saved, original = AutoModelForMaskedLM.from_pretrained(d / "m"), BertForMaskedLM.from_pretrained(ckpt)
    assert type(saved).__name__ == "BertForMaskedLM"
    for (name, a), b in zip(saved.state_dict().items(), original.state_dict().values(), strict=True):
        assert (a == b).all(), name
    finetune.main(
        [
            "--params",
            params,
            "--data",
            f"{d}/t",
            "--encoder",
            f"{d}/m",
            "--out",
            f"{d}/f",
            "--metrics",
            f"{d}/f.json",
            "--plots",
            f"{d}/fp",
        ]
    )
    assert json.loads((d / "f/config.json").read_text())["id2label"]["0"] == "business"


def test_failing_finetune_leaves_its_run_failed_and_no_output(
    tmp_path: Path, pipeline_dir: Path, mlflow_uri: str
) -> None:
    (tmp_path / "bad").mkdir()
    d = pipeline_dir
    # With a checkpoint named, the params check leaves layer counts to the model: the failure comes in training.
    model = {"checkpoint": str(d / "models/pretrained")}
    params = str(tiny_params(tmp_path / "bad", finetune={"freeze_layers": 99}, model=model))
    with pytest.raises(Exception, match="freeze_layers=99"):
        finetune.main(
            [
                "--params",
                params,
                "--data",
                f"{d}/data/tokenized",
                "--encoder",
                f"{d}/models/pretrained",
                "--out",
                f"{d}/models/again",
                "--metrics",
                f"{d}/again.json",
                "--plots",
                f"{d}/again",
            ]
        )
    assert not (d / "models/again").exists() and not (d / "again.json").exists()
    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("transferpipe-test").experiment_id],
        "tags.`transferpipe.stage` = 'finetune'",
        order_by=["attributes.start_time DESC"],
    )
    assert runs[0].info.status == "FAILED"


def test_electra_pretraining_saves_the_discriminator_encoder_that_finetune_starts_from(
    tmp_path: Path, tiny_csv: Path, mlflow_uri: str
) -> None:
    """pretrain.objective electra: the stage's metrics and MLflow run carry the replaced-token scores, only
    the encoder (no generator) is saved, and finetune trains on it."""
    params = str(tiny_params(tmp_path, prepare={"source": str(tiny_csv)}, pretrain={"objective": "electra"}))
    d = tmp_path
    metrics = run_short(params, d)
    assert list(metrics["eval"]) == ["loss", "perplexity", "replaced_loss", "replaced_accuracy"]
    assert all(math.isfinite(v) for v in metrics["eval"].values())
    curve = (d / "pl/eval.csv").read_text().splitlines()
    assert curve[0] == "step,epoch,loss,perplexity,replaced_loss,replaced_accuracy" and len(curve) == 3
    from safetensors.torch import load_file

    saved = load_file(d / "m/model.safetensors")
    assert not any("generator" in key for key in saved)
    scratch = load_file(d / "s/model.safetensors")
    assert saved.keys() == scratch.keys()  # the same encoder layout as the MLM objective saves
    run = MlflowClient(mlflow_uri).get_run(json.loads((d / "m/training_run.json").read_text())["mlflow_run_id"])
    assert run.data.params["pretrain.objective"] == "electra"
    assert run.data.metrics["eval/replaced_accuracy"] == pytest.approx(metrics["eval"]["replaced_accuracy"])
    finetuned = finetune.main(
        ["--params", params, "--data", f"{d}/t", "--encoder", f"{d}/m", "--out", f"{d}/f",
         "--metrics", f"{d}/f.json", "--plots", f"{d}/fp"]
    )  # fmt: skip
    assert math.isfinite(finetuned["validation"]["loss"])


def test_setfit_scores_beside_the_models_on_the_same_labels(pipeline_dir: Path) -> None:
    """evaluate.setfit: SetFit trains on the pretrained encoder with the baseline's training labels and is scored
    on the same test documents, beside the fine-tuned models; the same seed gives the same predictions."""
    d = pipeline_dir
    (d / "setfit").mkdir()
    params = tiny_params(
        d / "setfit", prepare={"source": "unused"}, tokenize={"max_length": 16}, evaluate={"setfit": True,
        "setfit_max_steps": 3}
    )  # fmt: skip
    outputs = []
    for run in ("a", "b"):
        metrics = evaluate.main(
            ["--params", str(params), "--data", f"{d}/data/prepared", "--models", f"{d}/models/finetuned/pretrained",
             "--encoder", f"{d}/models/pretrained", "--metrics", f"{d}/{run}.json", "--plots", f"{d}/{run}"]
        )  # fmt: skip
        outputs.append((d / run / "confusion_setfit.json").read_text())
    assert list(metrics["test"]) == ["pretrained", "tfidf_logreg", "setfit"]
    assert 0 <= metrics["test"]["setfit"]["macro_f1"] <= 1
    assert len(json.loads(outputs[0])) == 12  # one row per test document
    assert outputs[0] == outputs[1]
    # The fine-tuned model's score is untouched by the extra system.
    assert metrics["test"]["pretrained"] == json.loads((d / "metrics/evaluate.json").read_text())["test"]["pretrained"]


def test_setfit_needs_a_transformer_encoder(tmp_path: Path) -> None:
    params = tiny_params(tmp_path, model={"architecture": "lstm"}, evaluate={"setfit": True})
    with pytest.raises(UserError, match=r"evaluate.setfit: True must be false with model.architecture lstm"):
        evaluate.main(
            ["--params", str(params), "--data", "d", "--models", "m", "--encoder", "e", "--metrics", "x.json",
             "--plots", "p"]
        )  # fmt: skip


def test_the_model_folder_has_a_model_card(pipeline_dir: Path) -> None:
    """README.md in Hugging Face's format: a YAML header, then labels, data lineage, training and validation."""
    card = (pipeline_dir / "models/finetuned/pretrained/README.md").read_text()
    _, header, body = card.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["pipeline_tag"] == "text-classification" and meta["metrics"] == ["f1", "accuracy"]
    data = json.loads((pipeline_dir / "metrics/data.json").read_text())["sources"]
    assert meta["datasets"] == [info["path"] for info in data.values()]
    assert "base_model" not in meta  # the tiny profile pretrains its own encoder: no published base
    assert all(f"`{label}`" in body for label in LABELS)
    assert f"`{data['source']['sha256']}`" in body
    validation = json.loads((pipeline_dir / "metrics/finetune/pretrained.json").read_text())["validation"]
    assert f"macro-F1 {validation['macro_f1']:.4f}" in body
    assert "mean of the windows' logits" in body
