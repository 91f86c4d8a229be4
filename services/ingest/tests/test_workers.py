"""The pipeline with its CPU-bound part in worker processes: the same results and the same
stored bytes as in threads, and a worker that dies costs its calls, not the service."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import asyncpg
import pytest

from medimg_core.errors import Unavailable
from medimg_ingest.objects import LocalObjectStore
from medimg_ingest.pipeline import Outcome
from medimg_ingest.workers import Workers
from services.ingest.tests.support import MakePipeline, dicom_file


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    pool = Workers(2)
    yield pool
    pool.close()


def stored(objects: LocalObjectStore) -> dict[str, bytes]:
    return {
        str(path.relative_to(objects.root)): path.read_bytes()
        for path in objects.root.rglob("*.dcm")
    }


async def test_processes_store_what_threads_store(
    make_pipeline: MakePipeline,
    workers: Workers,
    pool: asyncpg.Pool,
    objects: LocalObjectStore,
) -> None:
    files = [
        dicom_file("CT_small.dcm"),
        b"GIF89a",
        dicom_file("MR_small.dcm"),
        dicom_file("US1_J2KR.dcm"),  # compressed: decoded in the worker to be checked
        dicom_file("CT_small.dcm")[:-10],
    ]
    in_threads, _ = make_pipeline()
    threads = await in_threads.ingest(files)
    by_threads = stored(objects)
    rows = await pool.fetch("SELECT sop_instance_uid, object_key, sha256 FROM instances")
    await pool.execute(
        "TRUNCATE instances, quarantined_instances, series, studies, identities CASCADE"
    )
    for path in objects.root.rglob("*.dcm"):
        path.unlink()

    in_processes, recorded = make_pipeline(workers=workers)
    before = workers.completed
    processes = await in_processes.ingest(files)
    assert workers.completed - before == len(files)

    assert [r.outcome for r in processes] == [
        Outcome.STORED, Outcome.REJECTED, Outcome.STORED, Outcome.QUARANTINED,
        Outcome.REJECTED,
    ]  # fmt: skip
    assert processes == threads
    assert stored(objects) == by_threads
    again = await pool.fetch("SELECT sop_instance_uid, object_key, sha256 FROM instances")
    assert sorted(map(tuple, again)) == sorted(map(tuple, rows))
    # The sealed link to the patient was made in this process, from the worker's pseudonym.
    assert await pool.fetchval("SELECT count(*) FROM identities") == 3
    assert len(recorded.accesses) == 3


async def test_a_dead_worker_fails_its_call_and_the_next_gets_a_new_pool() -> None:
    workers = Workers(1)
    try:
        with pytest.raises(Unavailable) as failed:
            await workers.run(os._exit, 1)  # a worker process that dies, as on a segfault
        assert failed.value.reason == "INGEST_WORKER_LOST"
        assert await workers.run(pow, 2, 10) == 1024
        # Calls in flight when it died fail alike; none hangs.
        results = await asyncio.gather(
            workers.run(os._exit, 1), workers.run(pow, 3, 2), return_exceptions=True
        )
        assert any(isinstance(r, Unavailable) for r in results)
        assert await workers.run(pow, 2, 3) == 8
    finally:
        workers.close()
