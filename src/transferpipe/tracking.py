"""MLflow runs: tracking URI, run names and tags, lineage, the logged model, and how a failure ends a run.

Metrics files are the record DVC reads; MLflow mirrors them. The default store is an SQLite database at
the repository root, resolved absolutely so that stages of queued and temporary DVC experiments (which run
in copies under .dvc/tmp/exps) write to the same store as the workspace. MLFLOW_TRACKING_URI overrides it.

Concurrent writers (`dvc queue start -j 2`) share that SQLite file. MLflow waits up to 20 s for a lock on
each session (PRAGMA busy_timeout), which covers ordinary contention; two processes creating a fresh store
at once, however, corrupt its schema migration for good, so store creation is serialized with a file lock,
and a write that still meets "database is locked" is retried with backoff before giving up with a message.

finetune registers its model (alias `candidate`, Run.log_text_classifier); what evaluate does in the registry
is transferpipe.registry. Runs record their host and process; see start_run for how a run ends.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import filelock

from transferpipe.errors import STOP_SIGNALS, Interrupted, UserError
from transferpipe.params import TrackingParams
from transferpipe.vcs import git_commit, repo_root

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
CANDIDATE, CHAMPION = "candidate", "champion"
CHAMPION_METRIC = "test/macro_f1"
HEALTH_TIMEOUT_S = 3.0
# Seconds between retries of a write that found the SQLite store locked (after MLflow's own 20 s wait).
LOCKED_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# While a stage trains, and when it ends its run, a tracking call fails in seconds: MLflow's HTTP client retries a
# dead server 7 times with exponential backoff by default, which stalled training for 8.5 minutes. Where the user
# set these variables, theirs apply.
RESEND_AFTER_S = 30.0
TRAINING_HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

T = TypeVar("T")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the SQLite store at the repository root. Credentials written into an http(s)
    URI (`https://user:password@host`) move to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which
    MLflow's client sends as basic auth, so the URI this returns (and every message that shows it) has none."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{repo_root() / STORE_FILE}"
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(user))
    if password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(password))
    plain = urllib.parse.urlunsplit(parts._replace(netloc=host))
    os.environ["MLFLOW_TRACKING_URI"] = plain  # what MLflow itself reads holds no password either
    return plain


@contextlib.contextmanager
def bounded_http() -> Iterator[None]:
    """TRAINING_HTTP_BOUNDS for the calls inside, unless the user set those variables."""
    added = {key: value for key, value in TRAINING_HTTP_BOUNDS.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class Run:
    """An active MLflow run; every method is a no-op on a disabled one (run_id None)."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.unsent = 0  # rows that could not be sent since the store last answered (send_rows)
        self.failed_at = 0.0  # time.monotonic() of the last failure

    def send_rows(self, rows: list[tuple[int, dict[str, float]]], once: bool = False, force: bool = False) -> bool:
        """What the training loop sends: log_rows (log_rows_once with `once`), within TRAINING_HTTP_BOUNDS, never
        raising. False when the store could not take them: the caller keeps the rows (they travel with the
        checkpoint) and sends them again later; one warning line when the store stops answering, one line when
        it answers again. After a failure the store is tried again only after RESEND_AFTER_S (or when
        `force`d: the last rows of a run), so a dead store costs training a few seconds per half minute."""
        if not self.run_id or not rows:
            return True
        if self.unsent and not force and time.monotonic() - self.failed_at < RESEND_AFTER_S:
            self.unsent = len(rows)
            return False
        try:
            with bounded_http():
                (self.log_rows_once if once else self.log_rows)(rows)
        except Exception as exc:  # noqa: BLE001 - no tracking failure may stop training
            if not self.unsent:
                import mlflow
                from tqdm import tqdm

                tqdm.write(  # above the progress bar, on a line of its own
                    f"warning: MLflow store {mlflow.get_tracking_uri()} is not answering ({type(exc).__name__}: "
                    f"{_first_line(exc)[:200]}); training continues, its rows kept to send when it answers",
                    file=sys.stderr,
                )
            self.unsent, self.failed_at = len(rows), time.monotonic()
            return False
        if self.unsent:
            from tqdm import tqdm

            tqdm.write(f"MLflow store answers again: {len(rows)} rows sent to run {self.run_id}", file=sys.stderr)
            self.unsent = 0
        return True

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run_id:
            import mlflow

            _retry_locked(lambda: mlflow.log_params({k: ("None" if v is None else v) for k, v in params.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            import mlflow

            _retry_locked(lambda: mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step))

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """(step, metrics) rows in one store write (log_batch: all of them or none)."""
        if self.run_id and rows:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, step) for step, values in rows for k, v in values.items()]
            _retry_locked(lambda: MlflowClient().log_batch(self.run_id, metrics=metrics))

    def log_rows_once(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """log_rows, unless an earlier process already sent these rows: a checkpoint is written before its rows
        go to MLflow, so a process killed between the two leaves rows that a resumed run must send."""
        if not self.run_id or not rows:
            return
        from mlflow.tracking import MlflowClient

        step, values = rows[0]
        history = _retry_locked(lambda: MlflowClient().get_metric_history(self.run_id, next(iter(values))))
        if not any(m.step >= step for m in history):
            self.log_rows(rows)

    def log_datasets(self, folder: Path, splits: dict[str, tuple[str, int, str]]) -> None:
        """The splits of `folder` (an output of prepare, tokenize or the pretraining blocks) this run read, as
        MLflow datasets (mlflow.log_input: the run page's Datasets): {split: (digest, rows, context)}, the
        context training, validation or test, each with the labeled source it was prepared from (sources.json:
        its path as the dataset's source, its sha256 as the input's tag transferpipe.source_sha256)."""
        if not self.run_id:
            return
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.tracking import MlflowClient

        lineage = json.loads((folder / "sources.json").read_text(encoding="utf-8")).get("source", {})
        path = lineage.get("path", str(folder))
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local file
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(path)
        inputs = []
        for split, (digest, rows, context) in splits.items():
            meta = MetaDataset(source, name=f"{Path(path).stem}/{split}", digest=digest)
            tags = [InputTag("mlflow.data.context", context), InputTag("transferpipe.rows", str(rows))]
            if "sha256" in lineage:
                tags.append(InputTag("transferpipe.source_sha256", lineage["sha256"]))
            inputs.append(DatasetInput(meta._to_mlflow_entity(), tags))
        _retry_locked(lambda: MlflowClient().log_inputs(self.run_id, inputs))

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        if self.run_id:
            import mlflow

            _retry_locked(lambda: mlflow.log_artifacts(str(folder), artifact_path=artifact_path))

    def log_text_classifier(
        self,
        model_dir: Path,
        example_texts: list[str],
        python_model: Any,
        registered_model_name: str | None = None,
        max_length: int | None = None,
        max_windows: int | None = 1,
    ) -> str | None:
        """The fine-tuned model as an MLflow pyfunc model (`python_model`, a transferpipe.serving.TextClassifier,
        passed in so that only the stages that log a classifier import serving): predict(texts)
        gives a DataFrame of `label` (label names) and `score`, each text scored as evaluate scores it
        (inference.predict_texts): the mean logits of its windows of max_length tokens, at most max_windows of them
        (None: all; max_length None: each text whole, as one window).

        The model carries this package as its code (code_paths), so it loads wherever its pinned requirements
        are installed, an LSTM included, without trust_remote_code.

        With a registered_model_name it becomes a new version of that registered model, with alias
        `candidate` pointing at it; returns the version (a string, as in `models:/<name>/<version>`).

        Idempotent: a rerun after a failure later on (the registration, the store going away) finds the model it
        logged from the same files (tag transferpipe.model_sha256) and the version it registered, and reuses them.
        """
        if not self.run_id:
            return None
        import shutil
        import tempfile

        import datasets
        import mlflow
        import sklearn
        import tokenizers
        import torch
        import transformers

        from transferpipe.sources import sha256_of

        digest = sha256_of(model_dir)
        model_uri = self._logged_model(digest)
        if model_uri:
            print(f"the model is logged to MLflow already ({model_uri}, the same files): not logging it again")
        else:
            print(f"logging the model to MLflow ({self.run_id}) and checking it predicts its input example ...",
                  flush=True)  # fmt: skip
            with tempfile.TemporaryDirectory() as work:
                # The artifact keeps its folder's name: `classifier`, not the atomic write's hidden temporary name.
                folder = shutil.copytree(model_dir, Path(work) / "classifier")
                model_uri = _retry_locked(
                    lambda: mlflow.pyfunc.log_model(
                        name="model",
                        python_model=python_model,
                        artifacts={"model": str(folder)},
                        code_paths=[str(Path(__file__).parent)],  # the transferpipe package itself
                        model_config={"max_length": max_length, "max_windows": max_windows},
                        input_example=example_texts[:2],
                        # Pinned explicitly: MLflow's inference of them imports torchvision, which is not installed.
                        pip_requirements=[
                            f"torch=={torch.__version__.split('+')[0]}",
                            f"transformers=={transformers.__version__}",
                            f"tokenizers=={tokenizers.__version__}",
                            f"datasets=={datasets.__version__}",
                            f"scikit-learn=={sklearn.__version__}",
                        ],
                        tags={MODEL_SHA256_TAG: digest},
                    )
                ).model_uri
        if not registered_model_name:
            return None
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        # MLflow 3 keeps the model's files with its logged model (models:/m-...), linked to this run. A retry after
        # a failed registration finds the version it made, if any, instead of making a second one.
        query = f"name = '{registered_model_name}' and run_id = '{self.run_id}'"
        made = [v for v in _retry_locked(lambda: client.search_model_versions(query)) if v.source == model_uri]
        version = made[0] if made else _retry_locked(lambda: mlflow.register_model(model_uri, registered_model_name))
        _retry_locked(lambda: client.set_registered_model_alias(registered_model_name, CANDIDATE, version.version))
        return str(version.version)

    def _logged_model(self, digest: str) -> str | None:
        """The URI of the model this run logged from these files already (a retry after a later step failed)."""
        import mlflow

        experiment = _retry_locked(lambda: mlflow.get_run(self.run_id)).info.experiment_id
        query = f"source_run_id = '{self.run_id}' AND tags.`{MODEL_SHA256_TAG}` = '{digest}'"
        found = _retry_locked(
            lambda: mlflow.search_logged_models(experiment_ids=[experiment], filter_string=query, output_format="list")
        )
        ready = [m for m in found if str(m.status).endswith("READY")]
        return ready[0].model_uri if ready else None


def check_tracking(params: TrackingParams) -> None:
    """Fail in seconds, before any data or model is loaded, when the tracking server cannot be reached or
    the registered-model name is one MLflow would reject after training."""
    if params.enabled:
        _check_reachable(tracking_uri())
        check_registry_name(params)


def _check_reachable(uri: str) -> None:
    # MLflow's own client retries a dead server with backoff for minutes; its /health answers at once.
    if not uri.startswith(("http://", "https://")):
        return
    request = urllib.request.Request(f"{uri.rstrip('/')}/health")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT_S) as response:
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


def quiet_mlflow() -> None:
    """MLflow and alembic are chatty at INFO; a stage's own progress is what the user wants to read."""
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It warns that a local model has no hub model card or license, which is expected here.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` store URI (None for other stores)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock beside an SQLite store (a no-op for other stores)."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    # In the (ignored) artifacts folder, so the lock file never shows up as an untracked file beside mlflow.db.
    lock = db.parent / ARTIFACTS_DIR / f".{db.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(lock):
        yield


def _configure(uri: str, experiment_name: str) -> None:
    import mlflow

    quiet_mlflow()
    mlflow.set_tracking_uri(uri)
    # The first store access creates and migrates a new SQLite store: two processes doing that at once leave
    # it broken for good ("table _alembic_tmp_experiments already exists"), so they take turns.
    with _store_lock(uri):
        if _retry_locked(lambda: mlflow.get_experiment_by_name(experiment_name)) is None:
            location = None
            db = sqlite_path(uri)
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


SEED_GROUP_TAG = "transferpipe.seed_group"
# The params a finetune run's result depends on; runs equal in all of them but finetune.seed form one group.
SEED_GROUP_SECTIONS = ("prepare", "tokenize", "model", "pretrain", "finetune")


def seed_group(params_file: Path, variant: str) -> str:
    """A short key that the finetune runs of one recipe share whatever their `finetune.seed`: a hash of the
    variant and of every param they depend on but the seed (tag transferpipe.seed_group, which the MLflow UI
    can group runs by; `transferpipe compare` shows the groups' mean ± sd)."""
    import yaml

    params = yaml.safe_load(Path(params_file).read_text()) or {}
    recipe = {section: params.get(section) for section in SEED_GROUP_SECTIONS}
    recipe["finetune"] = {k: v for k, v in (recipe["finetune"] or {}).items() if k != "seed"}
    text = json.dumps({"variant": variant, "params": recipe}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def rows_digest(dataset: Any) -> str:
    """sha256 (16 hex digits) of a datasets.Dataset's rows as stored (Arrow IPC of its table, indices applied)."""
    import pyarrow as pa

    table = dataset.flatten_indices().data.table if dataset._indices is not None else dataset.data.table
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def lineage_tags(folder: Path) -> dict[str, str]:
    """Tags naming the data a run trained on: the sources.json that prepare writes and tokenize copies into
    its outputs (path, content hash, package version or hub revision of each source), and an encoder folder's
    checkpoint.json (the pinned checkpoint pretrain started from, with its digest)."""
    lineage = {}
    path = Path(folder) / "sources.json"  # name -> {path, sha256, ...} of each data source
    if path.is_file():
        lineage |= json.loads(path.read_text(encoding="utf-8"))
    path = Path(folder) / "checkpoint.json"  # the published checkpoint an encoder started from (pretrain)
    if path.is_file():
        lineage["checkpoint"] = json.loads(path.read_text(encoding="utf-8"))
    return lineage_to_tags(lineage)


def lineage_to_tags(lineage: dict[str, dict]) -> dict[str, str]:
    """{name: {key: value}} as MLflow tags transferpipe.<name>.<key>."""
    return {f"transferpipe.{name}.{k}": str(v) for name, info in lineage.items() for k, v in info.items()}


@contextlib.contextmanager
def start_run(
    stage: str,
    params: TrackingParams,
    tags: dict[str, str] | None = None,
    name: str | None = None,
    primary: bool = True,
    resume: str | None = None,
) -> Iterator[Run]:
    """An MLflow run for one stage: FINISHED on success, KILLED when a signal (errors.STOP_SIGNALS, Ctrl-C) stops
    the stage, FAILED on any other exception; never left RUNNING by a process that could still write.

    `resume` continues that run (a stage resumed from a checkpoint) instead of starting one. Runs record the
    host and process that write them; runs of this stage left RUNNING by a process that no longer exists
    (`kill -9`, the OOM killer, a lost machine) are ended KILLED here. Named `name` (default: the stage),
    suffixed with the DVC experiment's name inside `dvc exp run`. primary=False (the ranks above 0 of a
    torchrun job) gives a disabled Run: one run per stage, not per process.
    """
    if not params.enabled or not primary:
        yield Run(None)
        return
    uri = tracking_uri()
    _check_reachable(uri)
    try:
        _configure(uri, params.experiment_name)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any store failure is reported the same way
        raise UserError(
            f"MLflow tracking store {uri} is not usable ({type(exc).__name__}: {_first_line(exc)}); "
            "fix MLFLOW_TRACKING_URI or set tracking.enabled: false"
        ) from None
    root = repo_root()
    exp_name = os.environ.get("DVC_EXP_NAME")
    all_tags = {"transferpipe.stage": stage, **(tags or {}), **_process_tags()}
    commit = git_commit(root)
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    if exp_name:
        all_tags["dvc.exp_name"] = exp_name
    name = name or stage
    run_name = f"{name}-{exp_name}" if exp_name else name
    end_orphaned_runs(stage, params.experiment_name, keep=resume)
    # SIGTERM (a killed `dvc repro` or queue worker, a preemption), SIGUSR1 (a scheduler's warning) and SIGHUP (a
    # lost terminal) would end the process without unwinding; raise instead, so the run below is closed as KILLED
    # rather than left RUNNING. Training itself (transferpipe.training.fit) first finishes its step and checkpoints.
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in STOP_SIGNALS}
    try:
        run_id = _start_or_resume(run_name, all_tags, resume, params.system_metrics)
        status = "FAILED"
        try:
            yield Run(run_id)
            status = "FINISHED"
        except (Interrupted, KeyboardInterrupt):
            status = "KILLED"
            raise
        finally:
            try:
                with bounded_http():
                    _end_run(run_id, status)
            except Exception as exc:  # noqa: BLE001 - a dead store on the way out is one line, never a traceback
                message = f"MLflow could not end run {run_id} as {status} ({type(exc).__name__}: {_first_line(exc)})"
                if status == "FINISHED":
                    raise UserError(
                        f"{stage}: {message[:300]}; the outputs are complete: rerun the stage (dvc repro) once the "
                        "store answers, which records it without training again"
                    ) from None
                _warn(message[:300])  # the error that stopped the stage is the one to report
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def recording(stage: str, outputs: Path) -> Iterator[None]:
    """Around what a stage sends to MLflow after its outputs are complete on disk: a failure there is one line
    that says the outputs are kept, and a rerun records them without training again (the stage's finished
    checkpoint, transferpipe.checkpoint, holds the result until then). Within TRAINING_HTTP_BOUNDS: a dead
    store fails it in seconds."""
    try:
        with bounded_http():
            yield
    except Exception as exc:
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {_first_line(exc)}"
        raise UserError(
            f"{stage}: {outputs} is complete, but MLflow could not record it ({reason}); fix the store and rerun "
            "the stage (dvc repro), which records it without training again"
        ) from None


def _start_or_resume(run_name: str, tags: dict[str, str], resume: str | None, system_metrics: bool = False) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    if resume:
        try:
            run = _retry_locked(lambda: mlflow.start_run(run_id=resume, log_system_metrics=system_metrics))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            print(f"{run_name}: MLflow run {resume} of the checkpoint is not in this store; starting a new run")
        else:
            _retry_locked(lambda: mlflow.set_tags(tags))  # this process writes it now
            return run.info.run_id
    start = lambda: mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=system_metrics)  # noqa: E731
    return _retry_locked(start).info.run_id


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), so a reused pid is not taken for the
    process that wrote a run; None where there is no /proc or no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before it may hold spaces


def _process_tags() -> dict[str, str]:
    tags = {"transferpipe.host": socket.gethostname(), "transferpipe.pid": str(os.getpid())}
    started = _process_start(os.getpid())
    if started:
        tags["transferpipe.pid_start"] = started
    return tags


def _process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process of that pid is alive
    return started is None or _process_start(pid) in (started, None)


def end_orphaned_runs(stage: str, experiment_name: str, keep: str | None = None) -> list[str]:
    """End KILLED every RUNNING run of `stage` in the experiment whose writing process, on this host,
    no longer exists; `keep` is left alone (the run a resumed stage continues). Returns the ended run ids.
    Runs written on another host are left as they are: their process cannot be checked from here."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = _retry_locked(lambda: client.get_experiment_by_name(experiment_name))
    if experiment is None:
        return []
    runs = _retry_locked(
        lambda: client.search_runs(
            [experiment.experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`transferpipe.stage` = '{stage}'",
        )
    )
    host, ended = socket.gethostname(), []
    for run in runs:
        tags = run.data.tags
        pid = tags.get("transferpipe.pid", "")
        if run.info.run_id == keep or tags.get("transferpipe.host") != host or not pid.isdigit():
            continue
        if _process_alive(int(pid), tags.get("transferpipe.pid_start")):
            continue
        _retry_locked(lambda run=run: client.set_terminated(run.info.run_id, "KILLED"))
        print(f"{stage}: MLflow run {run.info.run_id} was left RUNNING by process {pid}, which is gone; ended KILLED")
        ended.append(run.info.run_id)
    return ended


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


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def log_to_existing_run(run_id: str, metrics: dict[str, float], params: TrackingParams) -> bool:
    """Add metrics to a finished run (evaluate adds test metrics to the finetune run); True when added.

    A store without that run (a fresh clone after `dvc pull`, another MLFLOW_TRACKING_URI than training's)
    is no error, since the metrics files are the record: one warning line on stderr, and False, on which
    evaluate also leaves that run's registered model alone.
    """
    if not params.enabled or not run_id:
        return False
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    _configure(uri, params.experiment_name)
    client = MlflowClient()
    try:
        run = _retry_locked(lambda: client.get_run(run_id))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        _warn(
            f"MLflow store {uri} has no run {run_id} (the model was trained against another store); "
            "its test metrics are not mirrored there and its registered model is left as it is"
        )
        return False
    for key, value in metrics.items():
        _retry_locked(lambda key=key, value=value: client.log_metric(run_id, key, float(value)))
    return True


MODEL_SHA256_TAG = "transferpipe.model_sha256"  # a logged model's files, so that a retry logs it once
# The registry keeps names in VARCHAR(256) columns: SQLite stores a longer one, MySQL and PostgreSQL refuse it.
MAX_REGISTERED_MODEL_NAME = 256


def check_registry_name(params: TrackingParams) -> None:
    """Fail at a stage's start, before any training, on a tracking.registered_model_name that MLflow would
    reject when finetune registers the trained model."""
    name = params.registered_model_name
    if not params.enabled or name is None:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name  # what MLflow's stores check on registration

    if not name.strip():
        reason = "it is empty; use null for no model registry"
    elif len(name) > MAX_REGISTERED_MODEL_NAME:
        reason = f"{len(name)} characters, the registry keeps at most {MAX_REGISTERED_MODEL_NAME}"
    else:
        try:
            _validate_model_name(name)
            return
        except MlflowException as exc:
            reason = str(exc.message).strip().splitlines()[0]
    raise UserError(f"tracking.registered_model_name {name!r} is not a name MLflow accepts: {reason}")


def _warn(message: str) -> None:

    print(f"warning: {message}", file=sys.stderr)
