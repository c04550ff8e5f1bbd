"""The README and docs/ stay true to the repository: size, module tree, params reference, setup commands,
links, and no references to this project's issues."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
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


def field_docstrings(cls: type) -> dict[str, str]:
    """The string under each field of a params dataclass (litgpt's args.py style), read from the source."""
    (node,) = [
        n
        for n in ast.parse(Path(params_module.__file__).read_text(encoding="utf-8")).body
        if getattr(n, "name", "") == cls.__name__
    ]
    docs = {}
    for field, after in zip(node.body, [*node.body[1:], None], strict=True):
        if isinstance(field, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[field.target.id] = " ".join(after.value.value.split())
    return docs


def allowed_values(field: dataclasses.Field, hint: object) -> str:
    """The range column of docs/params.md as the field declares it: `ranged(...)` bounds, Literal options, or -."""
    bounds = field.metadata.get("range")
    if bounds is not None:
        text = (str(bounds) + params_module._alternatives(hint)).replace(str(2**32), "2^32")
        return re.sub(r"'(\w+)'", r"`\1`", text)
    if typing.get_origin(hint) is typing.Literal:
        return ", ".join(f"`{value}`" for value in typing.get_args(hint))
    return "-"


def test_every_params_field_has_a_docstring_and_the_reference_row_agrees() -> None:
    """One description per key: the docstring under its field is the params reference's text, and the row's
    default and range are those of params.yaml and of the field's declaration."""
    reference = (REPO / "docs" / "params.md").read_text(encoding="utf-8")
    rows = {
        m[1]: m.groups()[1:] for m in re.finditer(r"^\| `([\w.]+)` \| `?(.*?)`? \| (.*?) \| (.*) \|$", reference, re.M)
    }
    committed = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    wrong = []
    for section, cls in params_module.SECTIONS.items():
        docs, hints = field_docstrings(cls), typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            key = f"{section}.{field.name}"
            default, allowed, text = rows[key]
            if docs.get(field.name) != " ".join(text.split()):
                wrong.append(f"{key}: docstring {docs.get(field.name)!r} against the reference's {text!r}")
            if yaml.safe_load(default) != committed[section][field.name]:
                wrong.append(f"{key}: default {default} against params.yaml's {committed[section][field.name]!r}")
            if allowed != allowed_values(field, hints[field.name]):
                wrong.append(f"{key}: range {allowed} against the declared {allowed_values(field, hints[field.name])}")
    assert not wrong, "\n".join(wrong)


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
