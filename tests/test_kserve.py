"""KServe v2 through the mesh: the stock tritonclient, as an operator uses it, talks to the
inference service through its sidecar with mutual TLS (the ops certificate), and serves a
small TorchScript network trained here and dropped into the platform's model repository."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from medimg_cli.platform import Platform
from services.inference.tests.support import (
    PATCH,
    TORCHSCRIPT_DEPRECATED,
    classifier_metadata,
    export_torchscript,
    random_patches,
    train_patch_classifier,
    write_bundle,
)
from tests.helpers import channel

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)]

#: A name of its own: the platform and its repository are shared by the whole session.
MODEL = "kserve-patches"

Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Served:
    patches: Float32Array
    expected: Float32Array
    torchscript: bytes


@pytest.fixture(scope="module")
def served(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Served:
    """The trained patch classifier, as version 1 of MODEL in the platform's repository."""
    network = train_patch_classifier()
    model = export_torchscript(network, tmp_path_factory.mktemp("kserve") / "model.ts")
    write_bundle(
        platform.model_repository,
        MODEL,
        1,
        classifier_metadata({"max_batch_size": 8}),
        {"model.ts": model.read_bytes()},
    )
    patches, _ = random_patches(8, np.random.default_rng(7))
    with torch.inference_mode():
        expected = network(torch.from_numpy(patches)).numpy()
    return Served(patches, expected, model.read_bytes())


@pytest.fixture(scope="module")
def client(platform: Platform, served: Served) -> Iterator[triton.InferenceServerClient]:
    """tritonclient over mTLS as `ops`, with MODEL loaded through it."""
    assert platform.pki is not None
    client = triton.InferenceServerClient(
        platform.sidecar("inference"),
        ssl=True,
        root_certificates=str(platform.pki.ca_cert),
        private_key=str(platform.pki.key("ops")),
        certificate_chain=str(platform.pki.cert("ops")),
    )
    client.load_model(MODEL, client_timeout=60)
    yield client
    client.close()


def patch_input(patches: Float32Array) -> triton.InferInput:
    tensor = triton.InferInput("patch", list(patches.shape), "FP32")
    tensor.set_data_from_numpy(patches)
    return tensor


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")
    server = client.get_server_metadata()
    assert server.name == "medimg-inference"
    assert "model_repository" in server.extensions
    metadata = client.get_model_metadata(MODEL)
    assert (metadata.name, list(metadata.versions)) == (MODEL, ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("patch", "FP32", [-1, 1, PATCH, PATCH])
    ]
    config = client.get_model_config(MODEL).config
    assert (config.name, config.platform, config.max_batch_size) == (
        MODEL,
        "pytorch_libtorch",
        8,
    )
    assert [list(i.dims) for i in config.input] == [[1, PATCH, PATCH]]
    assert config.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)
    ]


def test_infer_with_raw_contents(client: triton.InferenceServerClient, served: Served) -> None:
    result = client.infer(
        MODEL,
        [patch_input(served.patches[:3])],
        outputs=[triton.InferRequestedOutput("probabilities")],
        request_id="raw-1",
        client_timeout=30,
    )
    probabilities = result.as_numpy("probabilities")
    assert probabilities is not None
    np.testing.assert_allclose(probabilities, served.expected[:3], atol=1e-5)
    assert result.get_response().id == "raw-1"


def test_infer_with_typed_contents(platform: Platform, served: Served) -> None:
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed-1")
    tensor = request.inputs.add(name="patch", datatype="FP32", shape=[2, 1, PATCH, PATCH])
    tensor.contents.fp32_contents.extend(served.patches[:2].ravel().tolist())
    with channel(platform, "inference") as ch:
        response = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=30)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "FP32", [2, 2])
    probabilities = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 2)
    np.testing.assert_allclose(probabilities, served.expected[:2], atol=1e-5)


def test_bad_input_gets_a_specific_error(client: triton.InferenceServerClient) -> None:
    wrong = np.zeros((1, 1, PATCH, PATCH), dtype=np.float64)
    tensor = triton.InferInput("patch", list(wrong.shape), "FP64")
    tensor.set_data_from_numpy(wrong)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [tensor], client_timeout=30)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "FP64" in str(caught.value.message())
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("no-such-model")
    assert missing.value.status() == "StatusCode.NOT_FOUND"


def test_stream_infer_fails_only_the_bad_request(
    client: triton.InferenceServerClient, served: Served
) -> None:
    results: queue.Queue[tuple[triton.InferResult | None, InferenceServerException | None]]
    results = queue.Queue()

    def collect(result: triton.InferResult | None, error: InferenceServerException | None) -> None:
        results.put((result, error))

    client.start_stream(callback=partial(collect))
    try:
        client.async_stream_infer(MODEL, [patch_input(served.patches[:2])], request_id="s-1")
        bad = triton.InferInput("patch", [1, 1, PATCH, PATCH + 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 1, PATCH, PATCH + 3), dtype=np.float32))
        client.async_stream_infer(MODEL, [bad], request_id="s-bad")
        client.async_stream_infer(MODEL, [patch_input(served.patches[2:5])], request_id="s-2")
        answers = [results.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1
    assert "shape" in str(errors[0].message())
    good = {
        result.get_response().id: result.as_numpy("probabilities")
        for result, _ in answers
        if result is not None
    }
    assert set(good) == {"s-1", "s-2"}
    np.testing.assert_allclose(good["s-1"], served.expected[:2], atol=1e-5)
    np.testing.assert_allclose(good["s-2"], served.expected[2:5], atol=1e-5)


def test_statistics_count_what_ran(client: triton.InferenceServerClient, served: Served) -> None:
    def stats() -> service_pb2.ModelStatistics:
        (model,) = client.get_inference_statistics(MODEL).model_stats
        return model

    before = stats()
    client.infer(MODEL, [patch_input(served.patches[:4])], client_timeout=30)
    client.infer(MODEL, [patch_input(served.patches[:1])], client_timeout=30)
    after = stats()
    assert after.inference_count - before.inference_count == 5
    success = after.inference_stats.success.count - before.inference_stats.success.count
    assert success == 2
    assert after.execution_count > before.execution_count
    assert after.last_inference >= before.last_inference > 0


def test_repository_index_load_and_unload(
    client: triton.InferenceServerClient, served: Served, platform: Platform
) -> None:
    index = client.get_model_repository_index()
    assert (MODEL, "1", "READY") in [(m.name, m.version, m.state) for m in index.models]
    client.unload_model(MODEL)
    assert not client.is_model_ready(MODEL)
    (entry,) = [m for m in client.get_model_repository_index().models if m.name == MODEL]
    assert (entry.state, entry.reason) == ("UNAVAILABLE", "unloaded")
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [patch_input(served.patches[:1])], client_timeout=30)
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    client.load_model(MODEL, client_timeout=60)
    assert client.is_model_ready(MODEL)


def test_a_model_in_openvino_serves_through_the_sidecar(
    client: triton.InferenceServerClient, served: Served, platform: Platform
) -> None:
    """The same TorchScript file with `"accelerator": "openvino"`, in the service process."""
    accelerated = f"{MODEL}-openvino"
    metadata = classifier_metadata({"max_batch_size": 8, "accelerator": "openvino"})
    write_bundle(
        platform.model_repository, accelerated, 1, metadata, {"model.ts": served.torchscript}
    )
    client.load_model(accelerated, client_timeout=60)

    result = client.infer(accelerated, [patch_input(served.patches[:5])], client_timeout=30)

    probabilities = result.as_numpy("probabilities")
    assert probabilities is not None
    np.testing.assert_allclose(probabilities, served.expected[:5], atol=1e-5)
    config = client.get_model_config(accelerated).config
    assert config.platform == "pytorch_libtorch"
    [accelerator] = config.optimization.execution_accelerators.cpu_execution_accelerator
    assert accelerator.name == "openvino"
    client.unload_model(accelerated)


def test_workloads_are_allowed_per_method(platform: Platform) -> None:
    """training may load models; ingest may infer but not touch the repository."""
    request = service_pb2.RepositoryIndexRequest()
    with channel(platform, "inference", "training") as ch:
        index = service_pb2_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(request, timeout=10)
        assert MODEL in [m.name for m in index.models]
    with channel(platform, "inference", "ingest") as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelUnload(
                service_pb2.RepositoryModelUnloadRequest(model_name=MODEL), timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED  # Envoy's RBAC


def test_no_rest_for_kserve(platform: Platform) -> None:
    """The gateway routes the service's own API only."""
    assert (
        "inference.GRPCInferenceService"
        not in Path(platform.state / "envoy" / "gateway.json").read_text()
    )
