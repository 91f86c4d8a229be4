"""The audit log in PostgreSQL: validating and appending events, their Merkle tree, reading.

Appends are serialised by a transaction-scoped advisory lock, so log indexes are dense
and in commit order and the tree grows one batch at a time. Each appended event gets
its canonical bytes and leaf hash, and the batch adds every perfect subtree it completes
(`merkle.parents_of_new_leaves`), so any root or proof later needs O(log n) rows. An
event id already in the log keeps the index it has and appends nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg_audit import merkle
from medimg_core import timestamps
from medimg_core.errors import FailedPrecondition, InvalidArgument

MAX_BATCH = 1000
#: Longest text field of an event, and most roles: events name things, they carry no data.
MAX_FIELD_CHARS = 1024
MAX_ROLES = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 9162: the hash of an empty tree
_APPEND_LOCK = 0x61756469740A  # "audit": one writer at a time appends

_COLUMNS = (
    "log_index, event_id, event_time, record_time, actor_workload, actor_user, actor_roles, "
    "action, outcome, resource, patient_pseudonym, service, method, trace_id, "
    "break_glass_reason, canonical, leaf_hash"
)
_EVENT_COLUMNS = [
    "log_index", "event_id", "event_time", "record_time", "reporter", "actor_workload",
    "actor_user", "actor_roles", "action", "outcome", "resource", "patient_pseudonym",
    "service", "method", "trace_id", "break_glass_reason", "canonical", "leaf_hash",
]  # fmt: skip


@dataclass(frozen=True)
class Filters:
    """Which events a listing or an export wants; empty fields match everything."""

    actor_workload: str = ""
    actor_user: str = ""
    patient_pseudonym: str = ""
    resource: str = ""
    action: int = 0
    outcome: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None


#: The filters that match every event.
ALL = Filters()


_ACTIONS = frozenset(pb.Action.values()) - {pb.ACTION_UNSPECIFIED}
_OUTCOMES = frozenset(pb.Outcome.values()) - {pb.OUTCOME_UNSPECIFIED}
_ACTION_NAMES = {value: pb.Action.Name(value) for value in _ACTIONS}
_OUTCOME_NAMES = {value: pb.Outcome.Name(value) for value in _OUTCOMES}
_string = json.encoder.encode_basestring  # the C escaper, as json.dumps(ensure_ascii=False)


def validate(events: Sequence[pb.AuditEvent], reporter: str) -> list[uuid.UUID]:
    """Refuses a batch with any bad event, naming the first one (nothing is appended).

    Returns the parsed event ids."""
    if not events:
        raise InvalidArgument("EMPTY_BATCH", "AppendEvents needs at least one event")
    if len(events) > MAX_BATCH:
        raise InvalidArgument("BATCH_TOO_LARGE", f"at most {MAX_BATCH} events per call")
    ids = []
    for index, event in enumerate(events):
        try:
            ids.append(uuid.UUID(event.event_id))
        except ValueError:
            raise InvalidArgument(
                "INVALID_EVENT_ID", f"events[{index}]: event_id must be a UUID", index=index
            ) from None
        problem = _problem(event, reporter)
        if problem:
            reason, message = problem
            raise InvalidArgument(reason, f"events[{index}]: {message}", index=index)
    return ids


def _problem(event: pb.AuditEvent, reporter: str) -> tuple[str, str] | None:
    if not event.HasField("event_time"):
        return "MISSING_EVENT_TIME", "event_time is required"
    if not event.actor.workload:
        return "MISSING_ACTOR", "actor.workload is required"
    if event.action not in _ACTIONS:
        return "INVALID_ACTION", "action must be set to a known value"
    if event.outcome not in _OUTCOMES:
        return "INVALID_OUTCOME", "outcome must be set to a known value"
    if event.service != reporter:
        return "SERVICE_MISMATCH", f"a workload may only report its own events ({reporter!r})"
    actor = event.actor
    longest = max(
        len(event.resource), len(event.patient_pseudonym), len(event.service), len(event.method),
        len(event.trace_id), len(event.break_glass_reason), len(actor.workload), len(actor.user),
        *map(len, actor.roles),
    )  # fmt: skip
    if longest > MAX_FIELD_CHARS or len(actor.roles) > MAX_ROLES:
        return "EVENT_TOO_LARGE", f"fields are limited to {MAX_FIELD_CHARS} characters"
    return None


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def canonical(
    event: pb.AuditEvent, *, log_index: int, event_id: uuid.UUID, event_time: str, record_time: str
) -> bytes:
    """The bytes the event's leaf hash covers: UTF-8 JSON, keys sorted, no spaces.

    Times are RFC 3339 in UTC with microseconds (`_rfc3339`), as PostgreSQL keeps them;
    enums by name. Written out by hand in key order because it runs once per appended
    event; a test checks it against json.dumps(sort_keys=True).
    """
    actor = event.actor
    roles = ",".join(_string(role) for role in sorted(actor.roles))
    return (
        f'{{"action":"{_ACTION_NAMES[event.action]}",'
        f'"actor":{{"roles":[{roles}],"user":{_string(actor.user)},'
        f'"workload":{_string(actor.workload)}}},'
        f'"break_glass_reason":{_string(event.break_glass_reason)},'
        f'"event_id":"{event_id}","event_time":"{event_time}","log_index":{log_index},'
        f'"method":{_string(event.method)},"outcome":"{_OUTCOME_NAMES[event.outcome]}",'
        f'"patient_pseudonym":{_string(event.patient_pseudonym)},'
        f'"record_time":"{record_time}","resource":{_string(event.resource)},'
        f'"service":{_string(event.service)},"trace_id":{_string(event.trace_id)}}}'
    ).encode()


async def append(pool: asyncpg.Pool, events: Sequence[pb.AuditEvent], reporter: str) -> list[int]:
    """Appends the events in order; returns each one's log index.

    The per-event work (validation, canonical bytes, hashes) runs in a thread, so a large
    batch does not hold up the event loop.
    """
    ids = await asyncio.to_thread(validate, events, reporter)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _APPEND_LOCK)
        known = {
            row["event_id"]: row["log_index"]
            for row in await conn.fetch(
                "SELECT event_id, log_index FROM audit_events WHERE event_id = ANY($1::uuid[])",
                ids,
            )
        }
        size = await _size(conn)
        frontier = await nodes(conn, merkle.range_nodes(0, size))
        batch = await asyncio.to_thread(
            _new_rows, events, ids, known, size, frontier=frontier, reporter=reporter
        )
        if batch.rows:
            await conn.copy_records_to_table(
                "audit_events", records=batch.rows, columns=_EVENT_COLUMNS
            )
            await conn.copy_records_to_table(
                "tree_nodes",
                records=[(level, idx, h) for (level, idx), h in batch.nodes.items() if level > 0],
                columns=["level", "idx", "hash"],
            )
    return batch.indexes


@dataclass(frozen=True)
class _Batch:
    indexes: list[int]
    rows: list[tuple[object, ...]]
    nodes: dict[merkle.Node, bytes]


def _new_rows(
    events: Sequence[pb.AuditEvent],
    ids: Sequence[uuid.UUID],
    known: dict[uuid.UUID, int],
    size: int,
    *,
    frontier: dict[merkle.Node, bytes],
    reporter: str,
) -> _Batch:
    """The rows and tree nodes of the events not yet in a log of `size` events."""
    record = datetime.now(UTC)
    record_time = _rfc3339(record)
    rows: list[tuple[object, ...]] = []
    leaves: list[bytes] = []
    indexes = []
    for event_id, event in zip(ids, events, strict=True):
        if event_id not in known:
            index = known[event_id] = size + len(rows)
            event_time = event.event_time.ToDatetime(tzinfo=UTC)
            data = canonical(
                event,
                log_index=index,
                event_id=event_id,
                event_time=_rfc3339(event_time),
                record_time=record_time,
            )
            leaves.append(merkle.leaf_hash(data))
            rows.append(
                (
                    index,
                    event_id,
                    event_time,
                    record,
                    reporter,
                    event.actor.workload,
                    event.actor.user,
                    sorted(event.actor.roles),
                    event.action,
                    event.outcome,
                    event.resource,
                    event.patient_pseudonym,
                    event.service,
                    event.method,
                    event.trace_id,
                    event.break_glass_reason,
                    data,
                    leaves[-1],
                )
            )
        indexes.append(known[event_id])
    return _Batch(indexes, rows, merkle.parents_of_new_leaves(size, leaves, frontier))


async def _size(conn: asyncpg.Connection) -> int:
    size: int = await conn.fetchval("SELECT coalesce(max(log_index) + 1, 0) FROM audit_events")
    return size


async def tree_size(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        return await _size(conn)


async def nodes(
    conn: asyncpg.Connection | asyncpg.Pool, wanted: Iterable[merkle.Node]
) -> dict[merkle.Node, bytes]:
    """The stored perfect-subtree hashes of `wanted`, in one query.

    Level 0 (the leaves) is read from the events themselves, higher levels from tree_nodes.
    """
    leaves: list[merkle.Node] = []
    higher: list[merkle.Node] = []
    for level, idx in wanted:
        (leaves if level == 0 else higher).append((level, idx))
    rows = await conn.fetch(
        "SELECT 0::smallint AS level, log_index AS idx, leaf_hash AS hash FROM audit_events "
        "WHERE log_index = ANY($1::bigint[]) "
        "UNION ALL "
        "SELECT n.level, n.idx, n.hash FROM tree_nodes n "
        "JOIN unnest($2::smallint[], $3::bigint[]) AS w(level, idx) USING (level, idx)",
        [idx for _, idx in leaves],
        [level for level, _ in higher],
        [idx for _, idx in higher],
    )
    return {(row["level"], row["idx"]): bytes(row["hash"]) for row in rows}


async def _hashes(pool: asyncpg.Pool, ranges: Sequence[merkle.Range]) -> list[bytes]:
    wanted = merkle.needed(ranges)
    found = await nodes(pool, wanted)
    if len(found) < len(wanted):
        missing = min(wanted - found.keys())
        raise FailedPrecondition(
            "TREE_INCOMPLETE", f"the log's tree lacks node {missing}: it was damaged"
        )
    return merkle.fold(ranges, found)


async def root(pool: asyncpg.Pool, size: int) -> bytes:
    """The Merkle tree hash of the first `size` events."""
    return EMPTY_ROOT if size == 0 else (await _hashes(pool, [(0, size)]))[0]


async def inclusion_proof(pool: asyncpg.Pool, index: int, size: int) -> list[bytes]:
    await _check_size(pool, size)
    if not 0 <= index < size:
        raise InvalidArgument(
            "LEAF_NOT_IN_TREE", f"event {index} is not in the tree of size {size}", size=size
        )
    return await _hashes(pool, merkle.inclusion_ranges(index, size))


async def consistency_proof(pool: asyncpg.Pool, first: int, second: int) -> list[bytes]:
    await _check_size(pool, second)
    if not 0 < first <= second:
        raise InvalidArgument(
            "INVALID_TREE_SIZES", "consistency needs 0 < first_size <= second_size"
        )
    return await _hashes(pool, merkle.consistency_ranges(first, second))


async def _check_size(pool: asyncpg.Pool, size: int) -> None:
    current = await tree_size(pool)
    if not 0 < size <= current:
        raise InvalidArgument(
            "INVALID_TREE_SIZE", f"tree_size must be between 1 and {current}", size=size
        )


async def list_events(
    pool: asyncpg.Pool, filters: Filters = ALL, *, after: int | None, limit: int
) -> tuple[list[pb.AuditEvent], int | None]:
    """A page of matching events in log order after `after`; and the last index if more follow."""
    where, args = _where(filters)
    args += [-1 if after is None else after, limit + 1]
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM audit_events WHERE {where} AND log_index > ${len(args) - 1} "
        f"ORDER BY log_index LIMIT ${len(args)}",
        *args,
    )
    events = [_event(row) for row in rows[:limit]]
    more = len(rows) > limit
    return events, (events[-1].log_index if more else None)


def _where(filters: Filters) -> tuple[str, list[object]]:
    clauses: list[str] = ["true"]
    args: list[object] = []
    for column in ("actor_workload", "actor_user", "patient_pseudonym"):
        value = getattr(filters, column)
        if value:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    if filters.resource:
        # The resource itself, or anything under it: `studies/1` matches `studies/1/series/2`.
        base = filters.resource.rstrip("/")
        args += [base, _like_prefix(base + "/")]
        clauses.append(f"(resource = ${len(args) - 1} OR resource LIKE ${len(args)})")
    for column in ("action", "outcome"):
        value = getattr(filters, column)
        if value:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    if filters.start_time is not None:
        args.append(filters.start_time)
        clauses.append(f"event_time >= ${len(args)}")
    if filters.end_time is not None:
        args.append(filters.end_time)
        clauses.append(f"event_time < ${len(args)}")
    return " AND ".join(clauses), args


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


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
        canonical=bytes(row["canonical"]),
        leaf_hash=bytes(row["leaf_hash"]),
    )
