"""What each service pulls in: all it imports (its image installs only what it declares),
and, for ingest and audit, never torch."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What each image installs from the repository (deploy/docker/Dockerfile), and its sources.
SHIPPED = {
    "medimg-protos": ROOT / "libs/medimg-protos/src",
    "medimg-core": ROOT / "libs/medimg-core/src",
    **{
        f"medimg-{s}": ROOT / f"services/{s}/src"
        for s in ("audit", "ingest", "inference", "training")
    },
}
#: Imported only where the deployment installs it, and a clear error elsewhere.
OPTIONAL = {"tensorrt"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def closure(package: str) -> set[str]:
    """Every distribution `package` depends on, transitively (extras left out)."""
    seen: set[str] = set()
    todo = [package]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        todo += [_name(r) for r in needs if "extra ==" not in r]
    return seen


def declared(package: str) -> set[str]:
    """The distributions that `package`, or a medimg library it needs, names itself."""
    names: set[str] = set()
    todo = [package]
    while todo:
        for requirement in requires(todo.pop()) or []:
            name = _name(requirement)
            if "extra ==" in requirement or name in names:
                continue
            names.add(name)
            if name.startswith("medimg-"):
                todo.append(name)
    return names


def imported(source: Path) -> set[str]:
    """The top-level modules the code under `source` imports when it runs (imports for the
    type checker alone, under `if TYPE_CHECKING:`, left out)."""

    class Imports(ast.NodeVisitor):
        def __init__(self) -> None:
            self.found: set[str] = set()

        def visit_If(self, node: ast.If) -> None:
            if ast.unparse(node.test).endswith("TYPE_CHECKING"):
                for statement in node.orelse:
                    self.visit(statement)
            else:
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            self.found |= {alias.name.partition(".")[0] for alias in node.names}

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 0 and node.module:
                self.found.add(node.module.partition(".")[0])

    visitor = Imports()
    for path in source.rglob("*.py"):
        visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.found


@pytest.mark.parametrize("package", sorted(SHIPPED))
def test_a_shipped_package_declares_what_it_imports(package: str) -> None:
    """Its image installs only what it and the medimg libraries it needs declare: a module
    that came along in the development environment, undeclared, breaks it at run time."""
    providers = packages_distributions()
    ours = declared(package) | {package}
    undeclared = {}
    for module in imported(SHIPPED[package]) - set(sys.stdlib_module_names) - OPTIONAL:
        distributions = {_name(d) for d in providers.get(module, [])}
        if not distributions & ours:
            undeclared[module] = sorted(distributions) or "no installed distribution"
    assert not undeclared, f"{package} imports, undeclared: {undeclared}"


@pytest.mark.parametrize("service", ["medimg-ingest", "medimg-audit"])
def test_service_does_not_pull_in_torch(service: str) -> None:
    dependencies = closure(service)
    assert "medimg-core" in dependencies
    assert not dependencies & {"torch", "monai", "onnxruntime"}
