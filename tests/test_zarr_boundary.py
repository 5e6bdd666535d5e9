"""zarr-python is used in one module, and its private names nowhere else.

zarr-python's internals change between minor releases (3.2 moved its chunk
grids, 3.4 its Morton order), and a package that imports them stops
importing on the next release. The package writes its metadata from the
Zarr V3 specification (``_spec``) and asks zarr-python for the rest through
one module, ``_zarr``; these tests keep it so, by reading every import of
every module of the package (and of the tests and benchmarks, which must
use the public API too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "bluesky_zarr"

#: The one module of the package that imports zarr.
OWNER = Path("storage", "_zarr.py")


def zarr_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every name a module imports from zarr."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "zarr" or alias.name.startswith("zarr."):
                    found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "zarr" or node.module.startswith("zarr."):
                found.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
    return found


def private(name: str) -> bool:
    """Whether a dotted zarr name is not public: below ``zarr.core`` (the
    package keeps its internals there) or any part ``_``-prefixed."""
    parts = name.split(".")
    return parts[:2] == ["zarr", "core"] or any(p.startswith("_") for p in parts)


def python_files(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


def test_the_rule_sees_private_and_public_names() -> None:
    """The control: the checks below would catch what they look for."""
    sample = "from zarr.core.chunk_grids import RegularChunkGrid\nimport zarr.storage\n"
    tree = ROOT / "tests" / "__sample_import_check__.py"
    try:
        tree.write_text(sample)
        names = [name for _, name in zarr_imports(tree)]
    finally:
        tree.unlink()
    assert names == ["zarr.core.chunk_grids.RegularChunkGrid", "zarr.storage"]
    assert private(names[0]) and not private(names[1])
    assert private("zarr.storage._common.StorePath")


@pytest.mark.parametrize(
    "path", python_files(PACKAGE), ids=lambda p: p.relative_to(PACKAGE).as_posix()
)
def test_only_the_owner_module_imports_zarr(path: Path) -> None:
    if path == PACKAGE / OWNER:
        return
    assert not zarr_imports(path), (
        f"{path.relative_to(ROOT)} imports zarr; go through bluesky_zarr.storage instead"
    )


@pytest.mark.parametrize(
    "path",
    python_files(PACKAGE, ROOT / "tests", ROOT / "benchmarks"),
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_no_private_zarr_name_is_imported_outside_the_owner(path: Path) -> None:
    if path == PACKAGE / OWNER:
        return
    names = [f"line {line}: {name}" for line, name in zarr_imports(path) if private(name)]
    assert not names, f"{path.relative_to(ROOT)} imports private zarr-python names: {names}"


def test_the_owner_imports_private_names_only_where_it_says_why() -> None:
    """The owner module may reach a private name only with a fallback for a
    release that moved it (an ``except ImportError`` around the import)."""
    source = (PACKAGE / OWNER).read_text()
    tree = ast.parse(source)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers
        ):
            for inner in node.body:
                guarded.update(id(n) for n in ast.walk(inner))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [
                f"{node.module}.{a.name}" if isinstance(node, ast.ImportFrom) else a.name
                for a in node.names
            ]
            for name in names:
                if name.startswith("zarr") and private(name):
                    assert id(node) in guarded, f"unguarded private import {name}"
