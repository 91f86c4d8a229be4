"""The object store of DICOM files: a local directory, written atomically and durably.

A file is written to a temporary name, fsynced, renamed into place and its directory
fsynced, so an acknowledged object survives a crash and a half-written one never
shows under its key. Keys are content hashes, so a retried write is harmless.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key_for(data: bytes) -> tuple[str, str]:
        """The content key of `data` and its SHA-256."""
        digest = hashlib.sha256(data).hexdigest()
        return f"instances/{digest[:2]}/{digest}.dcm", digest

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()
