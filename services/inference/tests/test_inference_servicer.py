"""Inference as its app builds it: permission first, then the models of its repository.

Audit and ingest are not running here (their targets are closed ports): these tests cover
what answers before either is needed; tests/test_predict.py covers Predict end to end."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medimg.inference.v1 import inference_service_pb2 as pb
from medimg.inference.v1 import inference_service_pb2_grpc as pb_grpc
from medimg_cli.testing import error_reason
from medimg_core.identity import USER_HEADER, XFCC_HEADER
from medimg_core.server import Server
from medimg_inference.app import build
from medimg_inference.settings import InferenceSettings
from services.inference.tests.support import (
    TORCHSCRIPT_DEPRECATED,
    TrainedClassifier,
    classifier_metadata,
    write_bundle,
)

pytestmark = pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)

SPIFFE = "spiffe://medimg.local/ns/medimg/sa/"
Metadata = tuple[tuple[str, str], ...]


def workload(name: str) -> Metadata:
    return ((XFCC_HEADER, f"URI={SPIFFE}{name}"),)


def user(subject: str, *roles: str) -> Metadata:
    claims = base64.urlsafe_b64encode(json.dumps({"sub": subject, "roles": roles}).encode())
    return (*workload("gateway"), (USER_HEADER, claims.decode()))


@pytest.fixture
async def channel(tmp_path: Path, classifier: TrainedClassifier) -> AsyncIterator[grpc.aio.Channel]:
    write_bundle(
        tmp_path, "patches", 1, classifier_metadata(), {"model.ts": classifier.torchscript}
    )
    write_bundle(tmp_path, "patches", 2, classifier_metadata(), {"model.onnx": classifier.onnx})
    settings = InferenceSettings(
        port=0,
        grace_seconds=1,
        audit_target="127.0.0.1:9",
        ingest_target="127.0.0.1:9",
        model_repository=tmp_path,
        load_models="",  # Predict loads on first use; GetModel shows the state before
    )
    async with AsyncExitStack() as resources:
        server = Server(settings, await build(settings, resources))
        port = await server.start()
        await server.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
        await server.grpc.stop(None)


CALLS = [
    ("ListModels", pb.ListModelsRequest(page_size=10)),
    ("GetModel", pb.GetModelRequest(name="models/patches")),
    ("Predict", pb.PredictRequest(model="models/patches", target="studies/1.2/series/3.4")),
]


@pytest.mark.parametrize("caller", [workload("training"), user("dr-who", "clinician")])
async def test_an_allowed_caller_lists_and_gets_models(
    channel: grpc.aio.Channel, caller: Metadata
) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    page = await stub.ListModels(pb.ListModelsRequest(), metadata=caller, timeout=5)
    model = await stub.GetModel(
        pb.GetModelRequest(name="models/patches"), metadata=caller, timeout=5
    )

    assert [m.name for m in page.models] == ["models/patches"]
    assert page.models[0] == model
    assert list(model.versions) == [1, 2]
    assert (model.loaded_version, model.state) == (0, pb.Model.STATE_UNAVAILABLE)
    assert (model.described_version, model.platform) == (2, pb.Model.PLATFORM_ONNX)
    assert model.task == pb.Model.TASK_CLASSIFICATION
    assert list(model.labels) == ["CT", "MR"]
    assert [(t.name, t.dtype, list(t.shape)) for t in model.inputs] == [
        ("patch", "float32", [1, 16, 16])
    ]
    assert [(t.name, list(t.shape)) for t in model.outputs] == [("probabilities", [2])]


async def test_models_page_by_name(channel: grpc.aio.Channel, tmp_path: Path) -> None:
    for name in ("b-model", "a-model"):
        (tmp_path / name).mkdir()
    stub = pb_grpc.InferenceServiceStub(channel)
    caller = user("ann", "ml-engineer")
    first = await stub.ListModels(pb.ListModelsRequest(page_size=2), metadata=caller, timeout=5)
    rest = await stub.ListModels(
        pb.ListModelsRequest(page_size=2, page_token=first.next_page_token),
        metadata=caller,
        timeout=5,
    )
    assert [m.name for m in first.models] == ["models/a-model", "models/b-model"]
    assert [m.name for m in rest.models] == ["models/patches"] and not rest.next_page_token
    assert first.models[0].state_reason == "no version"


@pytest.mark.parametrize(
    ("request_", "code", "expected"),
    [
        (pb.GetModelRequest(name="patches"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME"),
        (pb.GetModelRequest(name="models/nope"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (
            pb.PredictRequest(model="models/patches", target="studies/1.2"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_TARGET",
        ),
        (
            pb.PredictRequest(model="models/nope", target="studies/1.2/series/3.4"),
            grpc.StatusCode.NOT_FOUND,
            "MODEL_NOT_FOUND",
        ),
    ],
)
async def test_bad_requests_get_a_specific_error(
    channel: grpc.aio.Channel, request_: object, code: grpc.StatusCode, expected: str
) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    caller = user("dr-who", "clinician")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(request_, pb.GetModelRequest):
            await stub.GetModel(request_, metadata=caller, timeout=5)
        else:
            assert isinstance(request_, pb.PredictRequest)
            await stub.Predict(request_, metadata=caller, timeout=5)
    assert caught.value.code() == code
    assert error_reason(caught.value) == expected


@pytest.mark.parametrize(("method", "request_"), CALLS)
@pytest.mark.parametrize("roles", [(), ("auditor",), ("wizard",)])
async def test_a_user_without_an_allowed_role_is_denied(
    channel: grpc.aio.Channel, method: str, request_: object, roles: tuple[str, ...]
) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, method)(request_, metadata=user("ann", *roles), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(caught.value) == "ROLE_NOT_ALLOWED"


async def test_no_caller_identity_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pb_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_is_serving(channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="medimg.inference.v1.InferenceService"), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
