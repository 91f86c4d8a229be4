"""The gRPC face of the audit log: thin, over `log`."""

from __future__ import annotations

import uuid

import asyncpg
from google.protobuf import timestamp_pb2

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_audit import log
from medimg_core import calls, pagination, telemetry
from medimg_core.identity import Role

POLICY = {
    "AppendEvents": frozenset[Role](),  # workloads only
    "ListAuditEvents": frozenset({Role("auditor"), Role("admin")}),
}


class AuditServicer(pb_grpc.AuditServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def AppendEvents(
        self, request: pb.AppendEventsRequest, context: calls.Context
    ) -> pb.AppendEventsResponse:
        call = calls.current()
        assert call is not None
        indexes = await log.append(self._pool, request.events, call.principal.workload_name)
        return pb.AppendEventsResponse(log_indexes=indexes)

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: calls.Context
    ) -> pb.ListAuditEventsResponse:
        size = pagination.page_size(request.page_size, default=100)
        position = pagination.decode_token(request.page_token, "after")
        after = None if position is None else int(position["after"])
        # Reading the log is an access to the log: it is recorded before it is served.
        await log.append(self._pool, [self._own_event("auditEvents")], "audit")
        events, last = await log.list_events(self._pool, after=after, limit=size)
        token = "" if last is None else pagination.encode_token({"after": last})
        return pb.ListAuditEventsResponse(audit_events=events, next_page_token=token)

    def _own_event(self, resource: str) -> pb.AuditEvent:
        call = calls.current()
        assert call is not None
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        return pb.AuditEvent(
            event_id=str(uuid.uuid4()),
            event_time=now,
            actor=pb.Actor(
                workload=call.principal.workload,
                user=call.principal.user or "",
                roles=sorted(call.principal.roles),
            ),
            action=pb.ACTION_READ,
            outcome=pb.OUTCOME_SUCCESS,
            resource=resource,
            service="audit",
            method=call.method,
            trace_id=telemetry.current_trace_id(),
        )
