"""A Markdown report of the working tree against a base git revision, for a pull request or a local check.

Params and metrics are DVC's own diffs (`dvc params diff` and `dvc metrics diff` against the base, as Markdown).
What DVC does not show is added: the MLflow run ids behind the numbers, and figures of the DVC plots files
under plots/ at the base revision (read with `git show`) beside the working tree's, so it works in any clone
where the base revision is fetched, with no DVC cache. The MLflow run ids behind the numbers live
in DVC outputs (models/*/training_run.json): the working tree's are read from disk, the base's through
`dvc.api.read`, from the local cache or else the default DVC remote; where neither has them (a fresh clone with
no remote, as on a CI runner) they are reported as unknown.

Verdicts come first: for each model scored at both revisions on the same test set (plots/evaluate/test_set.json,
the split's sha256), a paired bootstrap of the test macro-F1 and accuracy deltas over the per-document
predictions (plots/evaluate/confusion_<model>.json; transferpipe.significance.paired_bootstrap) gives each
delta a 95% interval and one word: better, worse, or within noise.

Figures are PNGs (matplotlib, Agg) with the base on the left and the working tree on the right, written to an
images folder next to the report and linked by relative path.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferpipe.errors import UserError
from transferpipe.evaluation import confusion
from transferpipe.io import SKIPPED, write_text_atomic
from transferpipe.significance import PairedDelta, paired_bootstrap
from transferpipe.vcs import dvc, git

PARAMS_FILE = "params.yaml"
METRICS_DIR = "metrics"
EVALUATE_PLOTS_DIR = "plots/evaluate"
RUN_FILES = {
    "pretrain": "models/pretrained/training_run.json",
    "finetune (pretrained)": "models/finetuned/pretrained/training_run.json",
    "finetune (scratch)": "models/finetuned/scratch/training_run.json",
}
MISSING = "—"
NOT_TRAINED = "not trained (skipped)"

# (file name, title, [(csv path, column, series label)], y label); missing files or columns are skipped.
CURVES = [
    (
        "pretrain_loss.png",
        "Pretraining loss (masked LM)",
        [("plots/pretrain/train.csv", "loss", "train"), ("plots/pretrain/eval.csv", "loss", "held-out")],
        "loss",
    ),
    (
        "finetune_loss.png",
        "Fine-tuning loss",
        [
            ("plots/finetune/pretrained/train.csv", "loss", "pretrained, train"),
            ("plots/finetune/pretrained/eval.csv", "loss", "pretrained, validation"),
            ("plots/finetune/scratch/train.csv", "loss", "scratch, train"),
            ("plots/finetune/scratch/eval.csv", "loss", "scratch, validation"),
        ],
        "loss",
    ),
    (
        "finetune_macro_f1.png",
        "Fine-tuning validation macro-F1",
        [
            ("plots/finetune/pretrained/eval.csv", "macro_f1", "pretrained"),
            ("plots/finetune/scratch/eval.csv", "macro_f1", "scratch"),
        ],
        "macro-F1",
    ),
]

Reader = Callable[[str], str | None]


@dataclass(frozen=True)
class Side:
    """One side of the comparison: a label for headings and a reader of repository files (None: absent)."""

    label: str
    read: Reader
    list_dir: Callable[[str], list[str]]


def build_report(
    root: Path, base: str, out: Path, images_dir: Path, section: str | None = None, rerun: dict | None = None
) -> Path:
    """Write the report to `out` and its figures to `images_dir`; return the report's path. With `section`,
    the report is a section of that title, its own headings one level down (to append to another report). With
    `rerun`, the record of `transferpipe rerun` in this working tree, the first line says what the rerun did."""
    root = Path(root)
    base_sha = resolve_revision(root, base)
    head_sha = git(root, "rev-parse", "--short", "HEAD").strip()
    dirty = bool(git(root, "status", "--porcelain", "--untracked-files=no").strip())
    old = Side(
        f"base {base} ({base_sha[:7]})", lambda p: _git_show(root, base_sha, p), lambda d: _git_ls(root, base_sha, d)
    )
    new = Side(
        f"working tree ({head_sha}{', uncommitted changes' if dirty else ''})",
        lambda p: _read_file(root, p),
        lambda d: _list_files(root, d),
    )
    out = Path(out)
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    link_prefix = Path(os.path.relpath(images_dir.resolve(), out.resolve().parent)).as_posix()

    lines = [freshness_line(root, rerun), "", f"# transferpipe report: {new.label} vs {old.label}", ""]
    lines += verdicts_section(old, new)
    lines += sweeps_section(*(_sweep(root, rev) for rev in (base_sha, "HEAD")))
    lines += _dvc_diff_section(root, "params", base, "Params", f"No params changed in {PARAMS_FILE}.")
    lines += _dvc_diff_section(root, "metrics", base, "Metrics", f"No metrics changed under {METRICS_DIR}/.")
    lines += _runs_section(root, base_sha, new)
    lines += _figures_section(old, new, images_dir, link_prefix)
    if section:  # the title becomes a line of text under the section's heading, and ## becomes ###
        title = f"# transferpipe report: {new.label} vs {old.label}"
        body = [f"{new.label} vs {old.label}." if line == title else f"#{line}" if line.startswith("#") else line
                for line in lines]  # fmt: skip
        lines = [f"## {section}", "", *body]
    write_text_atomic(out, "\n".join(lines).rstrip() + "\n")
    return out


def resolve_revision(root: Path, rev: str) -> str:
    """The full commit id of `rev`, or a UserError naming the fix."""
    try:
        return git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").strip()
    except UserError:
        raise UserError(
            f"base revision {rev!r} not found in this clone; fetch it (git fetch origin main) or pass another --base"
        ) from None


# --- freshness: do the committed results belong to this code, params and data? ---------------------------


def stale_stages(root: Path) -> tuple[dict[str, list[str]], set[str]]:
    """From `dvc status` of the working tree against its dvc.lock: the stages whose code, params, command or
    upstream outputs changed since they were run, each with why (their committed results are stale), and the
    stages whose outputs are not here to check (no DVC cache or remote, as in a fresh clone)."""
    status = json.loads(dvc(root, "status", "--json").strip() or "{}")
    lock = _lock_stages(root)
    outputs = {out["path"] for stage in lock.values() for out in stage.get("outs", [])}
    stale, unverified = {}, set()
    for stage, entries in status.items():
        reasons = []
        for entry in entries:
            if isinstance(entry, str):  # "changed command", "always changed"
                reasons.append(entry.removeprefix("changed "))
                continue
            for path, change in (entry.get("changed deps") or {}).items():
                if isinstance(change, dict):  # params: {section: modified}, named down to the keys that changed
                    ran_with = lock.get(stage, {}).get("params", {}).get(path, {})
                    reasons.append(f"{path}: {', '.join(_changed_keys(root / path, ran_with, list(change)))}")
                elif change == "deleted" and _is_output(path, outputs):
                    unverified.add(stage)  # an upstream output not here: unknown, not stale
                else:
                    reasons.append(path)
            for path, change in (entry.get("changed outs") or {}).items():
                if change == "modified":
                    reasons.append(f"{path} differs from dvc.lock")
                else:
                    unverified.add(stage)
        if reasons:
            stale[stage] = sorted(set(reasons))
    return stale, unverified


def describe_stale(stale: dict[str, list[str]]) -> str:
    return "; ".join(f"{stage} ({', '.join(reasons)})" for stage, reasons in stale.items())


def freshness_line(root: Path, rerun: dict | None = None) -> str:
    """The report's first line: whether every stage's committed results belong to the committed code, params and
    data (`stale_stages`), and, given the record of `transferpipe rerun` (transferpipe.rerun), what a rerun of the
    stale stages on this machine did: the report then compares the rerun's results where it finished."""
    if rerun and rerun.get("outcome") == "rerun":
        return rerun_line(rerun)
    stale, unverified = stale_stages(root)
    if stale:
        line = (
            f"**Results are stale**: changed since they were run: {describe_stale(stale)}. "
            "Rerun `dvc repro` (or `dvc exp run`), commit dvc.lock, metrics and plots, and `dvc push`."
        )
        return line + (f" {rerun_line(rerun)}" if rerun else "")
    line = "**Results are current**: every stage ran with the code, params and data committed here (`dvc status`)."
    if unverified:
        line += " The models themselves were not checked: their DVC outputs are not here (no cache, no remote)."
    return line


def rerun_line(rerun: dict) -> str:
    """What `transferpipe rerun` did, in a sentence or two (its record: transferpipe.rerun.rerun_stale)."""
    took = ", ".join(f"{stage} {_duration(seconds)}" for stage, seconds in rerun.get("stages", {}).items())
    where = rerun.get("cpu", "this machine")
    if rerun["outcome"] == "rerun":
        return (
            f"**Results were stale and are rerun here**: changed since they were run: "
            f"{describe_stale(rerun['stale'])}. `dvc repro` reran {took or 'them'} on {where} "
            f"({_duration(rerun['seconds'])} in all); the review compares those results, uncommitted, with the "
            "base's committed ones. Another CPU lands within the seed spread, not on the author's digits: "
            "rerun, commit and `dvc push` to review your own."
        )
    budget = _duration(rerun["within_seconds"])
    if rerun["outcome"] == "timeout":
        return (
            f"A rerun here did not finish within {budget} ({took or 'no stage finished'}; stopped, the committed "
            "results restored)."
        )
    if rerun["outcome"] == "failed":
        return f"A rerun here failed: {rerun.get('error', 'see the job log')} (the committed results restored)."
    return f"Not rerun here: {rerun.get('why', rerun['outcome'])}."


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _lock_stages(root: Path) -> dict[str, dict]:
    import yaml

    lock = root / "dvc.lock"
    return (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}) if lock.is_file() else {}


def _changed_keys(params_file: Path, ran_with: dict, sections: list[str]) -> list[str]:
    """The dotted keys under `sections` whose value in `params_file` differs from what the stage ran with (its
    dvc.lock entry); a section whose keys cannot be told apart is named whole."""
    import yaml

    try:
        now = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return sections
    keys = []
    for section in sections:
        old, new = _flatten(ran_with.get(section), section), _flatten(_lookup(now, section), section)
        keys += sorted(
            key for key in old.keys() | new.keys() if not _same(old.get(key, MISSING), new.get(key, MISSING))
        )
    return keys or sections


def _same(a: object, b: object) -> bool:
    """Equal values, where DVC's lock writes 5.0e-5 as `5e-05`, which YAML 1.1 reads back as a string."""
    if a == b:
        return True
    try:
        return isinstance(a, str | float | int) and isinstance(b, str | float | int) and float(a) == float(b)
    except ValueError:
        return False


def _lookup(tree: dict, dotted: str) -> object:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _flatten(value: object, prefix: str) -> dict[str, object]:
    """label_efficiency.flatten of a section, or {prefix: value} for a single param (model.checkpoint)."""
    from transferpipe.label_efficiency import flatten

    return flatten(value, f"{prefix}.") if isinstance(value, dict) else {prefix: value}


def _is_output(path: str, outputs: set[str]) -> bool:
    return any(path == out or path.startswith(out.rstrip("/") + "/") for out in outputs)


# --- verdicts: every delta with its noise --------------------------------------------------------------------

RESAMPLES = 10_000
TEST_SET_FILE = f"{EVALUATE_PLOTS_DIR}/test_set.json"


def verdicts_section(old: Side, new: Side) -> list[str]:
    """One line per model scored at both revisions: the macro-F1 and accuracy deltas with their paired-bootstrap
    95% intervals and a verdict, or why there is none."""
    lines = ["## Verdicts", ""]
    sets = [_load_json(side.read(TEST_SET_FILE), TEST_SET_FILE) for side in (old, new)]
    missing = [side.label for side, found in zip((old, new), sets, strict=True) if not found.get("sha256")]
    if missing:
        return lines + [f"No verdicts: {' and '.join(missing)} has no {TEST_SET_FILE} (evaluate writes it).", ""]
    if sets[0]["sha256"] != sets[1]["sha256"]:
        return lines + [
            f"No verdicts: the test sets differ (sha256 {sets[0]['sha256'][:12]} against {sets[1]['sha256'][:12]}), "
            "so the scores are not comparable document by document.",
            "",
        ]
    labels = {name: i for i, name in enumerate(dict.fromkeys([*sets[1]["labels"], *sets[0]["labels"]]))}
    models = [m for m in _models(new) if m in _models(old)]
    for model in models:
        path = f"{EVALUATE_PLOTS_DIR}/confusion_{model}.json"
        rows = [_load_json(side.read(path), path) for side in (old, new)]
        actual = [[labels[r["actual"]] for r in side] for side in rows]
        if actual[0] != actual[1] or len(actual[1]) != sets[1]["documents"]:
            lines.append(f"- **{model}**: no verdict, its predictions do not cover the same test documents in order")
            continue
        base, head = ([labels[r["predicted"]] for r in side] for side in rows)
        deltas = paired_bootstrap(actual[1], base, head, len(labels), resamples=RESAMPLES)
        lines.append(f"- **{model}**: " + "; ".join(_delta_text(d) for d in deltas.values()))
    if not models:
        lines.append("No model was scored at both revisions.")
    lines += [
        "",
        f"Paired bootstrap over the {sets[1]['documents']} test documents ({RESAMPLES:,} resamples, seed 0), 95% "
        "intervals of head minus base in points; better or worse when the interval excludes 0.",
        "",
    ]
    return lines


def _sweep(root: Path, rev: str) -> list[dict]:
    """label_efficiency.summarize's rows for the finished DVC experiments of commit `rev` ([] for none)."""
    from transferpipe.label_efficiency import experiments_from_show, show_experiments, summarize

    try:
        found, _ = experiments_from_show(show_experiments(root, rev))
        return summarize(found)[0] if found else []
    except UserError:
        return []


def sweeps_section(base: list[dict], head: list[dict]) -> list[str]:
    """Where both revisions have seed sweeps (label-efficiency experiments: label_efficiency.summarize's rows),
    each point's mean ± sd per model at both, and whether the difference of the means is within the seed spread
    (no larger than the larger of the two standard deviations): there a single run's delta says little."""
    before = {row["labels_per_class"]: row for row in base if row["experiments"] > 1}
    points = [row for row in head if row["experiments"] > 1 and row["labels_per_class"] in before]
    if not points:
        return []
    lines = [
        "## Seed sweeps",
        "",
        "| labels per class | model | base | head | difference | |",
        "|---|---|---|---|---|---|",
    ]
    for row in points:
        old = before[row["labels_per_class"]]
        for model in [k.removesuffix("_mean") for k in row if k.endswith("_mean") and k in old]:
            mean, sd = row[f"{model}_mean"], row[f"{model}_std"]
            old_mean, old_sd = old[f"{model}_mean"], old[f"{model}_std"]
            if math.isnan(mean) or math.isnan(old_mean):
                continue
            spread = "within the seed spread" if abs(mean - old_mean) <= max(sd, old_sd) else "beyond the seed spread"
            lines.append(
                f"| {row['labels_per_class']} | {model} | {old_mean:.3f} ± {old_sd:.3f} (n={old['experiments']}) | "
                f"{mean:.3f} ± {sd:.3f} (n={row['experiments']}) | {100 * (mean - old_mean):+.2f} points | {spread} |"
            )
    lines += [
        "",
        "Test macro-F1 of the finished DVC experiments of each revision (`transferpipe label-efficiency`), mean ± sd "
        "over seeds; within the seed spread when the difference is no larger than the larger sd.",
        "",
    ]
    return lines


def _models(side: Side) -> list[str]:
    return sorted(
        Path(p).stem.removeprefix("confusion_")
        for p in side.list_dir(EVALUATE_PLOTS_DIR)
        if Path(p).name.startswith("confusion_") and p.endswith(".json")
    )


def _delta_text(d: PairedDelta) -> str:
    name = "macro-F1" if d.metric == "macro_f1" else d.metric
    return (
        f"{name} {d.base:.4f} → {d.head:.4f}, {100 * d.delta:+.2f} points "
        f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}]: **{d.verdict}**"
    )


# --- params and metrics: DVC's own diffs ------------------------------------------------------------------


def _dvc_diff_section(root: Path, kind: str, base: str, title: str, nothing: str) -> list[str]:
    """`dvc params diff` or `dvc metrics diff` of the working tree against `base`, as DVC's Markdown table."""
    table = dvc(root, kind, "diff", base, "--md").strip()
    rows = [line for line in table.splitlines() if line.startswith("|")][2:]  # under the header and the rule
    return [f"## {title}", "", table if rows else nothing, ""]


def _load_json(text: str | None, path: str) -> Any:
    if text is None:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


# --- MLflow run ids ----------------------------------------------------------------------------------------


def _runs_section(root: Path, base_sha: str, new: Side) -> list[str]:
    lines = ["## MLflow runs", "", "| stage | base run id | new run id |", "|---|---|---|"]
    missing = []
    for stage, path in RUN_FILES.items():
        skipped_file = str(Path(path).parent / SKIPPED)  # a model the params said not to make: no run to find
        before = _base_run_id(root, base_sha, path)
        if before is None and _base_run_id(root, base_sha, skipped_file, raw=True) is not None:
            before = NOT_TRAINED
        elif before is None:
            missing.append(path)
        after = NOT_TRAINED if new.read(skipped_file) is not None else _run_id(new.read(path))
        lines.append(f"| {stage} | {_code(before)} | {_code(after)} |")
    lines.append("")
    if missing:
        lines += [
            f"The base revision's DVC outputs ({', '.join(missing)}) are not in the DVC cache, so its MLflow run "
            "ids are unknown; params and committed metrics above are still compared.",
            "",
        ]
    return lines


def _base_run_id(root: Path, rev: str, path: str, raw: bool = False) -> str | None:
    """The MLflow run id in `path` at `rev` (with raw=True the file's text), None where it cannot be read."""
    import dvc.api

    try:
        text = dvc.api.read(path, repo=str(root), rev=rev)
        return text if raw else _run_id(text)
    except Exception:
        # Not tracked at that revision, not in the cache, no remote or an unreachable one: all mean "unknown".
        # The errors have no common base: a file inside a directory output whose .dir manifest is in neither
        # the cache nor a remote (a fresh clone on a CI runner) raises dvc_data's DataIndexDirError, others
        # come from dvc, scmrepo or a remote's client library (missing credentials). The run ids only
        # annotate the report, so none of them may stop it.
        return None


def _run_id(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    run_id = data.get("mlflow_run_id") if isinstance(data, dict) else None
    return str(run_id) if run_id else None


def _code(value: str | None) -> str:
    return value if value == NOT_TRAINED else f"`{value}`" if value else MISSING


# --- figures -----------------------------------------------------------------------------------------------


def _figures_section(old: Side, new: Side, images_dir: Path, link_prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # no display on a CI runner
    lines = ["## Training curves", "", f"Left: {old.label}. Right: {new.label}.", ""]
    for name, title, series, ylabel in CURVES:
        _curve_figure(images_dir / name, title, series, ylabel, old, new)
        lines += [f"![{title}]({link_prefix}/{name})", ""]
    lines += ["## Confusion matrices (test set)", "", f"Left: {old.label}. Right: {new.label}.", ""]
    models = sorted(set(_models(old)) | set(_models(new)))
    if not models:
        lines += [f"No confusion matrices under {EVALUATE_PLOTS_DIR}/ on either side.", ""]
    for model in models:
        name = f"confusion_{model}.png"
        _confusion_figure(images_dir / name, model, f"{EVALUATE_PLOTS_DIR}/confusion_{model}.json", old, new)
        lines += [f"![Confusion matrix, {model}]({link_prefix}/{name})", ""]
    return lines


def _read_csv(side: Side, path: str) -> Any:
    import pandas as pd

    text = side.read(path)
    if text is None or not text.strip():
        return None
    return pd.read_csv(io.StringIO(text))


def _curve_figure(path: Path, title: str, series: list[tuple[str, str, str]], ylabel: str, *sides: Side) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, squeeze=False)
    for ax, side in zip(axes[0], sides, strict=True):
        plotted = False
        for csv_path, column, label in series:
            frame = _read_csv(side, csv_path)
            if frame is None or column not in frame or "step" not in frame:
                continue
            marker = "o" if len(frame) <= 30 else None
            ax.plot(frame["step"], frame[column], marker=marker, markersize=3, label=label)
            plotted = True
        ax.set_title(side.label, fontsize=9)
        ax.set_xlabel("step")
        if plotted:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _confusion_figure(path: Path, model: str, json_path: str, *sides: Side) -> None:
    import matplotlib.pyplot as plt
    import pandas as pd
    from sklearn.metrics import ConfusionMatrixDisplay

    frames = []
    for side in sides:
        text = side.read(json_path)
        rows = _load_json(text, json_path) if text is not None else []
        frames.append(pd.DataFrame(rows, columns=["actual", "predicted"]) if rows else None)
    # One label order for both panels, so cells line up across base and new.
    labels = sorted({str(v) for f in frames if f is not None for v in pd.concat([f["actual"], f["predicted"]])})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), squeeze=False)
    for ax, side, frame in zip(axes[0], sides, frames, strict=True):
        ax.set_title(side.label, fontsize=9)
        if frame is None:
            ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        counts = confusion(frame["actual"].astype(str), frame["predicted"].astype(str), labels)  # (actual, predicted)
        display = ConfusionMatrixDisplay(counts, display_labels=labels)
        display.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
    fig.suptitle(f"Test confusion matrix, {model}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- git and file access -----------------------------------------------------------------------------------


def _git_show(root: Path, rev: str, path: str) -> str | None:
    try:
        return git(root, "show", f"{rev}:{path}")
    except UserError:
        return None  # the file does not exist at that revision


def _git_ls(root: Path, rev: str, folder: str) -> list[str]:
    return [p for p in git(root, "ls-tree", "-r", "--name-only", rev, "--", folder).splitlines() if p]


def _read_file(root: Path, path: str) -> str | None:
    file = root / path
    return file.read_text(encoding="utf-8") if file.is_file() else None


def _list_files(root: Path, folder: str) -> list[str]:
    base = root / folder
    if not base.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file())
