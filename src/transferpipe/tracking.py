"""The one place that talks to MLflow: tracking URI, run names and tags, and how a failure ends a run.

Metrics files are the record DVC reads; MLflow mirrors them. The default store is an SQLite database at
the repository root, resolved absolutely so that stages of queued and temporary DVC experiments (which run
in copies under .dvc/tmp/exps) write to the same store as the workspace. MLFLOW_TRACKING_URI overrides it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transferpipe.errors import UserError
from transferpipe.params import TrackingParams

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def repo_root() -> Path:
    """DVC_ROOT (set by DVC for stage commands) or the working directory, lifted out of .dvc/tmp copies."""
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    if ".dvc" in root.parts:
        root = Path(*root.parts[: root.parts.index(".dvc")])
    return root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / STORE_FILE}"


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Run:
    """An active MLflow run; every method is a no-op on a disabled one (run_id None)."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_params({k: ("None" if v is None else v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            import mlflow

            mlflow.set_tags(tags)

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def log_text_classifier(self, model_dir: Path, example_texts: list[str]) -> None:
        """The fine-tuned model as an MLflow transformers model: pyfunc predict(texts) gives label names."""
        if not self.run_id:
            return
        import mlflow
        import tokenizers
        import torch
        import transformers

        # An absolute path is no valid hub repo id, so MLflow's model-card lookup fails at once, offline.
        local = str(Path(model_dir).resolve())
        pipe = transformers.pipeline("text-classification", model=local, tokenizer=local)
        mlflow.transformers.log_model(
            transformers_model=pipe,
            name="model",
            task="text-classification",
            input_example=example_texts[:2],
            # Pinned explicitly: MLflow's inference of them imports torchvision, which is not installed.
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"transformers=={transformers.__version__}",
                f"tokenizers=={tokenizers.__version__}",
            ],
        )


def _configure(uri: str, experiment_name: str) -> None:
    import mlflow

    # MLflow and alembic are chatty at INFO; a stage's own progress is what the user wants to read.
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It warns that a local model has no hub model card or license, which is expected here.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment_name) is None:
        location = None
        if uri.startswith("sqlite:///"):
            # Without this MLflow puts artifacts under ./mlruns of whatever folder the stage runs in.
            location = (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR).resolve().as_uri()
        mlflow.create_experiment(experiment_name, artifact_location=location)
    mlflow.set_experiment(experiment_name)


@contextlib.contextmanager
def start_run(stage: str, params: TrackingParams, tags: dict[str, str] | None = None) -> Iterator[Run]:
    """An MLflow run for one stage: FINISHED on success, FAILED on any exception (never left RUNNING)."""
    if not params.enabled:
        yield Run(None)
        return
    import mlflow

    uri = tracking_uri()
    try:
        _configure(uri, params.experiment_name)
    except Exception as exc:  # noqa: BLE001 - any store failure is reported the same way
        raise UserError(
            f"MLflow tracking store {uri} is not usable ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "fix MLFLOW_TRACKING_URI or set tracking.enabled: false"
        ) from None
    root = repo_root()
    exp_name = os.environ.get("DVC_EXP_NAME")
    all_tags = {"transferpipe.stage": stage, **(tags or {})}
    commit = git_commit(root)
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    if exp_name:
        all_tags["dvc.exp_name"] = exp_name
    run_name = f"{stage}-{exp_name}" if exp_name else stage
    # SIGTERM (a killed `dvc repro` or queue worker) would end the process without unwinding; raise
    # instead, so the run below is closed as FAILED rather than left RUNNING.
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        with mlflow.start_run(run_name=run_name, tags=all_tags) as active:
            yield Run(active.info.run_id)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def log_to_existing_run(run_id: str, metrics: dict[str, float], params: TrackingParams) -> bool:
    """Add metrics to a finished run (evaluate adds test metrics to the finetune run)."""
    if not params.enabled or not run_id:
        return False
    from mlflow.tracking import MlflowClient

    _configure(tracking_uri(), params.experiment_name)
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    return True
