"""Fixtures of the ingest tests: the index on the test PostgreSQL, a Redis database of their
own, an object store, the pipeline assembled from them with a recording audit hook, and the
DIMSE door in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from medimg_core import db
from medimg_core import redis as medimg_redis
from medimg_ingest import deid
from medimg_ingest.dimse import DimseServer
from medimg_ingest.objects import LocalObjectStore, ObjectStore
from medimg_ingest.pipeline import Pipeline
from medimg_ingest.workers import Workers
from services.ingest.tests.support import DEID_KEY, POLICY, VAULT, MakePipeline, Recorded


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
def objects(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture
def make_pipeline(
    pool: asyncpg.Pool, objects: ObjectStore, events: aioredis.Redis, executor: ThreadPoolExecutor
) -> MakePipeline:
    """Builds the pipeline; `events` and `policy` may be given to replace the defaults."""

    def make(
        *,
        events: aioredis.Redis = events,
        policy: deid.Policy = POLICY,
        workers: Workers | None = None,
    ) -> tuple[Pipeline, Recorded]:
        recorded = Recorded(pool)
        pipeline = Pipeline(
            pool=pool, objects=objects, events=events, executor=executor, report=recorded,
            policy=policy, deid_key=DEID_KEY, vault=VAULT, workers=workers,
        )  # fmt: skip
        return pipeline, recorded

    return make


@pytest.fixture
def pipeline(make_pipeline: MakePipeline) -> tuple[Pipeline, Recorded]:
    return make_pipeline()


@pytest.fixture
async def door(
    make_pipeline: MakePipeline, pool: asyncpg.Pool
) -> AsyncIterator[tuple[DimseServer, Pipeline, Recorded]]:
    pipeline, recorded = make_pipeline()
    server = DimseServer(
        ingest=pipeline.ingest, pool=pool, report=recorded, ae_title="MEDIMG",
        host="127.0.0.1", port=0,
    )  # fmt: skip
    server.start()
    yield server, pipeline, recorded
    server.stop()
