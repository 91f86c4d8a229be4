"""Real pixels for the training tests: volumes of pydicom's CT and MR test files, put in
the worker's cache as ingest would have served them (float32, (slices, rows, columns));
and a real OTLP/gRPC receiver for the workers' spans."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from pydicom import dcmread
from pydicom.data import get_testdata_file

from medimg_training import datasets
from medimg_training.datasets import Found, Item, Pseudonym, SeriesName
from medimg_training.worker import cache_path, slices_path

CLASSES = ("CT", "MR")
SEGMENTS = ("background", "bright")


def _pixels(name: str) -> np.ndarray:
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"pydicom's wheel lacks {name}"
    return np.asarray(dcmread(path).pixel_array, dtype=np.float32)


def series_table(count: int, cache: Path) -> tuple[list[Item], dict[str, str]]:
    """`count` labelled series (CT and MR alternating, each its own patient), their volumes
    cached, and their pseudonyms."""
    images = {"CT": _pixels("CT_small.dcm"), "MR": _pixels("MR_small.dcm")}
    rng = np.random.default_rng(0)
    items: list[Item] = []
    pseudonyms: dict[str, str] = {}
    for index in range(count):
        label = CLASSES[index % 2]
        series = SeriesName(f"studies/1.2.{index}/series/1.2.{index}.1")
        volume = images[label] * rng.uniform(0.9, 1.1) + rng.normal(0, 5, images[label].shape)
        path = cache_path(cache, series)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, volume[None].astype(np.float32))
        items.append(Item(series, label))
        pseudonyms[series] = f"patient-{index:03d}"
    return items, pseudonyms


def probe_of(
    pseudonyms: dict[str, str], volumes: dict[str, tuple[tuple[int, ...], list[str]]] | None = None
) -> datasets.Probe:
    """Pseudonyms (and volume shapes and slice UIDs) from tables (the cross-service test
    asks ingest itself)."""

    async def probe(series: SeriesName) -> Found:
        shape, slices = (volumes or {}).get(series, ((), []))
        return Found(Pseudonym(pseudonyms[series]), shape, tuple(slices))

    return probe


def cache(cache_dir: Path, series: str, volume: np.ndarray, slices: list[tuple[str, int]]) -> None:
    """Caches a volume as the worker does, with the instance and frame of each slice."""
    path = cache_path(cache_dir, series)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, volume.astype(np.float32))
    slices_path(cache_dir, series).write_text(json.dumps(slices))


def segmentation_table(
    count: int, cache_dir: Path, slices: int = 3, *, multi_frame: bool = False
) -> tuple[list[Item], dict[str, str], dict[str, tuple[tuple[int, ...], list[str]]]]:
    """`count` CT series of `slices` slices each (CT_small.dcm, shifted and noisy), each
    with a label series marking its bright voxels (label 1) on its own slices in reverse
    order, as ingest serves a SEG; their volumes cached; pseudonyms and volume headers.
    `multi_frame`: each series is one instance whose frames are the slices."""
    ct = _pixels("CT_small.dcm")
    rng = np.random.default_rng(1)
    items: list[Item] = []
    pseudonyms: dict[str, str] = {}
    volumes: dict[str, tuple[tuple[int, ...], list[str]]] = {}
    for index in range(count):
        image = np.stack([np.roll(ct, 9 * (index + k), axis=1) for k in range(slices)])
        image = image + rng.normal(0, 5, image.shape)
        labels = (image > 1100).astype(np.float32)
        series = f"studies/2.{index}/series/2.{index}.1"
        label_series = f"studies/2.{index}/series/2.{index}.2"
        frames = (
            [(f"2.{index}.1.1", k + 1) for k in range(slices)]
            if multi_frame
            else [(f"2.{index}.1.{k}", 1) for k in range(slices)]
        )
        uids = [uid for uid, _ in frames]
        cache(cache_dir, series, image, frames)
        cache(cache_dir, label_series, labels[::-1], frames[::-1])
        items.append(Item(SeriesName(series), label_series=label_series))
        for name in (series, label_series):
            pseudonyms[name] = f"patient-{index:03d}"
            volumes[name] = (image.shape, uids)
    return items, pseudonyms, volumes


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver (plaintext, as a sidecar's listener is): keeps every
    span it is sent, with its resource's attributes."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            requests = list(self.requests)
        return [
            ReceivedSpan(attributes(resource.resource.attributes), span)
            for request in requests
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]


@dataclass(frozen=True)
class ReceivedSpan:
    resource: dict[str, Any]
    span: trace_pb2.Span

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)


def attributes(values: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    """OTLP key-values as Python values."""
    return {
        item.key: getattr(item.value, item.value.WhichOneof("value") or "string_value")
        for item in values
    }


@contextmanager
def otlp_receiver() -> Iterator[tuple[OtlpReceiver, str]]:
    """A receiver on a free port of 127.0.0.1 and its endpoint (`http://127.0.0.1:PORT`)."""
    receiver = OtlpReceiver()
    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, f"http://127.0.0.1:{port}"
    finally:
        server.stop(None)


def stand_in_python(directory: Path, script: str) -> Path:
    """An executable to give as `worker_python`: the local launcher runs `<it> -m
    medimg_training.worker CONFIG`, and it runs `script` instead, with those arguments (so
    the process's command line names the job's config, as a real worker's does)."""
    python = directory / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -c {shlex.quote(script)} "$@"\n')
    python.chmod(0o755)
    return python


def logged(log: Path) -> list[str]:
    """The lines of a worker.log so far."""
    return log.read_text().splitlines() if log.exists() else []


async def wait_for_line(log: Path, line: str) -> None:
    """Until `line` is in the worker.log (10 s at most)."""
    for _ in range(1000):
        if line in logged(log):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{line!r} never came: {logged(log)}")
