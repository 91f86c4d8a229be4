"""The KServe v2 / Open Inference Protocol (`inference.GRPCInferenceService`), as Triton speaks it.

A thin servicer over `ModelServer`, so that tritonclient, grpcurl and any KServe v2 client
use medimg's model repository as they use Triton's. The conversions between protocol tensors
and numpy arrays are plain functions. Tensors arrive as typed `contents` or as
`raw_input_contents` (little-endian, row-major, what tritonclient sends); outputs go back in
`raw_output_contents`, as Triton answers. Every tensor has the batch axis first, as for a
Triton model with `max_batch_size > 0`. Shared memory, trace and log settings are not
offered: they answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from types import MappingProxyType
from typing import Any

import numpy as np

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from inference import model_config_pb2 as mc
from medimg_core.calls import Context
from medimg_core.errors import InvalidArgument, MedimgError, NotFound, Unavailable, Unimplemented
from medimg_core.identity import Role
from medimg_inference.backends import Array
from medimg_inference.batcher import ModelStatistics
from medimg_inference.repository import (
    Accelerator,
    ModelConfig,
    ModelVersion,
    Platform,
    TensorSpec,
    check_model_name,
)
from medimg_inference.serving import LoadedModel, ModelServer, ModelState

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

#: The protocol's data types by their KServe v2 name, from model_config.proto's DataType
#: (TYPE_<NAME>; the protocol calls TYPE_STRING "BYTES").
DATATYPES: Mapping[str, int] = MappingProxyType(
    {
        ("BYTES" if number == mc.TYPE_STRING else name.removeprefix("TYPE_")): number
        for name, number in mc.DataType.items()
        if number != mc.TYPE_INVALID
    }
)
#: The data types numpy cannot hold, which no medimg model takes (repository.DTYPES).
UNSERVED_DATATYPES = frozenset({"BYTES", "BF16"})
#: The numpy dtype of each data type a model may take ("FP32" -> float32, ...).
NUMPY_DTYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        name: np.dtype(name.lower().replace("fp", "float"))
        for name in DATATYPES
        if name not in UNSERVED_DATATYPES
    }
)
_DATATYPE_OF: Mapping[np.dtype[Any], str] = MappingProxyType(
    {dtype: name for name, dtype in NUMPY_DTYPES.items()}
)
#: The field of InferTensorContents that holds each data type (FP16 has none: raw only).
CONTENTS_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "BOOL": "bool_contents",
        "INT8": "int_contents",
        "INT16": "int_contents",
        "INT32": "int_contents",
        "INT64": "int64_contents",
        "UINT8": "uint_contents",
        "UINT16": "uint_contents",
        "UINT32": "uint_contents",
        "UINT64": "uint64_contents",
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
        "BYTES": "bytes_contents",
    }
)
_CONTENTS_DTYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        "bool_contents": np.dtype(np.bool_),
        "int_contents": np.dtype(np.int32),
        "int64_contents": np.dtype(np.int64),
        "uint_contents": np.dtype(np.uint32),
        "uint64_contents": np.dtype(np.uint64),
        "fp32_contents": np.dtype(np.float32),
        "fp64_contents": np.dtype(np.float64),
    }
)
#: Triton's platform and backend names for each model file format.
PLATFORMS: Mapping[Platform, tuple[str, str]] = MappingProxyType(
    {
        Platform.TORCHSCRIPT: ("pytorch_libtorch", "pytorch"),
        Platform.ONNX: ("onnxruntime_onnx", "onnxruntime"),
        Platform.TENSORRT: ("tensorrt_plan", "tensorrt"),
    }
)
#: The protocol extensions medimg offers (ServerMetadata).
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
#: Tensors larger than this are converted in a thread, off the event loop.
_INLINE_BYTES = 1 << 20
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
#: Parameters of RepositoryModelUnload that change nothing here (medimg has no ensembles).
_UNLOAD_PARAMETERS = frozenset({"unload_dependents"})

#: Callers are workloads and operators through their sidecars (deploy/mesh.toml allows them
#: per method); there is no REST for KServe, and no user role reaches these methods.
POLICY: Mapping[str, frozenset[Role]] = MappingProxyType(
    {
        method.name: frozenset()
        for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    }
)


# --- conversions ---------------------------------------------------------------------------


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The protocol's name of a numpy dtype a model declares ("FP32" for float32)."""
    return _DATATYPE_OF[dtype.newbyteorder("=")]


def parse_version(text: str) -> ModelVersion | None:
    """A request's model version: "" is the version serving; otherwise a positive integer."""
    if not text:
        return None
    if not _VERSION.fullmatch(text):
        raise InvalidArgument(
            "INVALID_MODEL_VERSION",
            f"a model version is a positive integer, not {text[:32]!r}",
            version=text[:32],
        )
    return ModelVersion(int(text))


def decode_inputs(request: pb.ModelInferRequest, specs: Sequence[TensorSpec]) -> dict[str, Array]:
    """The request's input tensors as numpy arrays (batch axis first), checked against the
    model's inputs for name and data type; the batcher checks shapes and batch sizes."""
    by_name = {spec.name: spec for spec in specs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            "RAW_INPUT_COUNT_MISMATCH",
            f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents",
        )
    arrays: dict[str, Array] = {}
    for index, tensor in enumerate(request.inputs):
        spec = by_name.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                "UNEXPECTED_INPUT",
                f"model {request.model_name!r} has no input {tensor.name[:128]!r} "
                f"(its inputs: {', '.join(by_name)})",
                input=tensor.name[:128],
            )
        if tensor.name in arrays:
            raise InvalidArgument(
                "DUPLICATE_INPUT", f"input {tensor.name!r} is given twice", input=tensor.name
            )
        dtype = _input_dtype(tensor, spec)
        shape = _shape(tensor)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    "CONTENTS_AND_RAW_CONTENTS",
                    f"input {tensor.name!r} has contents although the request uses "
                    "raw_input_contents",
                    input=tensor.name,
                )
            arrays[tensor.name] = _from_raw(tensor.name, raw[index], dtype, shape)
        else:
            arrays[tensor.name] = _from_contents(tensor, dtype, shape)
    return arrays


def requested_outputs(request: pb.ModelInferRequest, specs: Sequence[TensorSpec]) -> list[str]:
    """The names of the outputs to answer with, in order: those requested, else all."""
    declared = [spec.name for spec in specs]
    names: list[str] = []
    for output in request.outputs:
        if output.name not in declared:
            raise InvalidArgument(
                "UNKNOWN_OUTPUT",
                f"model {request.model_name!r} has no output {output.name[:128]!r} "
                f"(its outputs: {', '.join(declared)})",
                output=output.name[:128],
            )
        if "classification" in output.parameters:
            raise InvalidArgument(
                "UNSUPPORTED_PARAMETER",
                "the classification extension is not offered: request the output itself",
                output=output.name,
            )
        if output.name not in names:
            names.append(output.name)
    return names or declared


def encode_response(
    request: pb.ModelInferRequest,
    config: ModelConfig,
    outputs: Mapping[str, Array],
    names: Iterable[str],
) -> pb.ModelInferResponse:
    """The answer to `request`: the named outputs, as raw little-endian bytes."""
    response = pb.ModelInferResponse(
        model_name=config.name, model_version=str(config.version), id=request.id
    )
    for name in names:
        array = outputs[name]
        response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        response.raw_output_contents.append(np.ascontiguousarray(little).tobytes())
    return response


def model_metadata(config: ModelConfig) -> pb.ModelMetadataResponse:
    """The model's metadata, with -1 for the batch axis and every dynamic size."""

    def tensor(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=datatype_of(spec.dtype), shape=[-1, *spec.shape]
        )

    return pb.ModelMetadataResponse(
        name=config.name,
        versions=[str(config.version)],
        platform=PLATFORMS[config.execution.platform][0],
        inputs=[tensor(spec) for spec in config.inputs],
        outputs=[tensor(spec) for spec in config.outputs],
    )


def model_config(config: ModelConfig) -> mc.ModelConfig:
    """Our ModelConfig as Triton's: dims per batch item (-1: variable), the batch axis
    implied by max_batch_size, dynamic batching and the instance group."""
    platform, backend = PLATFORMS[config.execution.platform]
    device = config.execution.device
    group = mc.ModelInstanceGroup(
        name=config.name,
        kind=mc.ModelInstanceGroup.KIND_GPU
        if config.execution.uses_cuda
        else mc.ModelInstanceGroup.KIND_CPU,
        count=config.execution.instances,
        gpus=[int(device.partition(":")[2] or 0)] if config.execution.uses_cuda else [],
    )
    message = mc.ModelConfig(
        name=config.name,
        platform=platform,
        backend=backend,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        max_batch_size=config.batching.max_batch_size,
        input=[
            mc.ModelInput(name=spec.name, data_type=_data_type(spec), dims=spec.shape)
            for spec in config.inputs
        ],
        output=[
            mc.ModelOutput(name=spec.name, data_type=_data_type(spec), dims=spec.shape)
            for spec in config.outputs
        ],
        instance_group=[group],
        default_model_filename=config.execution.model_file.name,
        response_cache=mc.ModelResponseCache(enable=config.response_cache),
    )
    if config.batching.max_batch_size > 1:
        message.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=config.batching.preferred_batch_sizes,
                max_queue_delay_microseconds=config.batching.max_queue_delay_us,
                default_queue_policy=mc.ModelQueuePolicy(
                    max_queue_size=config.batching.queue_limit
                ),
            )
        )
    if config.execution.accelerator is not Accelerator.NONE:
        accelerator = mc.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator(
            name=config.execution.accelerator
        )
        message.optimization.execution_accelerators.cpu_execution_accelerator.append(accelerator)
    return message


def model_statistics(name: str, version: int, stats: ModelStatistics) -> pb.ModelStatistics:
    """The batcher's counters as Triton reports them; a cache hit never queues nor runs."""
    duration = pb.StatisticDuration
    executed = stats.success_count - stats.cache_hit_count
    return pb.ModelStatistics(
        name=name,
        version=str(version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(count=stats.success_count, ns=stats.success_ns),
            fail=duration(count=stats.failure_count, ns=stats.failure_ns),
            queue=duration(count=executed, ns=stats.queue_ns),
            compute_input=duration(count=executed, ns=stats.compute_input_ns),
            compute_infer=duration(count=executed, ns=stats.compute_infer_ns),
            compute_output=duration(count=executed, ns=stats.compute_output_ns),
            cache_hit=duration(count=stats.cache_hit_count, ns=stats.cache_hit_ns),
            cache_miss=duration(count=stats.cache_miss_count, ns=stats.cache_miss_ns),
        ),
        # Durations per batch size are not kept: only how many executions had each size.
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=duration(count=count))
            for size, count in sorted(stats.executions_by_batch_size.items())
        ],
    )


def _data_type(spec: TensorSpec) -> str:
    """The model_config.proto DataType of a tensor, by its enum name ("TYPE_FP32")."""
    return mc.DataType.Name(DATATYPES[datatype_of(spec.dtype)])


def _input_dtype(tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec) -> np.dtype[Any]:
    datatype = tensor.datatype
    if datatype not in DATATYPES:
        raise InvalidArgument(
            "UNKNOWN_DATATYPE",
            f"input {tensor.name!r}: {datatype[:32]!r} is not a data type of the protocol "
            f"({', '.join(DATATYPES)})",
            input=tensor.name,
        )
    wanted = datatype_of(spec.dtype)
    if datatype != wanted:
        if datatype in UNSERVED_DATATYPES:
            raise InvalidArgument(
                "UNSUPPORTED_DATATYPE",
                f"input {tensor.name!r} is {datatype}, which no medimg model takes; "
                f"this input is {wanted}",
                input=tensor.name,
            )
        raise InvalidArgument(
            "INPUT_DATATYPE_MISMATCH",
            f"input {tensor.name!r} is {datatype}, the model takes {wanted}",
            input=tensor.name,
        )
    return NUMPY_DTYPES[datatype]


def _shape(tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if not shape or any(size < 0 for size in shape):
        raise InvalidArgument(
            "INVALID_SHAPE",
            f"input {tensor.name!r} has shape {list(shape)}: a batch axis and sizes >= 0",
            input=tensor.name,
        )
    return shape


def _from_raw(name: str, raw: bytes, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Array:
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            "RAW_CONTENTS_SIZE_MISMATCH",
            f"input {name!r} of shape {list(shape)} needs {expected} bytes, "
            f"raw_input_contents holds {len(raw)}",
            input=name,
        )
    # astype copies: the array is writable and in native byte order.
    array: Array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    return array


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> Array:
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        raise InvalidArgument(
            "NO_TYPED_CONTENTS",
            f"input {tensor.name!r} is {tensor.datatype}, which has no typed contents: "
            "send it in raw_input_contents",
            input=tensor.name,
        )
    if others := [f.name for f, _ in tensor.contents.ListFields() if f.name != field]:
        raise InvalidArgument(
            "CONTENTS_FIELD_MISMATCH",
            f"input {tensor.name!r} is {tensor.datatype}, held in {field}, not {others[0]}",
            input=tensor.name,
        )
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            "CONTENTS_SIZE_MISMATCH",
            f"input {tensor.name!r} of shape {list(shape)} needs {count} values, "
            f"{field} holds {len(values)}",
            input=tensor.name,
        )
    wide = np.fromiter(values, dtype=_CONTENTS_DTYPES[field], count=count)
    if dtype.kind in "iu" and dtype.itemsize < wide.dtype.itemsize and wide.size:
        limits = np.iinfo(dtype)
        if wide.min() < limits.min or wide.max() > limits.max:
            raise InvalidArgument(
                "CONTENTS_OUT_OF_RANGE",
                f"input {tensor.name!r} is {tensor.datatype}: its values lie in "
                f"{limits.min}..{limits.max}",
                input=tensor.name,
            )
    array: Array = wide.astype(dtype).reshape(shape)
    return array


def _request_bytes(request: pb.ModelInferRequest) -> int:
    return sum(len(raw) for raw in request.raw_input_contents) or request.ByteSize()


# --- the servicer --------------------------------------------------------------------------


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over one ModelServer."""

    def __init__(self, server: ModelServer, *, repository_name: str = "") -> None:
        self.server = server
        #: The one repository's name; requests may leave it empty.
        self.repository_name = repository_name

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        # This servicer answers once the service is built, its start-up models loaded.
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        try:
            release = package_version("medimg-inference")
        except PackageNotFoundError:
            release = "unknown"
        return pb.ServerMetadataResponse(
            name="medimg-inference", version=release, extensions=EXTENSIONS
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        version = parse_version(request.version)
        return pb.ModelReadyResponse(ready=self.server.ready(request.name, version))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        loaded = await self._serving(request.name, parse_version(request.version))
        return model_metadata(loaded.config)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        """The configuration of the version serving, or of any version in the repository."""
        name = check_model_name(request.name)
        version = parse_version(request.version)
        if self.server.ready(name, version):
            config = self.server.model(name, version).config
        else:
            config = await asyncio.to_thread(self.server.repository.config, name, version)
        return pb.ModelConfigResponse(config=model_config(config))

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        return await self._infer(request, _deadline(context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Runs the requests concurrently (so the batcher may batch them) and answers each as
        it finishes; a request that fails gets its error in `error_message`, and the stream
        goes on."""
        deadline = _deadline(context)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            answers.put_nowait(await self._stream_answer(request, deadline))

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: answers.put_nowait(None))
        try:
            while (item := await answers.get()) is not None:
                yield item
            await reader  # its error, if reading the stream failed
        finally:
            for task in (reader, *running):
                task.cancel()

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        """Every version serving, or the one of `name` (at `version`, if given)."""
        wanted: set[tuple[str, int]] = set()
        if request.name:
            loaded = await self._serving(request.name, parse_version(request.version))
            wanted.add((loaded.config.name, loaded.version))
        elif request.version:
            raise InvalidArgument(
                "VERSION_WITHOUT_MODEL", "a version of the statistics needs a model name"
            )
        statistics = self.server.statistics()
        return pb.ModelStatisticsResponse(
            model_stats=[
                model_statistics(name, version, stats)
                for (name, version), stats in sorted(statistics.items())
                if not request.name or (name, version) in wanted
            ]
        )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        self._check_repository(request.repository_name)
        entries = await self.server.index()
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=entry.name,
                    version="" if entry.version is None else str(entry.version),
                    state=entry.state.value,
                    reason=entry.reason,
                )
                for entry in entries
                if not request.ready or entry.state is ModelState.READY
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        """Loads (or reloads) the newest version of the model."""
        self._check_repository(request.repository_name)
        if request.parameters:
            # Triton's "config" and "file:" overrides would let a caller put models on the
            # server; models come from the repository only.
            key = sorted(request.parameters)[0]
            raise InvalidArgument(
                "UNSUPPORTED_PARAMETER",
                f"load parameters are not offered ({key[:64]!r}): models come from the "
                "repository as they are",
                parameter=key[:64],
            )
        await self.server.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_repository(request.repository_name)
        if unknown := sorted(set(request.parameters) - _UNLOAD_PARAMETERS):
            raise InvalidArgument(
                "UNSUPPORTED_PARAMETER",
                f"unload takes no parameter {unknown[0][:64]!r}",
                parameter=unknown[0][:64],
            )
        await self.server.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- not offered: shared memory, trace and log settings ------------------------------

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        raise _not_offered("SystemSharedMemoryStatus", "shared memory")

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        raise _not_offered("SystemSharedMemoryRegister", "shared memory")

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        raise _not_offered("SystemSharedMemoryUnregister", "shared memory")

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Context
    ) -> pb.CudaSharedMemoryStatusResponse:
        raise _not_offered("CudaSharedMemoryStatus", "CUDA shared memory")

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Context
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise _not_offered("CudaSharedMemoryRegister", "CUDA shared memory")

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        raise _not_offered("CudaSharedMemoryUnregister", "CUDA shared memory")

    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: Context
    ) -> pb.TraceSettingResponse:
        raise _not_offered("TraceSetting", "trace settings (traces go to OpenTelemetry)")

    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: Context
    ) -> pb.LogSettingsResponse:
        raise _not_offered("LogSettings", "log settings (MEDIMG_INFERENCE_LOG_LEVEL sets them)")

    # --- helpers ---------------------------------------------------------------------------

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelInferResponse:
        version = parse_version(request.model_version)
        loaded = await self._serving(request.model_name, version)
        config = loaded.config
        names = requested_outputs(request, config.outputs)
        if _request_bytes(request) > _INLINE_BYTES:
            inputs = await asyncio.to_thread(decode_inputs, request, config.inputs)
        else:
            inputs = decode_inputs(request, config.inputs)
        outputs = await self.server.infer(request.model_name, version, inputs, deadline)
        if sum(outputs[name].nbytes for name in names) > _INLINE_BYTES:
            return await asyncio.to_thread(encode_response, request, config, outputs, names)
        return encode_response(request, config, outputs, names)

    async def _stream_answer(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelStreamInferResponse:
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))
        except MedimgError as error:
            message = error.message
        except Exception:  # one request's failure must not end the stream
            log.exception("stream request failed", extra={"fields": {"method": "ModelStreamInfer"}})
            message = "internal error; see the service log"
        return pb.ModelStreamInferResponse(
            error_message=message,
            infer_response=pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            ),
        )

    async def _serving(self, name: str, version: ModelVersion | None) -> LoadedModel:
        """The version of `name` serving; NOT_FOUND if the repository has no such model or
        version, UNAVAILABLE MODEL_NOT_READY if it is there but not serving."""
        try:
            return self.server.model(name, version)
        except Unavailable:
            await asyncio.to_thread(self._check_in_repository, name, version)
            raise

    def _check_in_repository(self, name: str, version: ModelVersion | None) -> None:
        versions = self.server.repository.versions(check_model_name(name))
        if version is not None and version not in versions:
            raise NotFound(
                "MODEL_VERSION_NOT_FOUND",
                f"model {name!r} has no version {version}",
                model=name,
                version=version,
            )

    def _check_repository(self, name: str) -> None:
        if name and name != self.repository_name:
            raise NotFound(
                "REPOSITORY_NOT_FOUND",
                f"no model repository {name[:64]!r}: leave repository_name empty",
                repository=name[:64],
            )


def _deadline(context: Context) -> float | None:
    """The caller's deadline as a time.monotonic() value, for the batcher."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _not_offered(method: str, what: str) -> Unimplemented:
    return Unimplemented(
        "NOT_OFFERED", f"{SERVICE}/{method}: medimg does not offer {what}", method=method
    )
