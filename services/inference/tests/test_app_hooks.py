"""The service as its app builds it, with Redis: Triton's metrics on the default registry
(what the metrics port serves), and a promotion on the real stream, confirmed over gRPC by
a registry, loaded and served."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from medimg.training.v1 import training_service_pb2 as training_pb
from medimg_core import redis as medimg_redis
from medimg_core.bundles import bundle_digest
from medimg_inference.app import build
from medimg_inference.promotion import PROMOTION_STREAM
from medimg_inference.settings import InferenceSettings
from services.inference.tests.support import (
    TORCHSCRIPT_DEPRECATED,
    TrainedClassifier,
    classifier_metadata,
    write_bundle,
)

pytestmark = pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)


def versions_served(model: str) -> set[str]:
    text = prometheus_client.generate_latest().decode()
    return {
        sample.labels["version"]
        for family in text_string_to_metric_families(text)
        if family.name == "nv_inference_count"
        for sample in family.samples
        if sample.labels["model"] == model
    }


def registry_server(versions: dict[str, training_pb.ModelVersion]) -> grpc.aio.Server:
    """The training registry's GetModelVersion, for the versions it was told of."""

    async def get_model_version(
        request: training_pb.GetModelVersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> training_pb.ModelVersion:
        if request.name not in versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such version")
        return versions[request.name]

    handler = grpc.method_handlers_generic_handler(
        "medimg.training.v1.TrainingService",
        {
            "GetModelVersion": grpc.unary_unary_rpc_method_handler(
                get_model_version,
                request_deserializer=training_pb.GetModelVersionRequest.FromString,
                response_serializer=training_pb.ModelVersion.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    return server


async def test_the_app_serves_metrics_and_follows_promotions(
    tmp_path: Path, redis_url: str, classifier: TrainedClassifier
) -> None:
    model = f"app{uuid.uuid4().hex[:8]}"
    repository = tmp_path / "repository"
    write_bundle(repository, model, 1, classifier_metadata(), {"model.ts": classifier.torchscript})
    promoted = write_bundle(
        tmp_path / "registry", model, 2, classifier_metadata(), {"model.onnx": classifier.onnx}
    )
    registered = training_pb.ModelVersion(
        bundle_uri=promoted.as_uri(), sha256=bundle_digest(promoted), aliases=["production"]
    )
    training = registry_server({f"registeredModels/{model}/versions/2": registered})
    training_port = training.add_insecure_port("127.0.0.1:0")
    await training.start()
    settings = InferenceSettings(
        port=0,
        audit_target="127.0.0.1:9",
        ingest_target="127.0.0.1:9",
        training_target=f"127.0.0.1:{training_port}",
        model_repository=repository,
        redis_url=redis_url,
    )
    publisher = medimg_redis.connect(redis_url)
    try:
        async with AsyncExitStack() as resources:
            await build(settings, resources)
            assert versions_served(model) == {"1"}

            await medimg_redis.publish(
                publisher,
                PROMOTION_STREAM,
                {
                    "model": model,
                    "version": "2",
                    "alias": "production",
                    "bundle": promoted.as_uri(),
                    "sha256": bundle_digest(promoted),
                },
            )
            async with asyncio.timeout(30):
                while versions_served(model) != {"2"}:  # noqa: ASYNC110 - another task's work
                    await asyncio.sleep(0.05)
    finally:
        await publisher.aclose()
        await training.stop(None)

    assert (repository / model / "2" / "models" / "model.onnx").is_file()
    # Stopped: its collector is gone from the registry.
    assert versions_served(model) == set()
