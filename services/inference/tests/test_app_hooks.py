"""The service as its app builds it, with Redis: Triton's metrics on the default registry
(what the metrics port serves), and a promotion on the real stream loaded and served."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

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


async def test_the_app_serves_metrics_and_follows_promotions(
    tmp_path: Path, redis_url: str, classifier: TrainedClassifier
) -> None:
    model = f"app{uuid.uuid4().hex[:8]}"
    repository = tmp_path / "repository"
    write_bundle(repository, model, 1, classifier_metadata(), {"model.ts": classifier.torchscript})
    promoted = write_bundle(
        tmp_path / "registry", model, 2, classifier_metadata(), {"model.onnx": classifier.onnx}
    )
    settings = InferenceSettings(
        port=0,
        audit_target="127.0.0.1:9",
        ingest_target="127.0.0.1:9",
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

    assert (repository / model / "2" / "models" / "model.onnx").is_file()
    # Stopped: its collector is gone from the registry.
    assert versions_served(model) == set()
