"""The README and docs/ stay true to the repository: size, module tree, params reference, setup commands,
links, and no references to this project's issues."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from transferpipe import params as params_module

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(path: Path) -> str:
    """The page without its fenced code blocks (a `# comment` in a bash block is not a heading)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def anchor(heading: str) -> str:
    """GitHub's rule: lowercase, drop punctuation other than '-' and '_', spaces become '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(path)):
        slug = anchor(heading)
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")  # repeats get -1, -2, ...
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_readme_is_at_most_10_kb() -> None:
    size = len(README.read_bytes())
    assert size <= 10_240, f"README.md is {size} bytes; move reference or measurements into docs/"


def test_readme_tree_names_every_module_on_its_own_line() -> None:
    blocks = [b for b in FENCE.findall(README.read_text(encoding="utf-8")) if "src/transferpipe/" in b]
    assert len(blocks) == 1, "README.md needs one code block with the annotated tree of src/transferpipe/"
    modules = sorted(p.stem for p in (REPO / "src" / "transferpipe").glob("*.py") if p.stem != "__init__")
    assert modules
    missing = [m for m in modules if not re.search(rf"^\s*{re.escape(m)}\.py\s+\S", blocks[0], re.M)]
    assert not missing, f"modules without a line in the README's tree: {missing}"


def test_every_params_key_has_an_entry_in_the_params_reference() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    reference = (REPO / "docs" / "params.md").read_text(encoding="utf-8")
    keys = [f"{section}.{key}" for section, values in params.items() for key in values]
    assert len(keys) > 50
    missing = [key for key in keys if f"`{key}`" not in reference]
    assert not missing, f"params keys without an entry in docs/params.md: {missing}"


def test_every_params_field_has_a_docstring() -> None:
    """The string under each field is its row's text in docs/params.md (use_attribute_docstrings reads it)."""
    bare = [
        f"{section}.{key}"
        for section, cls in params_module.SECTIONS.items()
        for key, field in cls.__pydantic_fields__.items()
        if not field.description
    ]
    assert not bare, f"params fields without a docstring under them: {bare}"


def test_the_params_reference_is_generated_from_the_fields() -> None:
    """docs/params.md's tables are what `make docs` writes from params.py: docstrings, defaults and ranges."""
    page = (REPO / "docs" / "params.md").read_text(encoding="utf-8")
    assert page == params_module.params_reference(page), "docs/params.md is stale: run `make docs`"


def test_the_params_reference_defaults_are_the_params_files() -> None:
    page = (REPO / "docs" / "params.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([\w.]+)` \| `(.*?)` \|", page, re.M))
    committed = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert {key: yaml.safe_load(default) for key, default in rows.items()} == {
        f"{section}.{key}": value for section, values in committed.items() for key, value in values.items()
    }


def test_readme_setup_commands_are_makefile_targets() -> None:
    readme = README.read_text(encoding="utf-8")
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    for target in ("repro", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M), f"the Makefile has no target {target!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(REPO)})")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target} (no heading #{fragment} in {file.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_references_to_this_projects_issues(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    # A bare #123 (upstream references such as huggingface/tokenizers#1794 and anchors such as
    # LOG.md#2026-11-25-... are preceded by a name, or followed by '-').
    bare = re.findall(r"(?<![\w/.\-])#\d+\b(?!-)", text)
    words = re.findall(r"\bthe issue\b|\bissue's\b|\bissue\s*#", text, re.I)
    assert not bare and not words, f"{page.relative_to(REPO)} refers to issues: {bare + words}"


def test_the_anchor_rule() -> None:
    assert anchor("Long documents: windows") == "long-documents-windows"
    assert anchor("An LSTM instead of a transformer (ULMFiT)") == "an-lstm-instead-of-a-transformer-ulmfit"
    assert anchor("2026-11-26: label efficiency, 3 seeds") == "2026-11-26-label-efficiency-3-seeds"
