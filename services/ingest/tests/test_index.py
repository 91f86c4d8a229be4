"""The study / series / instance index on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from importlib.resources import files

import asyncpg
import pytest

from medimg_core import db
from medimg_ingest import index
from medimg_ingest.dicom import InstanceHeader


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.connect(database_url, max_size=6)
    await db.migrate(pool, files("medimg_ingest.migrations"))
    yield pool
    await pool.close()


NEW = index.Placement.NEW


def stored(study: str, series: str, sop: str, modality: str = "CT") -> index.StoredObject:
    header = InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop,
        study_uid=study,
        series_uid=series,
        modality=modality,
        transfer_syntax="1.2.840.10008.1.2.1",
    )
    return index.StoredObject(header, 10, "0" * 64, f"instances/00/{sop}.dcm")


async def test_add_instances_tells_new_from_known(pool: asyncpg.Pool) -> None:
    first = [stored("1.1", "1.1.1", "1.1.1.1"), stored("1.1", "1.1.2", "1.1.2.1", "MR")]
    assert await index.add_instances(pool, first) == [NEW, NEW]
    again = [stored("1.1", "1.1.1", "1.1.1.1"), stored("1.1", "1.1.1", "1.1.1.2")]
    assert await index.add_instances(pool, again) == [index.Placement.DUPLICATE, NEW]
    study = await index.get_study(pool, "1.1")
    assert study is not None
    assert (study.series_count, study.instance_count) == (2, 3)
    assert study.modalities == ["CT", "MR"]
    assert study.update_time >= study.create_time
    assert await index.get_study(pool, "9.9") is None


async def test_list_studies_newest_first_in_pages(pool: asyncpg.Pool) -> None:
    for n in range(5):
        await index.add_instances(pool, [stored(f"2.{n}", f"2.{n}.1", f"2.{n}.1.1")])
    page, more = await index.list_studies(pool, after=None, limit=2)
    assert [s.study_uid for s in page] == ["2.4", "2.3"]
    assert more
    last = page[-1]
    page, more = await index.list_studies(pool, after=(last.update_time, last.study_uid), limit=2)
    assert [s.study_uid for s in page] == ["2.2", "2.1"]
    assert more
    last = page[-1]
    page, more = await index.list_studies(pool, after=(last.update_time, last.study_uid), limit=2)
    assert [s.study_uid for s in page] == ["2.0"]
    assert not more


async def test_list_studies_breaks_ties_by_uid(pool: asyncpg.Pool) -> None:
    # One transaction: every study gets the same now(), so only the uid orders them.
    await index.add_instances(pool, [stored(f"3.{n}", f"3.{n}.1", f"3.{n}.1.1") for n in range(4)])
    seen = []
    after = None
    while True:
        page, more = await index.list_studies(pool, after=after, limit=1)
        seen += [s.study_uid for s in page]
        if not more:
            break
        after = (page[-1].update_time, page[-1].study_uid)
    assert seen == ["3.3", "3.2", "3.1", "3.0"]
    old = page[-1].update_time - timedelta(days=1)
    assert await index.list_studies(pool, after=(old, "z"), limit=10) == ([], False)


async def test_concurrent_batches_in_opposite_orders_do_not_deadlock(pool: asyncpg.Pool) -> None:
    for attempt in range(10):
        a = stored(f"4.{attempt}.1", f"4.{attempt}.1.1", f"4.{attempt}.1.1.1")
        b = stored(f"4.{attempt}.2", f"4.{attempt}.2.1", f"4.{attempt}.2.1.1")
        first, second = await asyncio.gather(
            index.add_instances(pool, [a, b]), index.add_instances(pool, [b, a])
        )
        placements = [p.value for p in (*first, *second)]
        assert sorted(placements) == ["duplicate", "duplicate", "new", "new"]


async def test_a_batch_is_placed_as_if_its_instances_came_one_by_one(pool: asyncpg.Pool) -> None:
    first = stored("5.1", "5.1.1", "5.1.1.1")
    again = stored("5.1", "5.1.1", "5.1.1.1")
    changed = dataclasses.replace(stored("5.1", "5.1.1", "5.1.1.1"), sha256="1" * 64)
    neighbour = stored("5.1", "5.1.1", "5.1.1.2")
    held = dataclasses.replace(stored("5.1", "5.1.2", "5.1.2.1"), quarantine="BURNED_IN")
    batch = [neighbour, first, again, changed, held]
    assert await index.add_instances(pool, batch) == [
        NEW, NEW, index.Placement.DUPLICATE, index.Placement.CONFLICT, NEW
    ]  # fmt: skip
    study = await index.get_study(pool, "5.1")
    assert study is not None
    assert (study.series_count, study.instance_count) == (1, 2)  # nothing of the held one
    assert await pool.fetchval("SELECT count(*) FROM quarantined_instances") == 1
    assert await pool.fetchval(
        "SELECT sha256 FROM instances WHERE sop_instance_uid = '5.1.1.1'"
    ) == ("0" * 64)
    assert await index.add_instances(pool, [held, changed]) == [
        index.Placement.DUPLICATE, index.Placement.CONFLICT
    ]  # fmt: skip
