"""dvc.yaml, params.yaml and the stage code agree: commands, params sections and module deps."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, TINY_PARAMS
from transferpipe.checkpoint import code_files
from transferpipe.params import SECTIONS

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = ["prepare", "tokenize", "pretrain", "finetune", "evaluate"]


def expand(name: str, spec: dict) -> list[dict]:
    """A stage's definitions with foreach expanded (${item} substituted), as DVC runs them."""
    if "foreach" not in spec:
        return [spec]
    text = yaml.safe_dump(spec["do"])
    return [yaml.safe_load(text.replace("${item}", item)) for item in spec["foreach"]]


# (script, definition) for every stage DVC runs: finetune appears once per variant.
RUNS = [(name, d) for name, spec in DVC["stages"].items() for d in expand(name, spec)]


def sections_read(stage: str) -> set[str]:
    """Sections the stage script takes from load_params(args.params): `.<section>` of that call or of `every`,
    the name the stages give its result."""
    source = (REPO / "stages" / f"{stage}.py").read_text()
    return set(re.findall(r"(?:load_params\(args\.params\)|\bevery)\.(\w+)", source))


def test_stage_order_and_commands() -> None:
    assert list(DVC["stages"]) == STAGES
    assert [name for name, _ in RUNS] == ["prepare", "tokenize", "pretrain", "finetune", "finetune", "evaluate"]
    for name, stage in RUNS:
        assert stage["cmd"].startswith(f"python -m stages.{name} --params params.yaml"), name


@pytest.mark.parametrize(("stage", "spec"), RUNS)
def test_deps_list_exactly_the_package_modules_imported(stage: str, spec: dict) -> None:
    """DVC reruns a stage when this code changes, and its checkpoints are keyed on the same files (code_files)."""
    code_deps = {d for d in spec["deps"] if d.startswith(("src/", "stages/"))}
    script = REPO / "stages" / f"{stage}.py"
    modules = {f"src/transferpipe/{path.name}" for path in code_files(script) if path != script.resolve()}
    assert code_deps == {f"stages/{stage}.py"} | modules  # by name: the package may be installed from elsewhere


@pytest.mark.parametrize(("stage", "spec"), RUNS)
def test_params_list_exactly_the_sections_read(stage: str, spec: dict) -> None:
    listed = {p.split(".")[0] for p in spec["params"]}
    assert listed == sections_read(stage)


@pytest.mark.parametrize(("stage", "spec"), RUNS)
def test_every_path_flag_is_a_declared_dep_or_output(stage: str, spec: dict) -> None:
    declared = set(spec.get("deps", []))
    for key in ("outs", "metrics", "plots"):
        for entry in spec.get(key, []):
            declared.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    words = spec["cmd"].split()
    # Every word after a path flag up to the next flag is a path (--models takes several).
    paths, flag = set(), None
    for word in words[3:]:
        if word.startswith("--"):
            flag = word[2:]
        elif flag not in (None, "params", "variant"):
            paths.add(word)
    assert paths <= declared, paths - declared
    # Besides code, flags' paths and the data that params.yaml names (templated: ${prepare.source}), nothing.
    templated = {d for d in declared if d.startswith("${")}
    assert templated == ({"${prepare.source}", "${prepare.unlabeled_source}"} if stage == "prepare" else set())
    # The checkpoint source files model.checkpoint may name (transferpipe.model_sources): a folder, not a flag.
    pins = {"models/sources"} if stage in ("tokenize", "pretrain") else set()
    assert pins <= declared
    assert paths | templated | pins | {d for d in declared if d.startswith(("src/", "stages/"))} == declared


@pytest.mark.parametrize("params_file", [REPO / "params.yaml", TINY_PARAMS])
def test_params_files_match_the_dataclasses(params_file: Path) -> None:
    raw = yaml.safe_load(params_file.read_text())
    assert list(raw) == list(SECTIONS)
    for name, cls in SECTIONS.items():
        assert list(raw[name]) == [f.name for f in dataclasses.fields(cls)], name


def test_params_floats_are_written_with_a_dot() -> None:
    """1e-3 without a dot is a string to PyYAML; the loader rejects it, so none may be committed."""
    for path in (REPO / "params.yaml", TINY_PARAMS):
        assert not re.search(r":\s*[0-9]+e-?[0-9]+\s*(#.*)?$", path.read_text(), re.MULTILINE), path


def test_top_level_plots_point_at_stage_outputs() -> None:
    outs = {next(iter(o)) if isinstance(o, dict) else o for _, stage in RUNS for o in stage.get("outs", [])}
    for plot in DVC["plots"]:
        (spec,) = plot.values()
        for file in spec["y"]:
            assert any(file.startswith(o + "/") for o in outs), file


def test_stages_import_the_package_code_beside_them(tmp_path: Path) -> None:
    """In a copy of the repository (as DVC runs queued experiments) without PYTHONPATH, the stages import
    transferpipe from the copy's src/, not from the editable install's workspace."""
    import os
    import subprocess
    import sys

    from tests.helpers import copy_repo

    copy_repo(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", "import stages, transferpipe; print(transferpipe.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == tmp_path / "src" / "transferpipe" / "__init__.py"


def test_the_gpu_scale_command_sets_what_bench_gpu_scale_runs() -> None:
    from bench.gpu_scale import GPU_SCALE

    doc = (REPO / "docs" / "gpu.md").read_text()
    command = doc[doc.index("## The GPU-scale configuration") :].split("```bash")[1].split("```")[0]
    pairs = dict(re.findall(r"-S ([\w.]+)=(\S+)", command))
    assert {key: yaml.safe_load(value) for key, value in pairs.items()} == GPU_SCALE


def test_the_lstm_profile_command_gives_valid_lstm_params(tmp_path: Path) -> None:
    """docs/lstm.md's one command, applied to params.yaml as `dvc exp run -S` would, passes every check."""
    from transferpipe.params import check_params, load_params

    doc = (REPO / "docs" / "lstm.md").read_text()
    command = doc[doc.index("## The LSTM profile") :].split("```bash")[1].split("```")[0]
    assert command.strip().startswith("dvc exp run -S")
    pairs = re.findall(r"-S ([\w.]+)=(\S+)", command)
    assert len(pairs) == command.count("-S ") >= 10
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in pairs:
        section, name = key.split(".")
        assert name in raw[section], f"{key} is not a key of params.yaml"
        raw[section][name] = yaml.safe_load(value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    check_params(params)
    assert params.model.architecture == "lstm" and params.model.lstm_weight_dropout > 0
    assert params.finetune.labels_per_class == 20  # the few-label regime its +10-point target is about


def check_workflows(*paths: Path) -> subprocess.CompletedProcess:
    """GitHub's workflow schema, as check-jsonschema ships it (offline)."""
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
    return subprocess.run([*command, *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_every_workflow_validates_against_githubs_schema(tmp_path: Path) -> None:
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert workflows
    proc = check_workflows(*workflows)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "broken.yml"  # the check can fail: steps must be a list
    broken.write_text("name: x\non: pull_request\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps: 3\n")
    assert check_workflows(broken).returncode == 1


def test_the_pull_request_workflow_lints_and_runs_the_fast_tests_before_the_report() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "pull-request.yml").read_text())
    runs = [step.get("run", "").strip() for step in workflow["jobs"]["report"]["steps"]]
    assert "make lint" in runs and "make test-fast" in runs
    assert runs.index("make test-fast") < next(i for i, r in enumerate(runs) if r.startswith("transferpipe report"))


def test_the_pull_request_comment_carries_the_reports_figures() -> None:
    """The comment is CML's, which uploads the PNGs the report links; no step strips the image links."""
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "pull-request.yml").read_text())
    steps = workflow["jobs"]["report"]["steps"]
    assert any(step.get("uses", "").startswith("iterative/setup-cml@") for step in steps)
    runs = [step.get("run", "") for step in steps]
    (comment,) = [r for r in runs if "cml comment" in r]
    assert "cml comment update" in comment and "--publish" in comment and "report.md" in comment
    assert not any("sed" in r and "report.md" in r for r in runs)
