"""Fresh clones of one reproduced tiny pipeline, as a CI runner or a colleague gets them: the pull-request
workflow's own steps with an empty DVC cache, and a finished run shared through a local-directory DVC remote
(push, clone, pull: nothing left to rerun, a model that predicts, a report that finds the base's MLflow run
ids). The module reproduces the base once; only the workflow test runs the pipeline again, as CI does."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, TINY_PARAMS, clean_env, committed_tiny_repo, sh
from transferpipe.report import RUN_FILES

pytestmark = pytest.mark.slow

WORKFLOW = REPO / ".github/workflows/pull-request.yml"
UNKNOWN = "are not in the DVC cache, so its MLflow run ids are unknown"
# The only GitHub expression the steps run here use, as a pull request into main sets it.
GITHUB_CONTEXT = {"${{ github.base_ref }}": "main"}


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def fresh_clone(origin: Path, dest: Path, branch: str) -> tuple[Path, dict[str, str]]:
    """`git clone` of one branch: git's files only, so an empty DVC cache and no outputs on disk."""
    env = clean_env(dest)
    sh(["git", "clone", "-q", "-b", branch, str(origin), str(dest)], dest.parent, env)
    assert not (dest / ".dvc/cache").exists()
    return dest, env


def report(root: Path, env: dict[str, str], base: str, out: str) -> str:
    proc = sh([sys.executable, "-m", "transferpipe.cli", "report", "--base", base, "--out", out], root, env)
    assert "Traceback" not in proc.stderr
    return (root / out).read_text()


def run_ids(root: Path) -> dict[str, str]:
    """Report stage name -> the MLflow run id recorded in that stage's DVC output."""
    return {stage: json.loads((root / path).read_text())["mlflow_run_id"] for stage, path in RUN_FILES.items()}


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Branch main: the pipeline with the tiny profile as params.yaml and at tests/fixtures/params-tiny.yaml
    (where the workflow copies it from), reproduced and committed. No DVC remote."""
    root = tmp_path_factory.mktemp("origin")
    env = committed_tiny_repo(root)
    (root / "tests/fixtures").mkdir(parents=True)
    shutil.copy2(TINY_PARAMS, root / "tests/fixtures/params-tiny.yaml")
    sh(dvc("repro"), root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "reproduced"], root, env)
    return root, env


@pytest.fixture(scope="module")
def remote(origin: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Branch shared: main plus a local-directory default remote in .dvc/config, committed (a clone gets
    only what git has), and main's outputs pushed to it. origin is left on main."""
    root, env = origin
    storage = tmp_path_factory.mktemp("dvc-remote")
    sh(["git", "checkout", "-q", "-b", "shared"], root, env)
    try:
        sh(dvc("remote", "add", "-d", "local", str(storage)), root, env)
        sh(["git", "add", ".dvc/config"], root, env)
        sh(["git", "commit", "-qm", "share results through a DVC remote"], root, env)
        assert sh(["git", "status", "--porcelain"], root, env).stdout == ""
        sh(dvc("push"), root, env)
    finally:
        sh(["git", "checkout", "-q", "main"], root, env)
    assert list(storage.rglob("*.dir")), "dvc push left no directory manifests in the remote"
    return storage


class Workflow:
    """The pull-request workflow's steps after the install, as written in pull-request.yml, run by bash as Actions
    runs a `run:` script on Linux, in a clone, with the job's env plus `secrets`."""

    def __init__(self, clone: Path, env: dict[str, str], secrets: dict[str, str] | None = None) -> None:
        job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["report"]
        self.steps = {step.get("name"): step for step in job["steps"]}
        self.clone, self.env = clone, dict(env)
        for key, value in job.get("env", {}).items():
            if "${{ secrets." in str(value):
                self.env[key] = (secrets or {}).get(key, "")  # an unset secret is an empty string on Actions
            else:
                self.env[key] = self.expand(str(value))

    @staticmethod
    def expand(value: str) -> str:
        for expression, replacement in GITHUB_CONTEXT.items():
            value = value.replace(expression, replacement)
        assert "${{" not in value, f"a GitHub expression this test does not know: {value}"
        return value

    def runs(self, name: str) -> bool:
        """Whether the step's `if:` lets it run (the only condition the workflow uses: a non-empty env var)."""
        condition = self.steps[name].get("if")
        if condition is None:
            return True
        match = re.fullmatch(r"env\.(\w+) != ''", condition)
        assert match, f"a step condition this test does not know: {condition}"
        return self.env.get(match.group(1), "") != ""

    def run(self, name: str) -> subprocess.CompletedProcess:
        step = self.steps[name]
        step_env = self.env | {key: self.expand(str(value)) for key, value in step.get("env", {}).items()}
        script = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", self.expand(step["run"])]
        proc = sh(script, self.clone, step_env)
        assert "Traceback" not in proc.stdout + proc.stderr
        return proc


PULL, RERUN, REVIEW = (
    "Pull the pull request's DVC outputs",
    "Rerun the stale stages that fit the runner's time",
    "Review the results against the base",
)


def test_pull_request_workflow_in_a_fresh_clone(origin: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """The workflow's steps after the install on a runner's fresh checkout of a pull request that changes a param
    of the pipeline without rerunning it, and the tiny CI profile; no DVC remote (no secret)."""
    root, _ = origin
    clone, env = fresh_clone(root, tmp_path / "clone", "main")
    workflow = Workflow(clone, env)
    # The pull request: one commit on top of origin/main that changes fine-tuning epochs in params.yaml (not
    # rerun) and the learning rate of the tiny CI profile.
    params, profile = clone / "params.yaml", clone / "tests/fixtures/params-tiny.yaml"
    epochs = yaml.safe_load(params.read_text())["finetune"]["epochs"]
    new_epochs = 1 if epochs > 1 else 2
    assert params.read_text().count(f"  epochs: {epochs}\n") == 1
    params.write_text(params.read_text().replace(f"  epochs: {epochs}\n", f"  epochs: {new_epochs}\n"))
    text = profile.read_text()
    assert text.count("  head_learning_rate: ") == 1
    profile.write_text(re.sub(r"  head_learning_rate: \S+", "  head_learning_rate: 2.0e-3", text))
    git_user = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    sh(["git", *git_user, "commit", "-qam", f"{new_epochs} fine-tuning epochs; CI profile head rate"], clone, env)

    assert not workflow.runs(PULL)  # no secret here
    workflow.run(RERUN)
    assert json.loads((clone / "rerun.json").read_text())["outcome"] == "skipped"  # nothing pulled to start from
    workflow.run(REVIEW)
    review = re.sub(" +", " ", (clone / "report.md").read_text())  # DVC pads its Markdown tables
    # The first line: the committed results predate the committed params.
    assert review.startswith("**Results are stale**: changed since they were run: finetune@pretrained (params.yaml:")
    assert review.splitlines()[0].endswith(
        "Not rerun here: the outputs the stale stages start from are not here (no DVC remote to pull them from)."
    )
    assert f"| params.yaml | finetune.epochs | {epochs} | {new_epochs} |" in review
    # Like with like: the committed results on both sides are the same run, so every model is within noise.
    verdicts = [line for line in review.splitlines() if line.startswith("- **")]
    assert verdicts and all(line.count("+0.00 points [+0.00, +0.00]: **within noise**") == 2 for line in verdicts)
    # The base's outputs are in neither the runner's empty cache nor a remote: unknown, said once.
    assert review.count(UNKNOWN) == 1
    assert "![Pretraining loss (masked LM)](report_images/pretrain_loss.png)" in review

    workflow.run("Smoke test, the tiny CI profile at the base and here")
    text = re.sub(" +", " ", (clone / "report.md").read_text())
    assert text.startswith(review.rstrip("\n"))  # the review stays first, the smoke test follows
    section = text[text.index("## Smoke test: the tiny CI profile, at the base and here") :]
    assert "**Results are current**" in section.splitlines()[2]  # both ran here, just now
    assert "| params.yaml | finetune.head_learning_rate |" in section  # tiny against tiny: the profile's change
    assert "finetune.epochs" not in section
    assert "### Verdicts" in section and "](report_images/smoke/pretrain_loss.png)" in section

    # The comment step without its `cml comment` line (that needs GitHub and a token): every figure the report
    # links is a file where CML's --publish looks for it (beside report.md).
    comment = workflow.steps["Comment on the pull request, figures included"]["run"]
    assert comment.strip().startswith("cml comment update") and "--publish" in comment
    figures = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)", text, re.M)
    assert "report_images/pretrain_loss.png" in figures and "report_images/smoke/pretrain_loss.png" in figures
    assert all((clone / figure).is_file() for figure in figures), figures


def test_a_run_shared_through_a_remote_pulls_clean_and_predicts(
    origin: tuple[Path, dict[str, str]], remote: Path, tmp_path: Path
) -> None:
    root, _ = origin
    clone, env = fresh_clone(root, tmp_path / "clone", "shared")
    assert str(remote) in sh(dvc("remote", "list"), clone, env).stdout  # the committed config came along
    sh(dvc("pull"), clone, env)
    assert "Data and pipelines are up to date." in sh(dvc("status"), clone, env).stdout
    repro = sh(dvc("repro"), clone, env).stdout
    assert "Running stage" not in repro
    assert "Data and pipelines are up to date." in repro
    assert sh(["git", "status", "--porcelain"], clone, env).stdout == ""

    from transformers import pipeline

    texts = ["The striker scored twice as the team won the cup final.", "Shares fell after the bank's profit warning."]
    labels = json.loads((clone / "data/prepared/labels.json").read_text())
    pulled = pipeline("text-classification", model=str(clone / "models/finetuned/pretrained"))(texts)
    assert {p["label"] for p in pulled} <= set(labels)  # label names, not LABEL_0
    # The same bytes as the model that was pushed, hence the same scores.
    assert pulled == pipeline("text-classification", model=str(root / "models/finetuned/pretrained"))(texts)


def test_the_report_finds_the_base_run_ids_through_the_remote(
    origin: tuple[Path, dict[str, str]], remote: Path, tmp_path: Path
) -> None:
    root, _ = origin
    base_ids = run_ids(root)
    clone, env = fresh_clone(root, tmp_path / "clone", "shared")

    # A base whose committed .dvc/config has the remote: dvc.api.read fetches from it, no pull needed (the
    # working tree has no outputs yet).
    text = report(clone, env, "HEAD", "fetched.md")
    for stage, run_id in base_ids.items():
        assert f"| {stage} | `{run_id}` | — |" in text
    assert UNKNOWN not in text

    # main predates the remote, so its outputs can come from the local cache only: unknown until a pull
    # brings them (shared's outputs are main's).
    assert report(clone, env, "origin/main", "before_pull.md").count(UNKNOWN) == 1
    sh(dvc("pull"), clone, env)
    text = report(clone, env, "origin/main", "pulled.md")
    for stage, run_id in base_ids.items():
        assert f"| {stage} | `{run_id}` | `{run_id}` |" in text
    assert UNKNOWN not in text


def metric(root: Path, model: str, key: str) -> float:
    return json.loads((root / "metrics/evaluate.json").read_text())["test"][model][key]


LABELS_READ = '    label_names = read_json(args.data / "labels.json")\n'
# Pull requests rerun and committed, each reviewed against its base. A finetune param (its models move; the
# baseline does not), a comment in a stage script (every model within noise: CPU runs are bit-identical), and a
# bug that trains on wrong labels (every fine-tuned model worse, its interval excluding 0).
CHANGES = {
    "param": ("params.yaml", "  head_learning_rate: 1.0e-3\n", "  head_learning_rate: 3.0e-3\n"),
    "comment": ("stages/finetune.py", "    splits = datasets.load_from_disk(str(args.data))\n",
                "    splits = datasets.load_from_disk(str(args.data))  # the tokenized splits\n"),
    "broken": ("stages/finetune.py", LABELS_READ, LABELS_READ + "    splits['train'] = splits['train'].map(lambda x: "
               "{'labels': (x['labels'] + 1) % len(label_names)}, keep_in_memory=True)\n"),
}  # fmt: skip


def test_a_stale_pull_request_is_rerun_on_the_runner(
    origin: tuple[Path, dict[str, str]], remote: Path, tmp_path: Path
) -> None:
    """The workflow with the DVC_REMOTE_URL secret, on a pull request that changes a finetune param and commits
    it without a rerun: CI pulls the outputs, reruns the stale stages within the budget and reviews the rerun."""
    root, _ = origin
    clone, env = fresh_clone(root, tmp_path / "clone", "shared")
    workflow = Workflow(clone, env, secrets={"DVC_REMOTE_URL": str(remote)})
    path, old, new = CHANGES["param"]
    (clone / path).write_text((clone / path).read_text().replace(old, new))
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "not rerun"], clone, env)

    assert workflow.runs(PULL)
    workflow.run(PULL)
    assert "Running stage 'finetune@pretrained'" in workflow.run(RERUN).stdout
    record = json.loads((clone / "rerun.json").read_text())
    assert record["outcome"] == "rerun", record
    assert {"finetune@pretrained", "evaluate"} <= set(record["stages"]) and "prepare" not in record["stages"]
    workflow.run(REVIEW)
    review = (clone / "report.md").read_text()
    assert review.startswith(
        "**Results were stale and are rerun here**: changed since they were run: finetune@pretrained (params.yaml: "
    ), review.splitlines()[0]
    verdicts = {line.split("**")[1]: line for line in review.splitlines() if line.startswith("- **")}
    base, head = metric(root, "pretrained", "macro_f1"), metric(clone, "pretrained", "macro_f1")
    assert head != base and f"macro-F1 {base:.4f} → {head:.4f}" in verdicts["pretrained"]
    assert verdicts["tfidf_logreg"].count("+0.00 points [+0.00, +0.00]: **within noise**") == 2


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_rerun_pull_request_gets_a_verdict_for_every_model(
    origin: tuple[Path, dict[str, str]], remote: Path, tmp_path: Path, change: str
) -> None:
    root, _ = origin
    clone, env = fresh_clone(root, tmp_path / "clone", "shared")
    sh(dvc("pull", "-q"), clone, env)
    path, old, new = CHANGES[change]
    text = (clone / path).read_text()
    assert text.count(old) == 1, f"{path} no longer has {old!r}"
    (clone / path).write_text(text.replace(old, new))
    sh(dvc("repro", "-q"), clone, env)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", change], clone, env)

    review = report(clone, env, "origin/shared", "report.md")
    assert review.startswith("**Results are current**"), review.splitlines()[0]
    verdicts = {line.split("**")[1]: line for line in review.splitlines() if line.startswith("- **")}
    assert set(verdicts) == {"pretrained", "scratch", "tfidf_logreg"}
    assert verdicts["tfidf_logreg"].count("+0.00 points [+0.00, +0.00]: **within noise**") == 2
    for model in ("pretrained", "scratch"):
        base, head = metric(root, model, "macro_f1"), metric(clone, model, "macro_f1")
        assert f"macro-F1 {base:.4f} → {head:.4f}, {100 * (head - base):+.2f} points [" in verdicts[model]
        low, high = (float(x) for x in re.search(r"macro-F1 .*? points \[(\S+), (\S+)\]", verdicts[model]).groups())
        assert low <= 100 * (head - base) <= high
        if change == "param":
            assert head != base and low < high  # the models moved, each with its interval
        elif change == "comment":
            assert head == base and verdicts[model].count("+0.00 points [+0.00, +0.00]: **within noise**") == 2
        else:
            assert high < 0 and verdicts[model].count("**worse**") == 2, verdicts[model]
