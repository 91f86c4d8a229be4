"""Model versions on S3 (or an S3-compatible store), as Triton's `s3://` model repository:
listed there, and fetched whole to local disk when one is read.

Under `s3://bucket/prefix/` the layout is the local repository's: `<model>/<version>/` holds
one MONAI bundle (`configs/metadata.json`, `models/model.ts`, ...).

A version is fetched into `<cache>/<model>/<version>/<fingerprint>/`, the fingerprint being
a digest of its objects' keys, sizes and ETags as listed. Reading it again costs one
listing; a version whose files were replaced on S3 is fetched anew (as Triton fetches on
every load), and the older copy is removed once the new one is in place. Copies of the two
versions of each model read last are kept; older ones are removed.

- Each object is read with If-Match on the ETag it was listed with, so a version rewritten
  while it is fetched fails the fetch (UNAVAILABLE, load again) instead of mixing files;
  S3's own checksum of each object is checked where it has one.
- The copy is written and fsynced in a staging directory, then renamed into place: a
  crash leaves no partial copy under a fingerprint, only a staging directory, which the
  next fetch of the version removes.
- A key whose path under the version is not a plain relative path ("..", empty segments)
  fails the fetch: a bundle cannot write outside its directory.

Blocking, like the local repository: the model server calls it from a thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from medimg_core import s3
from medimg_core.errors import FailedPrecondition, NotFound, Unavailable
from medimg_core.s3 import S3Location
from medimg_inference.repository import ModelName, ModelVersion

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

#: Where the service keeps its copies, under the local repository: a name no model can have.
S3_CACHE = ".s3"
#: Versions of a model whose copies are kept: the one read last (serving, as a rule) and
#: the one before it (what a rollback loads).
KEEP_VERSIONS = 2
_CHUNK = 1024 * 1024
_STAGING = ".fetching-"


@dataclass(frozen=True)
class _Object:
    relative: PurePosixPath
    key: str
    size: int
    etag: str


class S3Models:
    """The model directories under one S3 location (see the module doc)."""

    def __init__(self, location: S3Location, client: S3Client, cache: Path) -> None:
        self.location = location
        self.cache = cache
        self._client = client
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._locks_lock = threading.Lock()

    @classmethod
    def connect(
        cls,
        url: str,
        cache: Path,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> S3Models:
        client = s3.client(endpoint_url=endpoint_url, region=region)
        return cls(S3Location.parse(url), client, cache)

    def __str__(self) -> str:
        return self.location.url

    def model_dirs(self) -> list[str]:
        """The names of the "directories" at the top of the location, unchecked."""
        return self._subdirectories(self.location.prefix)

    def version_dirs(self, model: ModelName) -> list[str]:
        """The names of the "directories" under model `model`, unchecked."""
        return self._subdirectories(self.location.child(model).prefix)

    def fetch(self, model: ModelName, version: ModelVersion) -> Path:
        """The local copy of the version's bundle, fetched if it is not there or no longer
        what S3 holds; MODEL_VERSION_NOT_FOUND if S3 has no object under the version."""
        with self._lock(model, version):
            objects = self._list_version(model, version)
            home = self.cache / model / str(version)
            target = home / _fingerprint(objects)
            if not target.is_dir():
                self._download(objects, home, target, model, version)
            for other in home.iterdir():  # older copies, and staging left by a crash
                if other != target:
                    shutil.rmtree(other, ignore_errors=True)
            os.utime(home)  # the version's last use
        self._prune(model)
        return target

    def _prune(self, model: ModelName) -> None:
        """Keeps the copies of the KEEP_VERSIONS versions of `model` read last, so that the
        local disk holds a bounded share of the repository. A copy removed is fetched again
        if it is read again; a backend that loaded it keeps what it read (Linux keeps a
        removed file's data for whoever has it open or mapped)."""
        homes = sorted(
            (home for home in (self.cache / model).iterdir() if home.is_dir()),
            key=lambda home: home.stat().st_mtime_ns,
            reverse=True,
        )
        for home in homes[KEEP_VERSIONS:]:
            with self._lock(model, int(home.name)) if home.name.isdigit() else nullcontext():
                shutil.rmtree(home, ignore_errors=True)

    def _subdirectories(self, prefix: str) -> list[str]:
        names = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    names.append(common["Prefix"][len(prefix) :].rstrip("/"))
        except (ClientError, BotoCoreError) as error:
            raise self._unavailable("list", error) from error
        return names

    def _list_version(self, model: ModelName, version: ModelVersion) -> list[_Object]:
        prefix = self.location.child(model, str(version)).prefix
        objects = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix
            )
            for page in pages:
                for entry in page.get("Contents", []):
                    key = entry["Key"]
                    if key.endswith("/") and entry["Size"] == 0:
                        continue  # a "folder" some consoles and tools create
                    relative = _relative(key[len(prefix) :], model, version)
                    objects.append(_Object(relative, key, entry["Size"], entry["ETag"]))
        except (ClientError, BotoCoreError) as error:
            raise self._unavailable("list", error) from error
        if not objects:
            raise NotFound(
                "MODEL_VERSION_NOT_FOUND",
                f"model {model!r} has no version {version} in {self}",
                model=model,
                version=version,
            )
        return sorted(objects, key=lambda item: item.key)

    def _download(
        self,
        objects: list[_Object],
        home: Path,
        target: Path,
        model: ModelName,
        version: ModelVersion,
    ) -> None:
        started = time.monotonic()
        staging = None
        try:
            home.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=home))
            for item in objects:
                destination = staging / item.relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                self._download_one(item, destination, model, version)
            staging.chmod(0o755)
            os.rename(staging, target)
            _fsync_directory(home)
        except OSError as error:  # the local disk: full (ENOSPC), a name too long, ...
            raise Unavailable(
                "MODEL_FETCH_FAILED",
                f"model {model!r} version {version} could not be copied to local disk: "
                f"{error.strerror or type(error).__name__}",
                model=model,
                version=version,
            ) from error
        finally:
            if staging is not None and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info(
            "model version fetched from S3",
            extra={
                "fields": {
                    "model": model,
                    "version": version,
                    "files": len(objects),
                    "bytes": sum(item.size for item in objects),
                    "seconds": round(time.monotonic() - started, 3),
                }
            },
        )

    def _download_one(
        self, item: _Object, destination: Path, model: ModelName, version: ModelVersion
    ) -> None:
        try:
            response = self._client.get_object(
                Bucket=self.location.bucket,
                Key=item.key,
                IfMatch=item.etag,  # the object as listed, or none
                ChecksumMode="ENABLED",  # botocore checks S3's checksum of it, if it has one
            )
            with destination.open("wb") as out:
                for chunk in response["Body"].iter_chunks(_CHUNK):
                    out.write(chunk)
                written = out.tell()
                out.flush()
                os.fsync(out.fileno())
        except ClientError as error:
            if s3.is_missing(error) or s3.reason(error) == "PreconditionFailed":
                raise Unavailable(
                    "MODEL_VERSION_CHANGING",
                    f"model {model!r} version {version} changed on S3 while it was fetched; "
                    "load it again once the upload is complete",
                    model=model,
                    version=version,
                ) from error
            raise self._unavailable("read", error) from error
        except BotoCoreError as error:  # a failed checksum is one, as is a lost connection
            raise self._unavailable("read", error) from error
        if written != item.size:
            raise Unavailable(
                "MODEL_VERSION_CHANGING",
                f"model {model!r} version {version}: {item.relative} came with {written} "
                f"bytes, not the {item.size} listed; load it again",
                model=model,
                version=version,
            )

    def _unavailable(self, action: str, error: ClientError | BotoCoreError) -> Unavailable:
        return Unavailable(
            "MODEL_REPOSITORY_UNAVAILABLE",
            f"S3 could not {action} the model repository {self}: {s3.reason(error)}",
        )

    def _lock(self, model: str, version: int) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault((model, version), threading.Lock())


def _relative(path: str, model: ModelName, version: ModelVersion) -> PurePosixPath:
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\0" in path:
        raise FailedPrecondition(
            "INVALID_BUNDLE_KEY",
            f"model {model!r} version {version} has an object whose key is not a plain path "
            "under the version (an empty, '.' or '..' segment)",
            model=model,
            version=version,
        )
    return PurePosixPath(*parts)


def _fingerprint(objects: list[_Object]) -> str:
    digest = hashlib.sha256()
    for item in objects:
        digest.update(f"{item.relative}\0{item.size}\0{item.etag}\n".encode())
    return digest.hexdigest()[:32]


def _fsync_directory(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
