"""The object store of DICOM files: one small interface, a local directory or S3 behind it.

Keys are content hashes, so a retried write is harmless, and every read through
`get_verified` is checked against the SHA-256 recorded when the object was stored.

An object is written before the index points at it, so a crash in between leaves an
object nothing points at. `orphan_candidates` and `discard` let the service sweep them
once they are older than any upload can take: a write of an existing object refreshes its
time, so it is never swept from under an upload that is about to index it.

Both stores are synchronous: the pipeline calls them from its worker threads. A missing
object is `FileNotFoundError` from either; any other failure of the store is an `OSError`.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from medimg_core import s3
from medimg_core.errors import DataLoss
from medimg_core.s3 import S3Location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from medimg_ingest.settings import IngestSettings

CONTENT_TYPE = "application/dicom"


def content_key(data: bytes) -> tuple[str, str]:
    """The content key of `data` and its SHA-256 (hex)."""
    digest = hashlib.sha256(data).hexdigest()
    return f"instances/{digest[:2]}/{digest}.dcm", digest


class ObjectStore(Protocol):
    """What the pipeline, the servicer and the orphan sweep need of an object store."""

    @staticmethod
    def key_for(data: bytes) -> tuple[str, str]:
        """The content key of `data` and its SHA-256."""
        return content_key(data)

    def put(self, key: str, data: bytes) -> None:
        """Stores `data` durably under `key`; if it is there already, makes it fresh."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; `FileNotFoundError` if there is none."""
        ...

    def get_verified(self, key: str, sha256: str) -> bytes:
        """The object, checked against the hash recorded when it was stored."""
        data = self.get(key)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise DataLoss("OBJECT_CORRUPTED", f"stored object {key} no longer matches its hash")
        return data

    def orphan_candidates(self, older_than: float) -> list[str]:
        """Keys of objects last written before `older_than` (epoch seconds)."""
        ...

    def discard(self, key: str, older_than: float) -> bool:
        """Removes the object if it was still last written before `older_than`."""
        ...


class LocalObjectStore(ObjectStore):
    """A directory, written atomically and durably.

    A file is written to a temporary name, fsynced, renamed into place and its directory
    fsynced, so an acknowledged object survives a crash and a half-written one never
    shows under its key (a crash mid-write leaves a temporary file, which the sweep takes).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

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


class ObjectStoreError(OSError):
    """The object store refused or failed a request (unreachable, denied, throttled)."""


class S3ObjectStore(ObjectStore):
    """A bucket (and a key prefix in it) on S3 or an S3-compatible store.

    `put` sends the SHA-256 with the upload, so S3 itself refuses bytes damaged on the way
    (BadDigest), and reads are checked against it again (`get_verified`). Objects appear
    whole or not at all (S3 has no partial objects), so there are no temporary files.

    An existing object is not uploaded again but refreshed: copied onto itself with new
    metadata, which renews its LastModified, the time the orphan sweep goes by.

    `discard` deletes the exact version it found old. In a bucket with versioning (as
    deploy/terraform makes it) every write, the refresh included, is a new version, so a
    `put` that lands between the sweep's look and its delete leaves a newer version that
    the delete does not touch: the race is closed. Without versioning, S3 offers nothing
    that tells a refreshed object from the old one (the ETag of the same bytes is the
    same, and conditional deletes on the modification time are for directory buckets
    only), so there is a window of one round trip, between `discard`'s HeadObject and its
    DeleteObject, in which a `put` of the same content (refreshing the object) is undone
    after it returned. The upload then indexes an object that is gone: reads of it fail
    with `FileNotFoundError` until the same content is ingested again. It takes an orphan
    older than the grace period whose very content is sent again within that round trip.
    """

    def __init__(self, location: S3Location, client: S3Client) -> None:
        self.location = location
        self._client = client

    @classmethod
    def connect(
        cls,
        location: S3Location,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        connections: int = 10,
    ) -> S3ObjectStore:
        """A store with a client of its own (one connection per worker thread)."""
        return cls(
            location, s3.client(endpoint_url=endpoint_url, region=region, connections=connections)
        )

    def _name(self, key: str) -> str:
        return self.location.prefix + key

    def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        try:
            self._client.copy_object(
                Bucket=self.location.bucket,
                Key=name,
                CopySource={"Bucket": self.location.bucket, "Key": name},
                MetadataDirective="REPLACE",  # S3 refuses a self-copy that changes nothing
                ContentType=CONTENT_TYPE,
                ChecksumAlgorithm="SHA256",  # the copy keeps a SHA-256, computed by S3
            )
            return
        except ClientError as error:
            if not s3.is_missing(error):
                raise _failure("refresh", key, error) from error
        except BotoCoreError as error:
            raise _failure("refresh", key, error) from error
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
        try:
            self._client.put_object(
                Bucket=self.location.bucket,
                Key=name,
                Body=data,
                ContentType=CONTENT_TYPE,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,  # ours, of the bytes in memory: S3 checks it
            )
        except (ClientError, BotoCoreError) as error:
            raise _failure("upload", key, error) from error

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=self._name(key))
            return response["Body"].read()
        except ClientError as error:
            if s3.is_missing(error):
                raise FileNotFoundError(errno.ENOENT, "no such object", key) from None
            raise _failure("read", key, error) from error
        except BotoCoreError as error:
            raise _failure("read", key, error) from error

    def orphan_candidates(self, older_than: float) -> list[str]:
        prefix = self.location.prefix
        found = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix + "instances/"
            )
            for page in pages:
                for entry in page.get("Contents", []):
                    if entry["LastModified"].timestamp() < older_than:
                        found.append(entry["Key"][len(prefix) :])
        except (ClientError, BotoCoreError) as error:
            raise _failure("list", prefix + "instances/", error) from error
        return found

    def discard(self, key: str, older_than: float) -> bool:
        """Deletes the object's current version if it was last written before `older_than`
        (see the class for what a concurrent `put` meets)."""
        name = self._name(key)
        try:
            head = self._client.head_object(Bucket=self.location.bucket, Key=name)
        except ClientError as error:
            if s3.is_missing(error):
                return False
            raise _failure("look at", key, error) from error
        except BotoCoreError as error:
            raise _failure("look at", key, error) from error
        if head["LastModified"].timestamp() >= older_than:
            return False
        try:
            if "VersionId" in head:  # versioned (or suspended: "null"): that version only
                self._client.delete_object(
                    Bucket=self.location.bucket, Key=name, VersionId=head["VersionId"]
                )
            else:
                self._client.delete_object(Bucket=self.location.bucket, Key=name)
        except (ClientError, BotoCoreError) as error:
            raise _failure("delete", key, error) from error
        return True


def _failure(action: str, key: str, error: ClientError | BotoCoreError) -> ObjectStoreError:
    return ObjectStoreError(errno.EIO, f"S3 could not {action} the object: {s3.reason(error)}", key)


def open_store(settings: IngestSettings) -> ObjectStore:
    """The store the settings choose: S3 when `object_store_url` is set, else the directory."""
    if settings.object_store_url:
        return S3ObjectStore.connect(
            S3Location.parse(settings.object_store_url),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            connections=settings.worker_threads,
        )
    if settings.object_dir is None:  # the settings refuse this; kept for the type checker
        raise ValueError("neither an object directory nor an S3 URL is set")
    return LocalObjectStore(settings.object_dir)
