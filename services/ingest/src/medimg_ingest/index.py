"""The study / series / instance index in PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from medimg_ingest.dicom import InstanceHeader


@dataclass(frozen=True)
class StoredObject:
    header: InstanceHeader
    size_bytes: int
    sha256: str
    object_key: str


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    modalities: list[str]
    series_count: int
    instance_count: int
    create_time: datetime
    update_time: datetime


async def add_instances(pool: asyncpg.Pool, objects: Sequence[StoredObject]) -> list[bool]:
    """Indexes the instances in one transaction; True for each one that was new."""
    # Rows are locked in one global order (study, series, instance), so two uploads that
    # share studies cannot deadlock whatever order their files came in.
    order = sorted(
        range(len(objects)),
        key=lambda i: (
            objects[i].header.study_uid,
            objects[i].header.series_uid,
            objects[i].header.sop_instance_uid,
        ),
    )
    created = [False] * len(objects)
    async with pool.acquire() as conn, conn.transaction():
        for i in order:
            obj = objects[i]
            h = obj.header
            await conn.execute(
                "INSERT INTO studies (study_uid) VALUES ($1) "
                "ON CONFLICT (study_uid) DO UPDATE SET update_time = now()",
                h.study_uid,
            )
            await conn.execute(
                "INSERT INTO series (series_uid, study_uid, modality) VALUES ($1, $2, $3) "
                "ON CONFLICT (series_uid) DO NOTHING",
                h.series_uid,
                h.study_uid,
                h.modality,
            )
            inserted = await conn.fetchval(
                "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, "
                "transfer_syntax, size_bytes, sha256, object_key) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING true",
                h.sop_instance_uid,
                h.series_uid,
                h.study_uid,
                h.sop_class_uid,
                h.transfer_syntax,
                obj.size_bytes,
                obj.sha256,
                obj.object_key,
            )
            created[i] = bool(inserted)
    return created


_STUDY_SUMMARY = """
SELECT s.study_uid, s.create_time, s.update_time,
       coalesce(array_agg(DISTINCT se.modality) FILTER (WHERE se.modality IS NOT NULL), '{}')
           AS modalities,
       count(DISTINCT se.series_uid) AS series_count,
       (SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid) AS instance_count
FROM studies s LEFT JOIN series se ON se.study_uid = s.study_uid
"""


def _summary(row: asyncpg.Record) -> StudySummary:
    return StudySummary(
        study_uid=row["study_uid"],
        modalities=sorted(row["modalities"]),
        series_count=row["series_count"],
        instance_count=row["instance_count"],
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


async def list_studies(
    pool: asyncpg.Pool, *, after: tuple[datetime, str] | None, limit: int
) -> tuple[list[StudySummary], bool]:
    """Newest studies first, strictly after `after`; and whether more follow.

    Ordered by when a study was first stored, which never changes, so pages stay stable
    while uploads go on."""
    where = ""
    args: list[object] = [limit + 1]
    if after is not None:
        where = "WHERE (s.create_time, s.study_uid) < ($2, $3)"
        args += [after[0], after[1]]
    rows = await pool.fetch(
        f"{_STUDY_SUMMARY} {where} GROUP BY s.study_uid "
        "ORDER BY s.create_time DESC, s.study_uid DESC LIMIT $1",
        *args,
    )
    return [_summary(r) for r in rows[:limit]], len(rows) > limit


async def get_study(pool: asyncpg.Pool, study_uid: str) -> StudySummary | None:
    row = await pool.fetchrow(
        f"{_STUDY_SUMMARY} WHERE s.study_uid = $1 GROUP BY s.study_uid", study_uid
    )
    return None if row is None else _summary(row)
