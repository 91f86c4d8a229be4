"""KServe v2: the tensor conversions, and the servicer over a real grpc.aio server with the
trained patch classifier behind it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from inference import model_config_pb2 as mc
from medimg_cli.testing import StartServer, error_reason
from medimg_core.errors import InvalidArgument
from medimg_core.identity import XFCC_HEADER
from medimg_core.server import ServiceDefinition
from medimg_inference import kserve
from medimg_inference.backends import BackendOptions
from medimg_inference.repository import ModelConfig, ModelName, ModelRepository, ModelVersion
from medimg_inference.serving import ModelServer
from services.inference.tests.support import (
    PATCH,
    TORCHSCRIPT_DEPRECATED,
    GatedBackend,
    TrainedClassifier,
    classifier_metadata,
    metadata_json,
    tensor_json,
    write_bundle,
)

pytestmark = pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)

PATCHES_2 = (ModelName("patches"), ModelVersion(2))
CALLER = ((XFCC_HEADER, "URI=spiffe://medimg.local/ns/medimg/sa/training"),)
Request = pb.ModelInferRequest


def raw_request(patches: np.ndarray, **fields: object) -> Request:
    request = Request(model_name="patches", **fields)  # type: ignore[arg-type]
    request.inputs.add(name="patch", datatype="FP32", shape=patches.shape)
    request.raw_input_contents.append(patches.astype("<f4").tobytes())
    return request


def typed_request(patches: np.ndarray) -> Request:
    request = Request(model_name="patches")
    tensor = request.inputs.add(name="patch", datatype="FP32", shape=patches.shape)
    tensor.contents.fp32_contents.extend(patches.ravel().tolist())
    return request


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        tensor.name: np.frombuffer(raw, dtype=np.dtype("<f4")).reshape(tuple(tensor.shape))
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


# --- conversions ----------------------------------------------------------------------------


def test_the_datatypes_come_from_the_protocol() -> None:
    assert set(kserve.DATATYPES) == {
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
        "FP16", "FP32", "FP64", "BYTES", "BF16",
    }  # fmt: skip
    assert kserve.DATATYPES["BYTES"] == mc.TYPE_STRING
    assert kserve.NUMPY_DTYPES["FP16"] == np.float16
    assert kserve.NUMPY_DTYPES["UINT64"] == np.uint64
    assert set(kserve.NUMPY_DTYPES) == set(kserve.DATATYPES) - {"BYTES", "BF16"}
    assert kserve.datatype_of(np.dtype(">f4")) == "FP32"


@pytest.mark.parametrize(("text", "version"), [("", None), ("1", 1), ("42", 42)])
def test_parse_version(text: str, version: int | None) -> None:
    assert kserve.parse_version(text) == version


@pytest.mark.parametrize("text", ["0", "01", "-1", "latest", "1.0"])
def test_parse_version_refuses_what_is_not_a_positive_integer(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        kserve.parse_version(text)
    assert caught.value.reason == "INVALID_MODEL_VERSION"


@dataclass(frozen=True)
class Specs:
    """Tensor specs of small bundles, read by the repository as the server reads them."""

    float_patch: ModelConfig
    ints: ModelConfig


@pytest.fixture
def specs(tmp_path: Path, classifier: TrainedClassifier) -> Specs:
    write_bundle(
        tmp_path, "patches", 1, classifier_metadata(), {"model.ts": classifier.torchscript}
    )
    ints = metadata_json(
        {"counts": tensor_json(2, ["8*n"], dtype="int8")},
        {"total": tensor_json(1, [], dtype="int64", kind="probabilities")},
        {
            "max_batch_size": 4,
            "max_queue_delay_us": 500,
            "preferred_batch_sizes": [4],
            "instances": 2,
            "accelerator": "openvino",
        },
    )
    write_bundle(tmp_path, "ints", 3, ints, {"model.ts": classifier.torchscript})
    repository = ModelRepository(tmp_path)
    return Specs(repository.config("patches"), repository.config("ints"))


def test_raw_and_typed_contents_decode_to_the_same_array(specs: Specs) -> None:
    patches = np.random.default_rng(0).normal(size=(3, 1, PATCH, PATCH)).astype(np.float32)
    raw = kserve.decode_inputs(raw_request(patches), specs.float_patch.inputs)["patch"]
    typed = kserve.decode_inputs(typed_request(patches), specs.float_patch.inputs)["patch"]
    np.testing.assert_array_equal(raw, patches)
    np.testing.assert_array_equal(typed, patches)
    assert raw.dtype == typed.dtype == np.float32
    assert raw.flags.writeable  # torch.from_numpy warns on a read-only array


def test_narrow_integers_come_in_int_contents(specs: Specs) -> None:
    request = Request(model_name="ints")
    tensor = request.inputs.add(name="counts", datatype="INT8", shape=[1, 2, 3])
    tensor.contents.int_contents.extend([-128, 0, 1, 2, 3, 127])
    array = kserve.decode_inputs(request, specs.ints.inputs)["counts"]
    assert array.dtype == np.int8
    assert array.tolist() == [[[-128, 0, 1], [2, 3, 127]]]


def failure(specs: Specs, request: Request, model: str = "float_patch") -> str:
    with pytest.raises(InvalidArgument) as caught:
        kserve.decode_inputs(request, getattr(specs, model).inputs)
    return caught.value.reason


def test_bad_tensors_get_specific_errors(specs: Specs) -> None:
    patches = np.zeros((2, 1, PATCH, PATCH), dtype=np.float32)

    short = raw_request(patches)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    assert failure(specs, short) == "RAW_CONTENTS_SIZE_MISMATCH"

    extra = raw_request(patches)
    extra.raw_input_contents.append(b"")
    assert failure(specs, extra) == "RAW_INPUT_COUNT_MISMATCH"

    both = raw_request(patches)
    both.inputs[0].contents.fp32_contents.append(1.0)
    assert failure(specs, both) == "CONTENTS_AND_RAW_CONTENTS"

    few = typed_request(patches)
    del few.inputs[0].contents.fp32_contents[-1]
    assert failure(specs, few) == "CONTENTS_SIZE_MISMATCH"

    wrong_field = typed_request(patches)
    wrong_field.inputs[0].contents.int_contents.append(1)
    assert failure(specs, wrong_field) == "CONTENTS_FIELD_MISMATCH"

    for datatype, reason in [
        ("FP64", "INPUT_DATATYPE_MISMATCH"),
        ("BF16", "UNSUPPORTED_DATATYPE"),
        ("BYTES", "UNSUPPORTED_DATATYPE"),
        ("FLOAT32", "UNKNOWN_DATATYPE"),
    ]:
        request = raw_request(patches)
        request.inputs[0].datatype = datatype
        assert failure(specs, request) == reason, datatype

    renamed = raw_request(patches)
    renamed.inputs[0].name = "image"
    assert failure(specs, renamed) == "UNEXPECTED_INPUT"

    twice = raw_request(patches)
    twice.inputs.add().CopyFrom(twice.inputs[0])
    twice.raw_input_contents.append(twice.raw_input_contents[0])
    assert failure(specs, twice) == "DUPLICATE_INPUT"

    negative = raw_request(patches)
    negative.inputs[0].shape[0] = -2
    assert failure(specs, negative) == "INVALID_SHAPE"

    out_of_range = Request(model_name="ints")
    tensor = out_of_range.inputs.add(name="counts", datatype="INT8", shape=[1, 2, 1])
    tensor.contents.int_contents.extend([1, 300])
    assert failure(specs, out_of_range, "ints") == "CONTENTS_OUT_OF_RANGE"


def test_fp16_has_no_typed_contents(tmp_path: Path, classifier: TrainedClassifier) -> None:
    metadata = metadata_json(
        {"half": tensor_json(1, [2], dtype="float16")},
        {"out": tensor_json(1, [], dtype="float16", kind="probabilities")},
    )
    write_bundle(tmp_path, "half", 1, metadata, {"model.ts": classifier.torchscript})
    config = ModelRepository(tmp_path).config("half")
    request = Request(model_name="half")
    request.inputs.add(name="half", datatype="FP16", shape=[1, 1, 2])
    with pytest.raises(InvalidArgument) as caught:
        kserve.decode_inputs(request, config.inputs)
    assert caught.value.reason == "NO_TYPED_CONTENTS"
    request.raw_input_contents.append(np.array([1.5, -2], dtype="<f2").tobytes())
    decoded = kserve.decode_inputs(request, config.inputs)["half"]
    assert decoded.dtype == np.float16
    assert decoded.tolist() == [[[1.5, -2.0]]]


def test_outputs_are_raw_little_endian_in_the_order_requested(specs: Specs) -> None:
    request = Request(model_name="patches", id="r-1")
    request.outputs.add(name="probabilities")
    names = kserve.requested_outputs(request, specs.float_patch.outputs)
    probabilities = np.array([[0.25, 0.75]], dtype=">f4")  # big-endian on purpose
    response = kserve.encode_response(
        request, specs.float_patch, {"probabilities": probabilities}, names
    )
    assert (response.model_name, response.model_version, response.id) == ("patches", "1", "r-1")
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("probabilities", "FP32", [1, 2])
    ]
    assert response.raw_output_contents[0] == np.array([0.25, 0.75], dtype="<f4").tobytes()
    request.outputs.add(name="logits")
    with pytest.raises(InvalidArgument) as caught:
        kserve.requested_outputs(request, specs.float_patch.outputs)
    assert caught.value.reason == "UNKNOWN_OUTPUT"


def test_model_config_as_triton_writes_it(specs: Specs) -> None:
    config = kserve.model_config(specs.ints)
    assert (config.name, config.platform, config.backend) == ("ints", "pytorch_libtorch", "pytorch")
    assert config.max_batch_size == 4
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("counts", mc.TYPE_INT8, [2, -1])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("total", mc.TYPE_INT64, [1])
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_CPU, 2)
    ]
    assert config.default_model_filename == "model.ts"
    (accelerator,) = config.optimization.execution_accelerators.cpu_execution_accelerator
    assert accelerator.name == "openvino"
    assert not kserve.model_config(specs.float_patch).HasField("optimization")


# --- the servicer ---------------------------------------------------------------------------


@dataclass
class Served:
    stub: pb_grpc.GRPCInferenceServiceAsyncStub
    server: ModelServer
    repository: Path


@pytest.fixture
async def served(
    tmp_path: Path,
    classifier: TrainedClassifier,
    start_server: StartServer,
) -> AsyncIterator[Served]:
    for version in (1, 2):
        write_bundle(
            tmp_path,
            "patches",
            version,
            classifier_metadata({"max_batch_size": 8}),
            {"model.ts": classifier.torchscript},
        )
    server = ModelServer(
        ModelRepository(tmp_path),
        BackendOptions(intra_op_threads=1),
        backend_loader=GatedBackend.load,
    )
    await server.load("patches")
    servicer = kserve.KServeServicer(server)
    definition = ServiceDefinition(
        names=[kserve.SERVICE],
        add_to_server=lambda grpc_server: pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            servicer, grpc_server
        ),
        policy=kserve.POLICY,
    )
    _, channel = await start_server(definition)
    yield Served(pb_grpc.GRPCInferenceServiceStub(channel), server, tmp_path)
    await server.close()


async def call_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_server_and_model_metadata(served: Served) -> None:
    stub = served.stub
    assert (await stub.ServerLive(pb.ServerLiveRequest(), metadata=CALLER)).live
    assert (await stub.ServerReady(pb.ServerReadyRequest(), metadata=CALLER)).ready
    server = await stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=CALLER)
    assert server.name == "medimg-inference"
    assert "model_repository" in server.extensions
    ready = pb.ModelReadyRequest
    assert (await stub.ModelReady(ready(name="patches"), metadata=CALLER)).ready
    assert (await stub.ModelReady(ready(name="patches", version="2"), metadata=CALLER)).ready
    assert not (await stub.ModelReady(ready(name="patches", version="1"), metadata=CALLER)).ready
    assert not (await stub.ModelReady(ready(name="nothing"), metadata=CALLER)).ready

    model = await stub.ModelMetadata(pb.ModelMetadataRequest(name="patches"), metadata=CALLER)
    assert (model.name, list(model.versions), model.platform) == (
        "patches",
        ["2"],
        "pytorch_libtorch",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("patch", "FP32", [-1, 1, PATCH, PATCH])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("probabilities", "FP32", [-1, 2])
    ]
    config = await stub.ModelConfig(pb.ModelConfigRequest(name="patches"), metadata=CALLER)
    assert (config.config.name, config.config.max_batch_size) == ("patches", 8)
    # A version on disk but not serving: its config is read from the repository.
    old = await stub.ModelConfig(
        pb.ModelConfigRequest(name="patches", version="1"), metadata=CALLER
    )
    assert old.config.name == "patches"


@pytest.mark.parametrize(
    ("name", "version", "code", "reason"),
    [
        ("nothing", "", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        ("patches", "7", grpc.StatusCode.NOT_FOUND, "MODEL_VERSION_NOT_FOUND"),
        ("patches", "1", grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY"),
        ("patches", "one", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODEL_VERSION"),
        ("../etc", "", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODEL_NAME"),
    ],
)
async def test_an_unknown_model_or_version_gets_a_specific_error(
    served: Served, name: str, version: str, code: grpc.StatusCode, reason: str
) -> None:
    patches = np.zeros((1, 1, PATCH, PATCH), dtype=np.float32)
    request = raw_request(patches, model_version=version)
    request.model_name = name
    for call in (
        served.stub.ModelMetadata(
            pb.ModelMetadataRequest(name=name, version=version), metadata=CALLER
        ),
        served.stub.ModelInfer(request, metadata=CALLER),
    ):
        error = await call_error(call)
        assert (error.code(), error_reason(error)) == (code, reason)


async def test_infer_with_raw_and_typed_contents(
    served: Served, classifier: TrainedClassifier
) -> None:
    patches = classifier.patches[:4]
    expected = classifier.expected(patches)
    raw = await served.stub.ModelInfer(raw_request(patches, id="a"), metadata=CALLER)
    typed = await served.stub.ModelInfer(typed_request(patches), metadata=CALLER)
    assert (raw.model_name, raw.model_version, raw.id) == ("patches", "2", "a")
    np.testing.assert_allclose(outputs_of(raw)["probabilities"], expected, atol=1e-5)
    np.testing.assert_allclose(outputs_of(typed)["probabilities"], expected, atol=1e-5)


async def test_infer_refuses_bad_input_with_its_reason(served: Served) -> None:
    wrong_shape = np.zeros((1, 1, PATCH, PATCH + 1), dtype=np.float32)
    error = await call_error(served.stub.ModelInfer(raw_request(wrong_shape), metadata=CALLER))
    assert (error.code(), error_reason(error)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INPUT_SHAPE_MISMATCH",
    )
    request = raw_request(np.zeros((1, 1, PATCH, PATCH), dtype=np.float32))
    request.outputs.add(name="logits")
    error = await call_error(served.stub.ModelInfer(request, metadata=CALLER))
    assert error_reason(error) == "UNKNOWN_OUTPUT"


async def test_the_callers_deadline_reaches_the_batcher(
    served: Served, classifier: TrainedClassifier
) -> None:
    loaded = served.server.model("patches")
    (backend,) = loaded.batcher.backends
    assert isinstance(backend, GatedBackend)
    backend.gate.clear()
    backend.started.clear()
    executed_before = backend.rows_executed  # the warmup's
    first = asyncio.ensure_future(
        served.stub.ModelInfer(raw_request(classifier.patches[:1]), metadata=CALLER)
    )
    await asyncio.to_thread(backend.started.wait, 10)  # the only instance is now busy
    late = await call_error(
        served.stub.ModelInfer(raw_request(classifier.patches[1:3]), metadata=CALLER, timeout=0.5)
    )
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(50):  # the batcher answers an expired request at its deadline
        if served.server.statistics()[PATCHES_2].failure_count:
            break
        await asyncio.sleep(0.05)
    backend.gate.set()
    await first
    stats = served.server.statistics()[PATCHES_2]
    assert stats.failure_count == 1
    assert backend.rows_executed == executed_before + 1  # the expired request never ran


async def test_a_stream_answers_each_request_and_survives_a_bad_one(
    served: Served, classifier: TrainedClassifier
) -> None:
    good = raw_request(classifier.patches[:2], id="good-1")
    bad = raw_request(classifier.patches[:1], id="bad")
    bad.inputs[0].datatype = "FP64"
    later = typed_request(classifier.patches[2:3])
    later.id = "good-2"

    async def requests() -> AsyncIterator[Request]:
        for request in (good, bad, later):
            yield request

    answers = {
        answer.infer_response.id: answer
        async for answer in served.stub.ModelStreamInfer(requests(), metadata=CALLER)
    }
    assert set(answers) == {"good-1", "bad", "good-2"}
    assert "FP64" in answers["bad"].error_message
    assert not answers["good-1"].error_message and not answers["good-2"].error_message
    np.testing.assert_allclose(
        outputs_of(answers["good-2"].infer_response)["probabilities"],
        classifier.expected(classifier.patches[2:3]),
        atol=1e-5,
    )


async def test_statistics_count_what_ran(served: Served, classifier: TrainedClassifier) -> None:
    for rows in (1, 3):
        await served.stub.ModelInfer(raw_request(classifier.patches[:rows]), metadata=CALLER)
    await call_error(
        served.stub.ModelInfer(
            raw_request(np.zeros((1, 1, 2, 2), dtype=np.float32)), metadata=CALLER
        )
    )
    answer = await served.stub.ModelStatistics(
        pb.ModelStatisticsRequest(name="patches"), metadata=CALLER
    )
    (stats,) = answer.model_stats
    assert (stats.name, stats.version) == ("patches", "2")
    assert stats.inference_count == 4
    assert stats.inference_stats.success.count == 2
    assert stats.inference_stats.fail.count == 1
    assert stats.execution_count == sum(b.compute_infer.count for b in stats.batch_stats)
    assert stats.last_inference > 0
    everything = await served.stub.ModelStatistics(pb.ModelStatisticsRequest(), metadata=CALLER)
    assert [s.name for s in everything.model_stats] == ["patches"]


async def test_repository_index_load_and_unload(served: Served) -> None:
    stub = served.stub
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=CALLER)
    assert [(m.name, m.version, m.state) for m in index.models] == [
        ("patches", "1", "UNAVAILABLE"),
        ("patches", "2", "READY"),
    ]
    ready = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), metadata=CALLER)
    assert [(m.name, m.version) for m in ready.models] == [("patches", "2")]

    await stub.RepositoryModelUnload(
        pb.RepositoryModelUnloadRequest(model_name="patches"), metadata=CALLER
    )
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="patches"), metadata=CALLER)).ready
    await stub.RepositoryModelLoad(
        pb.RepositoryModelLoadRequest(model_name="patches"), metadata=CALLER
    )
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="patches"), metadata=CALLER)).ready

    missing = await call_error(
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"), metadata=CALLER)
    )
    assert (missing.code(), error_reason(missing)) == (
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    )
    upload = pb.RepositoryModelLoadRequest(model_name="patches")
    upload.parameters["file:1/model.ts"].bytes_param = b"not a model"
    refused = await call_error(stub.RepositoryModelLoad(upload, metadata=CALLER))
    assert error_reason(refused) == "UNSUPPORTED_PARAMETER"
    other = await call_error(
        stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="x"), metadata=CALLER)
    )
    assert error_reason(other) == "REPOSITORY_NOT_FOUND"


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest()),
        ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest(name="r")),
        ("TraceSetting", pb.TraceSettingRequest()),
        ("LogSettings", pb.LogSettingsRequest()),
    ],
)
async def test_what_is_not_offered_is_unimplemented(
    served: Served, method: str, request_: object
) -> None:
    error = await call_error(getattr(served.stub, method)(request_, metadata=CALLER))
    assert (error.code(), error_reason(error)) == (grpc.StatusCode.UNIMPLEMENTED, "NOT_OFFERED")
    assert "does not offer" in (error.details() or "")
