"""The study / series / instance index in PostgreSQL."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import asyncpg

from medimg_ingest.dicom import InstanceHeader

T = TypeVar("T")


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
    """Indexes the instances (or quarantines them) in one transaction; where each one went.

    A statement per table, whatever the number of instances (a group commit may bring
    hundreds). Within the batch the first instance of a study, series or patient (in the
    order below) gives its row, and a SOP Instance UID that comes twice is new once, then a
    duplicate or a conflict, as if the instances had been indexed one after the other."""
    # Rows are locked in one global order (study, series, instance within each table, and
    # tables always in the same order), so two uploads that share studies cannot deadlock
    # whatever order their files came in.
    async with pool.acquire() as conn, conn.transaction():
        return await add_instances_in(conn, objects)


async def add_instances_in(
    conn: asyncpg.Connection, objects: Sequence[StoredObject]
) -> list[Placement]:
    """add_instances, in the caller's transaction."""
    order = sorted(
        range(len(objects)),
        key=lambda i: (
            objects[i].header.study_uid,
            objects[i].header.series_uid,
            objects[i].header.sop_instance_uid,
        ),
    )
    ordered = [objects[i] for i in order]
    indexed = [obj for obj in ordered if not obj.quarantine]
    held = [obj for obj in ordered if obj.quarantine]
    await _add_identities(conn, ordered)
    if indexed:
        await _add_studies(conn, indexed)
        await _add_series(conn, indexed)
    placed = dict(
        zip(
            map(id, indexed + held),
            await _add_rows(conn, "instances", indexed)
            + await _already_released(
                conn, held, await _add_rows(conn, "quarantined_instances", held)
            ),
            strict=True,
        )
    )
    return [placed[id(obj)] for obj in objects]


async def _already_released(
    conn: asyncpg.Connection, held: Sequence[StoredObject], placements: list[Placement]
) -> list[Placement]:
    """The placements of held instances, with those already in the index (a reviewer
    released them earlier) taken back out of quarantine: a duplicate, or a conflict.

    Checked after the insert, in a statement of its own: its snapshot sees a release that
    committed while the insert waited on the row the release deleted."""
    new = [obj.header.sop_instance_uid for obj, p in zip(held, placements, strict=True)
           if p is Placement.NEW]  # fmt: skip
    if not new:
        return placements
    released = {
        r["sop_instance_uid"]: r["sha256"]
        for r in await conn.fetch(
            "SELECT sop_instance_uid, sha256 FROM instances WHERE sop_instance_uid = ANY($1)", new
        )
    }
    if not released:
        return placements
    await conn.execute(
        "DELETE FROM quarantined_instances WHERE sop_instance_uid = ANY($1)", list(released)
    )
    return [
        p if p is not Placement.NEW or obj.header.sop_instance_uid not in released
        else Placement.DUPLICATE if released[obj.header.sop_instance_uid] == obj.sha256
        else Placement.CONFLICT
        for obj, p in zip(held, placements, strict=True)
    ]  # fmt: skip


async def _add_identities(conn: asyncpg.Connection, objects: Sequence[StoredObject]) -> None:
    first: dict[str, tuple[str, bytes]] = {}
    for obj in objects:
        if obj.identity is not None:
            first.setdefault(obj.header.patient_id, obj.identity)
    if first:
        pseudonyms = sorted(first)
        await conn.execute(
            "INSERT INTO identities (patient_pseudonym, key_id, sealed) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) "
            "ON CONFLICT (patient_pseudonym) DO NOTHING",
            pseudonyms,
            [first[p][0] for p in pseudonyms],
            [first[p][1] for p in pseudonyms],
        )


async def _add_studies(conn: asyncpg.Connection, objects: Sequence[StoredObject]) -> None:
    studies = _first_of_each([obj.header for obj in objects], lambda h: h.study_uid)
    await conn.execute(
        "INSERT INTO studies (study_uid, patient_pseudonym, study_date, study_time, "
        "accession_number, study_id, study_description) SELECT * FROM unnest($1::text[], "
        "$2::text[], $3::date[], $4::text[], $5::text[], $6::text[], $7::text[]) "
        "ON CONFLICT (study_uid) DO UPDATE SET update_time = now()",
        *_columns(
            studies,
            lambda h: (
                h.study_uid, h.patient_id, h.study_date, h.study_time, h.accession_number,
                h.study_id, h.study_description,
            ),
        ),
    )  # fmt: skip


async def _add_series(conn: asyncpg.Connection, objects: Sequence[StoredObject]) -> None:
    series = _first_of_each([obj.header for obj in objects], lambda h: h.series_uid)
    await conn.execute(
        "INSERT INTO series (series_uid, study_uid, modality, series_number, "
        "series_description, body_part_examined) SELECT * FROM unnest($1::text[], $2::text[], "
        "$3::text[], $4::integer[], $5::text[], $6::text[]) ON CONFLICT (series_uid) DO NOTHING",
        *_columns(
            series,
            lambda h: (
                h.series_uid, h.study_uid, h.modality, h.series_number, h.series_description,
                h.body_part_examined,
            ),
        ),
    )  # fmt: skip


_INSERT_ROWS = {
    "instances": (
        "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, "
        "transfer_syntax, size_bytes, sha256, object_key, instance_number, rows, columns, "
        "number_of_frames) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], "
        "$4::text[], $5::text[], $6::bigint[], $7::text[], $8::text[], $9::integer[], "
        "$10::integer[], $11::integer[], $12::integer[]) "
        "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING sop_instance_uid",
        lambda o: (
            o.header.sop_instance_uid, o.header.series_uid, o.header.study_uid,
            o.header.sop_class_uid, o.header.transfer_syntax, o.size_bytes, o.sha256,
            o.object_key, o.header.instance_number, o.header.rows, o.header.columns,
            o.header.number_of_frames,
        ),
    ),
    "quarantined_instances": (
        "INSERT INTO quarantined_instances (sop_instance_uid, series_uid, study_uid, "
        "sop_class_uid, patient_pseudonym, reason, size_bytes, sha256, object_key) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
        "$6::text[], $7::bigint[], $8::text[], $9::text[]) "
        "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING sop_instance_uid",
        lambda o: (
            o.header.sop_instance_uid, o.header.series_uid, o.header.study_uid,
            o.header.sop_class_uid, o.header.patient_id, o.quarantine, o.size_bytes, o.sha256,
            o.object_key,
        ),
    ),
}  # fmt: skip


async def _add_rows(
    conn: asyncpg.Connection, table: str, objects: Sequence[StoredObject]
) -> list[Placement]:
    """Inserts the instances' rows into `table` (instances or quarantined_instances); where
    each one went."""
    if not objects:
        return []
    insert, row = _INSERT_ROWS[table]
    firsts = _first_of_each(range(len(objects)), lambda i: objects[i].header.sop_instance_uid)
    rows = [objects[i] for i in firsts]
    inserted = {r["sop_instance_uid"] for r in await conn.fetch(insert, *_columns(rows, row))}
    # New: the first of the batch's objects with an inserted row, not a later copy.
    new = {i for i in firsts if objects[i].header.sop_instance_uid in inserted}
    others = [obj.header.sop_instance_uid for i, obj in enumerate(objects) if i not in new]
    known: dict[str, str] = {}
    if others:
        query = f"SELECT sop_instance_uid, sha256 FROM {table} WHERE sop_instance_uid = ANY($1)"
        known = {r["sop_instance_uid"]: r["sha256"] for r in await conn.fetch(query, others)}
    placements = []
    for i, obj in enumerate(objects):
        if i in new:
            placements.append(Placement.NEW)
        elif known.get(obj.header.sop_instance_uid) == obj.sha256:
            placements.append(Placement.DUPLICATE)
        else:
            placements.append(Placement.CONFLICT)
    return placements


def _first_of_each(items: Iterable[T], key: Callable[[T], str]) -> list[T]:
    """The first item of each key, in order."""
    first: dict[str, T] = {}
    for item in items:
        first.setdefault(key(item), item)
    return list(first.values())


def _columns(items: Sequence[T], row: Callable[[T], tuple[object, ...]]) -> list[list[object]]:
    """The rows of `items` as one list per column (for unnest)."""
    return [list(column) for column in zip(*map(row, items), strict=True)] if items else []


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
