"""Training as its app builds it: permission first, then UNIMPLEMENTED until jobs exist."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from medimg.training.v1 import training_service_pb2 as pb
from medimg.training.v1 import training_service_pb2_grpc as pb_grpc
from medimg_core.identity import USER_HEADER, XFCC_HEADER
from medimg_core.server import Server
from medimg_training.app import build
from medimg_training.settings import TrainingSettings

SPIFFE = "spiffe://medimg.local/ns/medimg/sa/"
Metadata = tuple[tuple[str, str], ...]


def workload(name: str) -> Metadata:
    return ((XFCC_HEADER, f"URI={SPIFFE}{name}"),)


def user(subject: str, *roles: str) -> Metadata:
    claims = base64.urlsafe_b64encode(json.dumps({"sub": subject, "roles": roles}).encode())
    return (*workload("gateway"), (USER_HEADER, claims.decode()))


def reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    settings = TrainingSettings(port=0, grace_seconds=1)
    async with AsyncExitStack() as resources:
        server = Server(settings, await build(settings, resources))
        port = await server.start()
        await server.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
        await server.grpc.stop(None)


CALLS = [
    ("ListTrainingJobs", pb.ListTrainingJobsRequest(page_size=10)),
    ("GetTrainingJob", pb.GetTrainingJobRequest(name="trainingJobs/1")),
]


@pytest.mark.parametrize(("method", "request_"), CALLS)
@pytest.mark.parametrize(
    "caller", [workload("ops"), user("rita", "researcher"), user("max", "ml-engineer")]
)
async def test_an_allowed_caller_gets_unimplemented(
    channel: grpc.aio.Channel, method: str, request_: object, caller: Metadata
) -> None:
    stub = pb_grpc.TrainingServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, method)(request_, metadata=caller, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert reason(caught.value) == "NOT_IMPLEMENTED"


@pytest.mark.parametrize(("method", "request_"), CALLS)
@pytest.mark.parametrize("roles", [(), ("clinician",), ("auditor",)])
async def test_a_user_without_an_allowed_role_is_denied(
    channel: grpc.aio.Channel, method: str, request_: object, roles: tuple[str, ...]
) -> None:
    stub = pb_grpc.TrainingServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, method)(request_, metadata=user("ann", *roles), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(caught.value) == "ROLE_NOT_ALLOWED"


async def test_no_caller_identity_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pb_grpc.TrainingServiceStub(channel).ListTrainingJobs(
            pb.ListTrainingJobsRequest(), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_is_serving(channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="medimg.training.v1.TrainingService"), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
