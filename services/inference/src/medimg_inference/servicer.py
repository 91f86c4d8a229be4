"""The gRPC face of inference: thin, over `catalog` and `predict`.

Predict reads the target series from ingest (GetSeriesPixels, through the sidecar's
outbound listener) and reports the read of patient data to audit, with the pseudonym from
the volume's header, before the model runs. A segmentation of a series is then stored back
through ingest as a DICOM SEG (StoreSegmentation, audited there as the store of an instance
and here as made for the user) unless the request says not to; if it cannot be stored, the
Predict fails rather than answer without it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from medimg.inference.v1 import inference_service_pb2 as pb
from medimg.inference.v1 import inference_service_pb2_grpc as pb_grpc
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_core import deadlines, pagination
from medimg_core.audit import Access, Action, AuditClient
from medimg_core.audit import Outcome as AuditOutcome
from medimg_core.calls import Context
from medimg_core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MedimgError,
    NotFound,
    Unavailable,
)
from medimg_core.identity import Role
from medimg_inference import catalog
from medimg_inference.predict import (
    Classification,
    Predictor,
    Segmentation,
    SeriesVolume,
    Target,
    Task,
    read_volume,
    segmentation_upload,
)
from medimg_inference.repository import Platform
from medimg_inference.serving import ModelState
from medimg_inference.settings import InferenceSettings

_USERS = frozenset({Role("clinician"), Role("researcher"), Role("ml-engineer"), Role("admin")})
POLICY = {"ListModels": _USERS, "GetModel": _USERS, "Predict": _USERS}

_STATES = {
    ModelState.READY: pb.Model.STATE_READY,
    ModelState.LOADING: pb.Model.STATE_LOADING,
    ModelState.UNAVAILABLE: pb.Model.STATE_UNAVAILABLE,
}
_PLATFORMS = {
    Platform.TORCHSCRIPT: pb.Model.PLATFORM_TORCHSCRIPT,
    Platform.ONNX: pb.Model.PLATFORM_ONNX,
    Platform.TENSORRT: pb.Model.PLATFORM_TENSORRT,
}
_TASKS = {
    Task.CLASSIFICATION: pb.Model.TASK_CLASSIFICATION,
    Task.SEGMENTATION: pb.Model.TASK_SEGMENTATION,
}


def _model_name(name: str, field: str) -> str:
    prefix, _, model = name.partition("/")
    if prefix != "models" or not model or "/" in model:
        raise InvalidArgument(
            "INVALID_NAME", f"{field} must look like models/{{model}}", field=field
        )
    return model


def _model(description: catalog.ModelDescription) -> pb.Model:
    model = pb.Model(
        name=f"models/{description.name}",
        versions=description.versions,
        loaded_version=description.loaded_version or 0,
        state=_STATES[description.state],
        state_reason=description.state_reason,
    )
    config = description.config
    if config is not None:
        model.described_version = config.version
        model.platform = _PLATFORMS[config.execution.platform]
        model.labels.extend(config.labels)
        for specs, out in ((config.inputs, model.inputs), (config.outputs, model.outputs)):
            out.extend(pb.TensorSpec(name=s.name, dtype=s.dtype.name, shape=s.shape) for s in specs)
    if description.task is not None:
        model.task = _TASKS[description.task]
    return model


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(
        self,
        *,
        predictor: Predictor,
        audit: AuditClient,
        ingest: ingest_grpc.IngestServiceAsyncStub,
        settings: InferenceSettings,
    ) -> None:
        self._predictor = predictor
        self._audit = audit
        self._ingest = ingest
        self._settings = settings

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        size = pagination.page_size(request.page_size, default=50)
        position = pagination.decode_token(request.page_token, "m")
        after = None if position is None else str(position["m"])
        models, more = await catalog.list_models(self._predictor.server, after=after, limit=size)
        token = pagination.encode_token({"m": models[-1].name}) if more else ""
        return pb.ListModelsResponse(models=[_model(m) for m in models], next_page_token=token)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.Model:
        name = _model_name(request.name, "name")
        return _model(await catalog.get_model(self._predictor.server, name))

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        name = _model_name(request.model, "model")
        target = Target.parse(request.target)
        if request.version < 0:
            raise InvalidArgument("INVALID_VERSION", "version must be positive, or 0 for any")
        store = _store_segmentation(request, target)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        # The model first: a bad model name reads no patient data.
        loaded = await self._predictor.model(name, request.version or None)
        volume = await self._volume(target)
        prediction = await self._predictor.predict(loaded, volume, deadline)
        response = pb.PredictResponse(
            model=request.model, model_version=prediction.version, target=target.name
        )
        result = prediction.result
        if isinstance(result, Classification):
            response.classification.labels.extend(
                pb.LabelProbability(label=p.label, probability=p.probability)
                for p in result.probabilities
            )
        else:
            response.segmentation.shape.extend(result.label_map.shape)
            response.segmentation.labels.extend(
                pb.LabelVolume(label=v.label, voxel_count=v.voxel_count, volume_ml=v.volume_ml)
                for v in result.volumes
            )
            if store:
                response.segmentation.segmentation_instance = await self._store(
                    target, prediction.model, prediction.version, result, volume
                )
        return response

    async def _store(
        self,
        target: Target,
        model: str,
        version: int,
        segmentation: Segmentation,
        volume: SeriesVolume,
    ) -> str:
        """Stores the segmentation as a DICOM SEG through ingest; the SEG's resource name."""
        try:
            stored = await self._ingest.StoreSegmentation(
                segmentation_upload(segmentation, target.series_name, model, version),
                timeout=deadlines.timeout(self._settings.default_deadline_seconds),
            )
        except grpc.aio.AioRpcError as error:
            raise _not_stored(error, target) from error
        # Ingest records the store as made by this service; this records the user it was for.
        await self._audit.report(
            [
                Access(
                    Action.ACTION_CREATE,
                    stored.instance,
                    patient_pseudonym=volume.patient_pseudonym,
                )
            ]
        )
        return str(stored.instance)

    async def _volume(self, target: Target) -> SeriesVolume:
        """The target's voxels from ingest, its read audited (a failed one too)."""
        pseudonym = ""
        try:
            volume = await read_volume(
                self._pixels(target), max_bytes=self._settings.max_volume_bytes
            )
            pseudonym = volume.patient_pseudonym
            if target.instance:
                volume = volume.instance(target.instance, target.name)
        except NotFound:
            await self._audit.report(
                [Access(Action.ACTION_READ, target.name, AuditOutcome.OUTCOME_FAILURE, pseudonym)]
            )
            raise
        await self._audit.report(
            [Access(Action.ACTION_READ, target.name, patient_pseudonym=pseudonym)]
        )
        return volume

    async def _pixels(self, target: Target) -> AsyncIterator[ingest_pb.SeriesPixels]:
        call = self._ingest.GetSeriesPixels(
            ingest_pb.GetSeriesPixelsRequest(name=target.series_name),
            timeout=deadlines.timeout(self._settings.default_deadline_seconds),
        )
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            raise _from_ingest(error, target) from error


def _from_ingest(error: grpc.aio.AioRpcError, target: Target) -> MedimgError:
    """Ingest's refusal as this service's own error; its reason kept where it is the caller's
    to act on."""
    code = error.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound("SERIES_NOT_FOUND", f"{target.series_name} is not in the index")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(
            _reason(error) or "INVALID_SERIES",
            f"ingest cannot serve {target.series_name} as a volume: {error.details()}",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("DEADLINE_EXCEEDED", "ingest did not serve the series in time")
    return Unavailable("INGEST_UNAVAILABLE", f"ingest did not serve the series: {code.name}")


def _store_segmentation(request: pb.PredictRequest, target: Target) -> bool:
    """Whether a segmentation is stored: as the request says, by default for a series."""
    if not request.HasField("store_segmentation"):
        return not target.instance
    if request.store_segmentation and target.instance:
        raise InvalidArgument(
            "STORE_NEEDS_SERIES_TARGET",
            "a segmentation is stored as a DICOM SEG of a whole series: target the series, or "
            "leave store_segmentation unset",
        )
    return request.store_segmentation


def _not_stored(error: grpc.aio.AioRpcError, target: Target) -> MedimgError:
    """Ingest's refusal of the SEG as this service's own error."""
    code, reason = error.code(), _reason(error)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(
            reason or "SEGMENTATION_NOT_STORED",
            f"the segmentation of {target.series_name} cannot be stored as a DICOM SEG: "
            f"{error.details()}; predict with store_segmentation false to measure it without",
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
        # The model's labels or name, not the caller's request, make a SEG ingest refuses.
        return FailedPrecondition(
            "SEGMENTATION_NOT_STORED",
            f"ingest refused the model's segmentation as a DICOM SEG ({reason}): {error.details()}",
            ingest_reason=reason,
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound("SERIES_NOT_FOUND", f"{target.series_name} is not in the index")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(
            "DEADLINE_EXCEEDED", "ingest did not store the segmentation in time"
        )
    return Unavailable("INGEST_UNAVAILABLE", f"ingest did not store the segmentation: {code.name}")


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""
