"""What each service pulls in: ingest and audit never carry torch."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, requires

import pytest


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
        for requirement in needs:
            if "extra ==" in requirement:
                continue
            todo.append(
                re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")
            )
    return seen


@pytest.mark.parametrize("service", ["medimg-ingest", "medimg-audit"])
def test_service_does_not_pull_in_torch(service: str) -> None:
    dependencies = closure(service)
    assert "medimg-core" in dependencies
    assert not dependencies & {"torch", "monai", "onnxruntime"}
