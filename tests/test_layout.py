"""The layout is the architecture: methods depend on the core only, adapters on nothing above them."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "effdiff"
ABOVE_METHODS = ("effdiff.zoo", "effdiff.bench", "effdiff.cli", "effdiff.tune", "effdiff.api")


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "effdiff":
                found.update(f"effdiff.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted((SRC / "methods").rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_methods_import_neither_the_public_package_nor_what_sits_above_them(path):
    found = imports(path)
    assert "effdiff" not in found, "import the module you need, not the public package"
    assert not [m for m in found if m.startswith(ABOVE_METHODS)]


@pytest.mark.parametrize("path", sorted((SRC / "adapters").rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_adapters_know_diffusers_not_methods(path):
    found = imports(path)
    assert not [m for m in found if m.startswith(("effdiff.registry", "effdiff.methods", "effdiff.recipe"))]


def test_errors_import_nothing_of_ours():
    assert not [m for m in imports(SRC / "errors.py") if m.startswith("effdiff")]
