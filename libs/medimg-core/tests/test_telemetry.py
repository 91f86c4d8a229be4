"""JSON logs: one object per line, with fields and trace id, never an exception's message.
Spans: exported over OTLP/gRPC to a collector."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from pydantic import ValidationError

from medimg_core.settings import ServiceSettings
from medimg_core.telemetry import JsonFormatter, current_trace_id, tracer_provider

SECRET = "PatientName=DOE^JANE"


def record(
    message: str = "stored %s", *args: object, exc: BaseException | None = None, **fields: object
) -> logging.LogRecord:
    exc_info = None
    if exc is not None:
        try:
            raise exc
        except BaseException:  # noqa: BLE001 - captured for the record
            exc_info = sys.exc_info()
    made = logging.getLogger("medimg_test.telemetry").makeRecord(
        "medimg_test.telemetry", logging.WARNING, __file__, 10, message, args, exc_info
    )
    if fields:
        made.fields = fields
    return made


def test_a_line_is_one_json_object_with_the_standard_keys() -> None:
    line = JsonFormatter("ingest").format(record("stored %s", "studies/1"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["service"] == "ingest"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "medimg_test.telemetry"
    assert entry["message"] == "stored studies/1"
    assert entry["time"][:2] == "20"
    assert "trace_id" not in entry  # outside a span


def test_fields_are_carried() -> None:
    entry = json.loads(
        JsonFormatter("audit").format(record("applied", migration="0001_x.sql", n=3))
    )
    assert entry["migration"] == "0001_x.sql"
    assert entry["n"] == 3


def test_exception_type_and_place_but_not_its_message() -> None:
    line = JsonFormatter("ingest").format(record("failed", exc=ValueError(f"bad value {SECRET}")))
    entry = json.loads(line)
    assert SECRET not in line
    assert entry["error_type"] == "ValueError"
    assert entry["error_at"].startswith(__file__)
    assert entry["message"] == "failed"


def test_exception_chain_message_is_left_out_too() -> None:
    try:
        try:
            raise KeyError(SECRET)
        except KeyError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        line = JsonFormatter("ingest").format(record("failed", exc=outer))
    assert SECRET not in line
    assert json.loads(line)["error_type"] == "RuntimeError"


def test_trace_id_inside_a_span() -> None:
    tracer = TracerProvider().get_tracer("medimg-test")
    with tracer.start_as_current_span("call") as span:
        expected = format(span.get_span_context().trace_id, "032x")
        assert current_trace_id() == expected
        entry = json.loads(JsonFormatter("ingest").format(record("x")))
    assert entry["trace_id"] == expected
    assert len(expected) == 32
    assert current_trace_id() == ""


def test_a_field_that_is_not_json_still_gives_a_line(tmp_path: Path) -> None:
    line = JsonFormatter("ingest").format(record("stored", path=tmp_path))
    assert json.loads(line)["path"] == str(tmp_path)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The receiving end of OTLP/gRPC, as an OpenTelemetry collector serves it."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.received = threading.Event()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    server = grpc.server(ThreadPoolExecutor(2))
    receiver = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(None)


def test_spans_reach_an_otlp_collector(collector: tuple[Collector, int]) -> None:
    receiver, port = collector
    provider = tracer_provider("ingest", to_console=False, otlp_endpoint=f"http://127.0.0.1:{port}")
    try:
        with provider.get_tracer("medimg-test").start_as_current_span("StoreInstances") as span:
            sent = span.get_span_context()
        assert provider.force_flush(10_000)
        assert receiver.received.wait(10)
    finally:
        provider.shutdown()
    (request,) = receiver.requests
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "medimg-ingest"
    (scope_spans,) = resource_spans.scope_spans
    (received,) = scope_spans.spans
    assert received.name == "StoreInstances"
    assert received.trace_id == sent.trace_id.to_bytes(16, "big")


@pytest.mark.parametrize("endpoint", ["otel-collector:4317", "grpc://collector:4317", "http://"])
def test_an_otlp_endpoint_must_be_an_http_or_https_url(endpoint: str) -> None:
    with pytest.raises(ValidationError, match="otlp_endpoint"):
        ServiceSettings(port=1, otlp_endpoint=endpoint)
