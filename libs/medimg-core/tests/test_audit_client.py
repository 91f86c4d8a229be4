"""The audit client against a real grpc.aio audit peer and a real Redis: events, the direct
path, the durable spool while audit is down, the drain, crashes, and what fails closed."""

from __future__ import annotations

import asyncio
import contextvars
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import prometheus_client
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_core import calls, deadlines
from medimg_core import redis as medimg_redis
from medimg_core.audit import (
    CONSUMER_GROUP,
    Access,
    AuditClient,
    DeliveryOptions,
    Kind,
    decode,
    encode,
    event_for,
)
from medimg_core.calls import Context
from medimg_core.errors import DeadlineExceeded, Unavailable
from medimg_core.identity import Principal, Role, spiffe_id

GATEWAY = spiffe_id("medimg.local", "medimg", "gateway")
SERVICE = "ingest"
STREAM = f"medimg:audit:spool:{SERVICE}"
#: Quick to notice a change, so the tests wait fractions of a second, not the defaults.
FAST = DeliveryOptions(
    direct_deadline=1.0,
    direct_retry_seconds=0.2,
    drain_deadline=2.0,
    poll_seconds=0.05,
    backoff_seconds=0.05,
    max_backoff_seconds=0.2,
)


class FakeAudit(pb_grpc.AuditServiceServicer):
    """An audit peer: idempotent by event id like the real one, and breakable on demand."""

    def __init__(self) -> None:
        self.requests: list[pb.AppendEventsRequest] = []
        self.timeouts: list[float | None] = []
        self.log: dict[str, int] = {}  # event id → log index: the log itself
        self.received: list[str] = []  # every event id sent, resends included
        self.down = False  # answer UNAVAILABLE, recording nothing
        self.failures = 0  # fail this many calls with `code`, recording nothing
        self.code = grpc.StatusCode.UNAVAILABLE
        self.acks_lost = 0  # record this many calls, then answer UNAVAILABLE anyway

    async def AppendEvents(
        self, request: pb.AppendEventsRequest, context: Context
    ) -> pb.AppendEventsResponse:
        self.requests.append(request)
        self.timeouts.append(context.time_remaining())
        self.received += [e.event_id for e in request.events]
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit is down")
        if self.failures:
            self.failures -= 1
            await context.abort(self.code, "not now")
        if any(e.resource == "refused" for e in request.events):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a bad event")
        for event in request.events:
            self.log.setdefault(event.event_id, len(self.log))
        if self.acks_lost:
            self.acks_lost -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "appended, but the answer is lost")
        return pb.AppendEventsResponse(log_indexes=[self.log[e.event_id] for e in request.events])


@dataclass
class Peer:
    fake: FakeAudit
    channel: grpc.aio.Channel
    redis: aioredis.Redis

    def client(self, redis: aioredis.Redis | None = None, **options: float) -> AuditClient:
        return AuditClient(
            self.channel,
            service=SERVICE,
            default_deadline=5.0,
            redis=redis or self.redis,
            options=DeliveryOptions(**{**FAST.__dict__, **options}),
        )


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis database of these tests' own, empty at the start of each."""
    client = medimg_redis.connect(redis_url.rsplit("/", 1)[0] + "/9")
    deadline = time.monotonic() + 10
    while True:  # the session's Redis may still be starting
        try:
            await client.flushdb()
            break
        except RedisConnectionError:
            assert time.monotonic() < deadline, "Redis did not start"
            await asyncio.sleep(0.05)
    yield client
    await client.aclose()


@pytest.fixture
async def peer(redis: aioredis.Redis) -> AsyncIterator[Peer]:
    fake = FakeAudit()  # type: ignore[abstract]  # only AppendEvents is needed
    server = grpc.aio.server()
    pb_grpc.add_AuditServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Peer(fake, channel, redis)
    await channel.close(None)
    await server.stop(None)


def closed_port() -> int:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return int(closed.getsockname()[1])


def sample(name: str, **labels: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, {"service": SERVICE, **labels}) or 0.0


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.02)


async def entries(redis: aioredis.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    """Every entry of a stream (the client decodes responses: text, not bytes)."""
    rows: Any = await redis.xrange(stream)
    return [(str(i), {str(k): str(v) for k, v in (f or {}).items()}) for i, f in rows]


def reads(n: int) -> list[Access]:
    return [Access(pb.ACTION_READ, f"studies/{i}") for i in range(n)]


# The direct path ----------------------------------------------------------------------


async def test_report_sends_the_callers_identity(peer: Peer) -> None:
    client = peer.client()

    async def as_the_servicer() -> list[int]:
        calls.enter(
            calls.Call(
                "/medimg.ingest.v1.IngestService/GetStudy",
                Principal(GATEWAY, "dr-who", frozenset({Role("clinician"), Role("admin")})),
            )
        )
        delivery = await client.report(
            [Access(pb.ACTION_READ, "studies/1.2.3"), Access(pb.ACTION_CREATE, "studies/4")]
        )
        assert delivery.kind is Kind.PHI_READ  # a read among them makes it a read
        assert not delivery.spooled
        return delivery.log_indexes

    indexes = await asyncio.create_task(as_the_servicer(), context=contextvars.copy_context())
    assert indexes == [0, 1]
    [request] = peer.fake.requests
    first, second = request.events
    assert first.resource == "studies/1.2.3"
    assert first.action == pb.ACTION_READ
    assert first.outcome == pb.OUTCOME_SUCCESS
    assert first.service == "ingest"
    assert first.method == "/medimg.ingest.v1.IngestService/GetStudy"
    assert first.actor.workload == GATEWAY
    assert first.actor.user == "dr-who"
    assert list(first.actor.roles) == ["admin", "clinician"]
    assert first.HasField("event_time")
    assert uuid.UUID(first.event_id) != uuid.UUID(second.event_id)


async def test_the_direct_path_appends_and_spools_nothing(peer: Peer) -> None:
    before = sample("medimg_audit_client_appended_events_total")
    delivery = await peer.client().report([Access(pb.ACTION_CREATE, "studies/1/series/2")])
    assert delivery.kind is Kind.PHI_WRITE
    assert dict(delivery.appended) == {peer.fake.requests[0].events[0].event_id: 0}
    assert await peer.redis.exists(STREAM) == 0
    assert sample("medimg_audit_client_appended_events_total") == before + 1


async def test_the_callers_deadline_bounds_the_direct_call(peer: Peer) -> None:
    client = peer.client(direct_deadline=1.0)

    async def within(seconds: float) -> list[int]:
        deadlines.set_from_remaining(seconds)
        return (await client.report([Access(pb.ACTION_READ, "studies/1")])).log_indexes

    await asyncio.create_task(within(0.5), context=contextvars.copy_context())
    await client.report([Access(pb.ACTION_READ, "studies/1")])  # no caller deadline
    short, default = peer.fake.timeouts
    assert short is not None and default is not None
    assert short <= 0.5 * 1.011  # grpc-timeout is rounded up a little on the wire
    assert 0.5 < default <= 1.0 * 1.011  # the short direct deadline, not the 5 s default

    with pytest.raises(DeadlineExceeded):
        await asyncio.create_task(within(0.0), context=contextvars.copy_context())


# Audit down: the spool, then the drain ------------------------------------------------


async def test_audit_down_spools_quickly_and_the_drain_delivers_each_event_once(
    peer: Peer,
) -> None:
    client = peer.client()
    spooled_before = sample("medimg_audit_client_spooled_events_total")
    drained_before = sample("medimg_audit_client_drained_events_total")
    peer.fake.down = True
    ids: list[str] = []
    started = time.monotonic()
    for _ in range(5):
        delivery = await client.report(reads(3))
        assert not delivery.appended
        assert len(delivery.spooled) == 3
        ids += delivery.spooled
    assert time.monotonic() - started < 1.0  # patient work is not held up
    # The first report tried audit; the next ones went straight to the spool.
    assert len(peer.fake.requests) < 5
    assert sample("medimg_audit_client_spooled_events_total") == spooled_before + 15

    # The spool holds the events themselves, nothing else.
    spool = await entries(peer.redis, STREAM)
    assert {tuple(fields) for _, fields in spool} == {("event",)}
    spooled = [decode(fields) for _, fields in spool]
    assert [e.event_id for e in spooled if e is not None] == ids
    assert peer.fake.log == {}

    peer.fake.down = False
    async with client:
        await eventually(lambda: _drained(peer.redis))
    assert sorted(peer.fake.log) == sorted(ids)
    assert sample("medimg_audit_client_drained_events_total") == drained_before + 15
    assert sample("medimg_audit_client_spool_length") == 0
    # Back to the direct path.
    assert (await client.report(reads(1))).appended


async def _drained(redis: aioredis.Redis) -> bool:
    return int(await redis.xlen(STREAM)) == 0 and not await _pending(redis)


async def _pending(redis: aioredis.Redis) -> int:
    summary = await redis.xpending(STREAM, CONSUMER_GROUP)
    return int(summary["pending"])


async def test_an_unreachable_audit_is_spooled(redis: aioredis.Redis) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{closed_port()}") as channel:
        client = AuditClient(channel, service=SERVICE, default_deadline=5.0, redis=redis)
        delivery = await client.report(reads(2))
    assert len(delivery.spooled) == 2
    assert int(await redis.xlen(STREAM)) == 2


async def test_a_lost_acknowledgement_is_resent_and_appended_once(peer: Peer) -> None:
    client = peer.client()
    peer.fake.down = True
    ids = list((await client.report(reads(4))).spooled)
    peer.fake.down = False
    peer.fake.acks_lost = 1  # the drainer's first batch is appended, but it hears UNAVAILABLE
    async with client:
        await eventually(lambda: _drained(peer.redis))
    assert sorted(peer.fake.log) == sorted(ids)  # exactly once in the log
    # The direct try, the batch whose answer was lost, and its resend, with the same ids.
    direct, lost, resent = peer.fake.requests
    assert [e.event_id for e in lost.events] == [e.event_id for e in resent.events] == ids
    assert list(resent.events) == list(direct.events)


async def test_a_direct_call_whose_answer_is_lost_is_not_appended_twice(peer: Peer) -> None:
    peer.fake.acks_lost = 1  # audit appends, the answer never arrives: the client spools
    client = peer.client()
    delivery = await client.report(reads(2))
    assert len(delivery.spooled) == 2
    async with client:
        await eventually(lambda: _drained(peer.redis))
    assert sorted(peer.fake.log) == sorted(delivery.spooled)
    assert len(peer.fake.received) == 4


# Several replicas, and crashes ---------------------------------------------------------


async def test_replicas_share_the_spool_without_sending_an_event_twice(peer: Peer) -> None:
    first, second = peer.client(direct_retry_seconds=60), peer.client(direct_retry_seconds=60)
    peer.fake.down = True
    ids: list[str] = []
    for n in range(20):
        ids += (await (first if n % 2 else second).report(reads(2))).spooled
    assert len(peer.fake.received) == 4  # one direct try each, then straight to the spool
    peer.fake.down = False
    async with first, second:
        await eventually(lambda: _drained(peer.redis))
    assert sorted(peer.fake.log) == sorted(ids)
    # Each entry went to one replica only: nothing was sent twice.
    assert len(peer.fake.received) == 4 + len(ids)


async def test_entries_of_a_replica_that_died_mid_batch_are_claimed_and_resent(
    peer: Peer,
) -> None:
    crashed = peer.client()
    peer.fake.down = True
    ids = list((await crashed.report(reads(6))).spooled)
    peer.fake.down = False
    # The crashed replica had read every entry and appended half before it died: the
    # entries are pending under it, never acknowledged.
    await peer.redis.xgroup_create(STREAM, CONSUMER_GROUP, id="0")
    read: Any = await peer.redis.xreadgroup(CONSUMER_GROUP, "crashed", {STREAM: ">"})
    [(_, held)] = read
    events = [e for _, fields in held if (e := decode(fields)) is not None]
    stub = pb_grpc.AuditServiceStub(peer.channel)
    await stub.AppendEvents(pb.AppendEventsRequest(events=events[:3]), timeout=5)

    survivor = peer.client(claim_idle_seconds=0.3)
    async with survivor:
        await eventually(lambda: _drained(peer.redis))
    assert sorted(peer.fake.log) == sorted(ids)
    consumers = {c["name"] for c in await peer.redis.xinfo_consumers(STREAM, CONSUMER_GROUP)}
    assert survivor.consumer in consumers


async def test_what_audit_refuses_for_good_is_dead_lettered_not_lost(peer: Peer) -> None:
    client = peer.client()
    peer.fake.down = True
    good = list((await client.report(reads(2))).spooled)
    refused = (await client.report([Access(pb.ACTION_READ, "refused")])).spooled
    good += (await client.report(reads(1))).spooled
    await peer.redis.xadd(STREAM, {"event": "not base64 of an event!"})
    peer.fake.down = False
    dead_before = sample("medimg_audit_client_dead_lettered_events_total")
    async with client:
        await eventually(lambda: _drained(peer.redis))
    assert sorted(peer.fake.log) == sorted(good)
    dead = await entries(peer.redis, f"medimg:audit:dead:{SERVICE}")
    assert len(dead) == 2
    assert [e.event_id for _, f in dead if (e := decode(f)) is not None] == list(refused)
    assert sample("medimg_audit_client_dead_lettered_events_total") == dead_before + 2


async def test_events_spooled_by_another_process_are_drained(peer: Peer) -> None:
    # A process that spooled and exited before its drainer ran (or an older replica).
    event = event_for(Access(pb.ACTION_READ, "studies/9"), SERVICE)
    await peer.redis.xadd(STREAM, {"event": encode(event)})
    async with peer.client():
        await eventually(lambda: _drained(peer.redis))
    assert list(peer.fake.log) == [event.event_id]


# Nothing durable: fail closed ----------------------------------------------------------


async def test_audit_and_redis_both_down_fails_closed(peer: Peer) -> None:
    dead_redis = medimg_redis.connect(f"redis://127.0.0.1:{closed_port()}/0")
    client = peer.client(redis=dead_redis)
    peer.fake.down = True
    before = sample("medimg_audit_client_unrecorded_reports_total", kind="phi_read")
    try:
        async with client:
            for kind in (None, Kind.PHI_WRITE):
                started = time.monotonic()
                with pytest.raises(Unavailable) as caught:
                    await client.report(reads(1), kind=kind)
                assert caught.value.reason == "AUDIT_UNAVAILABLE"
                assert time.monotonic() - started < 3.0
            # An event about no patient data is logged as lost; the call goes on.
            delivery = await client.report(reads(1), kind=Kind.NO_PHI)
            assert len(delivery.lost) == 1
    finally:
        await dead_redis.aclose()
    assert sample("medimg_audit_client_unrecorded_reports_total", kind="phi_read") == before + 1


async def test_a_full_spool_fails_closed(peer: Peer) -> None:
    client = peer.client(spool_max_events=3)
    peer.fake.down = True
    await client.report(reads(2))
    with pytest.raises(Unavailable):
        await client.report(reads(2))
    assert int(await peer.redis.xlen(STREAM)) == 2


async def test_without_a_spool_an_unreachable_audit_fails_closed() -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{closed_port()}") as channel:
        client = AuditClient(channel, service=SERVICE, default_deadline=0.5)
        with pytest.raises(Unavailable):
            await client.report(reads(1))


async def test_a_refused_event_is_neither_retried_nor_spooled(peer: Peer) -> None:
    peer.fake.failures = 1
    peer.fake.code = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(Unavailable) as caught:
        await peer.client().report(reads(1))
    assert caught.value.reason == "AUDIT_UNAVAILABLE"
    assert len(peer.fake.requests) == 1
    assert await peer.redis.exists(STREAM) == 0
