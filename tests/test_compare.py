"""`transferpipe compare` on real MLflow runs in a temporary SQLite store."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.helpers import TINY_PARAMS
from transferpipe.cli import main

EXPERIMENT = "transferpipe-test"  # tracking.experiment_name of the tiny profile
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# (run name, dvc.exp_name, params, metrics), logged oldest first.
RUNS = [
    (
        "finetune",
        None,
        {"finetune.epochs": 6, "finetune.seed": 42, "finetune.encoder_learning_rate": 0.0005},
        {"test/macro_f1": 0.91, "test/accuracy": 0.92, "test/tfidf_logreg_macro_f1": 0.97},
    ),
    (
        "finetune-fewer-epochs",
        "fewer-epochs",
        {"finetune.epochs": 2, "finetune.seed": 42, "finetune.encoder_learning_rate": 0.0005},
        {"test/macro_f1": 0.8, "test/accuracy": 0.83, "best/validation_macro_f1": 0.85},
    ),
    (
        "finetune-low-lr",
        "low-lr",
        {"finetune.epochs": 6, "finetune.seed": 42, "finetune.encoder_learning_rate": 0.0001},
        {"test/macro_f1": 0.88, "test/accuracy": 0.9},
    ),
]


def log_runs(uri: str, experiment: str, finetune: bool = True) -> None:
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment(experiment)
    # A pretrain run in the same experiment, which compare must leave out.
    with mlflow.start_run(experiment_id=experiment_id, run_name="pretrain", tags={"transferpipe.stage": "pretrain"}):
        mlflow.log_params({"pretrain.max_steps": 500})
    if not finetune:
        return
    for name, exp_name, params, metrics in RUNS:
        tags = {
            "transferpipe.stage": "finetune",
            "transferpipe.variant": "pretrained",
            "mlflow.source.git.commit": COMMIT,
        }
        if exp_name:
            tags["dvc.exp_name"] = exp_name
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags):
            mlflow.log_params(params)
            mlflow.log_metrics(metrics)


def test_compare_shows_differing_params_and_metrics(
    mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_runs(mlflow_uri, EXPERIMENT)
    capsys.readouterr()  # MLflow's own messages while the store was created
    csv, md = tmp_path / "out" / "runs.csv", tmp_path / "runs.md"
    # No --experiment: the name comes from tracking.experiment_name of the params file.
    main(["compare", "--params", str(TINY_PARAMS), "--csv", str(csv), "--markdown", str(md)])

    table = pd.read_csv(csv, dtype={"commit": str})
    assert list(table["run"]) == ["finetune", "finetune-fewer-epochs", "finetune-low-lr"]
    assert list(table.columns[:6]) == ["run", "run_id", "variant", "dvc.exp_name", "commit", "status"]
    assert list(table["variant"]) == ["pretrained"] * 3
    # Params that differ between the runs are shown; the equal one (seed) is not.
    assert "finetune.epochs" in table and "finetune.encoder_learning_rate" in table
    assert "finetune.seed" not in table and "pretrain.max_steps" not in table
    assert list(table["finetune.epochs"]) == [6, 2, 6]
    assert list(table["commit"]) == ["0123456"] * 3
    assert list(table["status"]) == ["FINISHED"] * 3
    assert table["dvc.exp_name"].isna().tolist() == [True, False, False]
    assert list(table["test/macro_f1"]) == [0.91, 0.8, 0.88]
    assert list(table["test/accuracy"]) == [0.92, 0.83, 0.9]
    assert table["best/validation_macro_f1"].isna().tolist() == [True, False, True]
    assert table["run_id"].str.len().eq(32).all()

    markdown = re.sub(" +", " ", md.read_text())  # pandas pads the cells
    assert (
        "| run | variant | dvc.exp_name | commit | status | finetune.encoder_learning_rate | finetune.epochs "
        "| test/macro_f1 |" in markdown
    )
    row = (
        "| finetune-fewer-epochs | pretrained | fewer-epochs | 0123456 | FINISHED | 0.0005 | 2 "
        "| 0.8000 | 0.8300 | - | 0.8500 |"
    )
    assert row in markdown
    assert "finetune.seed" not in markdown.split("Runs that differ only in")[0]  # equal: not a column
    # All three differ in params other than the seed: three groups of one run, no sd.
    assert "| pretrained | 0.0005 | 6 | 1 | - | 0.9100 | 0.9200 |" in markdown
    assert "3 finetune run(s)" in markdown and "1 param(s) equal across runs, not shown" in markdown

    printed = capsys.readouterr().out
    assert "finetune-low-lr" in printed and "0.8800" in printed
    assert "finetune.seed" not in printed.split("Runs that differ only in")[0]
    assert "None" not in printed  # a run without dvc.exp_name shows "-"


def test_no_finetune_runs_is_one_line_and_exit_2(mlflow_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    log_runs(mlflow_uri, EXPERIMENT, finetune=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--params", str(TINY_PARAMS)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no finetune runs in MLflow experiment '{EXPERIMENT}'")


def test_missing_store_or_experiment_and_the_experiment_flag(
    mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--experiment", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: no MLflow store at {mlflow_uri}")
    assert not (tmp_path / "mlflow.db").exists()

    log_runs(mlflow_uri, "other")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["compare", "--experiment", "nope"])
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: no MLflow experiment named 'nope' in {mlflow_uri}; pass --experiment or --params"
    ]

    # --experiment names the experiment without reading any params file.
    main(["compare", "--experiment", "other", "--params", "does-not-exist.yaml"])
    assert "3 finetune run(s) in experiment 'other'" in capsys.readouterr().out


def test_runs_that_differ_only_in_the_seed_are_grouped_with_mean_and_sd(
    mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mlflow.set_tracking_uri(mlflow_uri)
    experiment_id = mlflow.create_experiment(EXPERIMENT)
    scores = {(5.0e-4, 1): 0.90, (5.0e-4, 2): 0.94, (5.0e-4, 3): 0.92, (1.0e-4, 1): 0.85, (1.0e-4, 2): 0.87}
    for (rate, seed), macro_f1 in scores.items():
        tags = {"transferpipe.stage": "finetune", "transferpipe.variant": "pretrained"}
        with mlflow.start_run(experiment_id=experiment_id, tags=tags):
            mlflow.log_params({"finetune.seed": seed, "finetune.encoder_learning_rate": rate})
            mlflow.log_metrics({"test/macro_f1": macro_f1, "test/accuracy": macro_f1 + 0.01})
    with mlflow.start_run(experiment_id=experiment_id, tags=tags):  # unfinished: left out of the groups
        mlflow.log_params({"finetune.seed": 4, "finetune.encoder_learning_rate": 1.0e-4})
        mlflow.set_tag("mlflow.runName", "running")
        run_id = mlflow.active_run().info.run_id
    mlflow.tracking.MlflowClient().set_terminated(run_id, "FAILED")
    capsys.readouterr()
    md = tmp_path / "runs.md"
    main(["compare", "--params", str(TINY_PARAMS), "--markdown", str(md)])

    text = re.sub(" +", " ", md.read_text())
    assert "Runs that differ only in finetune.seed, grouped (mean ± sd over the seeds):" in text
    # Sample sd: 0.90 / 0.94 / 0.92 -> 0.02; 0.85 / 0.87 -> 0.0141.
    assert "| pretrained | 0.0005 | 3 | 1, 2, 3 | 0.9200 ± 0.0200 | 0.9300 ± 0.0200 |" in text
    assert "| pretrained | 0.0001 | 2 | 1, 2 | 0.8600 ± 0.0141 | 0.8700 ± 0.0141 |" in text
    assert "| 4 |" not in text.split("grouped")[1]  # the failed run is in the run table only
    assert "0.9200 ± 0.0200" in capsys.readouterr().out


def test_the_seed_group_tag_is_shared_by_runs_that_differ_only_in_the_seed(tmp_path: Path) -> None:
    from tests.helpers import tiny_params
    from transferpipe.tracking import seed_group

    def group(variant: str = "pretrained", **finetune: object) -> str:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        return seed_group(tiny_params(folder, finetune=finetune), variant)

    assert group(seed=1) == group(seed=2) == group(seed=3)
    assert group(seed=1, encoder_learning_rate=3.0e-4) != group(seed=1)
    assert group("scratch", seed=1) != group(seed=1)
