"""The audit client: how every service reports an access to patient data.

The event names the verified caller of the current RPC (workload, and user with
roles when one is behind it), the method, the trace, and the resource — never raw
PHI. Each event has an id chosen here, so a retry after a lost answer appends
nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_core import calls, deadlines, telemetry, timestamps
from medimg_core.errors import Unavailable

log = logging.getLogger(__name__)

Action = pb.Action
Outcome = pb.Outcome


@dataclass(frozen=True)
class Access:
    """One access to report: what was done to which resource, and how it ended."""

    action: pb.Action
    resource: str
    outcome: pb.Outcome = pb.OUTCOME_SUCCESS
    patient_pseudonym: str = ""


def event_for(access: Access, service: str) -> pb.AuditEvent:
    """The audit event of an access made in the current RPC, reported by `service`."""
    call = calls.current()
    event = pb.AuditEvent(
        event_id=str(uuid.uuid4()),
        event_time=timestamps.now(),
        action=access.action,
        outcome=access.outcome,
        resource=access.resource,
        patient_pseudonym=access.patient_pseudonym,
        service=service,
        trace_id=telemetry.current_trace_id(),
    )
    if call is not None:
        event.method = call.method
        event.actor.workload = call.principal.workload
        event.actor.user = call.principal.user or ""
        event.actor.roles.extend(sorted(call.principal.roles))
    return event


class AuditClient:
    def __init__(
        self, channel: grpc.aio.Channel, *, service: str, default_deadline: float, attempts: int = 3
    ) -> None:
        self._stub = pb_grpc.AuditServiceStub(channel)
        self._service = service
        self._default_deadline = default_deadline
        self._attempts = attempts

    async def report(self, accesses: Sequence[Access]) -> list[int]:
        """Appends the events and returns their log indexes; UNAVAILABLE if audit cannot be reached.

        The caller's deadline bounds the whole exchange, retries included.
        """
        request = pb.AppendEventsRequest(events=[event_for(a, self._service) for a in accesses])
        for attempt in range(1, self._attempts + 1):
            try:
                response = await self._stub.AppendEvents(
                    request, timeout=deadlines.timeout(self._default_deadline)
                )
                return list(response.log_indexes)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == self._attempts:
                    log.error("audit append failed", extra={"fields": {"code": error.code().name}})
                    raise Unavailable(
                        "AUDIT_UNAVAILABLE", "the access could not be recorded in the audit log"
                    ) from error
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")
