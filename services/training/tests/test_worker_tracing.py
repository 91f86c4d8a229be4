"""Training workers export spans: a real local job with an OTLP endpoint set sends its
workers' spans to a real OTLP/gRPC receiver, in the trace of the span that launched it; a
failed worker's root span says so; without an endpoint nothing is configured."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext

from medimg_training import jobs, launchers, worker
from medimg_training.datasets import Dataset
from medimg_training.jobs import Job, State
from medimg_training.launchers import Launch
from medimg_training.runner import Runner
from medimg_training.settings import TrainingSettings
from medimg_training.worker import cache_path
from services.training.tests.support import OtlpReceiver, ReceivedSpan, otlp_receiver
from services.training.tests.test_runner import ended, submit, wait_for

WORKER_SERVICE = "medimg-training-worker"


@pytest.fixture
def receiver() -> Iterator[tuple[OtlpReceiver, str]]:
    with otlp_receiver() as found:
        yield found


@pytest.fixture
def launched() -> InMemorySpanExporter:
    """The runner's own spans (the launching span among them)."""
    return InMemorySpanExporter()


@pytest.fixture
async def traced_runner(  # noqa: PLR0917 - fixtures
    pool: asyncpg.Pool,
    events: aioredis.Redis,
    settings: TrainingSettings,
    executor: ThreadPoolExecutor,
    receiver: tuple[OtlpReceiver, str],
    launched: InMemorySpanExporter,
) -> AsyncIterator[Runner]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(launched))
    _, endpoint = receiver
    runner = Runner(
        pool=pool,
        events=events,
        settings=settings.model_copy(update={"otlp_endpoint": endpoint}),
        executor=executor,
        code_version="test",
        tracer=provider.get_tracer("test"),
    )
    await runner.start()
    yield runner
    await runner.close()
    provider.shutdown()


def launch_context(exporter: InMemorySpanExporter, job: Job) -> SpanContext:
    """The span context of the runner's span that launched the job's workers."""
    (span,) = [
        s
        for s in exporter.get_finished_spans()
        if s.name == "training.launch"
        and (s.attributes or {}).get("medimg.training.job") == job.job_id
    ]
    context = span.get_span_context()
    assert context is not None
    return context


def worker_spans(receiver: OtlpReceiver) -> list[ReceivedSpan]:
    return [s for s in receiver.spans() if s.resource.get("service.name") == WORKER_SERVICE]


@pytest.mark.slow
async def test_a_jobs_workers_send_their_spans_into_the_launching_trace(  # noqa: PLR0917 - fixtures
    pool: asyncpg.Pool,
    dataset: Dataset,
    settings: TrainingSettings,
    traced_runner: Runner,
    receiver: tuple[OtlpReceiver, str],
    launched: InMemorySpanExporter,
) -> None:
    job = await submit(pool, dataset, checkpoint_every_steps=1)
    traced_runner.wake()
    job = await wait_for(pool, job.job_id, ended)
    log = (settings.object_dir / "jobs" / job.job_id / "worker.log").read_text()
    assert job.state is State.SUCCEEDED, (job.error_message, log[-3000:])

    parent = launch_context(launched, job)
    spans = worker_spans(receiver[0])
    # The worker flushed before it exited: every span is there once the job has ended.
    by_name: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        by_name.setdefault(span.span.name, []).append(span)
    assert set(by_name) == {
        "training.worker",
        "training.fetch",
        "training.load_data",
        "training.epoch",
        "training.checkpoint",
        "training.export",
    }, log[-3000:]
    (root,) = by_name["training.worker"]
    assert root.span.trace_id == parent.trace_id.to_bytes(16, "big")
    assert root.span.parent_span_id == parent.span_id.to_bytes(8, "big")
    assert root.span.status.code != trace_pb2.Status.STATUS_CODE_ERROR
    assert root.attributes == {
        "medimg.training.job": job.job_id,
        "medimg.training.dataset": dataset.name,
        "medimg.training.rank": 0,
        "medimg.training.world_size": 1,
    }
    # Checkpoints are taken within an epoch; the rest hang off the worker's span.
    epoch_ids = {e.span.span_id for e in by_name["training.epoch"]}
    for span in spans:
        assert span.span.trace_id == root.span.trace_id, span.span.name
        if span.span.name == "training.checkpoint":
            assert span.span.parent_span_id in epoch_ids
        elif span is not root:
            assert span.span.parent_span_id == root.span.span_id, span.span.name
    # One span per epoch, with its mean loss and the validation metrics.
    epochs = sorted(by_name["training.epoch"], key=lambda s: s.attributes["medimg.training.epoch"])
    assert [e.attributes["medimg.training.epoch"] for e in epochs] == [1, 2]
    assert [e.attributes["medimg.training.step"] for e in epochs] == [2, 4]
    for epoch in epochs:
        assert epoch.attributes["medimg.training.epochs"] == 2
        assert epoch.attributes["medimg.training.loss"] > 0
        assert 0 <= epoch.attributes["medimg.training.metric.accuracy"] <= 1
    assert epochs[-1].attributes["medimg.training.metric.accuracy"] == pytest.approx(
        job.progress["metrics"]["accuracy"]
    )
    steps = sorted(c.attributes["medimg.training.step"] for c in by_name["training.checkpoint"])
    assert steps == [1, 2, 3, 4]
    # Names, numbers and the job's ids only: no series, no pseudonym.
    for span in spans:
        for value in span.attributes.values():
            assert "series" not in str(value) and "patient" not in str(value), span.span.name


@pytest.mark.slow
async def test_a_failed_worker_ends_its_span_in_error(  # noqa: PLR0917 - fixtures
    pool: asyncpg.Pool,
    dataset: Dataset,
    settings: TrainingSettings,
    traced_runner: Runner,
    receiver: tuple[OtlpReceiver, str],
    launched: InMemorySpanExporter,
) -> None:
    # A volume missing from the cache: the worker asks ingest, and nothing listens there.
    cache_path(settings.cache, dataset.items[0].series).unlink()
    job = await submit(pool, dataset)
    traced_runner.wake()
    job = await wait_for(pool, job.job_id, ended)
    assert job.state is State.FAILED and job.error_reason == "WORKER_FAILED"

    parent = launch_context(launched, job)
    spans = {s.span.name: s for s in worker_spans(receiver[0])}
    root, fetch = spans["training.worker"], spans["training.fetch"]
    assert root.span.trace_id == parent.trace_id.to_bytes(16, "big")
    assert root.span.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert fetch.span.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    for failed in (root, fetch):
        (event,) = [e for e in failed.span.events if e.name == "exception"]
        recorded = {item.key: item.value.string_value for item in event.attributes}
        # grpc's error type; its message (which names the series) stays out of the trace.
        assert recorded["exception.type"] == "_MultiThreadedRendezvous"
        assert set(recorded) == {"exception.type", "code.location"}
        assert failed.span.status.message == "_MultiThreadedRendezvous"
    assert "training.epoch" not in spans


@pytest.mark.slow
async def test_a_cancelled_worker_exports_its_spans_before_it_dies(
    pool: asyncpg.Pool,
    dataset: Dataset,
    traced_runner: Runner,
    receiver: tuple[OtlpReceiver, str],
    launched: InMemorySpanExporter,
) -> None:
    job = await submit(pool, dataset, epochs=1000)
    traced_runner.wake()
    running = await wait_for(pool, job.job_id, lambda j: j.progress.get("epoch", 0) >= 3)
    await jobs.cancel(pool, job.job_id)
    await traced_runner.cancel(job.job_id)
    assert (await jobs.get(pool, job.job_id)).state is State.CANCELLED
    # Within the cancel grace, before SIGKILL: the batch processor's spans were exported.
    spans: dict[str, list[ReceivedSpan]] = {}
    for span in worker_spans(receiver[0]):
        spans.setdefault(span.span.name, []).append(span)
    (root,) = spans["training.worker"]
    assert root.span.trace_id == launch_context(launched, running).trace_id.to_bytes(16, "big")
    assert root.span.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert root.span.status.message == "Stopped"
    # The epochs finished before the cancel, all in the worker's trace.
    assert len(spans["training.epoch"]) >= 2
    assert {s.span.trace_id for found in spans.values() for s in found} == {root.span.trace_id}


#: A worker whose unwinding from SIGTERM is itself sent SIGTERM (a cancel reaches it twice
#: when the runner's own stop races the request's).
TWICE_STOPPED = """
import os, signal, sys, time
from medimg_training import worker

def run(config_path):
    try:
        print("running", flush=True)
        time.sleep(60)
    except worker.Stopped:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print("unwound", flush=True)
        raise

worker.run = run
worker.main(None)
"""


def test_a_second_sigterm_does_not_interrupt_the_unwinding() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", TWICE_STOPPED], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "running\n"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert output == "unwound\n"
    # It still dies of the signal, as the launchers expect of a stopped worker.
    assert process.returncode == -signal.SIGTERM


def test_the_local_launcher_passes_the_endpoint_and_traceparent(
    settings: TrainingSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the service's own environment holds reaches the workers only through settings.
    monkeypatch.setenv(launchers.OTLP_ENDPOINT_VARIABLE, "http://127.0.0.1:1")
    monkeypatch.setenv(launchers.TRACEPARENT_VARIABLE, "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    request = Launch("0123456789abcdef", tmp_path / "worker.json", processes=1)
    plain = launchers.LocalLauncher(settings, tmp_path).environment(request)
    assert launchers.OTLP_ENDPOINT_VARIABLE not in plain
    assert launchers.TRACEPARENT_VARIABLE not in plain
    assert plain[launchers.REDIS_URL_VARIABLE] == settings.redis_url
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    traced = launchers.LocalLauncher(
        settings.model_copy(update={"otlp_endpoint": "http://127.0.0.1:4317"}), tmp_path
    ).environment(Launch("0123456789abcdef", tmp_path / "worker.json", 1, traceparent=traceparent))
    assert traced[launchers.OTLP_ENDPOINT_VARIABLE] == "http://127.0.0.1:4317"
    assert traced[launchers.TRACEPARENT_VARIABLE] == traceparent


def test_without_an_endpoint_the_worker_sets_up_no_tracing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(launchers.OTLP_ENDPOINT_VARIABLE, raising=False)
    before = trace.get_tracer_provider()
    with worker.tracing({"job_id": "0123456789abcdef", "dataset": "d"}, 0, 1):
        assert not trace.get_current_span().get_span_context().is_valid
    assert trace.get_tracer_provider() is before
