"""Refused calls reach the service's denial hook, so the attempt is recorded in audit."""

from __future__ import annotations

import grpc
import pytest

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_cli.testing import StartServer
from medimg_core import calls
from medimg_core.audit import denial
from medimg_core.calls import Context
from medimg_core.errors import PermissionDenied, Unauthenticated
from medimg_core.identity import UNVERIFIED, Role
from medimg_core.server import ServiceDefinition


class Log(pb_grpc.AuditServiceServicer):
    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        return pb.ListAuditEventsResponse()


@pytest.mark.parametrize(
    ("method", "action"),
    [
        ("/x.v1.S/GetStudy", pb.ACTION_READ),
        ("/x.v1.S/ListAuditEvents", pb.ACTION_READ),
        ("/x.v1.S/UploadInstances", pb.ACTION_CREATE),
        ("/x.v1.S/DeleteModel", pb.ACTION_DELETE),
        ("/x.v1.S/ExportAuditEvents", pb.ACTION_EXPORT),
        ("/x.v1.S/Predict", pb.ACTION_EXECUTE),
    ],
)
def test_the_attempted_action_comes_from_the_verb(method: str, action: int) -> None:
    access = denial(method, PermissionDenied("ROLE_NOT_ALLOWED", "no"))
    assert (access.action, access.outcome) == (action, pb.OUTCOME_PERMISSION_DENIED)
    assert denial(method, Unauthenticated("X", "no")).outcome == pb.OUTCOME_UNAUTHENTICATED


async def test_refusals_reach_the_hook_with_who_was_refused(start_server: StartServer) -> None:
    seen: list[tuple[str, str, str]] = []

    async def hook(method: str, error: Unauthenticated | PermissionDenied) -> None:
        call = calls.current()
        assert call is not None
        seen.append((method, error.reason, call.principal.workload))

    definition = ServiceDefinition(
        names=["medimg.audit.v1.AuditService"],
        add_to_server=lambda server: pb_grpc.add_AuditServiceServicer_to_server(
            Log(),  # type: ignore[abstract]  # one method is enough here
            server,
        ),
        policy={"ListAuditEvents": frozenset({Role("auditor")})},
        on_denied=hook,
    )
    _, channel = await start_server(definition)
    stub = pb_grpc.AuditServiceStub(channel)
    request = pb.ListAuditEventsRequest()
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ListAuditEvents(request, timeout=5)  # no XFCC at all
    ops = (("x-forwarded-client-cert", "URI=spiffe://medimg.local/ns/medimg/sa/ops"),)
    await stub.ListAuditEvents(request, metadata=ops, timeout=5)  # allowed: no hook
    assert seen == [
        ("/medimg.audit.v1.AuditService/ListAuditEvents", "MISSING_CALLER_IDENTITY", UNVERIFIED)
    ]
