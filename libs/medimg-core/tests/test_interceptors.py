"""The call interceptor through a real grpc.aio server and stub: identity, roles, errors."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli.testing import StartServer
from medimg_core import calls, deadlines
from medimg_core.calls import Context
from medimg_core.errors import ERROR_DOMAIN, InvalidArgument, NotFound
from medimg_core.identity import USER_HEADER, XFCC_HEADER, Principal, Role, spiffe_id
from medimg_core.server import ServiceDefinition

GATEWAY = spiffe_id("medimg.local", "medimg", "gateway")
INGEST = spiffe_id("medimg.local", "medimg", "ingest")
SERVICE = "medimg.audit.v1.AuditService"
SECRET = "Jane Doe 1970-01-01 MRN 0042"
#: grpc encodes a timeout in its header rounded up to a few significant digits.
GRPC_TIMEOUT_ROUNDING = 1.011


def workload(spiffe: str = INGEST) -> tuple[tuple[str, str], ...]:
    return ((XFCC_HEADER, f"By=spiffe://medimg.local/ns/medimg/sa/audit;URI={spiffe}"),)


def user(subject: str, *roles: str) -> tuple[tuple[str, str], ...]:
    claims = json.dumps({"sub": subject, "roles": list(roles)}).encode()
    return (*workload(GATEWAY), (USER_HEADER, base64.urlsafe_b64encode(claims).decode()))


@dataclass
class Seen:
    call: calls.Call | None
    timeout: float
    default_timeout: float


class Probe(pb_grpc.AuditServiceServicer):
    """AppendEvents does what the first event's `resource` says; ListAuditEvents is left out."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    async def AppendEvents(
        self, request: pb.AppendEventsRequest, context: Context
    ) -> pb.AppendEventsResponse:
        self.seen.append(Seen(calls.current(), deadlines.timeout(3600.0), deadlines.timeout(7.5)))
        what = request.events[0].resource if request.events else "ok"
        if what == "invalid":
            raise InvalidArgument("BAD_EVENT", "events[3] is bad", index=3, field="action")
        if what == "not-found":
            raise NotFound("THING_NOT_FOUND", "things/1 is not there")
        if what == "boom":
            raise RuntimeError(f"could not parse {SECRET}")
        return pb.AppendEventsResponse(log_indexes=[7])


POLICY = {
    "AppendEvents": frozenset({Role("clinician"), Role("admin")}),
    "ListAuditEvents": frozenset({Role("auditor")}),
}


@pytest.fixture
async def probe(start_server: StartServer) -> tuple[Probe, pb_grpc.AuditServiceAsyncStub]:
    servicer = Probe()  # type: ignore[abstract]  # ListAuditEvents is left out on purpose
    definition = ServiceDefinition(
        names=[SERVICE],
        add_to_server=lambda server: pb_grpc.add_AuditServiceServicer_to_server(servicer, server),
        policy=POLICY,
    )
    _, channel = await start_server(definition)
    return servicer, pb_grpc.AuditServiceStub(channel)


def request(resource: str = "ok") -> pb.AppendEventsRequest:
    return pb.AppendEventsRequest(events=[pb.AuditEvent(resource=resource)])


def handled(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "medimg_grpc_server_handled_total",
        {"grpc_service": SERVICE, "grpc_method": method, "grpc_code": code},
    )
    return value or 0.0


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == error.code().value[0]
    assert status.message == error.details()
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1
    return infos[0]


async def test_ok_call_sees_the_workload_principal(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    response = await stub.AppendEvents(request(), metadata=workload(), timeout=5)
    assert list(response.log_indexes) == [7]
    [seen] = servicer.seen
    assert seen.call == calls.Call(f"/{SERVICE}/AppendEvents", Principal(INGEST))


async def test_domain_error_becomes_rich_status(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    _, stub = probe
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(request("invalid"), metadata=workload(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "events[3] is bad"
    info = error_info(caught.value)
    assert info.reason == "BAD_EVENT"
    assert info.domain == ERROR_DOMAIN == "medimg.io"
    assert dict(info.metadata) == {"index": "3", "field": "action"}


async def test_not_found_keeps_its_code(probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub]) -> None:
    _, stub = probe
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(request("not-found"), metadata=workload(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "THING_NOT_FOUND"


async def test_unexpected_exception_is_internal_without_its_message(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub], caplog: pytest.LogCaptureFixture
) -> None:
    _, stub = probe
    with (
        caplog.at_level(logging.ERROR, logger="medimg_core.interceptors"),
        pytest.raises(grpc.aio.AioRpcError) as caught,
    ):
        await stub.AppendEvents(request("boom"), metadata=workload(), timeout=5)
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in (error.details() or "")
    assert SECRET not in str(error.trailing_metadata())
    assert SECRET not in error.debug_error_string()
    info = error_info(error)
    assert info.reason == "INTERNAL"
    assert info.domain == "medimg.io"
    # The service log has it (type and place; the formatter leaves the message out).
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)


async def test_method_the_servicer_lacks_is_unimplemented(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    _, stub = probe
    before = handled("ListAuditEvents", "UNIMPLEMENTED")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=workload(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error_info(caught.value).reason == "NOT_IMPLEMENTED"
    # Counted as the call ends on the server, which may be just after the client sees it.
    for _ in range(100):
        if handled("ListAuditEvents", "UNIMPLEMENTED") == before + 1:
            break
        await asyncio.sleep(0.02)
    assert handled("ListAuditEvents", "UNIMPLEMENTED") == before + 1


async def test_no_xfcc_is_unauthenticated(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(request(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "MISSING_CALLER_IDENTITY"
    assert servicer.seen == []


async def test_xfcc_without_spiffe_uri_is_unauthenticated(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(request(), metadata=((XFCC_HEADER, "Hash=00"),), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert servicer.seen == []


async def test_gateway_without_user_is_unauthenticated(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(request(), metadata=workload(GATEWAY), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "MISSING_USER"
    assert servicer.seen == []


async def test_user_without_the_role_is_denied_before_the_servicer(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    before = handled("AppendEvents", "PERMISSION_DENIED")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(
            request("not-found"), metadata=user("rita", "researcher", "auditor"), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(caught.value)
    assert info.reason == "ROLE_NOT_ALLOWED"
    assert info.metadata["method"] == f"/{SERVICE}/AppendEvents"
    assert servicer.seen == []
    assert handled("AppendEvents", "PERMISSION_DENIED") == before + 1


async def test_user_with_no_roles_is_denied(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(request(), metadata=user("nobody"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert servicer.seen == []


async def test_user_with_an_allowed_role_is_served_as_that_user(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    response = await stub.AppendEvents(
        request(), metadata=user("dr-who", "clinician", "made-up"), timeout=5
    )
    assert list(response.log_indexes) == [7]
    [seen] = servicer.seen
    assert seen.call is not None
    assert seen.call.method == f"/{SERVICE}/AppendEvents"
    assert seen.call.principal == Principal(GATEWAY, "dr-who", frozenset({Role("clinician")}))


async def test_user_header_from_a_workload_is_not_believed(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    claims = base64.urlsafe_b64encode(b'{"sub": "mallory", "roles": ["admin"]}').decode()
    await stub.AppendEvents(request(), metadata=(*workload(), (USER_HEADER, claims)), timeout=5)
    [seen] = servicer.seen
    assert seen.call is not None
    assert seen.call.principal == Principal(INGEST)


async def test_the_callers_deadline_reaches_the_handler(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    await stub.AppendEvents(request(), metadata=workload(), timeout=2.0)
    [seen] = servicer.seen
    # grpc-timeout travels rounded up to a few significant digits (2.0 s may arrive as
    # 2.01 s), so the server's view may exceed the client's by that rounding, never more.
    assert 1.0 < seen.timeout <= 2.0 * GRPC_TIMEOUT_ROUNDING
    assert seen.default_timeout <= seen.timeout


async def test_a_default_caps_a_long_deadline(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    await stub.AppendEvents(request(), metadata=workload(), timeout=60.0)
    [seen] = servicer.seen
    assert seen.default_timeout == 7.5
    assert 50 < seen.timeout <= 60.0 * GRPC_TIMEOUT_ROUNDING


async def test_no_client_deadline_leaves_the_default(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    await stub.AppendEvents(request(), metadata=workload())
    [seen] = servicer.seen
    assert seen.timeout == 3600.0
    assert seen.default_timeout == 7.5


async def test_handled_counter_counts_by_code(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    _, stub = probe
    codes = ("OK", "INVALID_ARGUMENT", "INTERNAL", "UNAUTHENTICATED")
    before = {code: handled("AppendEvents", code) for code in codes}
    await stub.AppendEvents(request(), metadata=workload(), timeout=5)
    await stub.AppendEvents(request(), metadata=workload(), timeout=5)
    for resource, metadata in (("invalid", workload()), ("boom", workload()), ("ok", ())):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.AppendEvents(request(resource), metadata=metadata, timeout=5)
    after = {code: handled("AppendEvents", code) for code in codes}
    assert after["OK"] == before["OK"] + 2
    assert after["INVALID_ARGUMENT"] == before["INVALID_ARGUMENT"] + 1
    assert after["INTERNAL"] == before["INTERNAL"] + 1
    assert after["UNAUTHENTICATED"] == before["UNAUTHENTICATED"] + 1
    latency = REGISTRY.get_sample_value(
        "medimg_grpc_server_handling_seconds_count",
        {"grpc_service": SERVICE, "grpc_method": "AppendEvents"},
    )
    assert latency is not None
    assert latency >= 5


async def test_health_passes_through_without_identity(start_server: StartServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    definition = ServiceDefinition(
        names=[SERVICE],
        add_to_server=lambda server: pb_grpc.add_AuditServiceServicer_to_server(
            Probe(),  # type: ignore[abstract]
            server,
        ),
        policy=POLICY,
    )
    _, channel = await start_server(definition)
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_concurrent_calls_each_see_their_own_caller(
    probe: tuple[Probe, pb_grpc.AuditServiceAsyncStub],
) -> None:
    servicer, stub = probe
    subjects = [f"user-{i}" for i in range(8)]
    await asyncio.gather(
        *(stub.AppendEvents(request(), metadata=user(s, "admin"), timeout=5) for s in subjects),
        stub.AppendEvents(request(), metadata=workload(), timeout=5),
    )
    seen_users = sorted(
        str(seen.call.principal.user) for seen in servicer.seen if seen.call is not None
    )
    assert seen_users == sorted([*subjects, "None"])


class Uploader(ingest_grpc.IngestServiceServicer):
    """A client-streaming method through the interceptor: counts chunks or refuses them."""

    async def UploadInstances(
        self, request_iterator: object, context: Context
    ) -> ingest_pb.UploadInstancesResponse:
        call = calls.current()
        assert call is not None
        chunks = [request async for request in request_iterator]  # type: ignore[attr-defined]
        if any(c.chunk == b"bad" for c in chunks):
            raise InvalidArgument("NOT_DICOM", "file 1 is not DICOM", index=1)
        return ingest_pb.UploadInstancesResponse(
            results=[
                ingest_pb.InstanceResult(index=i, instance=call.principal.workload)
                for i in range(len(chunks))
            ]
        )


async def test_client_streaming_method_through_the_interceptor(start_server: StartServer) -> None:
    definition = ServiceDefinition(
        names=["medimg.ingest.v1.IngestService"],
        add_to_server=lambda server: ingest_grpc.add_IngestServiceServicer_to_server(
            Uploader(),  # type: ignore[abstract]  # GetStudy and ListStudies are left out
            server,
        ),
        policy={"UploadInstances": frozenset({Role("clinician")})},
    )
    _, channel = await start_server(definition)
    stub = ingest_grpc.IngestServiceStub(channel)

    def stream(*chunks: bytes) -> list[ingest_pb.UploadInstancesRequest]:
        return [ingest_pb.UploadInstancesRequest(chunk=c, last_chunk=True) for c in chunks]

    response = await stub.UploadInstances(iter(stream(b"a", b"b")), metadata=workload(), timeout=5)
    assert [r.instance for r in response.results] == [INGEST, INGEST]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UploadInstances(iter(stream(b"a", b"bad")), metadata=workload(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert (info.reason, dict(info.metadata)) == ("NOT_DICOM", {"index": "1"})

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UploadInstances(iter(stream(b"a")), metadata=user("r", "researcher"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetStudy(ingest_pb.GetStudyRequest(name="studies/1"), metadata=workload())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
