"""The audit service as built by its app, behind the real server and interceptor."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_audit.app import build
from medimg_audit.settings import AuditSettings
from medimg_cli.pki import create_signing_key
from medimg_core.identity import USER_HEADER, XFCC_HEADER
from medimg_core.pagination import encode_token
from medimg_core.server import Server

SPIFFE = "spiffe://medimg.local/ns/medimg/sa/"
Metadata = tuple[tuple[str, str], ...]


def workload(name: str) -> Metadata:
    return ((XFCC_HEADER, f"By={SPIFFE}audit;URI={SPIFFE}{name}"),)


def user(subject: str, *roles: str) -> Metadata:
    claims = base64.urlsafe_b64encode(json.dumps({"sub": subject, "roles": roles}).encode())
    return (*workload("gateway"), (USER_HEADER, claims.decode()))


def event(service: str = "ingest", **fields: object) -> pb.AuditEvent:
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return pb.AuditEvent(
        event_id=str(uuid.uuid4()),
        event_time=now,
        actor=pb.Actor(workload=f"{SPIFFE}gateway", user="dr-who", roles=["clinician"]),
        action=pb.ACTION_READ,
        outcome=pb.OUTCOME_SUCCESS,
        resource="studies/1",
        service=service,
        **fields,  # type: ignore[arg-type]
    )


def reason(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason), {str(k): str(v) for k, v in info.metadata.items()}


@pytest.fixture
async def stub(database_url: str, tmp_path: Path) -> AsyncIterator[pb_grpc.AuditServiceAsyncStub]:
    create_signing_key(tmp_path / "key.pem", tmp_path / "pub.pem")
    settings = AuditSettings(
        port=0, database_url=database_url, grace_seconds=1, signing_key_file=tmp_path / "key.pem"
    )
    async with AsyncExitStack() as resources:
        server = Server(settings, await build(settings, resources))
        port = await server.start()
        await server.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.AuditServiceStub(channel)
        await server.grpc.stop(None)


async def test_a_workload_appends_its_own_events(stub: pb_grpc.AuditServiceAsyncStub) -> None:
    request = pb.AppendEventsRequest(events=[event(), event()])
    response = await stub.AppendEvents(request, metadata=workload("ingest"), timeout=5)
    assert list(response.log_indexes) == [0, 1]
    again = await stub.AppendEvents(request, metadata=workload("ingest"), timeout=5)
    assert list(again.log_indexes) == [0, 1]


async def test_a_workload_may_not_report_for_another(stub: pb_grpc.AuditServiceAsyncStub) -> None:
    request = pb.AppendEventsRequest(events=[event("ingest"), event("training")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(request, metadata=workload("ingest"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value) == ("SERVICE_MISMATCH", {"index": "1"})


async def test_users_may_not_append(stub: pb_grpc.AuditServiceAsyncStub) -> None:
    request = pb.AppendEventsRequest(events=[event("gateway")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(request, metadata=user("eve", "admin", "auditor"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_auditor_lists_and_the_listing_is_itself_recorded(
    stub: pb_grpc.AuditServiceAsyncStub,
) -> None:
    await stub.AppendEvents(
        pb.AppendEventsRequest(events=[event(), event(), event()]),
        metadata=workload("ingest"),
        timeout=5,
    )
    auditor = user("ann", "auditor")
    first = await stub.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=2), metadata=auditor, timeout=5
    )
    assert [e.log_index for e in first.audit_events] == [0, 1]
    assert first.next_page_token
    second = await stub.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=2, page_token=first.next_page_token),
        metadata=auditor,
        timeout=5,
    )
    # Index 3 is the first listing's own record, written before it was served.
    assert [e.log_index for e in second.audit_events] == [2, 3]
    own = second.audit_events[1]
    assert own.service == "audit"
    assert own.resource == "auditEvents"
    assert own.action == pb.ACTION_READ
    assert own.method == "/medimg.audit.v1.AuditService/ListAuditEvents"
    assert own.actor.workload == f"{SPIFFE}gateway"
    assert own.actor.user == "ann"
    assert list(own.actor.roles) == ["auditor"]


async def test_a_clinician_may_not_list(stub: pb_grpc.AuditServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(), metadata=user("dr-who", "clinician"), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await stub.ListAuditEvents(
        pb.ListAuditEventsRequest(), metadata=user("ann", "auditor"), timeout=5
    )
    # The refusal is recorded (and read nothing); then ann's own listing.
    assert [(e.actor.user, e.outcome) for e in listed.audit_events] == [
        ("dr-who", pb.OUTCOME_PERMISSION_DENIED),
        ("ann", pb.OUTCOME_SUCCESS),
    ]


async def test_a_foreign_page_token_is_invalid_argument(
    stub: pb_grpc.AuditServiceAsyncStub,
) -> None:
    for token in ("garbage", encode_token({"before": 1})):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListAuditEvents(
                pb.ListAuditEventsRequest(page_token=token),
                metadata=user("ann", "auditor"),
                timeout=5,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason(caught.value)[0] == "INVALID_PAGE_TOKEN"


async def test_a_forged_page_token_value_is_invalid_argument(
    stub: pb_grpc.AuditServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(page_token=encode_token({"after": "x"})),
            metadata=user("ann", "auditor"),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_negative_page_size_is_invalid_argument(
    stub: pb_grpc.AuditServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=-1), metadata=user("ann", "admin"), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value)[0] == "INVALID_PAGE_SIZE"
