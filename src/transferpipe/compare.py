"""The finetune runs of an MLflow experiment side by side: which params differ, and the key test metrics.

One row per run (oldest first): run name, variant (pretrained or scratch), DVC experiment name, short git commit,
status, then only the params whose values differ between the runs (equal ones say nothing about the differences in
the metrics), then the headline metrics. Then the groups: runs of the same variant that differ only in
`finetune.seed`, with n and mean ± sd of the test metrics, so a difference between two recipes can be read
against the spread that the seed alone gives. The tracking URI is the one the stages use (tracking.tracking_uri()).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transferpipe.errors import UserError
from transferpipe.io import write_text_atomic
from transferpipe.params import SECTIONS
from transferpipe.tracking import quiet_mlflow, sqlite_path, tracking_uri

STAGE_TAG = "transferpipe.stage"
METRICS = ["test/macro_f1", "test/accuracy", "test/tfidf_logreg_macro_f1", "best/validation_macro_f1"]


def finetune_runs(experiment_name: str, uri: str | None = None) -> Any:
    """mlflow.search_runs' frame of the experiment's finetune runs, oldest first; UserError when there are none."""
    import mlflow

    quiet_mlflow()
    uri = uri or tracking_uri()
    if (db := sqlite_path(uri)) is not None and not db.is_file():
        # mlflow would silently create an empty store here; say what is missing instead.
        raise UserError(f"no MLflow store at {uri}; run `dvc repro` first or set MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment_name) is None:
        raise UserError(f"no MLflow experiment named {experiment_name!r} in {uri}; pass --experiment or --params")
    runs = mlflow.search_runs(
        experiment_names=[experiment_name],
        filter_string=f"tags.`{STAGE_TAG}` = 'finetune'",
        order_by=["attributes.start_time ASC"],
        output_format="pandas",
    )
    if runs.empty:
        raise UserError(f"no finetune runs in MLflow experiment {experiment_name!r} ({uri}); run `dvc repro` first")
    return runs


def comparison_table(runs: Any) -> tuple[Any, list[str]]:
    """(table, names of the params equal across all runs): run columns, differing params, key metrics."""
    import pandas as pd

    def tag(name: str) -> pd.Series:
        column = f"tags.{name}"
        return runs[column] if column in runs else pd.Series([None] * len(runs), index=runs.index)

    table = pd.DataFrame(
        {
            "run": tag("mlflow.runName"),
            "run_id": runs["run_id"],
            "variant": tag("transferpipe.variant"),
            "dvc.exp_name": tag("dvc.exp_name"),
            "commit": tag("mlflow.source.git.commit").map(lambda c: c[:7] if isinstance(c, str) else None),
            "status": runs["status"],
        }
    )
    param_columns = sorted(c for c in runs.columns if c.startswith("params."))
    equal = []
    for column in param_columns:
        # dropna=False: a param that one run lacks is a difference too.
        if runs[column].nunique(dropna=False) > 1:
            table[column.removeprefix("params.")] = runs[column]
        else:
            equal.append(column.removeprefix("params."))
    for metric in METRICS:
        column = f"metrics.{metric}"
        table[metric] = runs[column] if column in runs else float("nan")
    return table.reset_index(drop=True), equal


SEED = "finetune.seed"
GROUP_METRICS = ["test/macro_f1", "test/accuracy"]


def seed_groups(table: Any) -> Any:
    """One row per group of runs that differ only in finetune.seed (same variant, same other differing params):
    the params that define it, n, and mean ± sd (sample sd; none for one run) of the test metrics. Unfinished runs
    and runs without a test score are left out."""
    import pandas as pd

    finished = table[(table["status"] == "FINISHED") & table["test/macro_f1"].notna()]
    keys = ["variant", *(c for c in table.columns if "." in c and c.split(".")[0] in SECTIONS and c != SEED)]
    rows = []
    for values, group in finished.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,), strict=True))
        row["n"] = len(group)
        row["seeds"] = ", ".join(str(v) for v in group[SEED]) if SEED in group else "-"
        for metric in GROUP_METRICS:
            scores = group[metric].dropna()
            sd = f" ± {scores.std(ddof=1):.4f}" if len(scores) > 1 else ""
            row[metric] = f"{scores.mean():.4f}{sd}" if len(scores) else "-"
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, "n", "seeds", *GROUP_METRICS])


def to_markdown(table: Any) -> str:
    """A GitHub-flavoured Markdown table (pandas' to_markdown); metrics to 4 decimals, right-aligned."""
    columns = [c for c in table.columns if c != "run_id"]
    cells = table[columns].astype(object).apply(lambda col: col.map(lambda v: _cell(v, col.name in METRICS)))
    align = ["right" if c in METRICS else "left" for c in columns]
    return cells.to_markdown(index=False, tablefmt="github", colalign=align, disable_numparse=True) + "\n"


def to_text(table: Any) -> str:
    shown = table.drop(columns=["run_id"])
    others = [c for c in shown.columns if c not in METRICS]
    shown[others] = shown[others].astype(object).where(shown[others].notna(), "-")  # a missing tag is None
    return shown.to_string(index=False, na_rep="-", formatters={m: _fmt_metric for m in METRICS if m in shown})


def _fmt_metric(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _cell(value: Any, metric: bool) -> str:
    if metric:
        return _fmt_metric(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(value).replace("|", "\\|")


def compare(experiment_name: str, csv: Path | None = None, markdown: Path | None = None) -> str:
    """The printed comparison; writes the CSV (every column, full run ids) and Markdown when asked."""
    runs = finetune_runs(experiment_name)
    table, equal = comparison_table(runs)
    if csv is not None:
        Path(csv).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(csv), table.to_csv(index=False))
    summary = f"{len(table)} finetune run(s) in experiment {experiment_name!r}"
    hidden = f"{len(equal)} param(s) equal across runs, not shown" if equal else "no params are equal across runs"
    groups = seed_groups(table)
    grouped = "Runs that differ only in finetune.seed, grouped (mean ± sd over the seeds):"
    if markdown is not None:
        group_md = (
            groups.astype(str)
            .replace({"nan": "-", "None": "-"})
            .to_markdown(index=False, tablefmt="github", disable_numparse=True)
        )
        text = f"# Finetune runs: {experiment_name}\n\n{to_markdown(table)}\n{summary}; {hidden}.\n\n{grouped}\n\n"
        write_text_atomic(Path(markdown), text + group_md + "\n")
    shown = groups.astype(object).where(groups.notna(), "-").to_string(index=False)
    return f"{to_text(table)}\n\n{summary}; {hidden}.\n\n{grouped}\n{shown}"
