"""`transferpipe report` on a throwaway git + DVC repository with two commits that differ in a param and in
metrics (files written by hand, no training), run as a real subprocess with the real git and dvc."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from tests.helpers import REPO, sh
from transferpipe.report import Side, _changed_keys, freshness_line, sweeps_section, verdicts_section

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NEW_PRETRAIN_RUN = "a" * 32
NEW_FINETUNE_RUN = "b" * 32
EDITED_PRETRAIN_RUN = "c" * 32
SCRATCH_RUN = "d" * 32


def write_state(root: Path, epochs: int, macro_f1: float, steps: int, extra_metric: bool) -> None:
    """params.yaml, metrics/*.json and plots/* as the pipeline would commit them."""
    params = {"finetune": {"epochs": epochs, "seed": 42}, "tracking": {"enabled": True, "experiment_name": "t"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Declared as the pipeline's dvc.yaml declares them, for DVC's own diffs.
    metrics = ["metrics/evaluate.json", "metrics/finetune/pretrained.json"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"params": ["params.yaml"], "metrics": metrics}))
    (root / "metrics").mkdir(exist_ok=True)
    test = {"pretrained": {"accuracy": 0.82, "macro_f1": macro_f1}}
    if extra_metric:
        test["tfidf_logreg"] = {"macro_f1": 0.9}
    (root / "metrics/evaluate.json").write_text(json.dumps({"test": test}))
    (root / "metrics/finetune").mkdir(exist_ok=True)
    (root / "metrics/finetune/pretrained.json").write_text(json.dumps({"train": {"steps": steps}}))
    for stage in ("pretrain", "finetune/pretrained"):
        (root / "plots" / stage).mkdir(parents=True, exist_ok=True)
        (root / f"plots/{stage}/train.csv").write_text(
            "step,loss,learning_rate\n" + "".join(f"{s},{2.0 / s},0.001\n" for s in range(1, steps, 10))
        )
    (root / "plots/pretrain/eval.csv").write_text("step,epoch,loss,perplexity\n5,0,1.5,4.48\n")
    (root / "plots/finetune/pretrained/eval.csv").write_text(
        f"step,epoch,loss,accuracy,macro_f1\n10,0,0.9,0.7,0.65\n20,1,0.6,0.82,{macro_f1}\n"
    )
    (root / "plots/evaluate").mkdir(parents=True, exist_ok=True)
    rows = [{"actual": a, "predicted": p} for a, p in [("sport", "sport"), ("tech", "sport"), ("tech", "tech")]]
    (root / "plots/evaluate/confusion_pretrained.json").write_text(json.dumps(rows))


def write_run_ids(root: Path, pretrain: str, finetune: str) -> None:
    for folder, run_id in (
        ("pretrained", pretrain),
        ("finetuned/pretrained", finetune),
        ("finetuned/scratch", SCRATCH_RUN),
    ):
        (root / "models" / folder).mkdir(parents=True, exist_ok=True)
        (root / "models" / folder / "training_run.json").write_text(json.dumps({"mlflow_run_id": run_id}))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Commit 1 (base): epochs 6, macro-F1 0.8, 100 steps, models never cached. Commit 2 (HEAD, also the
    working tree): epochs 3, macro-F1 0.85, 50 steps, one more metric, models added to DVC."""
    root = tmp_path_factory.mktemp("report-repo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))}
    env |= {"PYTHONPATH": str(REPO / "src"), "DVC_NO_ANALYTICS": "1"}
    sh(["git", "init", "-q", "-b", "main"], root, env)
    sh(["git", "config", "user.email", "test@example.com"], root, env)
    sh(["git", "config", "user.name", "test"], root, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    write_state(root, epochs=6, macro_f1=0.8, steps=100, extra_metric=False)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "base"], root, env)

    write_state(root, epochs=3, macro_f1=0.85, steps=50, extra_metric=True)
    write_run_ids(root, NEW_PRETRAIN_RUN, NEW_FINETUNE_RUN)
    sh(
        [
            sys.executable,
            "-m",
            "dvc",
            "add",
            "-q",
            "models/pretrained",
            "models/finetuned/pretrained",
            "models/finetuned/scratch",
        ],
        root,
        env,
    )
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "fewer epochs"], root, env)
    return root, env


def report(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "transferpipe.cli", "report", *args], root, env, check=False)


def test_report_against_the_previous_commit(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    proc = report(root, env, "--base", "HEAD~1", "--out", "out/report.md")
    assert proc.returncode == 0, proc.stderr
    text = re.sub(" +", " ", (root / "out/report.md").read_text())  # DVC pads its Markdown tables

    # DVC's diffs: the changed param and nothing for the unchanged one; changed metrics with base, new and
    # change (a metric only on one side has none).
    assert "| params.yaml | finetune.epochs | 6 | 3 |" in text
    assert "finetune.seed" not in text
    assert "| metrics/evaluate.json | test.pretrained.macro_f1 | 0.8 | 0.85 | 0.05 |" in text
    assert "test.pretrained.accuracy" not in text  # unchanged
    assert "| metrics/evaluate.json | test.tfidf_logreg.macro_f1 | - | 0.9 | - |" in text
    assert "| metrics/finetune/pretrained.json | train.steps | 100 | 50 | -50 |" in text
    # Run ids: the working tree's from disk; the base has no DVC outputs, which the report says once.
    assert f"| finetune (pretrained) | — | `{NEW_FINETUNE_RUN}` |" in text
    assert f"| finetune (scratch) | — | `{SCRATCH_RUN}` |" in text
    assert f"| pretrain | — | `{NEW_PRETRAIN_RUN}` |" in text
    assert text.count("are not in the DVC cache, so its MLflow run ids are unknown") == 1

    # Figures: next to the report, linked by relative path, real PNGs with two panels' worth of width.
    links = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    expected = {"pretrain_loss", "finetune_loss", "finetune_macro_f1", "confusion_pretrained"}
    assert {Path(link).stem for link in links} == expected
    for link in links:
        assert link.startswith("report_images/")
        png = root / "out" / link
        assert png.read_bytes()[:8] == PNG_MAGIC
        height, width = matplotlib.image.imread(png).shape[:2]
        assert width > 2 * height * 0.9


def test_base_run_ids_come_from_the_dvc_cache(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    # Against HEAD the base's outputs are in the cache: its run ids come through dvc.api.read, the working
    # tree's (edited here, uncommitted) from disk.
    write_run_ids(root, EDITED_PRETRAIN_RUN, NEW_FINETUNE_RUN)
    try:
        proc = report(root, env, "--base", "HEAD", "--out", "same.md", "--images-dir", "same_images")
    finally:
        write_run_ids(root, NEW_PRETRAIN_RUN, NEW_FINETUNE_RUN)
    assert proc.returncode == 0, proc.stderr
    text = (root / "same.md").read_text()
    assert "No params changed in params.yaml." in text
    assert f"| pretrain | `{NEW_PRETRAIN_RUN}` | `{EDITED_PRETRAIN_RUN}` |" in text
    assert f"| finetune (pretrained) | `{NEW_FINETUNE_RUN}` | `{NEW_FINETUNE_RUN}` |" in text
    assert "not in the DVC cache" not in text
    assert "](same_images/confusion_pretrained.png)" in text
    assert (root / "same_images/confusion_pretrained.png").read_bytes()[:8] == PNG_MAGIC


def test_a_fresh_clone_without_the_base_outputs_reports_unknown_run_ids(
    repo: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, env = repo
    # A fresh clone, as on a CI runner: HEAD tracks models/* as directory outputs, but the DVC cache (with
    # their .dir manifests) stays behind and no remote is configured. dvc.api.read then raised dvc_data's
    # DataIndexDirError, which escaped as a traceback.
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / ".dvc/cache").exists()
    for base in ("HEAD", "HEAD~1"):
        proc = report(clone, env, "--base", base, "--out", f"{base}.md")
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        text = (clone / f"{base}.md").read_text()
        assert "| pretrain | — | — |" in text  # no base outputs, and none on disk in the clone
        assert text.count("are not in the DVC cache, so its MLflow run ids are unknown") == 1
    assert "| params.yaml | finetune.epochs | 6 | 3 |" in re.sub(" +", " ", (clone / "HEAD~1.md").read_text())


def test_unknown_base_is_one_line_and_exit_2(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    proc = report(root, env, "--base", "no-such-branch", "--out", "bad.md")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: base revision 'no-such-branch' not found in this clone; "
        "fetch it (git fetch origin main) or pass another --base"
    ]
    assert not (root / "bad.md").exists()


def side(label: str, files: dict[str, object]) -> Side:
    """A report side over in-memory files (JSON-encoded on read)."""
    return Side(
        label,
        lambda p: json.dumps(files[p]) if p in files else None,
        lambda d: sorted(p for p in files if p.startswith(d + "/")),
    )


def evaluated(sha256: str, actual: list[str], predicted: dict[str, list[str]]) -> dict[str, object]:
    files: dict[str, object] = {
        "plots/evaluate/test_set.json": {"sha256": sha256, "documents": len(actual), "labels": ["sport", "tech"]}
    }
    for model, pred in predicted.items():
        files[f"plots/evaluate/confusion_{model}.json"] = [
            {"actual": a, "predicted": p} for a, p in zip(actual, pred, strict=True)
        ]
    return files


def test_verdicts_give_every_delta_its_interval() -> None:
    """200 test documents. The fine-tuned model fixes 30 of the base's 40 errors (better), the baseline is
    unchanged (within noise, [0, 0]), the scratch model loses 30 right answers (worse)."""
    actual = ["sport", "tech"] * 100
    flip = {"sport": "tech", "tech": "sport"}
    wrong_40 = [flip[a] if i < 40 else a for i, a in enumerate(actual)]
    wrong_10 = [flip[a] if i < 10 else a for i, a in enumerate(actual)]
    wrong_70 = [flip[a] if i < 70 else a for i, a in enumerate(actual)]
    base = side("base", evaluated("s", actual, {"pretrained": wrong_40, "tfidf_logreg": wrong_10, "scratch": wrong_40}))
    head = side("head", evaluated("s", actual, {"pretrained": wrong_10, "tfidf_logreg": wrong_10, "scratch": wrong_70}))
    lines = {line.split("**")[1]: line for line in verdicts_section(base, head) if line.startswith("- **")}
    assert set(lines) == {"pretrained", "tfidf_logreg", "scratch"}
    assert "accuracy 0.8000 → 0.9500, +15.00 points [+" in lines["pretrained"]
    assert lines["pretrained"].count("**better**") == 2
    assert "accuracy 0.9500 → 0.9500, +0.00 points [+0.00, +0.00]: **within noise**" in lines["tfidf_logreg"]
    assert lines["scratch"].count("**worse**") == 2


def test_no_verdicts_across_different_test_sets_or_without_the_record() -> None:
    actual = ["sport", "tech"]
    head = side("head", evaluated("s", actual, {"pretrained": actual}))
    other = side("base", evaluated("t", actual, {"pretrained": actual}))
    assert any("No verdicts: the test sets differ" in line for line in verdicts_section(other, head))
    files = evaluated("s", actual, {"pretrained": actual})
    older = side("base", {k: v for k, v in files.items() if "test_set" not in k})
    lines = verdicts_section(older, head)
    assert any("No verdicts: base has no plots/evaluate/test_set.json" in line for line in lines)


def test_the_first_line_says_whether_the_committed_results_are_current(tmp_path: Path) -> None:
    """A one-stage pipeline run by the real dvc: after `dvc repro` its results are current; a param changed
    and committed without a rerun makes them stale, named with the param; a rerun makes them current again."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))}
    env |= {"DVC_NO_ANALYTICS": "1"}
    root = tmp_path / "repo"
    root.mkdir()
    for args in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@example.com"],
                 ["git", "config", "user.name", "t"], [sys.executable, "-m", "dvc", "init", "-q"]):  # fmt: skip
        sh(args, root, env)
    (root / "params.yaml").write_text("finetune:\n  epochs: 3\n")
    (root / "train.py").write_text(
        "import json, yaml\n"
        "epochs = yaml.safe_load(open('params.yaml'))['finetune']['epochs']\n"
        "json.dump({'macro_f1': 1 - 1 / (epochs + 1)}, open('scores.json', 'w'))\n"
    )
    stage = {"cmd": f"{sys.executable} train.py", "deps": ["train.py"], "params": ["finetune.epochs"],
             "metrics": [{"scores.json": {"cache": False}}]}  # fmt: skip
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))

    def first_line() -> str:
        sh(["git", "add", "-A"], root, env)
        sh(["git", "commit", "-qm", "step"], root, env)
        return freshness_line(root)

    sh([sys.executable, "-m", "dvc", "repro", "-q"], root, env)
    assert first_line().startswith("**Results are current**")
    (root / "params.yaml").write_text("finetune:\n  epochs: 5\n")
    stale = first_line()
    assert stale.startswith("**Results are stale**: changed since they were run: train (params.yaml: finetune.epochs)")
    sh([sys.executable, "-m", "dvc", "repro", "-q"], root, env)
    assert first_line().startswith("**Results are current**")


def test_stale_params_are_named_by_key_against_what_the_stage_ran_with(tmp_path: Path) -> None:
    """A stage that depends on a whole section is named with the keys that changed; DVC's lock writes 5.0e-5 as
    `5e-05`, which YAML reads back as a string: the same number, not a change."""
    (tmp_path / "params.yaml").write_text("finetune:\n  lr: 5.0e-5\n  decay: 0.8\n  new: 1\nmodel:\n  size: 2\n")
    ran_with = yaml.safe_load("finetune:\n  lr: 5e-05\n  decay: 1.0\nmodel.size: 2\n")
    keys = _changed_keys(tmp_path / "params.yaml", ran_with, ["finetune", "model.size"])
    assert keys == ["finetune.decay", "finetune.new"]
    assert _changed_keys(tmp_path / "missing.yaml", ran_with, ["finetune"]) == ["finetune"]


def test_seed_sweeps_flag_differences_within_the_seed_spread() -> None:
    """The DAPT change of docs/LOG.md at 5 labels per class: the fine-tuned model's mean moved by less than its
    seed spread (within), TF-IDF not at all (within); at 20 labels only the head has a sweep: no row."""

    def row(labels: object, n: int, **scores: tuple[float, float]) -> dict:
        values = {f"{m}_{k}": v for m, (mean, sd) in scores.items() for k, v in (("mean", mean), ("std", sd))}
        return {"labels_per_class": labels, "experiments": n, **values}

    base = [row(5, 3, pretrained=(0.926, 0.024), tfidf_logreg=(0.852, 0.014)), row(20, 1, pretrained=(0.959, 0.0))]
    head = [
        row(5, 3, pretrained=(0.935, 0.006), tfidf_logreg=(0.852, 0.014)),
        row(20, 3, pretrained=(0.990, 0.001)),
    ]
    lines = sweeps_section(base, head)
    assert lines[0] == "## Seed sweeps"
    table = [line for line in lines if line.startswith("| 5 ") or line.startswith("| 20 ")]
    assert table == [
        "| 5 | pretrained | 0.926 ± 0.024 (n=3) | 0.935 ± 0.006 (n=3) | +0.90 points | within the seed spread |",
        "| 5 | tfidf_logreg | 0.852 ± 0.014 (n=3) | 0.852 ± 0.014 (n=3) | +0.00 points | within the seed spread |",
    ]
    moved = sweeps_section(base, [row(5, 3, pretrained=(0.980, 0.010))])
    assert "| +5.40 points | beyond the seed spread |" in moved[4]
    assert sweeps_section(base, [row(20, 3, pretrained=(0.99, 0.0))]) == []  # one run at the base: no spread
