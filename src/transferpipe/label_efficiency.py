"""Label efficiency: test macro-F1 against labels per class, for every model, from finished DVC experiments.

The sweep queues one experiment per (labels per class, seed); only finetune and evaluate rerun, because the
pretrained encoder does not depend on the labels:

    dvc exp run --queue -S 'finetune.labels_per_class=5,20,all' -S 'finetune.seed=1,2,3'
    dvc queue start          # one worker on a 2-core CPU; `dvc queue status` shows progress
    transferpipe label-efficiency --out reports/label_efficiency

This reads `dvc exp show --json` (the experiments of HEAD): each experiment's finetune.labels_per_class and
metrics/evaluate.json, groups them by labels per class and gives mean and standard deviation over the
experiments of each group (the seeds). Experiments that differ in any other param are mixed into the same
groups, so the summary names those params; `--only key=value` keeps the experiments with that param value
(compare two recipes: `--only finetune.freeze_layers=0`, then `--only finetune.freeze_layers=4`), and
`--by key` puts the systems a param tells apart side by side in one table and plot (`--by model.architecture`:
the transformer's sweep beside the LSTM's). `--rev` (repeatable) reads the experiments of other commits than
HEAD: the LSTM sweep, queued on a branch of its own so that it pretrains once, beside main's
(`--rev main --rev lstm-profile`; docs/experiments.md).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from transferpipe.errors import UserError
from transferpipe.io import write_text_atomic
from transferpipe.vcs import dvc

PARAMS_FILE = "params.yaml"
METRICS_FILE = "metrics/evaluate.json"
SWEPT = {"finetune.labels_per_class", "finetune.seed"}
LINE_STYLES = ["-", "--", ":", "-."]  # one per system (--by)
MODEL_NAMES = {
    "pretrained": "pretrained",
    "scratch": "from scratch",
    "setfit": "SetFit",
    "tfidf_logreg": "TF-IDF + logistic regression",
}


@dataclass(frozen=True)
class Experiment:
    name: str
    params: dict[str, Any]  # flat: "finetune.seed" -> 1
    macro_f1: dict[str, float]  # model -> test macro-F1


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def experiments_from_show(shown: list[dict]) -> tuple[list[Experiment], int]:
    """The finished experiments in `dvc exp show --json` output (baselines and the workspace left out),
    and how many experiments had no evaluate metrics (queued, running or failed: a failed one is shown with its
    baseline's metrics, so its executor's state decides). An experiment running in
    the workspace is listed with the workspace's files, its new params beside the metrics of the last run,
    and without a commit or timestamp: it counts as unfinished."""
    found, unfinished = [], 0
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            if (group.get("executor") or {}).get("state") == "failed":
                unfinished += len(group.get("revs") or [])  # DVC shows it with its baseline's files
                continue
            for rev in group.get("revs") or []:
                data = rev.get("data") or {}
                params = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data")
                metrics = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data")
                if not data.get("timestamp") or not params or not metrics or "test" not in metrics:
                    unfinished += 1
                    continue
                scores = {model: values["macro_f1"] for model, values in metrics["test"].items()}
                found.append(Experiment(rev.get("name") or rev.get("rev", "?")[:7], flatten(params), scores))
    return found, unfinished


def show_experiments(root: Path, rev: str = "HEAD") -> list[dict]:
    """`dvc exp show --json` of the experiments whose baseline is the commit `rev`."""
    return json.loads(dvc(root, "exp", "show", "--json", "--hide-queued", "--rev", rev))


def _order(labels_per_class: Any) -> tuple[int, float]:
    return (1, math.inf) if labels_per_class == "all" else (0, float(labels_per_class))


def summarize(experiments: list[Experiment], by: str | None = None) -> tuple[list[dict], list[str]]:
    """Rows (labels per class, seeds, per model mean and std, pretrained minus scratch), ordered by labels per
    class with `all` last; and the params other than labels_per_class and seed that differ between them.
    With `by` (a param key, e.g. model.architecture) each value of it is a system of its own: its rows come
    first under that key, and only params that differ within a system are named."""
    if not experiments:
        raise UserError(
            "no finished DVC experiments with metrics/evaluate.json; queue the sweep first, e.g. "
            "dvc exp run --queue -S 'finetune.labels_per_class=5,20,all' -S 'finetune.seed=1,2,3' && dvc queue start"
        )
    systems: dict[Any, list[Experiment]] = {}
    for e in experiments:
        systems.setdefault(e.params.get(by) if by else None, []).append(e)
    mixed: set[str] = set()
    for members in systems.values():
        keys = set().union(*(e.params for e in members)) - SWEPT - {by}
        mixed |= {k for k in keys if len({json.dumps(e.params.get(k)) for e in members}) > 1}
    models = [m for m in MODEL_NAMES if any(m in e.macro_f1 for e in experiments)]
    rows = []
    for system in sorted(systems, key=str):
        groups: dict[Any, list[Experiment]] = {}
        for e in systems[system]:
            groups.setdefault(e.params.get("finetune.labels_per_class", "all"), []).append(e)
        for labels_per_class in sorted(groups, key=_order):
            members = groups[labels_per_class]
            row: dict[str, Any] = {by: system} if by else {}
            row |= {"labels_per_class": labels_per_class, "experiments": len(members)}
            for model in models:
                values = [e.macro_f1[model] for e in members if model in e.macro_f1]
                row[f"{model}_mean"] = statistics.fmean(values) if values else math.nan
                row[f"{model}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            if "pretrained" in models and "scratch" in models:
                row["pretrained_minus_scratch"] = row["pretrained_mean"] - row["scratch_mean"]
            rows.append(row)
    return rows, sorted(mixed)


def to_markdown(rows: list[dict], by: str | None = None) -> str:
    """summarize's rows as a GitHub table; `by`: the key its rows carry the system under (first column)."""
    models = [m for m in MODEL_NAMES if f"{m}_mean" in rows[0]]
    header = ([by] if by else []) + ["labels per class", "experiments", *(f"{MODEL_NAMES[m]} macro-F1" for m in models)]
    if "pretrained_minus_scratch" in rows[0]:
        header.append("pretrained − scratch")
    table = []
    for row in rows:
        cells = ([str(row[by])] if by else []) + [str(row["labels_per_class"]), str(row["experiments"])]
        cells += [f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}" for m in models]
        if "pretrained_minus_scratch" in row:
            cells.append(f"{row['pretrained_minus_scratch']:+.3f}")
        table.append(cells)
    frame = pd.DataFrame(table, columns=header)
    colalign = (["left"] if by else []) + ["right"] * (len(header) - bool(by))
    return frame.to_markdown(index=False, tablefmt="github", colalign=colalign, disable_numparse=True) + "\n"


def plot(rows: list[dict], path: Path, by: str | None = None) -> None:
    """Test macro-F1 (mean, with a band of ± one standard deviation) against labels per class, one line per
    model (a color each) and system (a line style each); labels per class on evenly spaced ticks, `all` last.
    A baseline line that repeats another system's values exactly (TF-IDF sees only the text) is drawn once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    systems = list(dict.fromkeys(r[by] for r in rows)) if by else [None]
    labels = list(dict.fromkeys(r["labels_per_class"] for r in rows))
    xs = {value: i for i, value in enumerate(sorted(labels, key=_order))}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn: list[tuple[str, np.ndarray]] = []
    for i, system in enumerate(systems):
        style = LINE_STYLES[i % len(LINE_STYLES)]
        members = [r for r in rows if not by or r[by] == system]
        for color, (model, name) in enumerate(MODEL_NAMES.items()):
            if f"{model}_mean" not in rows[0]:
                continue
            mean = np.array([r[f"{model}_mean"] for r in members])
            if any(m == model and np.array_equal(v, mean) for m, v in drawn):
                continue
            drawn.append((model, mean))
            std = np.array([r[f"{model}_std"] for r in members])
            x = [xs[r["labels_per_class"]] for r in members]
            label = name if not by or model == "tfidf_logreg" else f"{system}: {name}"
            ax.plot(x, mean, marker="o", linestyle=style, color=f"C{color}", label=label)
            ax.fill_between(x, mean - std, mean + std, color=f"C{color}", alpha=0.15)
    ax.set_xticks(list(xs.values()), [str(value) for value in xs])
    ax.set_xlabel("labeled training examples per class")
    ax.set_ylabel("test macro-F1")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    seeds = sorted({r["experiments"] for r in rows})
    ax.set_title(f"Label efficiency (mean ± std over {'/'.join(map(str, seeds))} experiments per point)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def select(experiments: list[Experiment], only: list[str]) -> list[Experiment]:
    """The experiments whose params match every `key=value` (values compared as YAML reads them)."""
    import yaml

    for condition in only:
        key, sep, value = condition.partition("=")
        if not sep:
            raise UserError(f"--only {condition!r}: expected key=value, e.g. finetune.freeze_layers=0")
        wanted = yaml.safe_load(value)
        experiments = [e for e in experiments if e.params.get(key) == wanted]
    return experiments


def label_efficiency(
    root: Path, out: Path, only: list[str] | None = None, by: str | None = None, revs: list[str] | None = None
) -> str:
    """Writes out/label_efficiency.{csv,md,png} from the experiments of the commits `revs` (default HEAD);
    returns the printed summary."""
    import pandas as pd

    # One entry per baseline commit: two revs naming one commit (main and HEAD) show its experiments once.
    shown = {b["rev"]: b for rev in dict.fromkeys(revs or ["HEAD"]) for b in show_experiments(root, rev)}
    experiments, unfinished = experiments_from_show(list(shown.values()))
    experiments = select(experiments, only or [])
    rows, mixed = summarize(experiments, by)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "label_efficiency.csv", pd.DataFrame(rows).to_csv(index=False))
    table = to_markdown(rows, by)
    notes = [f"{len(experiments)} finished experiment(s)" + (f" with {', '.join(only)}" if only else "")]
    if unfinished:
        notes.append(f"{unfinished} without evaluate metrics left out")
    if mixed:
        notes.append(f"they also differ in {', '.join(mixed)}" + (f" within a {by}" if by else ""))
    summary = "; ".join(notes) + "."
    write_text_atomic(out / "label_efficiency.md", f"# Label efficiency\n\n{table}\n{summary}\n")
    plot(rows, out / "label_efficiency.png", by)
    return f"{table}\n{summary}\nwrote {out}/label_efficiency.csv, .md and .png"
