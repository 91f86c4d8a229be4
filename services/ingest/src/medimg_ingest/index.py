"""The study / series / instance index in PostgreSQL."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from medimg_ingest.dicom import InstanceHeader


@dataclass(frozen=True)
class StoredObject:
    """A durable, de-identified object and what the index is to keep of it."""

    header: InstanceHeader  # of the de-identified instance: its patient_id is the pseudonym
    size_bytes: int
    sha256: str
    object_key: str
    #: Why the instance is held back from every query, or "" when it is not.
    quarantine: str = ""
    #: (key id, sealed Patient ID) of the pseudonym's patient, kept once per pseudonym.
    identity: tuple[str, bytes] | None = None


class Placement(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"  # the same SOP Instance UID with the same content
    CONFLICT = "conflict"  # the same SOP Instance UID with other content: the first stays


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    modalities: list[str]
    series_count: int
    instance_count: int
    create_time: datetime
    update_time: datetime


async def add_instances(pool: asyncpg.Pool, objects: Sequence[StoredObject]) -> list[Placement]:
    """Indexes the instances (or quarantines them) in one transaction; where each one went."""
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
    placements = [Placement.NEW] * len(objects)
    async with pool.acquire() as conn, conn.transaction():
        for i in order:
            obj = objects[i]
            if obj.identity is not None:
                await conn.execute(
                    "INSERT INTO identities (patient_pseudonym, key_id, sealed) "
                    "VALUES ($1, $2, $3) ON CONFLICT (patient_pseudonym) DO NOTHING",
                    obj.header.patient_id,
                    *obj.identity,
                )
            add = _quarantine if obj.quarantine else _index
            placements[i] = await add(conn, obj)
    return placements


async def _index(conn: asyncpg.Connection, obj: StoredObject) -> Placement:
    h = obj.header
    await conn.execute(
        "INSERT INTO studies (study_uid, patient_pseudonym, study_date, study_time, "
        "accession_number, study_id, study_description) VALUES ($1, $2, $3, $4, $5, $6, $7) "
        "ON CONFLICT (study_uid) DO UPDATE SET update_time = now()",
        h.study_uid, h.patient_id, h.study_date, h.study_time, h.accession_number, h.study_id,
        h.study_description,
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO series (series_uid, study_uid, modality, series_number, "
        "series_description, body_part_examined) VALUES ($1, $2, $3, $4, $5, $6) "
        "ON CONFLICT (series_uid) DO NOTHING",
        h.series_uid, h.study_uid, h.modality, h.series_number, h.series_description,
        h.body_part_examined,
    )  # fmt: skip
    inserted = await conn.fetchval(
        "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, "
        "transfer_syntax, size_bytes, sha256, object_key, instance_number, rows, columns, "
        "number_of_frames) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
        "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING true",
        h.sop_instance_uid, h.series_uid, h.study_uid, h.sop_class_uid, h.transfer_syntax,
        obj.size_bytes, obj.sha256, obj.object_key, h.instance_number, h.rows, h.columns,
        h.number_of_frames,
    )  # fmt: skip
    if inserted:
        return Placement.NEW
    known = await conn.fetchval(
        "SELECT sha256 FROM instances WHERE sop_instance_uid = $1", h.sop_instance_uid
    )
    return Placement.DUPLICATE if known == obj.sha256 else Placement.CONFLICT


async def _quarantine(conn: asyncpg.Connection, obj: StoredObject) -> Placement:
    h = obj.header
    inserted = await conn.fetchval(
        "INSERT INTO quarantined_instances (sop_instance_uid, series_uid, study_uid, "
        "sop_class_uid, patient_pseudonym, reason, size_bytes, sha256, object_key) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
        "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING true",
        h.sop_instance_uid, h.series_uid, h.study_uid, h.sop_class_uid, h.patient_id,
        obj.quarantine, obj.size_bytes, obj.sha256, obj.object_key,
    )  # fmt: skip
    if inserted:
        return Placement.NEW
    known = await conn.fetchval(
        "SELECT sha256 FROM quarantined_instances WHERE sop_instance_uid = $1", h.sop_instance_uid
    )
    return Placement.DUPLICATE if known == obj.sha256 else Placement.CONFLICT


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


@dataclass(frozen=True)
class SeriesObjects:
    patient_pseudonym: str
    objects: list[tuple[str, str]]  # (object key, sha256) of each instance


async def series_objects(
    pool: asyncpg.Pool, study_uid: str, series_uid: str
) -> SeriesObjects | None:
    """The stored objects of a series (quarantined instances are not in it)."""
    rows = await pool.fetch(
        "SELECT i.object_key, i.sha256, s.patient_pseudonym FROM instances i "
        "JOIN studies s USING (study_uid) WHERE i.study_uid = $1 AND i.series_uid = $2 "
        "ORDER BY i.sop_instance_uid",
        study_uid,
        series_uid,
    )
    if not rows:
        return None
    return SeriesObjects(
        rows[0]["patient_pseudonym"], [(r["object_key"], r["sha256"]) for r in rows]
    )
