"""The one place that talks to MLflow: tracking URI, run names and tags, and how a failure ends a run.

Metrics files are the record DVC reads; MLflow mirrors them. The default store is an SQLite database at
the repository root, resolved absolutely so that stages of queued and temporary DVC experiments (which run
in copies under .dvc/tmp/exps) write to the same store as the workspace. MLFLOW_TRACKING_URI overrides it.

Concurrent writers (`dvc queue start -j 2`) share that SQLite file. MLflow waits up to 20 s for a lock on
each session (PRAGMA busy_timeout), which covers ordinary contention; two processes creating a fresh store
at once, however, corrupt its schema migration for good, so store creation is serialized with a file lock,
and a write that still meets "database is locked" is retried with backoff before giving up with a message.

The model registry: finetune registers its model (alias `candidate`), evaluate moves alias `champion`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from transferpipe.errors import UserError
from transferpipe.params import TrackingParams

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
CANDIDATE, CHAMPION = "candidate", "champion"
CHAMPION_METRIC = "test/macro_f1"
HEALTH_TIMEOUT_S = 3.0
# Seconds between retries of a write that found the SQLite store locked (after MLflow's own 20 s wait).
LOCKED_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)

T = TypeVar("T")


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

            _retry_locked(lambda: mlflow.log_params({k: ("None" if v is None else v) for k, v in params.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            import mlflow

            _retry_locked(lambda: mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step))

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        if self.run_id:
            import mlflow

            _retry_locked(lambda: mlflow.log_artifacts(str(folder), artifact_path=artifact_path))

    def log_text_classifier(
        self,
        model_dir: Path,
        example_texts: list[str],
        registered_model_name: str | None = None,
        max_length: int | None = None,
    ) -> str | None:
        """The fine-tuned model as an MLflow transformers model: pyfunc predict(texts) gives label names.

        With max_length, pyfunc predict truncates each text to its first max_length tokens (the window the
        model was trained on) instead of running a long text through positions training never saw.

        With a registered_model_name it becomes a new version of that registered model, with alias
        `candidate` pointing at it; returns the version (a string, as in `models:/<name>/<version>`).
        """
        if not self.run_id:
            return None
        import mlflow
        import tokenizers
        import torch
        import transformers

        # An absolute path is no valid hub repo id, so MLflow's model-card lookup fails at once, offline.
        local = str(Path(model_dir).resolve())
        pipe = transformers.pipeline("text-classification", model=local, tokenizer=local)
        info = _retry_locked(
            lambda: mlflow.transformers.log_model(
                transformers_model=pipe,
                name="model",
                task="text-classification",
                input_example=example_texts[:2],
                model_config={"truncation": True, "max_length": max_length} if max_length else None,
                # Pinned explicitly: MLflow's inference of them imports torchvision, which is not installed.
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"transformers=={transformers.__version__}",
                    f"tokenizers=={tokenizers.__version__}",
                ],
            )
        )
        if not registered_model_name:
            return None
        from mlflow.tracking import MlflowClient

        # MLflow 3 keeps the model's files with its logged model (models:/m-...), linked to this run.
        version = _retry_locked(lambda: mlflow.register_model(info.model_uri, registered_model_name))
        _retry_locked(
            lambda: MlflowClient().set_registered_model_alias(registered_model_name, CANDIDATE, version.version)
        )
        return str(version.version)


def check_tracking(params: TrackingParams) -> None:
    """Fail in seconds, before any data or model is loaded, when the tracking server cannot be reached."""
    if params.enabled:
        _check_reachable(tracking_uri())


def _check_reachable(uri: str) -> None:
    # MLflow's own client retries a dead server with backoff for minutes; its /health answers at once.
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError:
        return  # something answered (perhaps a proxy asking for credentials): MLflow's client takes it from here
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"MLflow tracking server {uri} cannot be reached ({reason}); start the server, "
            "fix MLFLOW_TRACKING_URI, or set tracking.enabled: false"
        ) from None


def _is_locked(exc: BaseException) -> bool:
    """An SQLite "database is locked" error, however MLflow or SQLAlchemy wrapped it."""
    seen: BaseException | None = exc
    while seen is not None:
        if "database is locked" in str(seen) or "database table is locked" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retry_locked(action: Callable[[], T], delays: tuple[float, ...] = LOCKED_RETRY_DELAYS_S) -> T:
    """Run a store write, retrying while another process holds the SQLite store's write lock."""
    for delay in (*delays, None):
        try:
            return action()
        except Exception as exc:
            if not _is_locked(exc):
                raise
            if delay is None:
                import mlflow

                raise UserError(
                    f"MLflow store {mlflow.get_tracking_uri()} stayed locked by other writers after "
                    f"{len(delays) + 1} tries; for many concurrent stages run `mlflow server --backend-store-uri "
                    "sqlite:///mlflow.db` and set MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
                ) from None
            time.sleep(delay)
    raise AssertionError("unreachable")


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock beside an SQLite store (a no-op for other stores or without fcntl)."""
    db = _sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent DVC queue workers to guard against there
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    # In the (ignored) artifacts folder, so the lock file never shows up as an untracked file beside mlflow.db.
    lock = db.parent / ARTIFACTS_DIR / f".{db.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _configure(uri: str, experiment_name: str) -> None:
    import mlflow

    # MLflow and alembic are chatty at INFO; a stage's own progress is what the user wants to read.
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It warns that a local model has no hub model card or license, which is expected here.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(uri)
    # The first store access creates and migrates a new SQLite store: two processes doing that at once leave
    # it broken for good ("table _alembic_tmp_experiments already exists"), so they take turns.
    with _store_lock(uri):
        if _retry_locked(lambda: mlflow.get_experiment_by_name(experiment_name)) is None:
            location = None
            db = _sqlite_path(uri)
            if db is not None:
                # Without this MLflow puts artifacts under ./mlruns of whatever folder the stage runs in.
                location = (db.parent / ARTIFACTS_DIR).resolve().as_uri()
            _create_experiment(experiment_name, location)
        _retry_locked(lambda: mlflow.set_experiment(experiment_name))


def _create_experiment(name: str, location: str | None) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        _retry_locked(lambda: mlflow.create_experiment(name, artifact_location=location))
    except MlflowException as exc:
        # Another writer (through a server, where the file lock does not reach) created it first.
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


@contextlib.contextmanager
def start_run(
    stage: str,
    params: TrackingParams,
    tags: dict[str, str] | None = None,
    name: str | None = None,
    primary: bool = True,
) -> Iterator[Run]:
    """An MLflow run for one stage: FINISHED on success, FAILED on any exception (never left RUNNING).

    Named `name` (default: the stage), suffixed with the DVC experiment's name inside `dvc exp run`.
    primary=False (the ranks above 0 of a torchrun job) gives a disabled Run: one run per stage, not per process.
    """
    if not params.enabled or not primary:
        yield Run(None)
        return
    import mlflow

    uri = tracking_uri()
    _check_reachable(uri)
    try:
        _configure(uri, params.experiment_name)
    except UserError:
        raise
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
    name = name or stage
    run_name = f"{name}-{exp_name}" if exp_name else name
    # SIGTERM (a killed `dvc repro` or queue worker) would end the process without unwinding; raise
    # instead, so the run below is closed as FAILED rather than left RUNNING.
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        run_id = _retry_locked(lambda: mlflow.start_run(run_name=run_name, tags=all_tags)).info.run_id
        status = "FAILED"
        try:
            yield Run(run_id)
            status = "FINISHED"
        finally:
            _end_run(run_id, status)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end_run(run_id: str, status: str) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        mlflow.end_run(status)  # pops the active run, then writes the status
    except Exception as exc:
        if not _is_locked(exc):
            raise
        # The run is off MLflow's stack already; write its status directly, retrying while locked.
        _retry_locked(lambda: MlflowClient().set_terminated(run_id, status))


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
        _retry_locked(lambda key=key, value=value: client.log_metric(run_id, key, float(value)))
    return True


def promote_champion(version: str | None, macro_f1: float, params: TrackingParams) -> str | None:
    """Point alias `champion` at `version` if its test macro-F1 beats the champion's; a line saying which.

    The champion's score is the test/macro_f1 metric of the run that logged its version. No champion yet
    (or one never evaluated): `version` becomes champion. None when there is no registry to update.
    """
    name = params.registered_model_name
    if not params.enabled or not name or not version:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    _configure(uri, params.experiment_name)
    client = MlflowClient()
    # Two evaluates sharing an SQLite store read and move the alias in turns.
    with _store_lock(uri):
        try:
            champion = _retry_locked(lambda: client.get_model_version_by_alias(name, CHAMPION))
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            champion = None
        if champion is not None and str(champion.version) == str(version):
            return f"evaluate: {name} version {version} is the champion already (test macro-F1 {macro_f1:.4f})"
        best = None
        if champion is not None and champion.run_id:
            best = client.get_run(champion.run_id).data.metrics.get(CHAMPION_METRIC)
        if best is not None and macro_f1 <= best:
            return (
                f"evaluate: {name} champion stays version {champion.version} (test macro-F1 {best:.4f}); "
                f"candidate version {version} scored {macro_f1:.4f}"
            )
        _retry_locked(lambda: client.set_registered_model_alias(name, CHAMPION, version))
    before = "no champion before" if champion is None else f"was version {champion.version}"
    if best is not None:
        before += f" with {best:.4f}"
    return f"evaluate: {name} champion is now version {version} (test macro-F1 {macro_f1:.4f}; {before})"
