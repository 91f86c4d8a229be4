"""Triton's metrics from the model server: a known sequence of requests (batched and not,
refused, expired) gives known numbers, under Triton's names, and no GPU metrics here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import prometheus_client
import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from medimg_core.errors import DeadlineExceeded, InvalidArgument
from medimg_inference.backends import BackendOptions
from medimg_inference.metrics import CUMULATIVE, GpuProbe, register_metrics
from medimg_inference.repository import ModelName, ModelRepository, ModelVersion
from medimg_inference.serving import ModelServer
from services.inference.tests.support import (
    TORCHSCRIPT_DEPRECATED,
    TrainedClassifier,
    classifier_metadata,
    write_bundle,
)

pytestmark = pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ModelServer]:
    server = ModelServer(ModelRepository(tmp_path), BackendOptions(intra_op_threads=1))
    yield server
    await server.close()


def scrape(registry: CollectorRegistry) -> tuple[str, Samples]:
    text = prometheus_client.generate_latest(registry).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, samples


def labels(model: str, version: int) -> tuple[tuple[str, str], ...]:
    return (("model", model), ("version", str(version)))


async def test_a_known_sequence_of_requests_gives_triton_s_numbers(
    tmp_path: Path, server: ModelServer, classifier: TrainedClassifier
) -> None:
    # A long queue delay: a batch leaves when it holds 4 rows, or after 200 ms.
    medimg = {"max_batch_size": 4, "max_queue_delay_us": 200_000}
    write_bundle(
        tmp_path, "patches", 3, classifier_metadata(medimg), {"model.onnx": classifier.onnx}
    )
    await server.load("patches")
    registry = CollectorRegistry()
    register_metrics(server, registry)
    patches = classifier.patches

    # Four one-row requests together: one execution of 4 rows.
    await asyncio.gather(
        *(server.infer("patches", None, {"patch": patches[i : i + 1]}) for i in range(4))
    )
    # One request of two rows, alone: one execution of 2 rows, after the queue delay.
    await server.infer("patches", None, {"patch": patches[4:6]})
    # Refused before it queues.
    with pytest.raises(InvalidArgument):
        await server.infer("patches", None, {"patch": patches[:1].astype(np.float64)})
    # Its deadline passed before it arrived.
    with pytest.raises(DeadlineExceeded):
        await server.infer("patches", None, {"patch": patches[:1]}, time.monotonic() - 1)
    # Its deadline passes while it waits for a batch to fill: answered, never run.
    with pytest.raises(DeadlineExceeded):
        await server.infer("patches", None, {"patch": patches[:1]}, time.monotonic() + 0.02)
    await asyncio.sleep(0.3)  # the worker's fill wait ends, with nothing left to run

    statistics = server.statistics()[ModelName("patches"), ModelVersion(3)]
    text, samples = scrape(registry)
    at = labels("patches", 3)

    expected = {
        "nv_inference_request_success": 5,
        "nv_inference_request_failure": 3,
        "nv_inference_count": 6,
        "nv_inference_exec_count": 2,
        "nv_cache_num_hits_per_model": 0,
        "nv_cache_num_misses_per_model": 0,
    }
    assert {name: samples[name, at] for name in expected} == expected
    assert statistics.executions_by_batch_size == {4: 1, 2: 1}
    assert samples["nv_inference_request_duration_us", at] == statistics.success_ns // 1000
    assert samples["nv_inference_queue_duration_us", at] == statistics.queue_ns // 1000
    assert (
        samples["nv_inference_compute_infer_duration_us", at] == statistics.compute_infer_ns // 1000
    )
    # The lone request waited out the 200 ms queue delay; durations are microseconds.
    assert 200_000 <= samples["nv_inference_queue_duration_us", at] < 5_000_000
    assert samples["nv_inference_request_duration_us", at] >= (
        samples["nv_inference_queue_duration_us", at]
        + samples["nv_inference_compute_infer_duration_us", at]
    )
    assert samples["nv_inference_compute_input_duration_us", at] >= 0
    assert samples["nv_inference_compute_output_duration_us", at] >= 0
    # Triton's names, as Triton writes them: no `_total`, every cumulative metric present.
    for spec in CUMULATIVE:
        assert f"# TYPE {spec.name} untyped" in text
        assert (spec.name, at) in samples
    assert "_total" not in text


async def test_metrics_follow_the_version_serving(
    tmp_path: Path, server: ModelServer, classifier: TrainedClassifier
) -> None:
    for version in (1, 2):
        write_bundle(
            tmp_path, "patches", version, classifier_metadata(), {"model.onnx": classifier.onnx}
        )
    registry = CollectorRegistry()
    register_metrics(server, registry)
    _, before = scrape(registry)

    await server.load("patches", 1)
    await server.infer("patches", None, {"patch": classifier.patches[:2]})
    _, first = scrape(registry)
    await server.load("patches", 2)
    _, second = scrape(registry)

    assert not any(name == "nv_inference_count" for name, _ in before)
    assert first["nv_inference_count", labels("patches", 1)] == 2
    assert ("nv_inference_count", labels("patches", 1)) not in second
    assert second["nv_inference_count", labels("patches", 2)] == 0


async def test_register_metrics_serves_them_on_the_default_registry(
    tmp_path: Path, server: ModelServer, classifier: TrainedClassifier
) -> None:
    write_bundle(tmp_path, "served", 1, classifier_metadata(), {"model.onnx": classifier.onnx})
    await server.load("served")
    await server.infer("served", None, {"patch": classifier.patches[:3]})
    collector = register_metrics(server)
    try:
        _, samples = scrape(prometheus_client.REGISTRY)
    finally:
        prometheus_client.REGISTRY.unregister(collector)

    assert samples["nv_inference_count", labels("served", 1)] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="this test is for machines without a GPU")
def test_without_a_gpu_the_gpu_metrics_are_absent_not_broken() -> None:
    registry = CollectorRegistry()
    server = ModelServer(ModelRepository(Path("/nonexistent")))
    register_metrics(server, registry)

    text, _ = scrape(registry)

    assert GpuProbe().read() == []
    assert "nv_gpu_" not in text
    assert "# TYPE nv_inference_count untyped" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_with_a_gpu_its_utilization_and_memory_are_reported() -> None:
    registry = CollectorRegistry()
    register_metrics(ModelServer(ModelRepository(Path("/nonexistent"))), registry)

    _, samples = scrape(registry)

    totals = {key: value for key, value in samples.items() if key[0] == "nv_gpu_memory_total_bytes"}
    assert len(totals) == torch.cuda.device_count()
    for (_, gpu), total in totals.items():
        assert gpu[0][0] == "gpu_uuid" and gpu[0][1].startswith("GPU-")
        assert total > 0
        assert 0 <= samples["nv_gpu_memory_used_bytes", gpu] <= total
        assert 0 <= samples["nv_gpu_utilization", gpu] <= 1
