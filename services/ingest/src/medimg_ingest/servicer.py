"""The gRPC face of ingest: thin, over `pipeline` and `index`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from datetime import datetime
from typing import Protocol, TypeVar

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
from medimg_core.errors import AlreadyExists, InvalidArgument, MedimgError, NotFound
from medimg_core.identity import Role
from medimg_ingest import (
    dicom,
    dicomweb,
    index,
    rendering,
    review,
    search,
    segmentations,
    stow_json,
    wado,
)
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
    "ListQuarantinedInstances": frozenset({Role("admin")}),
    "RenderQuarantinedInstance": frozenset({Role("admin")}),
    "ReleaseQuarantinedInstance": frozenset({Role("admin")}),
    "RejectQuarantinedInstance": frozenset({Role("admin")}),
    "GetSeriesPixels": _READERS,
    # Workloads only (inference; the mesh allows no gateway): no user role may call it.
    "StoreSegmentation": frozenset(),
    "StoreInstances": frozenset({Role("clinician"), Role("admin")}),
    "SearchStudies": _READERS,
    "SearchSeries": _READERS,
    "SearchInstances": _READERS,
    "RetrieveInstances": _READERS,
    "RetrieveMetadata": _READERS,
    "RetrieveFrames": _READERS,
    "RetrieveRendered": _READERS,
    "RetrieveBulkdata": _READERS,
}
#: Bytes of volume data per streamed message.
PIXEL_CHUNK_BYTES = 1024 * 1024
#: A reason shorter than this says nothing an auditor could check.
MIN_REASON_CHARS = 10


def _after(page_token: str) -> tuple[datetime, str] | None:
    """The (create time, uid) a page of a listing in creation order starts after."""
    position = pagination.decode_token(page_token, "t", "s")
    if position is None:
        return None
    try:
        return datetime.fromisoformat(position["t"]), str(position["s"])
    except (TypeError, ValueError) as error:
        raise InvalidArgument(
            "INVALID_PAGE_TOKEN", "page_token is not one this API gave"
        ) from error


def _next_token(create_time: datetime, uid: str) -> str:
    return pagination.encode_token({"t": create_time.isoformat(), "s": uid})


class _Stored(Protocol):
    """A stored object as the index records it (an instance, a quarantined instance)."""

    @property
    def object_key(self) -> str: ...
    @property
    def sha256(self) -> str: ...


def _stored_header(data: bytes) -> dicom.InstanceHeader:
    return dicom.header_of(pydicom.dcmread(io.BytesIO(data)))


def _reason(text: str, what: str) -> str:
    """A reviewer's or admin's reason for the audit log, checked for substance."""
    reason = text.strip()
    if len(reason) < MIN_REASON_CHARS:
        raise InvalidArgument(
            "REASON_REQUIRED", f"say {what}, in at least {MIN_REASON_CHARS} characters"
        )
    return reason


def _quarantined(held: review.Quarantined) -> pb.QuarantinedInstance:
    return pb.QuarantinedInstance(
        name=held.name,
        instance=held.instance,
        sop_class_uid=held.sop_class_uid,
        patient_pseudonym=held.patient_pseudonym,
        reason=held.reason,
        size_bytes=held.size_bytes,
        create_time=timestamps.to_proto(held.create_time),
    )


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


_VOXEL_TYPES = {
    pb.SegmentationHeader.VOXEL_TYPE_UINT8: "uint8",
    pb.SegmentationHeader.VOXEL_TYPE_UINT16: "uint16",
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
        after = _after(request.page_token)
        studies, more = await index.list_studies(self._pool, after=after, limit=size)
        await self._audit.report([Access(Action.ACTION_READ, "studies")])
        token = _next_token(studies[-1].create_time, studies[-1].study_uid) if more else ""
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
        reason = _reason(request.reason, "why the identity is needed")
        row = await self._pool.fetchrow(
            "SELECT key_id, sealed FROM identities WHERE patient_pseudonym = $1", pseudonym
        )
        outcome = AuditOutcome.OUTCOME_SUCCESS if row else AuditOutcome.OUTCOME_FAILURE
        access = Access(
            Action.ACTION_READ, request.name, outcome, pseudonym, break_glass_reason=reason
        )
        await self._audit.report([access])  # before anything is revealed
        if row is None:
            raise NotFound("PATIENT_NOT_FOUND", f"{request.name} is not a known pseudonym")
        patient_id = self._vault.open(pseudonym, bytes(row["sealed"]), row["key_id"])
        return pb.ReidentifyPatientResponse(patient_id=patient_id)

    async def ListQuarantinedInstances(
        self, request: pb.ListQuarantinedInstancesRequest, context: Context
    ) -> pb.ListQuarantinedInstancesResponse:
        size = pagination.page_size(request.page_size, default=50)
        after = _after(request.page_token)
        held, more = await review.list_quarantined(self._pool, after=after, limit=size)
        await self._audit.report([Access(Action.ACTION_READ, "quarantinedInstances")])
        token = _next_token(held[-1].create_time, held[-1].sop_instance_uid) if more else ""
        return pb.ListQuarantinedInstancesResponse(
            quarantined_instances=[_quarantined(h) for h in held], next_page_token=token
        )

    async def RenderQuarantinedInstance(
        self, request: pb.RenderQuarantinedInstanceRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        held = await self._held(request.name, Action.ACTION_READ)
        how = rendering.options("image/png", {})
        image = await self._on_object(held, rendering.render, 1, how)
        return httpbody_pb2.HttpBody(content_type=how.media_type, data=image)

    async def ReleaseQuarantinedInstance(
        self, request: pb.ReleaseQuarantinedInstanceRequest, context: Context
    ) -> pb.QuarantinedInstance:
        reason = _reason(request.reason, "what was checked before it may be served")
        held = await self._held(request.name, Action.ACTION_UPDATE, reason)
        await review.release(self._pool, held, await self._on_object(held, _stored_header))
        await self._pipeline.announce([held.instance])
        return _quarantined(held)

    async def RejectQuarantinedInstance(
        self, request: pb.RejectQuarantinedInstanceRequest, context: Context
    ) -> pb.QuarantinedInstance:
        reason = _reason(request.reason, "why it is rejected")
        held = await self._held(request.name, Action.ACTION_DELETE, reason)
        return _quarantined(await review.reject(self._pool, held.sop_instance_uid))

    async def _held(self, name: str, action: Action, reason: str = "") -> review.Quarantined:
        """The quarantined instance `name`, once the access to it (or the attempt, when it is
        not there) is on record; a decision's reason goes with it."""
        uid = review.parse_name(name)
        try:
            held = await review.get(self._pool, uid)
        except NotFound:
            failed = Access(action, name, AuditOutcome.OUTCOME_FAILURE, break_glass_reason=reason)
            await self._audit.report([failed])
            raise
        access = Access(
            action, name, patient_pseudonym=held.patient_pseudonym, break_glass_reason=reason
        )
        await self._audit.report([access])  # before anything is shown or changed
        return held

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
                frame_numbers=volume.frame_numbers,
                patient_pseudonym=pseudonym,
            )
        )
        data = memoryview(volume.array.astype("<f4", copy=False).tobytes())
        for start in range(0, len(data), PIXEL_CHUNK_BYTES):
            yield pb.SeriesPixels(data=bytes(data[start : start + PIXEL_CHUNK_BYTES]))

    async def StoreSegmentation(
        self, request_iterator: AsyncIterator[pb.StoreSegmentationRequest], context: Context
    ) -> pb.StoreSegmentationResponse:
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("HEADER_REQUIRED", "the first message must carry the header")
        header = first.header
        spec = segmentations.check_spec(
            source_series=header.source_series,
            shape=list(header.shape),
            voxel_type=_VOXEL_TYPES.get(header.voxel_type),
            segment_labels=list(header.segment_labels),
            algorithm_name=header.algorithm_name,
            algorithm_version=header.algorithm_version,
            max_bytes=self._settings.max_upload_bytes,
        )
        found = await index.series_objects(self._pool, spec.study_uid, spec.series_uid)
        pseudonym = found.patient_pseudonym if found else ""
        outcome = AuditOutcome.OUTCOME_SUCCESS if found else AuditOutcome.OUTCOME_FAILURE
        # The source instances are read to build the SEG; the store itself is audited by
        # the pipeline.
        await self._audit.report([Access(Action.ACTION_READ, spec.series_name, outcome, pseudonym)])
        if found is None:
            raise NotFound("SERIES_NOT_FOUND", f"{spec.series_name} is not in the index")
        data = bytearray(first.data)
        async for message in messages:
            if message.HasField("header"):
                raise InvalidArgument("HEADER_REPEATED", "only the first message has a header")
            data += message.data
            if len(data) > spec.size_bytes:
                raise InvalidArgument(
                    "LABEL_MAP_SIZE_MISMATCH",
                    f"the label map holds more than the {spec.size_bytes} bytes of its header",
                )
        built = await self._in_executor(self._segmentation, spec, bytes(data), found.objects)
        result = (await self._pipeline.ingest([built.data], deidentified=True))[0]
        if result.outcome is Outcome.CONFLICT:
            raise AlreadyExists("SEGMENTATION_CONFLICT", result.message)
        if result.outcome not in (Outcome.STORED, Outcome.DUPLICATE):
            # A SEG built here that the pipeline refuses is a fault of this service.
            raise MedimgError(
                "SEGMENTATION_REJECTED", f"the SEG built was refused: {result.reason}"
            )
        return pb.StoreSegmentationResponse(
            instance=result.instance, outcome=_OUTCOMES[result.outcome]
        )

    def _segmentation(
        self, spec: segmentations.SegmentationSpec, data: bytes, stored: Sequence[tuple[str, str]]
    ) -> segmentations.BuiltSegmentation:
        labels = segmentations.label_map(spec, data)
        sources = [
            pydicom.dcmread(io.BytesIO(self._objects.get_verified(key, sha256)))
            for key, sha256 in stored
        ]
        return segmentations.build(spec, labels, sources)

    # --- DICOMweb (PS3.18): the gateway's transcoder hands bodies and query parameters
    # through as google.api.HttpBody; `dicomweb` does the rest.

    async def StoreInstances(
        self, request: pb.StoreInstancesRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        body = request.http_body
        data = body.data  # each read of a bytes field is a copy of it
        if len(data) > self._settings.max_upload_bytes:
            raise InvalidArgument(
                "UPLOAD_TOO_LARGE",
                f"a STOW-RS body may hold {self._settings.max_upload_bytes} bytes; send less",
            )
        root, parts = dicomweb.split_multipart(body.content_type, data)
        # DICOM JSON with bulk data becomes the Part 10 file it describes, or a refusal.
        prepared: list[bytes | Result] = (
            await self._in_executor(stow_json.instances, parts)
            if root == dicomweb.DICOM_JSON
            else [p.data for p in parts]
        )
        refused = {i: p for i, p in enumerate(prepared) if isinstance(p, Result)}
        files = {i: p for i, p in enumerate(prepared) if isinstance(p, bytes)}
        if request.study:
            mismatch = Result(
                Outcome.REJECTED,
                reason="STUDY_MISMATCH",
                message=f"the instance is not of study {request.study}, which the path names",
            )
            studies = await self._in_executor(_study_uids, list(files.values()))
            for i, uid in zip(list(files), studies, strict=True):
                if uid and request.study not in (uid, keyed.replacement_uid(self._deid_key, uid)):
                    refused[i] = mismatch
        inside = [f for i, f in files.items() if i not in refused]
        ingested = iter(await self._pipeline.ingest(inside) if inside else [])
        results = [refused[i] if i in refused else next(ingested) for i in range(len(prepared))]
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
        async with _negotiation(context):
            wanted = dicomweb.wanted_transfer_syntax(_accept(context))
        instances = await self._retrievable(request)
        async with _negotiation(context):
            for instance in instances:  # an error after the first message would be a cut body
                dicomweb.check_servable(instance.transfer_syntax, wanted)
        boundary = dicomweb.new_boundary()
        yield httpbody_pb2.HttpBody(content_type=dicomweb.multipart_type(boundary, wanted))
        for position, instance in enumerate(instances):
            data = await self._on_object(
                instance, dicomweb.transcoded, instance.transfer_syntax, wanted
            )
            head = dicomweb.part_head(boundary, first=position == 0)
            yield httpbody_pb2.HttpBody(data=head + data)
        yield httpbody_pb2.HttpBody(data=dicomweb.closing(boundary))

    async def RetrieveMetadata(
        self, request: pb.RetrieveMetadataRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        instances = await self._retrievable(request)
        base = _public_base(context)
        items = [
            await self._on_object(i, dicomweb.metadata, f"{base}/dicomweb/{_name(i)}")
            for i in instances
        ]
        return _dicom_json(json.dumps(items).encode())

    async def RetrieveFrames(
        self, request: pb.RetrieveFramesRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        numbers = wado.frame_numbers(request.frames)
        (instance,) = await self._retrievable(request, f"/frames/{request.frames}")
        async with _negotiation(context):
            representation = wado.negotiate(_accept(context), instance.transfer_syntax)
        frames = await self._on_object(instance, wado.frames, numbers, representation)
        for message in _multipart(frames, representation):
            yield message

    async def RetrieveRendered(
        self, request: pb.RetrieveRenderedRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        async with _negotiation(context):
            how = rendering.options(_accept(context), _query_params(request.http_body))
        numbers = wado.frame_numbers(request.frames) if request.frames else [1]
        if len(numbers) != 1:
            raise InvalidArgument("INVALID_FRAME_LIST", "frames are rendered one at a time")
        suffix = f"/frames/{request.frames}/rendered" if request.frames else "/rendered"
        (instance,) = await self._retrievable(request, suffix)
        image = await self._on_object(instance, rendering.render, numbers[0], how)
        return httpbody_pb2.HttpBody(content_type=how.media_type, data=image)

    async def RetrieveBulkdata(
        self, request: pb.RetrieveBulkdataRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        path = wado.bulk_data_path(request.attribute)
        (instance,) = await self._retrievable(request, f"/bulkdata/{path}")
        async with _negotiation(context):
            representation, parts = await self._on_object(
                instance, wado.bulk_data, path, _accept(context)
            )
        for message in _multipart(parts, representation):
            yield message

    async def _retrievable(
        self,
        request: pb.RetrieveInstancesRequest
        | pb.RetrieveMetadataRequest
        | pb.RetrieveFramesRequest
        | pb.RetrieveRenderedRequest
        | pb.RetrieveBulkdataRequest,
        what: str = "",
    ) -> list[search.InstanceRecord]:
        """Every instance the WADO-RS path names, after the read (of `what` in them, if
        given: `/frames/1`) is audited."""
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
        await self._audit.report([Access(Action.ACTION_READ, name + what, outcome, pseudonym)])
        if not instances:
            raise NotFound("NOT_FOUND", f"{name} is not in the index")
        return instances

    async def _on_object(self, stored: _Stored, work: Callable[..., T], *args: object) -> T:
        """`work(the stored object's bytes, *args)` in a worker thread, the bytes checked
        against the hash recorded when they were stored."""

        def run() -> T:
            return work(self._objects.get_verified(stored.object_key, stored.sha256), *args)

        return await self._in_executor(run)

    async def _in_executor(self, work: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)


def _accept(context: Context) -> str:
    return str(dict(context.invocation_metadata() or ()).get("accept", ""))


@contextlib.asynccontextmanager
async def _negotiation(context: Context) -> AsyncIterator[None]:
    """Content negotiation: an Accept nothing can meet is answered 406, not 400."""
    try:
        yield
    except dicomweb.NotAcceptable:
        await set_http_status(context, 406)
        raise


def _multipart(
    parts: Sequence[bytes], representation: wado.Representation
) -> Iterator[httpbody_pb2.HttpBody]:
    """A multipart/related body of `parts`, in messages of at most PIXEL_CHUNK_BYTES."""
    boundary = dicomweb.new_boundary()
    yield httpbody_pb2.HttpBody(content_type=representation.multipart_type(boundary))
    for position, part in enumerate(parts):
        head = dicomweb.part_head(boundary, position == 0, representation.part_type)
        yield httpbody_pb2.HttpBody(data=head)
        for start in range(0, len(part), PIXEL_CHUNK_BYTES):
            yield httpbody_pb2.HttpBody(data=part[start : start + PIXEL_CHUNK_BYTES])
    yield httpbody_pb2.HttpBody(data=dicomweb.closing(boundary))


#: What a forwarded host may look like (host name or address, and port).
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _public_base(context: Context) -> str:
    """The scheme and host clients reach the gateway at, when a proxy says so
    (X-Forwarded-Host, X-Forwarded-Proto), for absolute BulkDataURIs; else "" (relative)."""
    metadata = dict(context.invocation_metadata() or ())
    host = str(metadata.get("x-forwarded-host", "")).split(",")[0].strip()
    scheme = str(metadata.get("x-forwarded-proto", "http")).split(",")[0].strip()
    if not host or not _HOST.fullmatch(host) or scheme not in ("http", "https"):
        return ""
    return f"{scheme}://{host}"


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
