"""The gRPC face of the audit log: thin, over `log`."""

from __future__ import annotations

import asyncpg

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_audit import log
from medimg_core import calls, pagination
from medimg_core.audit import Access, event_for
from medimg_core.errors import InvalidArgument
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
        after = None if position is None else position["after"]
        if after is not None and (not isinstance(after, int) or after < 0):
            raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not one this API gave")
        # Reading the log is an access to the log: it is recorded before it is served.
        own = event_for(Access(pb.ACTION_READ, "auditEvents"), "audit")
        await log.append(self._pool, [own], "audit")
        events, last = await log.list_events(self._pool, after=after, limit=size)
        token = "" if last is None else pagination.encode_token({"after": last})
        return pb.ListAuditEventsResponse(audit_events=events, next_page_token=token)
