"""The gRPC face of ingest: thin, over `pipeline` and `index`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg

from medimg.ingest.v1 import ingest_service_pb2 as pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from medimg_core import pagination, timestamps
from medimg_core.audit import Access, Action, AuditClient
from medimg_core.audit import Outcome as AuditOutcome
from medimg_core.calls import Context
from medimg_core.errors import InvalidArgument, NotFound
from medimg_core.identity import Role
from medimg_ingest import index
from medimg_ingest.identities import IdentityVault
from medimg_ingest.pipeline import Outcome, Pipeline, collect_files
from medimg_ingest.settings import IngestSettings

_READERS = frozenset({Role("clinician"), Role("researcher"), Role("ml-engineer"), Role("admin")})
POLICY = {
    "UploadInstances": frozenset({Role("clinician"), Role("admin")}),
    "ListStudies": _READERS,
    "GetStudy": _READERS,
    "ReidentifyPatient": frozenset({Role("admin")}),
    "GetSeriesPixels": _READERS,
}
#: Bytes of volume data per streamed message.
PIXEL_CHUNK_BYTES = 1024 * 1024
#: A reason shorter than this says nothing an auditor could check.
MIN_REASON_CHARS = 10


def _study(summary: index.StudySummary) -> pb.Study:
    return pb.Study(
        name=f"studies/{summary.study_uid}",
        study_instance_uid=summary.study_uid,
        modalities=summary.modalities,
        series_count=summary.series_count,
        instance_count=summary.instance_count,
        create_time=timestamps.to_proto(summary.create_time),
        update_time=timestamps.to_proto(summary.update_time),
    )


_OUTCOMES = {
    Outcome.STORED: pb.InstanceResult.OUTCOME_STORED,
    Outcome.DUPLICATE: pb.InstanceResult.OUTCOME_DUPLICATE,
    Outcome.REJECTED: pb.InstanceResult.OUTCOME_REJECTED,
    Outcome.CONFLICT: pb.InstanceResult.OUTCOME_CONFLICT,
    Outcome.QUARANTINED: pb.InstanceResult.OUTCOME_QUARANTINED,
}


class IngestServicer(pb_grpc.IngestServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        pipeline: Pipeline,
        audit: AuditClient,
        settings: IngestSettings,
        vault: IdentityVault,
    ) -> None:
        self._pool = pool
        self._pipeline = pipeline
        self._vault = vault
        self._audit = audit
        self._settings = settings

    async def UploadInstances(
        self,
        request_iterator: AsyncIterator[pb.UploadInstancesRequest],
        context: Context,
    ) -> pb.UploadInstancesResponse:
        async def chunks() -> AsyncIterator[tuple[bytes, bool]]:
            async for request in request_iterator:
                yield request.chunk, request.last_chunk

        files = await collect_files(
            chunks(),
            self._settings.max_instance_bytes,
            max_total_bytes=self._settings.max_upload_bytes,
        )
        results = await self._pipeline.ingest(files)
        return pb.UploadInstancesResponse(
            results=[
                pb.InstanceResult(
                    index=i,
                    instance=r.instance,
                    outcome=_OUTCOMES[r.outcome],
                    reason=r.reason,
                    message=r.message,
                    patient_pseudonym=r.patient_pseudonym,
                )
                for i, r in enumerate(results)
            ]
        )

    async def ListStudies(
        self, request: pb.ListStudiesRequest, context: Context
    ) -> pb.ListStudiesResponse:
        size = pagination.page_size(request.page_size, default=50)
        position = pagination.decode_token(request.page_token, "t", "s")
        after = None
        if position is not None:
            try:
                after = (datetime.fromisoformat(position["t"]), str(position["s"]))
            except (TypeError, ValueError) as error:
                raise InvalidArgument(
                    "INVALID_PAGE_TOKEN", "page_token is not one this API gave"
                ) from error
        studies, more = await index.list_studies(self._pool, after=after, limit=size)
        await self._audit.report([Access(Action.ACTION_READ, "studies")])
        token = ""
        if more:
            last = studies[-1]
            token = pagination.encode_token(
                {"t": last.create_time.isoformat(), "s": last.study_uid}
            )
        return pb.ListStudiesResponse(studies=[_study(s) for s in studies], next_page_token=token)

    async def GetStudy(self, request: pb.GetStudyRequest, context: Context) -> pb.Study:
        prefix, _, uid = request.name.partition("/")
        if prefix != "studies" or not uid or "/" in uid:
            raise InvalidArgument("INVALID_NAME", "name must look like studies/{study}")
        summary = await index.get_study(self._pool, uid)
        outcome = AuditOutcome.OUTCOME_SUCCESS if summary else AuditOutcome.OUTCOME_FAILURE
        await self._audit.report([Access(Action.ACTION_READ, request.name, outcome)])
        if summary is None:
            raise NotFound("STUDY_NOT_FOUND", f"{request.name} is not in the index")
        return _study(summary)

    async def ReidentifyPatient(
        self, request: pb.ReidentifyPatientRequest, context: Context
    ) -> pb.ReidentifyPatientResponse:
        prefix, _, pseudonym = request.name.partition("/")
        if prefix != "patients" or not pseudonym or "/" in pseudonym:
            raise InvalidArgument("INVALID_NAME", "name must look like patients/{pseudonym}")
        reason = request.reason.strip()
        if len(reason) < MIN_REASON_CHARS:
            raise InvalidArgument(
                "REASON_REQUIRED",
                f"say why the identity is needed, in at least {MIN_REASON_CHARS} characters",
            )
        sealed = await self._pool.fetchval(
            "SELECT sealed FROM identities WHERE patient_pseudonym = $1", pseudonym
        )
        outcome = AuditOutcome.OUTCOME_SUCCESS if sealed else AuditOutcome.OUTCOME_FAILURE
        access = Access(
            Action.ACTION_READ, request.name, outcome, pseudonym, break_glass_reason=reason
        )
        await self._audit.report([access])  # before anything is revealed
        if sealed is None:
            raise NotFound("PATIENT_NOT_FOUND", f"{request.name} is not a known pseudonym")
        return pb.ReidentifyPatientResponse(patient_id=self._vault.open(pseudonym, sealed))

    async def GetSeriesPixels(
        self, request: pb.GetSeriesPixelsRequest, context: Context
    ) -> AsyncIterator[pb.SeriesPixels]:
        parts = request.name.split("/")
        if len(parts) != 4 or parts[0] != "studies" or parts[2] != "series" or "" in parts:
            raise InvalidArgument(
                "INVALID_NAME", "name must look like studies/{study}/series/{series}"
            )
        found = await index.series_objects(self._pool, parts[1], parts[3])
        pseudonym = found.patient_pseudonym if found else ""
        outcome = AuditOutcome.OUTCOME_SUCCESS if found else AuditOutcome.OUTCOME_FAILURE
        await self._audit.report([Access(Action.ACTION_READ, request.name, outcome, pseudonym)])
        if found is None:
            raise NotFound("SERIES_NOT_FOUND", f"{request.name} is not in the index")
        volume = await self._pipeline.volume(found.objects)
        yield pb.SeriesPixels(
            header=pb.VolumeHeader(
                shape=list(volume.array.shape),
                spacing=list(volume.spacing),
                origin=list(volume.origin),
                direction=list(volume.direction),
                sop_instance_uids=volume.sop_instance_uids,
                patient_pseudonym=pseudonym,
            )
        )
        data = memoryview(volume.array.astype("<f4", copy=False).tobytes())
        for start in range(0, len(data), PIXEL_CHUNK_BYTES):
            yield pb.SeriesPixels(data=bytes(data[start : start + PIXEL_CHUNK_BYTES]))
