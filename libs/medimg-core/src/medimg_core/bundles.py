"""The digest of a model bundle: what a promotion event names and a loader checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1024 * 1024


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def manifest(path: Path) -> list[str]:
    """The bundle's manifest: one `relative/path\\0sha256-of-file\\n` line per regular file,
    sorted; relative paths use `/` whatever the platform."""
    return sorted(
        f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n"
        for file in path.rglob("*")
        if file.is_file()
    )


def bundle_digest(path: Path) -> str:
    """sha256 (hex) over the bundle's sorted manifest lines."""
    digest = hashlib.sha256()
    for line in manifest(path):
        digest.update(line.encode("utf-8"))
    return digest.hexdigest()
