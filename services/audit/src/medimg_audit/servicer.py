"""The gRPC face of the audit log: thin, over `log` and `checkpoints`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC

import asyncpg
from google.api import httpbody_pb2

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_audit import checkpoints, export, log
from medimg_audit.checkpoints import Signer
from medimg_core import calls, pagination
from medimg_core.audit import Access, denial, event_for
from medimg_core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from medimg_core.identity import Role

#: Verifiers read the whole log: large pages keep the per-page costs (the listing's own
#: audit event, a round trip) small. 10,000 events are about 10 MB.
MAX_EVENTS_PAGE = 10_000
_AUDITORS = frozenset({Role("auditor"), Role("admin")})
POLICY = {
    "AppendEvents": frozenset[Role](),  # workloads only
    "ListAuditEvents": _AUDITORS,
    "GetCheckpoint": _AUDITORS,
    "ListCheckpoints": _AUDITORS,
    "CreateCheckpoint": _AUDITORS,
    "GetInclusionProof": _AUDITORS,
    "GetConsistencyProof": _AUDITORS,
    "ExportAuditEvents": _AUDITORS,
    "StreamAccessLogs": frozenset[Role](),  # the gateway's own access log (logins.py)
}


def _position(token: str) -> int | None:
    position = pagination.decode_token(token, "after")
    after = None if position is None else position["after"]
    if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
        raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not one this API gave")
    return after


def _filters(request: pb.ListAuditEventsRequest) -> log.Filters:
    if request.action not in pb.Action.values() or request.outcome not in pb.Outcome.values():
        raise InvalidArgument("INVALID_FILTER", "action and outcome must be known values")
    start = request.start_time.ToDatetime(tzinfo=UTC) if request.HasField("start_time") else None
    end = request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else None
    if start is not None and end is not None and end <= start:
        raise InvalidArgument("INVALID_TIME_RANGE", "end_time must be after start_time")
    return log.Filters(
        actor_workload=request.actor_workload,
        actor_user=request.actor_user,
        patient_pseudonym=request.patient_pseudonym,
        resource=request.resource,
        action=request.action,
        outcome=request.outcome,
        start_time=start,
        end_time=end,
    )


def _index_of(name: str) -> int:
    prefix, _, index = name.partition("/")
    if prefix != "auditEvents" or not index.isdigit():
        raise InvalidArgument("INVALID_NAME", "name must look like auditEvents/{log_index}")
    return int(index)


class AuditServicer(pb_grpc.AuditServiceServicer):
    def __init__(self, pool: asyncpg.Pool, appender: log.Appender, signer: Signer) -> None:
        self._pool = pool
        self._appender = appender
        self._signer = signer

    async def record_denial(self, method: str, error: Unauthenticated | PermissionDenied) -> None:
        """A refused call to the log is itself recorded in the log."""
        await self._appender.append([event_for(denial(method, error), "audit")], "audit")

    async def _record_own(self, action: pb.Action, resource: str) -> None:
        """Reading the log is an access to the log: it is recorded before it is served."""
        await self._appender.append([event_for(Access(action, resource), "audit")], "audit")

    async def AppendEvents(
        self, request: pb.AppendEventsRequest, context: calls.Context
    ) -> pb.AppendEventsResponse:
        call = calls.current()
        assert call is not None
        indexes = await self._appender.append(request.events, call.principal.workload_name)
        return pb.AppendEventsResponse(log_indexes=indexes)

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: calls.Context
    ) -> pb.ListAuditEventsResponse:
        size = pagination.page_size(request.page_size, default=100, maximum=MAX_EVENTS_PAGE)
        after = _position(request.page_token)
        filters = _filters(request)
        await self._record_own(pb.ACTION_READ, "auditEvents")
        events, last = await log.list_events(self._pool, filters, after=after, limit=size)
        token = "" if last is None else pagination.encode_token({"after": last})
        return pb.ListAuditEventsResponse(audit_events=events, next_page_token=token)

    async def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: calls.Context
    ) -> pb.Checkpoint:
        prefix, _, which = request.name.partition("/")
        if prefix != "checkpoints" or not (which == "latest" or which.isdigit()):
            raise InvalidArgument(
                "INVALID_NAME", "name must be checkpoints/latest or checkpoints/{tree_size}"
            )
        return await checkpoints.get(self._pool, None if which == "latest" else int(which))

    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: calls.Context
    ) -> pb.ListCheckpointsResponse:
        size = pagination.page_size(request.page_size, default=100)
        found, last = await checkpoints.list_checkpoints(
            self._pool, after=_position(request.page_token), limit=size
        )
        token = "" if last is None else pagination.encode_token({"after": last})
        return pb.ListCheckpointsResponse(checkpoints=found, next_page_token=token)

    async def CreateCheckpoint(
        self, request: pb.CreateCheckpointRequest, context: calls.Context
    ) -> pb.Checkpoint:
        return await checkpoints.create(self._pool, self._signer)

    async def GetInclusionProof(
        self, request: pb.GetInclusionProofRequest, context: calls.Context
    ) -> pb.InclusionProof:
        index = _index_of(request.name)
        hashes = await log.inclusion_proof(self._pool, index, request.tree_size)
        return pb.InclusionProof(leaf_index=index, tree_size=request.tree_size, hashes=hashes)

    async def GetConsistencyProof(
        self, request: pb.GetConsistencyProofRequest, context: calls.Context
    ) -> pb.ConsistencyProof:
        hashes = await log.consistency_proof(self._pool, request.first_size, request.second_size)
        return pb.ConsistencyProof(
            first_size=request.first_size, second_size=request.second_size, hashes=hashes
        )

    async def ExportAuditEvents(
        self, request: pb.ExportAuditEventsRequest, context: calls.Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        if not (request.HasField("start_time") and request.HasField("end_time")):
            raise InvalidArgument("INVALID_TIME_RANGE", "an export needs start_time and end_time")
        start = request.start_time.ToDatetime(tzinfo=UTC)
        end = request.end_time.ToDatetime(tzinfo=UTC)
        if end <= start:
            raise InvalidArgument("INVALID_TIME_RANGE", "end_time must be after start_time")
        filters = log.Filters(start_time=start, end_time=end)
        if request.format == pb.EXPORT_FORMAT_DICOM_XML:
            content_type, bundle = "application/xml", None
        elif request.format == pb.EXPORT_FORMAT_FHIR_JSON:
            content_type, bundle = "application/fhir+json", export.FhirBundleWriter()
        else:
            raise InvalidArgument("INVALID_FORMAT", "format must be DICOM_XML or FHIR_JSON")
        await self._record_own(pb.ACTION_EXPORT, "auditEvents")
        after = None
        while True:
            page, after = await log.list_events(self._pool, filters, after=after, limit=500)
            if bundle is not None:
                data = bundle.add(page)
            else:
                data = b"".join(export.dicom_xml_chunks(page))
            if data:
                yield httpbody_pb2.HttpBody(content_type=content_type, data=data)
            if after is None:
                break
        if bundle is not None:
            yield httpbody_pb2.HttpBody(content_type=content_type, data=bundle.finish())
