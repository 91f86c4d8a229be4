"""The audit log: validating, appending and reading events in PostgreSQL.

Appends are serialised by a transaction-scoped advisory lock so log indexes are
dense and in commit order; an event id already in the log keeps the index it has.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC

import asyncpg

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg_core import timestamps
from medimg_core.errors import InvalidArgument

MAX_BATCH = 1000
_APPEND_LOCK = 0x61756469740A  # "audit": one writer at a time appends

_COLUMNS = (
    "log_index, event_id, event_time, record_time, actor_workload, actor_user, actor_roles, "
    "action, outcome, resource, patient_pseudonym, service, method, trace_id, break_glass_reason"
)


def validate(events: Sequence[pb.AuditEvent], reporter: str) -> None:
    """Refuses a batch with any bad event, naming the first one (nothing is appended)."""
    if not events:
        raise InvalidArgument("EMPTY_BATCH", "AppendEvents needs at least one event")
    if len(events) > MAX_BATCH:
        raise InvalidArgument("BATCH_TOO_LARGE", f"at most {MAX_BATCH} events per call")
    for index, event in enumerate(events):
        problem = _problem(event, reporter)
        if problem:
            reason, message = problem
            raise InvalidArgument(reason, f"events[{index}]: {message}", index=index)


def _problem(event: pb.AuditEvent, reporter: str) -> tuple[str, str] | None:
    try:
        uuid.UUID(event.event_id)
    except ValueError:
        return "INVALID_EVENT_ID", "event_id must be a UUID"
    if not event.HasField("event_time"):
        return "MISSING_EVENT_TIME", "event_time is required"
    if not event.actor.workload:
        return "MISSING_ACTOR", "actor.workload is required"
    if event.action == pb.ACTION_UNSPECIFIED or event.action not in pb.Action.values():
        return "INVALID_ACTION", "action must be set to a known value"
    if event.outcome == pb.OUTCOME_UNSPECIFIED or event.outcome not in pb.Outcome.values():
        return "INVALID_OUTCOME", "outcome must be set to a known value"
    if event.service != reporter:
        return (
            "SERVICE_MISMATCH",
            f"a workload may only report its own events (service={reporter!r})",
        )
    return None


async def append(pool: asyncpg.Pool, events: Sequence[pb.AuditEvent], reporter: str) -> list[int]:
    """Appends the events in order; returns each one's log index."""
    validate(events, reporter)
    ids = [uuid.UUID(e.event_id) for e in events]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _APPEND_LOCK)
        known = {
            row["event_id"]: row["log_index"]
            for row in await conn.fetch(
                "SELECT event_id, log_index FROM audit_events WHERE event_id = ANY($1::uuid[])", ids
            )
        }
        next_index = await conn.fetchval("SELECT coalesce(max(log_index) + 1, 0) FROM audit_events")
        indexes, rows = [], []
        for event_id, event in zip(ids, events, strict=True):
            if event_id not in known:
                known[event_id] = next_index
                rows.append(_row(next_index, event_id, event, reporter))
                next_index += 1
            indexes.append(known[event_id])
        await conn.executemany(
            "INSERT INTO audit_events (log_index, event_id, event_time, reporter, actor_workload, "
            "actor_user, actor_roles, action, outcome, resource, patient_pseudonym, service, "
            "method, trace_id, break_glass_reason) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            rows,
        )
    return indexes


def _row(
    index: int, event_id: uuid.UUID, event: pb.AuditEvent, reporter: str
) -> tuple[object, ...]:
    return (
        index,
        event_id,
        event.event_time.ToDatetime(tzinfo=UTC),
        reporter,
        event.actor.workload,
        event.actor.user,
        list(event.actor.roles),
        event.action,
        event.outcome,
        event.resource,
        event.patient_pseudonym,
        event.service,
        event.method,
        event.trace_id,
        event.break_glass_reason,
    )


async def list_events(
    pool: asyncpg.Pool, *, after: int | None, limit: int
) -> tuple[list[pb.AuditEvent], int | None]:
    """A page of events in log order after `after`; and the last index if more follow."""
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM audit_events WHERE log_index > $1 ORDER BY log_index LIMIT $2",
        -1 if after is None else after,
        limit + 1,
    )
    events = [_event(row) for row in rows[:limit]]
    more = len(rows) > limit
    return events, (events[-1].log_index if more else None)


def _event(row: asyncpg.Record) -> pb.AuditEvent:
    return pb.AuditEvent(
        name=f"auditEvents/{row['log_index']}",
        event_id=str(row["event_id"]),
        event_time=timestamps.to_proto(row["event_time"]),
        record_time=timestamps.to_proto(row["record_time"]),
        actor=pb.Actor(
            workload=row["actor_workload"], user=row["actor_user"], roles=row["actor_roles"]
        ),
        action=row["action"],
        outcome=row["outcome"],
        resource=row["resource"],
        patient_pseudonym=row["patient_pseudonym"],
        service=row["service"],
        method=row["method"],
        trace_id=row["trace_id"],
        break_glass_reason=row["break_glass_reason"],
        log_index=row["log_index"],
    )
