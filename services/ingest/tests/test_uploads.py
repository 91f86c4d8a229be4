"""The upload pipeline: chunks to files, then all-or-nothing storage, index and events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from pydicom.data import get_testdata_file

from medimg_core import db
from medimg_core import redis as medimg_redis
from medimg_core.errors import InvalidArgument
from medimg_ingest.objects import ObjectStore
from medimg_ingest.uploads import INSTANCE_STORED_STREAM, Outcome, Uploads, collect_files

CT = "studies/1.3.6.1.4.1.5962.1.2.1.20040119072730.12322/series/1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322/instances/1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"  # noqa: E501


def dicom_file(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(str(path)).read_bytes()


async def stream(pairs: Iterable[tuple[bytes, bool]]) -> AsyncIterator[tuple[bytes, bool]]:
    for pair in pairs:
        yield pair


# --- collect_files ------------------------------------------------------------------------


async def test_chunks_are_joined_until_last_chunk() -> None:
    pairs = [(b"ab", False), (b"cd", False), (b"e", True), (b"fg", True), (b"h", True)]
    assert await collect_files(stream(pairs), 100) == [b"abcde", b"fg", b"h"]


async def test_an_empty_last_chunk_ends_the_file() -> None:
    pairs = [(b"ab", False), (b"", True), (b"cd", False), (b"", True)]
    assert await collect_files(stream(pairs), 100) == [b"ab", b"cd"]


async def test_trailing_bytes_end_a_file() -> None:
    pairs = [(b"ab", True), (b"cd", False), (b"ef", False)]
    assert await collect_files(stream(pairs), 100) == [b"ab", b"cdef"]


async def test_an_empty_file_is_passed_on_for_validation() -> None:
    assert await collect_files(stream([(b"", True)]), 100) == [b""]


@pytest.mark.parametrize("pairs", [[], [(b"", False)], [(b"", False), (b"", False)]])
async def test_an_empty_stream_is_refused(pairs: list[tuple[bytes, bool]]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await collect_files(stream(pairs), 100)
    assert caught.value.reason == "EMPTY_UPLOAD"


async def test_the_limit_is_per_file() -> None:
    pairs = [(b"ab", False), (b"cd", True), (b"efgh", True)]
    assert await collect_files(stream(pairs), 4) == [b"abcd", b"efgh"]


@pytest.mark.parametrize(
    ("pairs", "index"),
    [
        ([(b"abc", False), (b"de", True)], 0),
        ([(b"abcde", True)], 0),
        ([(b"ab", True), (b"cde", False), (b"fg", False)], 1),
    ],
)
async def test_a_file_over_the_limit_is_refused(
    pairs: list[tuple[bytes, bool]], index: int
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await collect_files(stream(pairs), 4)
    assert caught.value.reason == "INSTANCE_TOO_LARGE"
    assert caught.value.metadata == {"index": str(index), "limit": "4"}


async def test_the_limit_stops_reading_the_stream() -> None:
    consumed = []

    async def endless() -> AsyncIterator[tuple[bytes, bool]]:
        while True:
            consumed.append(1)
            yield b"x" * 10, False

    with pytest.raises(InvalidArgument):
        await collect_files(endless(), 100)
    assert len(consumed) == 11


# --- Uploads.store ------------------------------------------------------------------------


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.connect(database_url, max_size=4)
    await db.migrate(pool, files("medimg_ingest.migrations"))
    yield pool
    await pool.close()


@pytest.fixture
async def events(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    # A database of the shared server for these tests alone, emptied for each test.
    client = medimg_redis.connect(redis_url.rsplit("/", 1)[0] + "/7")
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool


@pytest.fixture
def objects(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "objects")


@pytest.fixture
def uploads(
    pool: asyncpg.Pool, objects: ObjectStore, events: aioredis.Redis, executor: ThreadPoolExecutor
) -> Uploads:
    return Uploads(pool, objects, events, executor)


def stored_files(objects: ObjectStore) -> list[Path]:
    return sorted(p for p in objects.root.rglob("*") if p.is_file())


async def announced(events: aioredis.Redis) -> list[dict[str, str]]:
    entries = await events.xrange(INSTANCE_STORED_STREAM) or []
    return [{str(k): str(v) for k, v in (fields or {}).items()} for _, fields in entries]


async def test_a_new_instance_is_stored_indexed_and_announced(
    uploads: Uploads, pool: asyncpg.Pool, objects: ObjectStore, events: aioredis.Redis
) -> None:
    data = dicom_file("CT_small.dcm")
    assert await uploads.store([data]) == [Outcome(CT, created=True)]

    row = await pool.fetchrow("SELECT * FROM instances")
    assert row is not None
    key, digest = ObjectStore.key_for(data)
    assert (row["object_key"], row["sha256"], row["size_bytes"]) == (key, digest, len(data))
    assert row["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2"
    assert row["transfer_syntax"] == "1.2.840.10008.1.2.1"
    assert objects.get(key) == data
    assert stored_files(objects) == [objects.root / key]
    assert await pool.fetchval("SELECT modality FROM series") == "CT"
    assert await announced(events) == [{"instance": CT}]


async def test_the_second_upload_is_a_duplicate(
    uploads: Uploads, pool: asyncpg.Pool, objects: ObjectStore, events: aioredis.Redis
) -> None:
    data = dicom_file("CT_small.dcm")
    await uploads.store([data])
    assert await uploads.store([data]) == [Outcome(CT, created=False)]
    assert await pool.fetchval("SELECT count(*) FROM instances") == 1
    assert len(stored_files(objects)) == 1
    assert await announced(events) == [{"instance": CT}]


async def test_a_batch_stores_each_file_and_announces_the_new_ones(
    uploads: Uploads, pool: asyncpg.Pool, events: aioredis.Redis
) -> None:
    await uploads.store([dicom_file("CT_small.dcm")])
    outcomes = await uploads.store(
        [dicom_file("MR_small.dcm"), dicom_file("CT_small.dcm"), dicom_file("rtplan.dcm")]
    )
    assert [o.created for o in outcomes] == [True, False, True]
    assert outcomes[0].instance.startswith("studies/1.3.6.1.4.1.5962.1.2.4.")
    assert await pool.fetchval("SELECT count(*) FROM instances") == 3
    assert await pool.fetchval("SELECT count(*) FROM studies") == 3
    names = [e["instance"] for e in await announced(events)]
    assert names == [CT, outcomes[0].instance, outcomes[2].instance]
    for entry in await announced(events):
        assert set(entry) == {"instance"}  # a resource name, nothing else (no PHI)


async def test_one_instance_twice_in_a_batch(uploads: Uploads, events: aioredis.Redis) -> None:
    data = dicom_file("CT_small.dcm")
    assert await uploads.store([data, data]) == [Outcome(CT, True), Outcome(CT, False)]
    assert await announced(events) == [{"instance": CT}]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"not a DICOM file at all", "NOT_DICOM"),
        (b"", "EMPTY_FILE"),
        (dicom_file("CT_small.dcm")[:200], "MALFORMED_DICOM"),
    ],
)
async def test_a_batch_with_one_bad_file_stores_nothing(
    *,
    uploads: Uploads,
    pool: asyncpg.Pool,
    objects: ObjectStore,
    events: aioredis.Redis,
    bad: bytes,
    reason: str,
) -> None:
    batch = [dicom_file("MR_small.dcm"), bad, dicom_file("rtplan.dcm")]
    with pytest.raises(InvalidArgument) as caught:
        await uploads.store(batch)
    assert caught.value.reason == reason
    assert caught.value.metadata["index"] == "1"
    for table in ("instances", "series", "studies"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    assert stored_files(objects) == []
    assert await announced(events) == []


async def test_concurrent_uploads_of_one_instance_create_it_once(
    uploads: Uploads, pool: asyncpg.Pool, events: aioredis.Redis
) -> None:
    data = dicom_file("MR_small.dcm")
    results = await asyncio.gather(*(uploads.store([data]) for _ in range(5)))
    assert sorted(r[0].created for r in results) == [False] * 4 + [True]
    assert await pool.fetchval("SELECT count(*) FROM instances") == 1
    assert len(await announced(events)) == 1


async def test_a_redis_outage_does_not_fail_a_stored_upload(
    pool: asyncpg.Pool,
    objects: ObjectStore,
    executor: ThreadPoolExecutor,
    unused_tcp_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{unused_tcp_port}/0", socket_connect_timeout=1
    )
    try:
        uploads = Uploads(pool, objects, down, executor)
        assert await uploads.store([dicom_file("CT_small.dcm")]) == [Outcome(CT, True)]
    finally:
        await down.aclose()
    assert await pool.fetchval("SELECT count(*) FROM instances") == 1
    assert any(r.message == "instance events not published" for r in caplog.records)
