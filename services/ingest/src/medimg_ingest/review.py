"""The review of quarantined instances: what a person decides about an instance whose pixels
may show identifying text (burned-in annotation) before anything serves it.

A quarantined instance is stored de-identified but indexed where no reader looks
(`quarantined_instances`). An admin lists them, looks at each (the servicer renders it),
and then releases it (its row moves into the index in one transaction: it is then served
and announced like any other) or rejects it (its row goes; the orphan sweep removes the
object once no row points at it). The servicer audits every step with the reviewer's
reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from medimg_core.errors import FailedPrecondition, InvalidArgument, NotFound
from medimg_ingest import dicom, index

PREFIX = "quarantinedInstances/"


@dataclass(frozen=True)
class Quarantined:
    """One quarantined instance, as its row holds it."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    patient_pseudonym: str
    reason: str
    size_bytes: int
    sha256: str
    object_key: str
    create_time: datetime

    @property
    def name(self) -> str:
        return PREFIX + self.sop_instance_uid

    @property
    def instance(self) -> str:
        return (
            f"studies/{self.study_uid}/series/{self.series_uid}/instances/{self.sop_instance_uid}"
        )


_COLUMNS = (
    "sop_instance_uid, series_uid, study_uid, sop_class_uid, patient_pseudonym, reason, "
    "size_bytes, sha256, object_key, create_time"
)


def parse_name(name: str) -> str:
    """The SOP Instance UID of `quarantinedInstances/{uid}`."""
    uid = name.removeprefix(PREFIX)
    if uid == name or not uid or "/" in uid:
        raise InvalidArgument(
            "INVALID_NAME", "name must look like quarantinedInstances/{sop_instance_uid}"
        )
    return uid


async def list_quarantined(
    pool: asyncpg.Pool, *, after: tuple[datetime, str] | None, limit: int
) -> tuple[list[Quarantined], bool]:
    """A page of quarantined instances, oldest first, after `after` (time, uid); and
    whether more follow."""
    if after is None:
        rows = await pool.fetch(
            f"SELECT {_COLUMNS} FROM quarantined_instances "
            "ORDER BY create_time, sop_instance_uid LIMIT $1",
            limit + 1,
        )
    else:
        rows = await pool.fetch(
            f"SELECT {_COLUMNS} FROM quarantined_instances "
            "WHERE (create_time, sop_instance_uid) > ($1, $2) "
            "ORDER BY create_time, sop_instance_uid LIMIT $3",
            *after,
            limit + 1,
        )
    found = [Quarantined(**dict(row)) for row in rows]
    return found[:limit], len(found) > limit


async def get(pool: asyncpg.Pool, uid: str) -> Quarantined:
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM quarantined_instances WHERE sop_instance_uid = $1", uid
    )
    if row is None:
        raise NotFound("QUARANTINED_INSTANCE_NOT_FOUND", f"{PREFIX}{uid} is not in quarantine")
    return Quarantined(**dict(row))


async def release(pool: asyncpg.Pool, held: Quarantined, header: dicom.InstanceHeader) -> None:
    """Moves the instance from quarantine into the index, in one transaction. `header` is
    the stored object's, read back (and checked against its hash) by the caller."""
    async with pool.acquire() as conn, conn.transaction():
        moved = await conn.fetchval(
            "DELETE FROM quarantined_instances WHERE sop_instance_uid = $1 AND sha256 = $2 "
            "RETURNING sop_instance_uid",
            held.sop_instance_uid,
            held.sha256,
        )
        if moved is None:  # another reviewer decided meanwhile
            raise NotFound(
                "QUARANTINED_INSTANCE_NOT_FOUND", f"{held.name} is no longer in quarantine"
            )
        stored = index.StoredObject(header, held.size_bytes, held.sha256, held.object_key)
        (placement,) = await index.add_instances_in(conn, [stored])
        if placement is index.Placement.CONFLICT:  # rolls the move back
            raise FailedPrecondition(
                "INSTANCE_CONFLICT",
                "the index already holds an instance with this SOP Instance UID and other "
                "content: reject this one",
            )


async def reject(pool: asyncpg.Pool, uid: str) -> Quarantined:
    """Removes the instance's quarantine row; what it was."""
    row = await pool.fetchrow(
        f"DELETE FROM quarantined_instances WHERE sop_instance_uid = $1 RETURNING {_COLUMNS}",
        uid,
    )
    if row is None:
        raise NotFound("QUARANTINED_INSTANCE_NOT_FOUND", f"{PREFIX}{uid} is not in quarantine")
    return Quarantined(**dict(row))
