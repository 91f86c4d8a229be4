"""The audit client against a real grpc.aio audit server: events, retries, failures, deadlines."""

from __future__ import annotations

import asyncio
import contextvars
import socket
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_core import calls, deadlines
from medimg_core.audit import Access, AuditClient
from medimg_core.calls import Context
from medimg_core.errors import DeadlineExceeded, Unavailable
from medimg_core.identity import Principal, Role, spiffe_id

GATEWAY = spiffe_id("medimg.local", "medimg", "gateway")


class FakeAudit(pb_grpc.AuditServiceServicer):
    """Records every request; fails the first `failures` calls with `code`."""

    def __init__(self) -> None:
        self.requests: list[pb.AppendEventsRequest] = []
        self.timeouts: list[float | None] = []
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.next_index = 0

    async def AppendEvents(
        self, request: pb.AppendEventsRequest, context: Context
    ) -> pb.AppendEventsResponse:
        self.requests.append(request)
        self.timeouts.append(context.time_remaining())
        if self.failures:
            self.failures -= 1
            await context.abort(self.code, "not now")
        indexes = list(range(self.next_index, self.next_index + len(request.events)))
        self.next_index += len(request.events)
        return pb.AppendEventsResponse(log_indexes=indexes)


@pytest.fixture
async def audit() -> AsyncIterator[tuple[FakeAudit, AuditClient]]:
    fake = FakeAudit()  # type: ignore[abstract]  # only AppendEvents is needed
    server = grpc.aio.server()
    pb_grpc.add_AuditServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield fake, AuditClient(channel, service="ingest", default_deadline=5.0)
    await channel.close(None)
    await server.stop(None)


async def test_report_sends_the_callers_identity(audit: tuple[FakeAudit, AuditClient]) -> None:
    fake, client = audit

    async def as_the_servicer() -> list[int]:
        calls.enter(
            calls.Call(
                "/medimg.ingest.v1.IngestService/GetStudy",
                Principal(GATEWAY, "dr-who", frozenset({Role("clinician"), Role("admin")})),
            )
        )
        return await client.report(
            [Access(pb.ACTION_READ, "studies/1.2.3"), Access(pb.ACTION_CREATE, "studies/4")]
        )

    indexes = await asyncio.create_task(as_the_servicer(), context=contextvars.copy_context())
    assert indexes == [0, 1]
    [request] = fake.requests
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


async def test_retry_after_unavailable_resends_the_same_event_ids(
    audit: tuple[FakeAudit, AuditClient],
) -> None:
    fake, client = audit
    fake.failures = 2
    assert await client.report([Access(pb.ACTION_READ, "studies/1")]) == [0]
    assert len(fake.requests) == 3
    ids = {r.events[0].event_id for r in fake.requests}
    assert len(ids) == 1


async def test_audit_down_for_good_is_unavailable(audit: tuple[FakeAudit, AuditClient]) -> None:
    fake, client = audit
    fake.failures = 10
    with pytest.raises(Unavailable) as caught:
        await client.report([Access(pb.ACTION_READ, "studies/1")])
    assert caught.value.reason == "AUDIT_UNAVAILABLE"
    assert len(fake.requests) == 3


async def test_a_refused_event_is_not_retried(audit: tuple[FakeAudit, AuditClient]) -> None:
    fake, client = audit
    fake.failures = 1
    fake.code = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(Unavailable) as caught:
        await client.report([Access(pb.ACTION_READ, "studies/1")])
    assert caught.value.reason == "AUDIT_UNAVAILABLE"
    assert len(fake.requests) == 1


async def test_the_callers_deadline_bounds_the_report(audit: tuple[FakeAudit, AuditClient]) -> None:
    fake, client = audit

    async def within(seconds: float) -> list[int]:
        deadlines.set_from_remaining(seconds)
        return await client.report([Access(pb.ACTION_READ, "studies/1")])

    await asyncio.create_task(within(1.0), context=contextvars.copy_context())
    [timeout] = fake.timeouts
    assert timeout is not None
    assert timeout <= 1.0 * 1.011  # grpc-timeout is rounded up a little on the wire

    with pytest.raises(DeadlineExceeded):
        await asyncio.create_task(within(0.0), context=contextvars.copy_context())


async def test_no_audit_server_is_unavailable() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = AuditClient(channel, service="ingest", default_deadline=0.5, attempts=2)
    try:
        with pytest.raises(Unavailable):
            await client.report([Access(pb.ACTION_READ, "studies/1")])
    finally:
        await channel.close(None)
