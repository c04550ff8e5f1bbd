"""The model registry's side of evaluate: each version tagged with the test set it was scored on and its score,
and alias `champion` moved to the best version scored on the same test set, safely under concurrent evaluates.
(finetune registers versions with alias `candidate`: tracking.Run.log_text_classifier.)"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

from transferpipe.errors import UserError
from transferpipe.params import TrackingParams
from transferpipe.tracking import CHAMPION, CHAMPION_METRIC, _configure, _retry_locked, _warn, tracking_uri

# Model-version tags evaluate sets: the test set and label names a version was scored on, and its score there.
TEST_SHA256_TAG = "transferpipe.test_sha256"
LABELS_TAG = "transferpipe.labels"
SCORE_TAG = f"transferpipe.{CHAMPION_METRIC}"
# Rounds of promote_champion's read-and-move loop before it gives up: each evaluate moves the alias at most a
# couple of times once every score is in, so this only ends a registry that something else keeps moving.
PROMOTE_ROUNDS = 20


def split_sha256(texts: list[str], labels: list[int]) -> str:
    """The sha256 (hex) of a test set as evaluate scores it: its texts with their integer labels.

    Each document is the UTF-8 JSON array [text, label]; these lines are sorted, joined with newlines and
    hashed, so the digest names the documents and their labels whatever their order (the scores do not
    depend on it either). The label names are not in it: evaluate tags them beside it (LABELS_TAG).
    """

    rows = sorted(json.dumps([str(t), int(label)], ensure_ascii=False) for t, label in zip(texts, labels, strict=True))
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


def promote_champion(
    version: str | None,
    macro_f1: float,
    params: TrackingParams,
    *,
    test_sha256: str,
    labels: list[str],
    run_id: str | None = None,
    description: str | None = None,
) -> str | None:
    """Tag `version` with its test score (and set its `description`: where a registry user reads its test
    results), then point alias `champion` at the best comparable version; returns a line saying what happened.

    Comparable: versions of the registered model scored on the same test set and label names, that is with
    the same TEST_SHA256_TAG (see split_sha256) and LABELS_TAG; each carries its test macro-F1 in
    SCORE_TAG. A tie keeps the champion. A champion that is not comparable (another test set or labels, or
    never scored by evaluate) stays where it is, and the line says so. None when there is no registry to
    update, or (after a warning line on stderr) when this store lacks `version` or has it from another run.
    """
    name = params.registered_model_name
    if not params.enabled or not name or not version:
        return None

    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    _configure(uri, params.experiment_name)
    client = MlflowClient()
    version = str(version)
    if not _is_version_of_run(client, name, version, run_id, uri):
        return None
    # The score goes last: a version competes once it has a score, and by then its test set and labels are set.
    tags = {TEST_SHA256_TAG: test_sha256, LABELS_TAG: json.dumps(labels), SCORE_TAG: repr(float(macro_f1))}
    for key, value in tags.items():
        _retry_locked(lambda key=key, value=value: client.set_model_version_tag(name, version, key, value))
    if description:
        _retry_locked(lambda: client.update_model_version(name, version, description=description))

    # MLflow has no compare-and-set for an alias: two evaluates that each read the champion, then each move it,
    # leave it wherever the slower write put it, better or worse. So each evaluate, having tagged its own
    # version, repeats [read the scores, read the alias; stop if the alias is on a best score, else move it to
    # the best] until it stops. However the calls of any number of evaluates interleave, the alias ends on a
    # best version: take the evaluate whose last read of the scores came last. Every evaluate tagged its
    # version before its own reads, so that read saw every score; every evaluate reads the scores again after
    # each alias write it makes, so all writes came before that read; the alias it then found on a best score
    # is where the alias stays (an evaluate killed between a write and its next read can leave a worse one:
    # rerun it). Evaluates on other test sets race only while there is no champion: the first write wins and
    # the others find a champion they cannot compare with.
    before: str | None = None
    for round_ in range(PROMOTE_ROUNDS):
        scores = _comparable_scores(client, name, test_sha256, labels)
        champion = _champion_of(client, name)
        if round_ == 0:
            before = champion
        if champion is not None and champion not in scores:
            return _incomparable_line(client, name, champion, version, macro_f1, test_sha256)
        top = max(scores.values())
        if champion is not None and scores[champion] == top:
            return _verdict_line(name, version, macro_f1, before, champion, scores)
        best = min((v for v, score in scores.items() if score == top), key=int)  # the same pick in every process
        _move_champion(client, name, best)
    raise UserError(
        f"alias {CHAMPION} of {name} in MLflow store {uri} was still moving after {PROMOTE_ROUNDS} rounds; "
        "rerun evaluate once the other evaluates have finished"
    )


def _is_version_of_run(client: Any, name: str, version: str, run_id: str | None, uri: str) -> bool:
    """Whether this store has `version` of `name`, from `run_id` when given; if not, a warning line says so."""
    from mlflow.exceptions import MlflowException

    try:
        registered = _retry_locked(lambda: client.get_model_version(name, version))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        _warn(f"MLflow store {uri} has no version {version} of {name}; alias {CHAMPION} left as it is")
        return False
    if run_id and registered.run_id != run_id:
        _warn(
            f"version {version} of {name} in MLflow store {uri} comes from run {registered.run_id}, not from "
            f"run {run_id} that trained this model; alias {CHAMPION} left as it is"
        )
        return False
    return True


def _comparable_scores(client: Any, name: str, test_sha256: str, labels: list[str]) -> dict[str, float]:
    """{version: test macro-F1} of the versions of `name` scored on this test set with these label names."""

    scores: dict[str, float] = {}
    token = None
    while True:
        # Filtered on the tag alone: a hex digest needs no quoting, a model name may hold both kinds of quote.
        page = _retry_locked(
            lambda token=token: client.search_model_versions(
                f"tags.`{TEST_SHA256_TAG}` = '{test_sha256}'", page_token=token
            )
        )
        for mv in page:
            tags = mv.tags or {}
            if mv.name != name or SCORE_TAG not in tags or tags.get(LABELS_TAG) != json.dumps(labels):
                continue
            with contextlib.suppress(ValueError):
                scores[str(mv.version)] = float(tags[SCORE_TAG])
        token = page.token
        if not token:
            return scores


def _move_champion(client: Any, name: str, version: str) -> None:
    """Set alias `champion`; a write that lost a race to create the alias counts as not made (the next round
    reads what won)."""
    from mlflow.exceptions import MlflowException

    try:
        _retry_locked(lambda: client.set_registered_model_alias(name, CHAMPION, version))
    except MlflowException as exc:
        # MLflow sets an alias by a read, then an insert or an update: two writers that both found no alias
        # both insert, and the second breaks the alias table's unique key (a BAD_REQUEST through a server).
        if not any(text in str(exc) for text in ("UNIQUE constraint", "IntegrityError", "duplicate key")):
            raise


def _champion_of(client: Any, name: str) -> str | None:
    version = _retry_locked(lambda: client.get_registered_model(name)).aliases.get(CHAMPION)
    return None if version is None else str(version)


def _incomparable_line(client: Any, name: str, champion: str, version: str, macro_f1: float, test_sha256: str) -> str:
    tags = _retry_locked(lambda: client.get_model_version(name, champion)).tags or {}
    if SCORE_TAG not in tags or TEST_SHA256_TAG not in tags:
        why = "was never scored by evaluate"
    elif tags[TEST_SHA256_TAG] != test_sha256:
        why = f"was scored on another test set (sha256 {tags[TEST_SHA256_TAG][:12]}, this one {test_sha256[:12]})"
    else:
        why = f"was scored with other label names ({tags.get(LABELS_TAG)})"
    return (
        f"evaluate: {name} champion stays version {champion}: it {why}, so candidate version {version} "
        f"(test macro-F1 {macro_f1:.4f}) is not compared with it; delete alias {CHAMPION} or set it by hand to "
        "start over"
    )


def _verdict_line(
    name: str, version: str, macro_f1: float, before: str | None, after: str, scores: dict[str, float]
) -> str:
    if after == before == version:
        return f"evaluate: {name} version {version} is the champion already (test macro-F1 {macro_f1:.4f})"
    candidate = "" if after == version else f"; candidate version {version} scored {macro_f1:.4f}"
    if after == before:
        return f"evaluate: {name} champion stays version {after} (test macro-F1 {scores[after]:.4f}){candidate}"
    was = "no champion before" if before is None else f"was version {before}"
    if before in scores:
        was += f" with {scores[before]:.4f}"
    return f"evaluate: {name} champion is now version {after} (test macro-F1 {scores[after]:.4f}; {was}){candidate}"
