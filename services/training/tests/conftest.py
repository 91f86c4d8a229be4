"""Fixtures of the training tests: the training database on the test PostgreSQL, a Redis
database of their own, settings over a temporary object directory, and a small dataset of
real CT and MR pixels already in the workers' cache."""

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
from medimg_training import datasets
from medimg_training.datasets import Task
from medimg_training.settings import TrainingSettings
from services.training.tests.support import (
    CLASSES,
    SEGMENTS,
    probe_of,
    segmentation_table,
    series_table,
)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.connect(database_url, max_size=4)
    await db.migrate(pool, files("medimg_training.migrations"))
    yield pool
    await pool.close()


@pytest.fixture
def events_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + "/8"


@pytest.fixture
async def events(events_url: str) -> AsyncIterator[aioredis.Redis]:
    client = medimg_redis.connect(events_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


@pytest.fixture
def settings(tmp_path: Path, database_url: str, events_url: str) -> TrainingSettings:
    return TrainingSettings(
        port=0,
        database_url=database_url,
        redis_url=events_url,
        object_dir=tmp_path / "training",
        # Nothing listens there: the datasets' volumes are in the cache already, and audit
        # events go to the spool.
        ingest_target="127.0.0.1:9",
        audit_target="127.0.0.1:9",
        poll_seconds=0.2,
        cancel_grace_seconds=2.0,
        gpus=0,
    )


@pytest.fixture
async def dataset(pool: asyncpg.Pool, settings: TrainingSettings) -> datasets.Dataset:
    items, pseudonyms = series_table(12, settings.cache)
    return await datasets.create(
        pool,
        probe_of(pseudonyms),
        dataset_id="ct-or-mr",
        task=Task.CLASSIFICATION,
        class_names=CLASSES,
        items=items,
        fractions=(0.6, 0.4, 0.0),
        split_seed="tests",
        creator="max",
    )


@pytest.fixture
async def segmentation_dataset(pool: asyncpg.Pool, settings: TrainingSettings) -> datasets.Dataset:
    items, pseudonyms, volumes = segmentation_table(6, settings.cache)
    return await datasets.create(
        pool,
        probe_of(pseudonyms, volumes),
        dataset_id="bright",
        task=Task.SEGMENTATION,
        class_names=SEGMENTS,
        items=items,
        fractions=(0.6, 0.4, 0.0),
        split_seed="tests",
        creator="max",
    )
