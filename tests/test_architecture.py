"""The dependency direction: entry point (cli/) -> {training, service} -> core (lorasae/).

Every import statement of every module is read from its source (at any nesting level: lazy
imports inside functions count, and so do ``importlib.import_module("...")`` calls with a literal
name), relative imports resolved against the module's own package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder -> the package it is installed as (pyproject.toml's package-dir)
PACKAGES = {"lorasae": "lorasae", "training": "lorasae.training", "service": "lorasae.service",
            "cli": "lorasae.cli"}
# what each part must never import (itself included in the check through the package names)
FORBIDDEN = {
    "lorasae": ("lorasae.training", "lorasae.service", "lorasae.cli"),
    "training": ("lorasae.service", "lorasae.cli"),
    "service": ("lorasae.training", "lorasae.cli"),
}


def _module_name(folder: str, path: Path) -> str:
    rel = path.relative_to(REPO / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PACKAGES[folder], *parts])


def imports_of(path: Path, module: str) -> set[str]:
    """Absolute names of everything ``path`` (the module ``module``) imports, anywhere in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    return names


def _violations(folder: str) -> list[str]:
    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        module = _module_name(folder, path)
        for name in sorted(imports_of(path, module)):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[folder]):
                found.append(f"{path.relative_to(REPO)} imports {name}")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_dependency_direction(folder):
    assert not _violations(folder)


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """The parser must catch what the rule is about, or the test above could pass vacuously."""
    source = tmp_path / "mod.py"
    source.write_text("import os\n"
                      "def f():\n"
                      "    from lorasae.training.eval import x\n"
                      "    from ..training import loop\n"
                      "    import importlib; importlib.import_module('lorasae.service.app')\n")
    names = imports_of(source, "lorasae.service.routes.mod")
    assert "lorasae.training.eval" in names
    assert "lorasae.service.training.loop" in names  # `..` from lorasae.service.routes
    assert "lorasae.service.app" in names and "os" in names


@pytest.mark.parametrize("folder", ["training", "service"])
def test_repo_folders_do_not_import_as_top_level_packages(folder):
    """`import training` from the repo root would load a second copy of the code beside
    lorasae.training (two module objects, two registries of everything): it must fail loudly."""
    result = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert f"import lorasae.{folder}, not {folder}" in result.stderr
