"""Plain helpers and constants the test modules share: the tiny corpus and params profile, repository copies for
real `dvc` runs, and the stage commands. Fixtures live in conftest.py; test modules import from here, never
from each other."""

from __future__ import annotations

import random
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from transferpipe.params import ModelParams

REPO = Path(__file__).resolve().parents[1]
TINY_PARAMS = REPO / "tests" / "fixtures" / "params-tiny.yaml"

# Five topics with their own vocabulary, so even a tiny model can learn something in a few steps.
TOPICS = {
    "business": "bank shares market profit economy trade company investors growth prices",
    "sport": "match goal team player season coach league cup score win",
    "tech": "software computer internet phone users digital network chip data online",
    "politics": "minister election party vote government labour parliament policy leader tax",
    "entertainment": "film music star award album band show actor festival singer",
}

# The tiny transformer encoders (conftest's tiny_encoders): their architectures and sizes.
ENCODER_ARCHITECTURES = ["modernbert", "bert"]
TINY_ENCODER = ModelParams(
    checkpoint=None,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)


def make_corpus(n_per_class: int = 12, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    common = ["the", "a", "of", "in", "and", "to", "said", "on", "for", "with", "was", "by", "it"]
    rows = []
    for label, words in TOPICS.items():
        vocab = words.split()
        for _ in range(n_per_class):
            n = rng.randint(12, 30)
            text = " ".join(rng.choice(vocab) if rng.random() < 0.5 else rng.choice(common) for _ in range(n))
            rows.append({"text": text.capitalize() + ".", "label": label})
    rng.shuffle(rows)
    return rows


def tiny_params(tmp_path: Path, **overrides: dict) -> Path:
    """The tiny profile with per-section overrides, written to tmp_path/params.yaml."""
    params = yaml.safe_load(TINY_PARAMS.read_text())
    for key in ("source", "unlabeled_source"):  # the repository's data, wherever the test runs from
        params["prepare"][key] = str(REPO / params["prepare"][key])
    for section, values in overrides.items():
        params[section].update(values)
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return out


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def dvc_commands() -> list[tuple[str, list[str]]]:
    """(stage module, argv) of every stage in dvc.yaml, in order, foreach stages expanded: the tests run
    exactly the commands `dvc repro` runs."""
    commands = []
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        if "foreach" in stage:
            cmds = [stage["do"]["cmd"].replace("${item}", item) for item in stage["foreach"]]
        else:
            cmds = [stage["cmd"]]
        for cmd in cmds:
            words = shlex.split(cmd)
            assert words[:2] == ["python", "-m"], cmd
            commands.append((words[2], words[3:]))
    return commands


def run_short(params: str, d: Path, through: str = "pretrain") -> dict:
    """The stages up to `through` on params, writing to short paths under d (p, tok, b, t, m, s, f); returns the
    last stage's metrics (finetune: of the pretrained variant)."""
    from stages import finetune, prepare, pretrain, tokenize

    order = ["prepare", "tokenize", "pretrain", "finetune"]
    argv = {
        "prepare": ["--out", f"{d}/p", "--stats", f"{d}/s.json"],
        "tokenize": ["--data", f"{d}/p", "--tokenizer", f"{d}/tok", "--blocks", f"{d}/b", "--out", f"{d}/t"],
        "pretrain": ["--data", f"{d}/b", "--tokenizer", f"{d}/tok", "--out", f"{d}/m", "--scratch", f"{d}/s",
                     "--metrics", f"{d}/m.json", "--plots", f"{d}/pl"],
        "finetune": ["--data", f"{d}/t", "--encoder", f"{d}/m", "--out", f"{d}/f",
                     "--metrics", f"{d}/f.json", "--plots", f"{d}/fp"],
    }  # fmt: skip
    modules = {"prepare": prepare, "tokenize": tokenize, "pretrain": pretrain, "finetune": finetune}
    for name in order[: order.index(through) + 1]:
        metrics = modules[name].main(["--params", params, *argv[name]])
    return metrics


def copy_repo(dest: Path) -> Path:
    """The tracked pipeline files copied into dest (for tests that run the real dvc)."""
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml", "stages", "src", "data/sources", "data/unlabeled",
                 "models/sources"):  # fmt: skip
        src = REPO / name
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def clean_env(root: Path) -> dict[str, str]:
    """The environment for real `dvc` / `git` processes in a repository copy: its own code, offline, no
    MLflow or DVC variables leaking in from the test run."""
    import os
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DVC_")) and k != "TRANSFERPIPE_CHECKPOINT_DIR"
    }
    env |= {"PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def committed_tiny_repo(root: Path) -> dict[str, str]:
    """A copy of the pipeline with the tiny profile in root, git- and dvc-initialized and committed (not
    reproduced); returns the environment to run dvc in it with."""
    import subprocess
    import sys

    copy_repo(root)
    shutil.copy2(TINY_PARAMS, root / "params.yaml")
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())
    env = clean_env(root)
    for args in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "test@example.com"],
        ["git", "config", "user.name", "test"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        ["cp", str(REPO / ".dvcignore"), ".dvcignore"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "pipeline"],
    ):
        subprocess.run(args, cwd=root, env=env, check=True, capture_output=True, timeout=120)
    return env


def wait_for_http(url: str, proc, log: Path, timeout: float) -> None:
    """Poll url until it answers 200; fail with the end of log if proc exits first or timeout passes."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout:.0f} s"
        time.sleep(0.5)


def make_checkpoint_package(site: Path, tokenizer, name: str = "tiny-ckpt", version: str = "0.1.0") -> Path:
    """A published checkpoint as a pip package would install it into `site` (a folder for sys.path): a tiny
    BertModel without a masked-LM head (as sentence encoders ship), saved with tokenizer in
    <module>/model/, and the distribution's metadata. Returns a source file (.yaml) pinning it by digest."""
    import torch
    from transformers import BertConfig, BertModel

    from transferpipe.sources import sha256_of

    module = name.replace("-", "_")
    folder = site / module / "model"
    sizes = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        **sizes)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (site / module / "__init__.py").write_text("")
    info = site / f"{module}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    digest = sha256_of(folder / "model.safetensors")
    pin = site.parent / f"{name}.yaml"
    pin.write_text(
        f"package: {name}\nversion: {version}\nfolder: {module}/model\nweights: model.safetensors\nsha256: {digest}\n"
    )
    return pin


def sh(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run a command (git, dvc, a stage) and capture its output; with `check`, fail the test with its last output
    unless it exits 0."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc
