"""The gRPC face of ingest: thin, over `pipeline` and `index`."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Executor
from datetime import datetime
from typing import TypeVar

import asyncpg
import pydicom
from google.api import httpbody_pb2

from medimg.envoy import transcoder_pb2
from medimg.ingest.v1 import ingest_service_pb2 as pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from medimg_core import pagination, timestamps
from medimg_core.audit import Access, Action, AuditClient
from medimg_core.audit import Outcome as AuditOutcome
from medimg_core.calls import Context, set_http_status
from medimg_core.errors import InvalidArgument, NotFound
from medimg_core.identity import Role
from medimg_ingest import dicomweb, index, search
from medimg_ingest.deid import keyed
from medimg_ingest.identities import IdentityVault
from medimg_ingest.objects import ObjectStore
from medimg_ingest.pipeline import Outcome, Pipeline, Result, collect_files
from medimg_ingest.settings import IngestSettings

T = TypeVar("T")
_READERS = frozenset({Role("clinician"), Role("researcher"), Role("ml-engineer"), Role("admin")})
POLICY = {
    "UploadInstances": frozenset({Role("clinician"), Role("admin")}),
    "ListStudies": _READERS,
    "GetStudy": _READERS,
    "ReidentifyPatient": frozenset({Role("admin")}),
    "GetSeriesPixels": _READERS,
    "StoreInstances": frozenset({Role("clinician"), Role("admin")}),
    "SearchStudies": _READERS,
    "SearchSeries": _READERS,
    "SearchInstances": _READERS,
    "RetrieveInstances": _READERS,
    "RetrieveMetadata": _READERS,
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
        *,
        pool: asyncpg.Pool,
        pipeline: Pipeline,
        audit: AuditClient,
        settings: IngestSettings,
        vault: IdentityVault,
        objects: ObjectStore,
        executor: Executor,
    ) -> None:
        self._pool = pool
        self._objects = objects
        self._executor = executor
        self._deid_key = settings.deid_key_file.read_bytes()
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

    # --- DICOMweb (PS3.18): the gateway's transcoder hands bodies and query parameters
    # through as google.api.HttpBody; `dicomweb` does the rest.

    async def StoreInstances(
        self, request: pb.StoreInstancesRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        body = request.http_body
        if len(body.data) > self._settings.max_upload_bytes:
            raise InvalidArgument(
                "UPLOAD_TOO_LARGE",
                f"a STOW-RS body may hold {self._settings.max_upload_bytes} bytes; send less",
            )
        files = dicomweb.split_multipart(body.content_type, body.data)
        outside: set[int] = set()
        if request.study:
            studies = await self._in_executor(_study_uids, files)
            outside = {
                i
                for i, uid in enumerate(studies)
                if uid and request.study not in (uid, keyed.replacement_uid(self._deid_key, uid))
            }
        inside = [f for i, f in enumerate(files) if i not in outside]
        ingested = iter(await self._pipeline.ingest(inside) if inside else [])
        mismatch = Result(
            Outcome.REJECTED,
            reason="STUDY_MISMATCH",
            message=f"the instance is not of study {request.study}, which the path names",
        )
        results = [mismatch if i in outside else next(ingested) for i in range(len(files))]
        stored = [
            r.instance.rsplit("/", 1)[-1] for r in results if r.outcome is not Outcome.REJECTED
        ]
        known = (
            await search.find_instances(
                self._pool, search.InstanceQuery(sop_instance_uids=stored, limit=len(stored))
            )
            if stored
            else []
        )
        classes = {_name(i): i.sop_class_uid for i in known}
        answer = dicomweb.store_answer(results, classes)
        await set_http_status(context, answer.status)
        return httpbody_pb2.HttpBody(content_type=answer.content_type, data=answer.body)

    async def SearchStudies(
        self, request: pb.SearchStudiesRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        query = dicomweb.study_search(_query_params(request.http_body))
        studies = await search.find_studies(self._pool, query)
        await self._audit.report([Access(Action.ACTION_READ, "studies")])
        return _dicom_json(dicomweb.studies_json(studies))

    async def SearchSeries(
        self, request: pb.SearchSeriesRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        query = dicomweb.series_search(_query_params(request.http_body), request.study)
        series = await search.find_series(self._pool, query)
        await self._audit.report(
            [Access(Action.ACTION_READ, f"studies/{query.study_uid or '-'}/series")]
        )
        return _dicom_json(dicomweb.series_json(series))

    async def SearchInstances(
        self, request: pb.SearchInstancesRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        params = _query_params(request.http_body)
        query = dicomweb.instance_search(params, request.study, request.series)
        instances = await search.find_instances(self._pool, query)
        resource = f"studies/{query.study_uid or '-'}/series/{query.series_uid or '-'}/instances"
        await self._audit.report([Access(Action.ACTION_READ, resource)])
        return _dicom_json(dicomweb.instances_json(instances))

    async def RetrieveInstances(
        self, request: pb.RetrieveInstancesRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        accept = dict(context.invocation_metadata() or ()).get("accept", "")
        wanted = dicomweb.wanted_transfer_syntax(str(accept))
        instances = await self._retrievable(request)
        for instance in instances:  # an error after the first message would be a cut body
            dicomweb.check_servable(instance.transfer_syntax, wanted)
        boundary = dicomweb.new_boundary()
        yield httpbody_pb2.HttpBody(content_type=dicomweb.multipart_type(boundary, wanted))
        for position, instance in enumerate(instances):
            data = await self._in_executor(self._read, instance, wanted)
            head = dicomweb.part_head(boundary, first=position == 0)
            yield httpbody_pb2.HttpBody(data=head + data)
        yield httpbody_pb2.HttpBody(data=dicomweb.closing(boundary))

    async def RetrieveMetadata(
        self, request: pb.RetrieveMetadataRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        instances = await self._retrievable(request)
        items = [await self._in_executor(self._metadata, instance) for instance in instances]
        return _dicom_json(json.dumps(items).encode())

    async def _retrievable(
        self, request: pb.RetrieveInstancesRequest | pb.RetrieveMetadataRequest
    ) -> list[search.InstanceRecord]:
        """Every instance the WADO-RS path names, after the read is audited."""
        if not request.study or (request.instance and not request.series):
            raise InvalidArgument("INVALID_NAME", "name a study, a series or an instance")
        name = f"studies/{request.study}"
        if request.series:
            name += f"/series/{request.series}"
        if request.instance:
            name += f"/instances/{request.instance}"
        instances: list[search.InstanceRecord] = []
        while True:  # all of them, a page at a time
            page = await search.find_instances(
                self._pool,
                search.InstanceQuery(
                    study_uid=request.study,
                    series_uid=request.series,
                    sop_instance_uids=[request.instance] if request.instance else [],
                    limit=search.MAX_RESULTS,
                    offset=len(instances),
                ),
            )
            instances += page
            if len(page) < search.MAX_RESULTS:
                break
        pseudonym = instances[0].patient_id if instances else ""
        outcome = AuditOutcome.OUTCOME_SUCCESS if instances else AuditOutcome.OUTCOME_FAILURE
        await self._audit.report([Access(Action.ACTION_READ, name, outcome, pseudonym)])
        if not instances:
            raise NotFound("NOT_FOUND", f"{name} is not in the index")
        return instances

    def _read(self, instance: search.InstanceRecord, wanted: str) -> bytes:
        data = self._objects.get_verified(instance.object_key, instance.sha256)
        return dicomweb.transcoded(data, instance.transfer_syntax, wanted)

    def _metadata(self, instance: search.InstanceRecord) -> dict[str, object]:
        data = self._objects.get_verified(instance.object_key, instance.sha256)
        return dicomweb.metadata(data)

    async def _in_executor(self, work: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)


def _name(instance: search.InstanceRecord) -> str:
    return (
        f"studies/{instance.study_uid}/series/{instance.series_uid}"
        f"/instances/{instance.sop_instance_uid}"
    )


def _query_params(body: httpbody_pb2.HttpBody) -> Mapping[str, Sequence[str]]:
    """The query parameters the gateway packed into the body (see medimg/envoy/transcoder.proto)."""
    params: dict[str, list[str]] = {}
    for extension in body.extensions:
        unknown = transcoder_pb2.UnknownQueryParams()
        if extension.Unpack(unknown):
            for key, values in unknown.key.items():
                params.setdefault(key, []).extend(values.values)
    return params


def _dicom_json(body: bytes) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=dicomweb.DICOM_JSON, data=body)


def _study_uids(files: Sequence[bytes]) -> list[str]:
    """The Study Instance UID of each file, as sent ("" where there is none to read)."""
    uids = []
    for data in files:
        try:
            dataset = pydicom.dcmread(
                io.BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
            )
            uids.append(str(dataset.get("StudyInstanceUID", "")))
        except Exception:  # noqa: BLE001 - the pipeline says what is wrong with the file
            uids.append("")
    return uids
