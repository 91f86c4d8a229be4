"""The S3 object store against a real S3 API on a socket (moto's server): round trips, the
SHA-256 sent with each upload and checked on read, refreshes instead of re-uploads, the
orphan sweep's cutoff and its race with a concurrent put, and the pipeline on S3."""

from __future__ import annotations

import base64
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pydicom
import pytest

from medimg_cli.testing import free_port, new_bucket
from medimg_cli.testing import s3_client as make_client
from medimg_core.errors import DataLoss
from medimg_core.s3 import S3Location
from medimg_ingest.objects import (
    ObjectStore,
    ObjectStoreError,
    S3ObjectStore,
    open_store,
)
from medimg_ingest.pipeline import Outcome, Pipeline, sweep_orphans
from medimg_ingest.settings import IngestSettings
from services.ingest.tests.support import Recorded, dicom_file

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.usefixtures("aws_credentials")

PREFIX = "site-a/"


@pytest.fixture
def raw(s3_endpoint: str) -> S3Client:
    """A client of the test's own, to look at and tamper with the bucket behind the store."""
    return make_client(s3_endpoint)


@pytest.fixture
def bucket(raw: S3Client) -> str:
    return new_bucket(raw, versioned=True)


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture
def store(s3_endpoint: str, bucket: str, calls: list[str]) -> S3ObjectStore:
    client = make_client(s3_endpoint)
    client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    return S3ObjectStore(S3Location(bucket, PREFIX), client)


def last_modified(raw: S3Client, bucket: str, key: str) -> float:
    return raw.head_object(Bucket=bucket, Key=PREFIX + key)["LastModified"].timestamp()


def wait_past(moment: float) -> None:
    """S3 keeps LastModified to the second: sleep until a later second has begun."""
    time.sleep(max(0.0, int(moment) + 1.05 - time.time()))


def test_put_then_get(store: S3ObjectStore, raw: S3Client, bucket: str) -> None:
    data = bytes(range(256)) * 100
    key, digest = store.key_for(data)
    store.put(key, data)
    assert store.get(key) == data
    assert store.get_verified(key, digest) == data
    stored = raw.get_object(Bucket=bucket, Key=PREFIX + key)  # under the prefix
    assert stored["Body"].read() == data
    assert stored["ContentType"] == "application/dicom"


def test_the_upload_carries_its_sha256(
    store: S3ObjectStore, raw: S3Client, bucket: str, calls: list[str]
) -> None:
    data = b"DICM and pixels"
    key, _ = store.key_for(data)
    store.put(key, data)
    expected = base64.b64encode(hashlib.sha256(data).digest()).decode()
    head = raw.head_object(Bucket=bucket, Key=PREFIX + key, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == expected
    assert calls == ["CopyObject", "PutObject"]  # not there yet: uploaded
    store.put(key, data)  # refreshed: the copy keeps a SHA-256 too
    head = raw.head_object(Bucket=bucket, Key=PREFIX + key, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == expected


def test_a_corrupted_object_is_detected(store: S3ObjectStore, raw: S3Client, bucket: str) -> None:
    key, digest = store.key_for(b"pixels")
    store.put(key, b"pixels")
    raw.put_object(Bucket=bucket, Key=PREFIX + key, Body=b"pixelz")  # behind the store's back
    with pytest.raises(DataLoss) as caught:
        store.get_verified(key, digest)
    assert caught.value.reason == "OBJECT_CORRUPTED"


def test_a_second_put_refreshes_instead_of_uploading(
    store: S3ObjectStore, raw: S3Client, bucket: str, calls: list[str]
) -> None:
    data = b"the same bytes"
    key, _ = store.key_for(data)
    store.put(key, data)
    first = last_modified(raw, bucket, key)
    wait_past(first)
    calls.clear()
    store.put(key, data)
    assert calls == ["CopyObject"]  # the bytes did not travel again
    assert last_modified(raw, bucket, key) > first  # but fresh: no sweep takes it now
    assert store.get(key) == data
    listed = raw.list_objects_v2(Bucket=bucket)["Contents"]
    assert [entry["Key"] for entry in listed] == [PREFIX + key]


def test_orphan_candidates_and_discard_honour_the_cutoff(
    store: S3ObjectStore, raw: S3Client, bucket: str
) -> None:
    old, _ = store.key_for(b"old")
    rewritten, _ = store.key_for(b"old, then written again")
    store.put(old, b"old")
    store.put(rewritten, b"old, then written again")
    raw.put_object(Bucket=bucket, Key=PREFIX + "models/not-ours", Body=b"x")
    raw.put_object(Bucket=bucket, Key="instances/00/outside-the-prefix.dcm", Body=b"x")
    wait_past(time.time())
    cutoff = time.time()
    wait_past(cutoff)
    recent, _ = store.key_for(b"recent")
    store.put(recent, b"recent")
    store.put(rewritten, b"old, then written again")  # a retry: fresh again

    assert store.orphan_candidates(cutoff) == [old]
    assert sorted(store.orphan_candidates(time.time() + 60)) == sorted([old, rewritten, recent])
    assert not store.discard(recent, cutoff)
    assert not store.discard(rewritten, cutoff)
    assert store.discard(old, cutoff)
    assert not store.discard(old, cutoff)  # gone already
    with pytest.raises(FileNotFoundError):
        store.get(old)
    assert store.get(recent) == b"recent"
    assert store.get(rewritten) == b"old, then written again"


def discard_racing_a_put(s3_endpoint: str, bucket: str, data: bytes) -> tuple[S3ObjectStore, bool]:
    """An old orphan is discarded while an upload of the same bytes puts it again: the
    upload's put lands between the sweep's look (HeadObject) and its DeleteObject."""
    sweeper = S3ObjectStore(S3Location(bucket, PREFIX), make_client(s3_endpoint))
    uploader = S3ObjectStore(S3Location(bucket, PREFIX), make_client(s3_endpoint))
    key, _ = uploader.key_for(data)
    uploader.put(key, data)
    wait_past(time.time())
    cutoff = time.time()
    wait_past(cutoff)
    raced: list[str] = []

    def put_before_the_delete(**_: object) -> None:
        if not raced:
            raced.append(key)
            uploader.put(key, data)

    sweeper._client.meta.events.register("before-call.s3.DeleteObject", put_before_the_delete)
    removed = sweeper.discard(key, cutoff)
    assert raced == [key]
    return uploader, removed


def test_a_put_between_the_sweeps_look_and_delete_survives(s3_endpoint: str, raw: S3Client) -> None:
    bucket = new_bucket(raw, versioned=True)
    uploader, removed = discard_racing_a_put(s3_endpoint, bucket, b"sent again")
    key, digest = uploader.key_for(b"sent again")
    assert removed  # the old version went ...
    assert uploader.get_verified(key, digest) == b"sent again"  # ... the refreshed one stays
    versions = raw.list_object_versions(Bucket=bucket).get("Versions", [])
    assert len(versions) == 1


def test_without_versioning_the_window_is_as_documented(s3_endpoint: str, raw: S3Client) -> None:
    bucket = new_bucket(raw, versioned=False)
    uploader, removed = discard_racing_a_put(s3_endpoint, bucket, b"sent again")
    key, _ = uploader.key_for(b"sent again")
    assert removed
    with pytest.raises(FileNotFoundError):  # the S3ObjectStore docstring's window
        uploader.get(key)


def test_a_missing_object_is_file_not_found_as_in_the_local_store(store: S3ObjectStore) -> None:
    key, digest = store.key_for(b"never stored")
    with pytest.raises(FileNotFoundError):
        store.get(key)
    with pytest.raises(FileNotFoundError):
        store.get_verified(key, digest)
    assert not store.discard(key, time.time() + 60)


def test_store_failures_are_os_errors(s3_endpoint: str) -> None:
    # The orphan sweep and the service's callers handle OSError, as for a local disk.
    no_bucket = S3ObjectStore(S3Location("medimg-no-such-bucket"), make_client(s3_endpoint))
    with pytest.raises(ObjectStoreError, match="NoSuchBucket"):
        no_bucket.get("instances/00/x.dcm")
    closed = make_client(
        f"http://127.0.0.1:{free_port()}", retries={"max_attempts": 1}, connect_timeout=1
    )
    unreachable = S3ObjectStore(S3Location("medimg-bucket"), closed)
    for call in (
        lambda: unreachable.put("instances/00/x.dcm", b"x"),
        lambda: unreachable.get("instances/00/x.dcm"),
        lambda: unreachable.orphan_candidates(time.time()),
        lambda: unreachable.discard("instances/00/x.dcm", time.time()),
    ):
        with pytest.raises(OSError, match="S3 could not"):
            call()


def test_the_settings_choose_s3(s3_endpoint: str, raw: S3Client, tmp_path: Path) -> None:
    bucket = new_bucket(raw, versioned=True)
    settings = IngestSettings(
        database_url="postgresql:///ingest",
        redis_url="redis://127.0.0.1:1/0",
        audit_target="127.0.0.1:1",
        deid_key_file=tmp_path / "deid.key",
        identity_key_file=tmp_path / "identity.key",
        object_store_url=f"s3://{bucket}/{PREFIX}",
        s3_endpoint_url=s3_endpoint,
        s3_region="eu-west-1",
    )
    store = open_store(settings)
    assert isinstance(store, S3ObjectStore)
    assert store.location == S3Location(bucket, PREFIX)
    key, digest = store.key_for(b"through the factory")
    store.put(key, b"through the factory")
    stored = raw.get_object(Bucket=bucket, Key=PREFIX + key)["Body"].read()
    assert stored == b"through the factory"
    assert store.get_verified(key, digest) == stored


# --- the pipeline on S3: the conftest's pipeline fixtures, with this store -----------------


@pytest.fixture
def objects(store: S3ObjectStore) -> ObjectStore:
    return store


async def test_the_pipeline_stores_on_s3_and_reads_back_verified(  # noqa: PLR0917 - fixtures
    pipeline: tuple[Pipeline, Recorded],
    pool: asyncpg.Pool,
    store: S3ObjectStore,
    raw: S3Client,
    bucket: str,
    executor: ThreadPoolExecutor,
) -> None:
    ingest, _ = pipeline
    [result] = await ingest.ingest([dicom_file("CT_small.dcm")])
    assert result.outcome is Outcome.STORED
    row = await pool.fetchrow("SELECT object_key, sha256 FROM instances")
    assert row is not None
    kept = raw.get_object(Bucket=bucket, Key=PREFIX + row["object_key"])["Body"].read()
    assert hashlib.sha256(kept).hexdigest() == row["sha256"]
    assert pydicom.dcmread(BytesIO(kept)).PatientIdentityRemoved == "YES"

    volume = await ingest.volume([(row["object_key"], row["sha256"])])
    assert volume.array.shape[:1] == (1,)

    [again] = await ingest.ingest([dicom_file("CT_small.dcm")])
    assert again.outcome is Outcome.DUPLICATE

    orphan, _ = store.key_for(b"what a crash between store and index leaves")
    store.put(orphan, b"what a crash between store and index leaves")
    # A grace period below zero: every object counts as old, only the orphan goes.
    assert await sweep_orphans(pool, store, executor, grace_seconds=-60) == 1
    assert store.orphan_candidates(time.time() + 60) == [row["object_key"]]

    raw.put_object(Bucket=bucket, Key=PREFIX + row["object_key"], Body=kept[:-1] + b"\0")
    with pytest.raises(DataLoss):
        await ingest.volume([(row["object_key"], row["sha256"])])
