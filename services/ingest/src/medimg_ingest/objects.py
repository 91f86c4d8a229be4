"""The object store of DICOM files: a local directory, written atomically and durably.

A file is written to a temporary name, fsynced, renamed into place and its directory
fsynced, so an acknowledged object survives a crash and a half-written one never
shows under its key. Keys are content hashes, so a retried write is harmless.

An object is written before the index points at it, so a crash in between leaves an
object nothing points at (and a crash mid-write a temporary file). `orphans` and
`discard` let the service sweep them once they are older than any upload can take: a
write of an existing object refreshes its time, so it is never swept from under an
upload that is about to index it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from medimg_core.errors import DataLoss


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
        try:
            os.utime(path)  # already there: fresh again, so no sweep takes it now
            return
        except FileNotFoundError:
            pass
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

    def get_verified(self, key: str, sha256: str) -> bytes:
        """The object, checked against the hash recorded when it was stored."""
        data = self.get(key)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise DataLoss("OBJECT_CORRUPTED", f"stored object {key} no longer matches its hash")
        return data

    def orphan_candidates(self, older_than: float) -> list[str]:
        """Keys of objects, and temporary files, last written before `older_than` (epoch s)."""
        found = []
        for path in self.root.glob("instances/*/*"):
            if path.is_file() and path.stat().st_mtime < older_than:
                found.append(str(path.relative_to(self.root)))
        return found

    def discard(self, key: str, older_than: float) -> bool:
        """Removes the object if it was still last written before `older_than`.

        The file is first moved aside, so a concurrent `put` either refreshed it before
        (then it is put back) or finds it gone and writes it anew."""
        path = self.root / key
        aside = path.with_name(".discarding-" + path.name)
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return False
        if aside.stat().st_mtime >= older_than:
            os.replace(aside, path)
            return False
        aside.unlink()
        return True
