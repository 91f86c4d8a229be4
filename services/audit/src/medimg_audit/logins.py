"""Login failures: the calls the gateway refused for a missing or bad token, as audit events.

The gateway's Envoy checks end-user JWTs itself, so those refusals never reach a service.
It streams them here through Envoy's gRPC access log service (only the requests jwt_authn
refused; see medimg_cli.mesh), and each becomes an event reported by the gateway: the
gateway as the actor (the token's claims are not trusted, so no user is named), outcome
UNAUTHENTICATED, the path without its query (which may carry search keys) as the method.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.envoy import als_pb2, als_pb2_grpc
from medimg_audit import log
from medimg_core import calls, timestamps
from medimg_core.audit import denial
from medimg_core.errors import Unauthenticated

METHOD = f"/{als_pb2.DESCRIPTOR.services_by_name['AccessLogService'].full_name}/StreamAccessLogs"
#: The service name login failures are reported under: the gateway is not a medimg service.
REPORTER = "gateway"


def event_of(entry: als_pb2.HTTPAccessLogEntry, gateway: str) -> pb.AuditEvent:
    """The audit event of one refused request, from the gateway's access log entry."""
    request = entry.request
    path = request.path.partition("?")[0][: log.MAX_FIELD_CHARS]
    attempted = denial(path, Unauthenticated("LOGIN_FAILED", "no valid token"))
    when = entry.common_properties.start_time
    return pb.AuditEvent(
        # Envoy's x-request-id is a fresh UUID per request at the edge, so a log entry
        # Envoy sends again is appended once.
        event_id=_uuid(request.request_id),
        event_time=when if entry.common_properties.HasField("start_time") else timestamps.now(),
        actor=pb.Actor(workload=gateway),
        action=attempted.action,
        outcome=attempted.outcome,
        service=REPORTER,
        method=path,
        trace_id=_trace_id(request.request_headers.get("traceparent", "")),
    )


def _uuid(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return str(uuid.uuid4())


def _trace_id(traceparent: str) -> str:
    """The trace id of a W3C traceparent header (version-traceid-parentid-flags), or ''."""
    parts = traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        try:
            int(parts[1], 16)
        except ValueError:
            return ""
        return parts[1]
    return ""


class RefusedLogins(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, appender: log.Appender) -> None:
        self._appender = appender

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: calls.Context,
    ) -> als_pb2.StreamAccessLogsResponse:
        call = calls.current()
        assert call is not None
        gateway = call.principal.workload
        async for message in request_iterator:
            entries = message.http_logs.log_entry
            for first in range(0, len(entries), log.MAX_BATCH):
                chunk = entries[first : first + log.MAX_BATCH]
                await self._appender.append([event_of(e, gateway) for e in chunk], REPORTER)
        return als_pb2.StreamAccessLogsResponse()
