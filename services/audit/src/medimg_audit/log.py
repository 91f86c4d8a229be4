"""The audit log in PostgreSQL: validating and appending events, their Merkle tree, reading.

Appends are serialised by a transaction-scoped advisory lock, so log indexes are dense
and in commit order and the tree grows one batch at a time. Each appended event's row
holds its canonical bytes, its leaf hash and the hashes of the perfect subtrees its leaf
completes (`merkle.completed_by`), so any root or proof later reads O(log n) rows by
primary key. An event id already in the log keeps the index it has and appends nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

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
    "subtree_hashes",
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


_ACTION_NAMES = {v: pb.Action.Name(v) for v in pb.Action.values() if v != pb.ACTION_UNSPECIFIED}
_OUTCOME_NAMES = {v: pb.Outcome.Name(v) for v in pb.Outcome.values() if v != pb.OUTCOME_UNSPECIFIED}
_EPOCH = datetime(1970, 1, 1)  # naive, in UTC
#: The range of google.protobuf.Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_FIRST_SECOND, _LAST_SECOND = -62_135_596_800, 253_402_300_799
_string = json.encoder.encode_basestring  # the C escaper, as json.dumps(ensure_ascii=False)


class _Prepared(NamedTuple):
    """One validated event: its row and its canonical bytes, but for what sequencing adds.

    The canonical JSON is `head + log_index + middle + record_time + tail` (keys sorted),
    so everything but the log index and record time is done before the append lock.
    """

    event_id: uuid.UUID
    event_time: datetime
    columns: tuple[object, ...]  # reporter .. break_glass_reason, as _EVENT_COLUMNS
    head: str
    middle: str
    tail: str


def prepare(events: Sequence[pb.AuditEvent], reporter: str) -> list[_Prepared]:
    """Validates a batch and does each event's work that needs no log index.

    Refuses the batch at its first bad event, naming it (nothing is appended)."""
    if not events:
        raise InvalidArgument("EMPTY_BATCH", "AppendEvents needs at least one event")
    if len(events) > MAX_BATCH:
        raise InvalidArgument("BATCH_TOO_LARGE", f"at most {MAX_BATCH} events per call")
    return [_prepare(event, reporter, index) for index, event in enumerate(events)]


def _prepare(event: pb.AuditEvent, reporter: str, index: int) -> _Prepared:
    def refuse(reason: str, message: str) -> InvalidArgument:
        return InvalidArgument(reason, f"events[{index}]: {message}", index=index)

    try:
        event_id = uuid.UUID(event.event_id)
    except ValueError:
        raise refuse("INVALID_EVENT_ID", "event_id must be a UUID") from None
    if not event.HasField("event_time"):
        raise refuse("MISSING_EVENT_TIME", "event_time is required")
    seconds, nanos = event.event_time.seconds, event.event_time.nanos
    if not (_FIRST_SECOND <= seconds <= _LAST_SECOND and 0 <= nanos < 1_000_000_000):
        raise refuse("INVALID_EVENT_TIME", "event_time must be a valid timestamp")
    actor = event.actor
    workload, user, roles = actor.workload, actor.user, sorted(actor.roles)
    if not workload:
        raise refuse("MISSING_ACTOR", "actor.workload is required")
    action, outcome = _ACTION_NAMES.get(event.action), _OUTCOME_NAMES.get(event.outcome)
    if action is None:
        raise refuse("INVALID_ACTION", "action must be set to a known value")
    if outcome is None:
        raise refuse("INVALID_OUTCOME", "outcome must be set to a known value")
    service = event.service
    if service != reporter:
        raise refuse("SERVICE_MISMATCH", f"a workload may only report its own events: {reporter}")
    resource, patient, method = event.resource, event.patient_pseudonym, event.method
    trace_id, reason = event.trace_id, event.break_glass_reason
    texts = (workload, user, resource, patient, service, method, trace_id, reason, *roles)
    if len(roles) > MAX_ROLES or max(map(len, texts)) > MAX_FIELD_CHARS:
        raise refuse("EVENT_TOO_LARGE", f"fields are limited to {MAX_FIELD_CHARS} characters")
    if any("\x00" in text for text in texts):  # PostgreSQL text cannot hold it
        raise refuse("INVALID_TEXT", "fields must not contain NUL characters")
    when = _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
    return _Prepared(
        event_id,
        when.replace(tzinfo=UTC),
        (reporter, workload, user, roles, event.action, event.outcome, resource, patient,
         service, method, trace_id, reason),
        f'{{"action":"{action}","actor":{{"roles":[{",".join(map(_string, roles))}],'
        f'"user":{_string(user)},"workload":{_string(workload)}}},'
        f'"break_glass_reason":{_string(reason)},"event_id":"{event_id}",'
        f'"event_time":"{when.isoformat(timespec="microseconds")}Z","log_index":',
        f',"method":{_string(method)},"outcome":"{outcome}",'
        f'"patient_pseudonym":{_string(patient)},"record_time":"',
        f'","resource":{_string(resource)},"service":{_string(service)},'
        f'"trace_id":{_string(trace_id)}}}',
    )  # fmt: skip


def canonical(prepared: _Prepared, *, log_index: int, record_time: str) -> bytes:
    """The bytes an event's leaf hash covers: UTF-8 JSON, keys sorted, no spaces.

    Times are RFC 3339 in UTC with exactly six fractional digits, as PostgreSQL keeps
    them; enums by name. Written out by hand (in `_prepare`) because it runs once per
    appended event; a test checks it against json.dumps(sort_keys=True).
    """
    return f"{prepared.head}{log_index}{prepared.middle}{record_time}{prepared.tail}".encode()


async def append(pool: asyncpg.Pool, events: Sequence[pb.AuditEvent], reporter: str) -> list[int]:
    """Appends the events in order, in a transaction of their own; returns each one's log
    index. (The service appends through an `Appender`, which shares transactions.)

    The per-event work runs in threads, so a large batch does not hold up the event
    loop, and most of it before the append lock, so concurrent appenders overlap it.
    """
    return await _append(pool, await asyncio.to_thread(prepare, events, reporter))


class Appender:
    """Appends the batches of concurrent callers together (group commit).

    Appends serialise on the log's lock, and each pays a transaction and a durable commit,
    so callers that report one event at a time (every ingested instance is one) would
    queue behind each other's commits. Here a batch waits while the transaction ahead of
    it commits, then commits with every batch that arrived meanwhile: one lock, one
    transaction, one commit for all of them. Under light load a group is one batch, and
    none waits for more than the one commit ahead of it. Each batch is validated on its
    own before it waits (a bad event refuses only its own batch), and if a group's
    transaction fails, its batches are appended one by one, so each caller gets its own
    answer. A caller acknowledged has its events committed, as with `append`.
    """

    def __init__(self, pool: asyncpg.Pool, max_group: int = 10 * MAX_BATCH) -> None:
        self._pool = pool
        self._max_group = max_group
        self._waiting: list[tuple[list[_Prepared], asyncio.Future[list[int]]]] = []
        self._committing: asyncio.Task[None] | None = None

    async def append(self, events: Sequence[pb.AuditEvent], reporter: str) -> list[int]:
        """Appends the events in order, with those of other callers; each one's log index."""
        prepared = await asyncio.to_thread(prepare, events, reporter)
        indexes: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._waiting.append((prepared, indexes))
        if self._committing is None:
            # A context of its own: the committer acts for no caller in particular.
            self._committing = asyncio.create_task(
                self._commit_waiting(), name="audit-append", context=contextvars.Context()
            )
        return await indexes

    async def _commit_waiting(self) -> None:
        try:
            while self._waiting:
                await self._commit(self._next_group())
        finally:
            self._committing = None
            for _, indexes in self._waiting:  # cancelled (shutdown): no commit will come
                indexes.cancel()
            self._waiting.clear()

    def _next_group(self) -> list[tuple[list[_Prepared], asyncio.Future[list[int]]]]:
        """The batches still awaited, oldest first, up to the group's limit of events."""
        group: list[tuple[list[_Prepared], asyncio.Future[list[int]]]] = []
        size = 0
        while self._waiting:
            prepared, indexes = self._waiting[0]
            if indexes.done():  # its caller gave up before it was appended
                self._waiting.pop(0)
                continue
            if group and size + len(prepared) > self._max_group:
                break
            group.append(self._waiting.pop(0))
            size += len(prepared)
        return group

    async def _commit(self, group: list[tuple[list[_Prepared], asyncio.Future[list[int]]]]) -> None:
        if not group:
            return
        try:
            appended = await _append(
                self._pool, [event for prepared, _ in group for event in prepared]
            )
        except Exception as error:  # noqa: BLE001 - given back to the callers
            if len(group) == 1:
                _settle(group[0][1], error)
                return
            for prepared, indexes in group:  # each alone: a failure is its own batch's
                try:
                    _settle(indexes, await _append(self._pool, prepared))
                except Exception as alone:  # noqa: BLE001 - this batch's own error
                    _settle(indexes, alone)
            return
        start = 0
        for prepared, indexes in group:
            _settle(indexes, appended[start : start + len(prepared)])
            start += len(prepared)


def _settle(indexes: asyncio.Future[list[int]], outcome: list[int] | BaseException) -> None:
    if indexes.done():  # the caller gave up; its events are in the log all the same
        return
    if isinstance(outcome, BaseException):
        indexes.set_exception(outcome)
    else:
        indexes.set_result(outcome)


async def _append(pool: asyncpg.Pool, prepared: Sequence[_Prepared]) -> list[int]:
    ids = [p.event_id for p in prepared]
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
        # A damaged frontier refuses the append: new nodes built on it would be wrong forever.
        frontier = await _complete(conn, merkle.range_nodes(0, size))
        indexes, rows = await asyncio.to_thread(_sequence, prepared, known, size, frontier)
        if rows:
            await conn.copy_records_to_table("audit_events", records=rows, columns=_EVENT_COLUMNS)
    return indexes


def _sequence(
    prepared: Sequence[_Prepared],
    known: dict[uuid.UUID, int],
    size: int,
    frontier: dict[merkle.Node, bytes],
) -> tuple[list[int], list[tuple[object, ...]]]:
    """Each event's log index, and the rows of those not yet in a log of `size` events."""
    record = datetime.now(UTC)
    record_time = _rfc3339(record)
    new: list[tuple[int, _Prepared, bytes]] = []
    indexes = []
    for event in prepared:
        if event.event_id not in known:
            index = known[event.event_id] = size + len(new)
            new.append((index, event, canonical(event, log_index=index, record_time=record_time)))
        indexes.append(known[event.event_id])
    leaves = [merkle.leaf_hash(data) for _, _, data in new]
    tree = merkle.parents_of_new_leaves(size, leaves, frontier)
    rows: list[tuple[object, ...]] = [
        (index, event.event_id, event.event_time, record, *event.columns, data, leaf,
         b"".join(tree[node] for node in merkle.completed_by(index)))
        for (index, event, data), leaf in zip(new, leaves, strict=True)
    ]  # fmt: skip
    return indexes, rows


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


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

    A node lives in the row of its last leaf: level 0 is the leaf hash, and level l >= 1
    the l-th 32 bytes of subtree_hashes (`merkle.completed_by`).
    """
    wanted = list(wanted)
    rows = await conn.fetch(
        "SELECT log_index, leaf_hash, subtree_hashes FROM audit_events "
        "WHERE log_index = ANY($1::bigint[])",
        list({merkle.last_leaf(node) for node in wanted}),
    )
    stored = {row["log_index"]: row["leaf_hash"] + row["subtree_hashes"] for row in rows}
    found = {}
    for level, idx in wanted:
        hashes = stored.get(merkle.last_leaf((level, idx)), b"")
        if len(hashes) >= 32 * (level + 1):
            found[(level, idx)] = hashes[32 * level : 32 * (level + 1)]
    return found


async def _complete(
    conn: asyncpg.Connection | asyncpg.Pool, wanted: Iterable[merkle.Node]
) -> dict[merkle.Node, bytes]:
    """The stored hashes of `wanted`, every one of them, or TREE_INCOMPLETE."""
    wanted = set(wanted)
    found = await nodes(conn, wanted)
    if len(found) < len(wanted):
        missing = min(wanted - found.keys())
        raise FailedPrecondition(
            "TREE_INCOMPLETE",
            f"the log's tree lacks node {missing}: it was damaged; restore the audit tables "
            "from backup and run `medimg audit verify`",
        )
    return found


async def _hashes(pool: asyncpg.Pool, ranges: Sequence[merkle.Range]) -> list[bytes]:
    return merkle.fold(ranges, await _complete(pool, merkle.needed(ranges)))


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
