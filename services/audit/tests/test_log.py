"""The audit log on a real PostgreSQL with its real migration: dense, idempotent, append-only."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from importlib.resources import files

import asyncpg
import pytest
from google.protobuf import timestamp_pb2

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg_audit import log
from medimg_core import db
from medimg_core.errors import FailedPrecondition, InvalidArgument

INGEST = "spiffe://medimg.local/ns/medimg/sa/ingest"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.connect(database_url, max_size=12)
    assert await db.migrate(pool, files("medimg_audit.migrations")) == ["0001_audit_events.sql"]
    yield pool
    await pool.close()


def event(**fields: object) -> pb.AuditEvent:
    when = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_000)
    values: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "event_time": when,
        "actor": pb.Actor(workload=INGEST, user="dr-who", roles=["admin", "clinician"]),
        "action": pb.ACTION_READ,
        "outcome": pb.OUTCOME_SUCCESS,
        "resource": "studies/1.2.3",
        "patient_pseudonym": "p-42",
        "service": "ingest",
        "method": "/medimg.ingest.v1.IngestService/GetStudy",
        "trace_id": "0" * 31 + "1",
    }
    values.update(fields)
    return pb.AuditEvent(**values)  # type: ignore[arg-type]


async def count(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM audit_events"))


async def test_indexes_are_dense_across_batches(pool: asyncpg.Pool) -> None:
    assert await log.append(pool, [event(), event(), event()], "ingest") == [0, 1, 2]
    assert await log.append(pool, [event()], "ingest") == [3]
    assert await log.append(pool, [event(), event()], "ingest") == [4, 5]
    assert await count(pool) == 6


async def test_reappending_the_same_ids_returns_the_same_indexes(pool: asyncpg.Pool) -> None:
    batch = [event(), event(), event()]
    assert await log.append(pool, batch, "ingest") == [0, 1, 2]
    assert await log.append(pool, batch, "ingest") == [0, 1, 2]
    assert await log.append(pool, list(reversed(batch)), "ingest") == [2, 1, 0]
    assert await count(pool) == 3
    # A retry that carries one old and one new event: the old keeps its place.
    assert await log.append(pool, [event(), batch[1]], "ingest") == [3, 1]
    assert await count(pool) == 4


async def test_one_id_twice_in_a_batch_is_one_event(pool: asyncpg.Pool) -> None:
    same = event()
    assert await log.append(pool, [same, event(), same], "ingest") == [0, 1, 0]
    assert await count(pool) == 2


async def test_an_id_is_a_uuid_value_not_a_spelling(pool: asyncpg.Pool) -> None:
    value = uuid.uuid4()
    assert await log.append(pool, [event(event_id=str(value))], "ingest") == [0]
    assert await log.append(pool, [event(event_id=str(value).upper())], "ingest") == [0]
    assert await count(pool) == 1


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (event(event_id="not-a-uuid"), "INVALID_EVENT_ID"),
        (event(event_id=""), "INVALID_EVENT_ID"),
        (event(event_time=None), "MISSING_EVENT_TIME"),
        (event(event_time=timestamp_pb2.Timestamp(seconds=253_402_300_800)), "INVALID_EVENT_TIME"),
        (event(event_time=timestamp_pb2.Timestamp(seconds=0, nanos=-1)), "INVALID_EVENT_TIME"),
        (event(actor=pb.Actor(user="dr-who")), "MISSING_ACTOR"),
        (event(action=pb.ACTION_UNSPECIFIED), "INVALID_ACTION"),
        (event(action=99), "INVALID_ACTION"),
        (event(outcome=pb.OUTCOME_UNSPECIFIED), "INVALID_OUTCOME"),
        (event(outcome=42), "INVALID_OUTCOME"),
        (event(service="training"), "SERVICE_MISMATCH"),
        (event(service=""), "SERVICE_MISMATCH"),
    ],
)
async def test_a_batch_with_one_bad_event_appends_nothing(
    pool: asyncpg.Pool, bad: pb.AuditEvent, reason: str
) -> None:
    await log.append(pool, [event()], "ingest")
    with pytest.raises(InvalidArgument) as caught:
        await log.append(pool, [event(), event(), bad, event()], "ingest")
    assert caught.value.reason == reason
    assert caught.value.metadata == {"index": "2"}
    assert caught.value.message.startswith("events[2]:")
    assert await count(pool) == 1
    assert await log.append(pool, [event()], "ingest") == [1]


async def test_the_first_bad_event_is_named(pool: asyncpg.Pool) -> None:
    batch = [event(), event(service="x"), event(event_id="nope")]
    with pytest.raises(InvalidArgument) as caught:
        await log.append(pool, batch, "ingest")
    assert (caught.value.reason, caught.value.metadata["index"]) == ("SERVICE_MISMATCH", "1")


async def test_empty_and_oversized_batches_are_refused(pool: asyncpg.Pool) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await log.append(pool, [], "ingest")
    assert caught.value.reason == "EMPTY_BATCH"
    with pytest.raises(InvalidArgument) as caught:
        await log.append(pool, [event() for _ in range(log.MAX_BATCH + 1)], "ingest")
    assert caught.value.reason == "BATCH_TOO_LARGE"
    assert await count(pool) == 0
    assert len(await log.append(pool, [event() for _ in range(log.MAX_BATCH)], "ingest")) == 1000


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET resource = 'studies/other'",
        "UPDATE audit_events SET actor_user = '' WHERE log_index = 0",
        "DELETE FROM audit_events WHERE log_index = 1",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ],
)
async def test_the_log_refuses_change_even_to_its_owner(pool: asyncpg.Pool, statement: str) -> None:
    await log.append(pool, [event(), event()], "ingest")
    owner = await pool.fetchval(
        "SELECT tableowner = current_user FROM pg_tables WHERE tablename = 'audit_events'"
    )
    assert owner
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await pool.execute(statement)
    events, _ = await log.list_events(pool, after=None, limit=10)
    assert [(e.log_index, e.resource, e.actor.user) for e in events] == [
        (0, "studies/1.2.3", "dr-who"),
        (1, "studies/1.2.3", "dr-who"),
    ]


async def test_list_events_pages_in_log_order(pool: asyncpg.Pool) -> None:
    batch = [event(resource=f"studies/{i}") for i in range(5)]
    await log.append(pool, batch[:3], "ingest")
    await log.append(pool, batch[3:], "ingest")

    page, last = await log.list_events(pool, after=None, limit=2)
    assert [e.resource for e in page] == ["studies/0", "studies/1"]
    assert last == 1
    page, last = await log.list_events(pool, after=last, limit=2)
    assert [e.log_index for e in page] == [2, 3]
    assert last == 3
    page, last = await log.list_events(pool, after=last, limit=2)
    assert [e.log_index for e in page] == [4]
    assert last is None
    page, last = await log.list_events(pool, after=None, limit=5)
    assert len(page) == 5
    assert last is None
    assert await log.list_events(pool, after=4, limit=5) == ([], None)


async def test_listed_events_carry_what_was_appended(pool: asyncpg.Pool) -> None:
    sent = event(break_glass_reason="code blue")
    await log.append(pool, [event(), sent], "ingest")
    [got], _ = await log.list_events(pool, after=0, limit=10)
    assert got.name == "auditEvents/1"
    assert got.log_index == 1
    assert got.event_id == sent.event_id
    assert got.event_time == sent.event_time
    assert got.HasField("record_time")
    assert got.record_time.seconds > sent.event_time.seconds
    for field in (
        "actor",
        "action",
        "outcome",
        "resource",
        "patient_pseudonym",
        "service",
        "method",
        "trace_id",
        "break_glass_reason",
    ):
        assert getattr(got, field) == getattr(sent, field), field


async def test_concurrent_appends_get_dense_unique_indexes(pool: asyncpg.Pool) -> None:
    batches = [[event() for _ in range(3)] for _ in range(10)]
    results = await asyncio.gather(*(log.append(pool, b, "ingest") for b in batches))
    every = sorted(i for r in results for i in r)
    assert every == list(range(30))
    for indexes in results:  # a batch is appended as a whole, in its order
        assert indexes == list(range(indexes[0], indexes[0] + 3))
    assert await count(pool) == 30


async def test_concurrent_retries_of_one_batch_append_it_once(pool: asyncpg.Pool) -> None:
    batch = [event() for _ in range(4)]
    results = await asyncio.gather(*(log.append(pool, batch, "ingest") for _ in range(6)))
    assert all(r == [0, 1, 2, 3] for r in results)
    assert await count(pool) == 4


# Group commit (log.Appender) ---------------------------------------------------------------


async def record_times(pool: asyncpg.Pool) -> int:
    """How many transactions appended: each stamps its events with one record time."""
    return int(await pool.fetchval("SELECT count(DISTINCT record_time) FROM audit_events"))


async def test_concurrent_callers_share_transactions(pool: asyncpg.Pool) -> None:
    appender = log.Appender(pool)
    batches = [[event()] for _ in range(40)]
    results = await asyncio.gather(*(appender.append(b, "ingest") for b in batches))
    assert sorted(i for r in results for i in r) == list(range(40))
    # The first caller commits alone; the others wait for it and then commit together.
    assert await record_times(pool) < 40
    listed, _ = await log.list_events(pool, log.ALL, after=None, limit=100)
    by_id = {e.event_id: e.log_index for e in listed}
    for batch, indexes in zip(batches, results, strict=True):
        assert [by_id[e.event_id] for e in batch] == indexes


async def test_a_group_keeps_each_batch_whole_and_in_order(pool: asyncpg.Pool) -> None:
    appender = log.Appender(pool)
    batches = [[event() for _ in range(n)] for n in (3, 1, 5, 2, 4)]
    results = await asyncio.gather(*(appender.append(b, "ingest") for b in batches))
    for batch, indexes in zip(batches, results, strict=True):
        assert indexes == list(range(indexes[0], indexes[0] + len(batch)))
    assert await count(pool) == 15


async def test_a_bad_batch_in_a_group_fails_alone(pool: asyncpg.Pool) -> None:
    appender = log.Appender(pool)
    good = [[event()] for _ in range(5)]
    bad = [event(), event(action=pb.ACTION_UNSPECIFIED)]
    results = await asyncio.gather(
        *(appender.append(b, "ingest") for b in [*good[:3], bad, *good[3:]]),
        return_exceptions=True,
    )
    assert isinstance(results[3], InvalidArgument)
    assert all(isinstance(r, list) for i, r in enumerate(results) if i != 3)
    assert await count(pool) == 5


async def test_a_nul_character_is_refused_before_it_reaches_the_database(
    pool: asyncpg.Pool,
) -> None:
    """PostgreSQL text cannot hold NUL: refused as bad input, not failed as a database error."""
    with pytest.raises(InvalidArgument) as refused:
        await log.Appender(pool).append([event(), event(resource="studies/1\x002")], "ingest")
    assert refused.value.reason == "INVALID_TEXT"
    assert await count(pool) == 0


async def test_the_same_event_from_two_callers_in_one_group_is_one_event(
    pool: asyncpg.Pool,
) -> None:
    appender = log.Appender(pool)
    same = event()
    results = await asyncio.gather(*(appender.append([same, event()], "ingest") for _ in range(6)))
    assert len({r[0] for r in results}) == 1
    assert await count(pool) == 7


async def test_grouped_appends_keep_the_tree_consistent(pool: asyncpg.Pool) -> None:
    appender = log.Appender(pool)
    for _ in range(3):
        await asyncio.gather(*(appender.append([event()], "ingest") for _ in range(7)))
    size = await log.tree_size(pool)
    assert size == 21
    for index in range(size):
        proof = await log.inclusion_proof(pool, index, size)
        assert proof is not None


async def test_an_append_over_a_damaged_frontier_is_refused_and_writes_nothing(
    pool: asyncpg.Pool,
) -> None:
    await log.append(pool, [event() for _ in range(7)], "ingest")
    # Row 3 holds the hashes of the perfect subtrees [2, 4) and [0, 4): the frontier's left
    # part. Someone with the table owner's rights cuts them off.
    await pool.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete")
    await pool.execute("UPDATE audit_events SET subtree_hashes = '' WHERE log_index = 3")
    with pytest.raises(FailedPrecondition) as refused:
        await log.append(pool, [event()], "ingest")
    assert refused.value.reason == "TREE_INCOMPLETE"
    assert "lacks node (2, 0)" in str(refused.value)
    assert await count(pool) == 7
