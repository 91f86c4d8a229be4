"""Training as its app builds it: permission first, specific refusals, a job watched to its end."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from medimg.training.v1 import training_service_pb2 as pb
from medimg.training.v1 import training_service_pb2_grpc as pb_grpc
from medimg_core.identity import USER_HEADER, XFCC_HEADER
from medimg_core.server import Server
from medimg_training.app import build
from medimg_training.datasets import Dataset
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
async def channel(settings: TrainingSettings) -> AsyncIterator[grpc.aio.Channel]:
    settings = settings.model_copy(update={"grace_seconds": 1})
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
    ("CreateTrainingJob", pb.CreateTrainingJobRequest()),
    ("ListModels", pb.ListModelsRequest()),
]


@pytest.mark.parametrize(
    "caller", [workload("ops"), user("rita", "researcher"), user("max", "ml-engineer")]
)
async def test_an_allowed_caller_lists_jobs(channel: grpc.aio.Channel, caller: Metadata) -> None:
    stub = pb_grpc.TrainingServiceStub(channel)
    reply = await stub.ListTrainingJobs(pb.ListTrainingJobsRequest(), metadata=caller, timeout=5)
    assert list(reply.training_jobs) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetTrainingJob(
            pb.GetTrainingJobRequest(name="trainingJobs/nothing"), metadata=caller, timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason(caught.value) == "TRAINING_JOB_NOT_FOUND"


def job_request(of: Dataset, **spec: Any) -> pb.CreateTrainingJobRequest:
    given = {
        "dataset": of.name,
        "network": {"name": "DenseNet"},
        "image_size": [32, 32],
        "batch_size": 4,
        **spec,
    }
    return pb.CreateTrainingJobRequest(
        training_job=pb.TrainingJob(spec=json_format.ParseDict(given, pb.TrainingJobSpec()))
    )


@pytest.mark.parametrize(
    ("spec", "code", "expected"),
    [
        ({"network": {"name": "NoSuchNet"}}, grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_NETWORK"),
        (
            {"network": {"name": "DenseNet", "arguments": {"out_channels": 5}}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "WRONG_LABEL_COUNT",
        ),
        ({"resources": {"gpus": 2}}, grpc.StatusCode.INVALID_ARGUMENT, "IMPOSSIBLE_RESOURCES"),
        ({"max_runtime": "0s"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MAX_RUNTIME"),
        ({"max_runtime": "864000s"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MAX_RUNTIME"),
        ({"dataset": "datasets/none/versions/1"}, grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND"),
    ],
)
async def test_a_bad_spec_is_refused_and_nothing_starts(
    channel: grpc.aio.Channel,
    dataset: Dataset,
    spec: dict[str, Any],
    code: grpc.StatusCode,
    expected: str,
) -> None:
    stub = pb_grpc.TrainingServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateTrainingJob(
            job_request(dataset, **spec), metadata=user("max", "ml-engineer"), timeout=30
        )
    assert caught.value.code() == code
    assert reason(caught.value) == expected
    jobs = await stub.ListTrainingJobs(
        pb.ListTrainingJobsRequest(), metadata=user("max", "ml-engineer"), timeout=5
    )
    assert list(jobs.training_jobs) == []


@pytest.mark.slow
async def test_a_job_is_watched_to_its_end(channel: grpc.aio.Channel, dataset: Dataset) -> None:
    stub = pb_grpc.TrainingServiceStub(channel)
    max_ = user("max", "ml-engineer")
    job = await stub.CreateTrainingJob(job_request(dataset, epochs=2), metadata=max_, timeout=30)
    assert job.state == pb.TrainingJob.STATE_QUEUED
    assert job.creator == "max"
    seen = [
        p
        async for p in stub.WatchTrainingJob(
            pb.WatchTrainingJobRequest(name=job.name), metadata=max_, timeout=240
        )
    ]
    assert seen[-1].state == pb.TrainingJob.STATE_SUCCEEDED
    assert seen[-1].step == seen[-1].total_steps == 4
    assert "accuracy" in seen[-1].metrics
    done = await stub.GetTrainingJob(pb.GetTrainingJobRequest(name=job.name), metadata=max_)
    assert done.state == pb.TrainingJob.STATE_SUCCEEDED
    assert done.model_version == "registeredModels/ct-or-mr/versions/1"
    version = await stub.GetModelVersion(
        pb.GetModelVersionRequest(name=done.model_version), metadata=max_
    )
    assert version.training_job == job.name
    assert version.spec.dataset == dataset.name
    versions = await stub.ListModelVersions(
        pb.ListModelVersionsRequest(parent="registeredModels/ct-or-mr"), metadata=max_
    )
    assert [v.name for v in versions.model_versions] == [done.model_version]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CancelTrainingJob(pb.CancelTrainingJobRequest(name=job.name), metadata=max_)
    assert reason(caught.value) == "JOB_ALREADY_ENDED"


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


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        (
            {"task": "TASK_CLASSIFICATION", "items": [{"series": "studies/1/series/2"}],
             "query": {"modalities": ["CT"]}, "label_rule": {"attribute": "Modality"}},
            "ITEMS_AND_QUERY",
        ),
        ({"task": "TASK_CLASSIFICATION", "label_rule": {"attribute": "Modality"}},
         "QUERY_REQUIRED"),
        ({"query": {}, "label_rule": {"attribute": "Modality"}}, "TASK_REQUIRED"),
        ({"task": "TASK_CLASSIFICATION", "query": {}, "label_rule": {"attribute": "PatientName"}},
         "INVALID_LABEL_RULE"),
        ({"task": "TASK_SEGMENTATION", "query": {}, "label_rule": {"attribute": "Modality"}},
         "INVALID_LABEL_RULE"),
        ({"task": "TASK_SEGMENTATION", "query": {"study_date": "yesterday"}},
         "INVALID_QUERY"),
    ],
)  # fmt: skip
async def test_a_bad_query_dataset_is_refused_before_ingest_is_asked(
    channel: grpc.aio.Channel, dataset: dict[str, Any], expected: str
) -> None:
    # Nothing listens where this service's ingest is: a refusal here asked it nothing.
    stub = pb_grpc.TrainingServiceStub(channel)
    request = pb.CreateDatasetRequest(
        dataset_id="by-query", dataset=json_format.ParseDict(dataset, pb.Dataset())
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDataset(request, metadata=user("max", "ml-engineer"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value) == expected
