"""Logs, traces and metrics, set up the same way in every service.

Logs are JSON lines on stderr carrying the trace id. They, the spans and the metric
labels hold resource names, codes and reasons only: never PHI.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import prometheus_client
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)

RPC_HANDLED = prometheus_client.Counter(
    "medimg_grpc_server_handled",
    "RPCs completed by the service, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_SECONDS = prometheus_client.Histogram(
    "medimg_grpc_server_handling_seconds",
    "Time the service took to handle an RPC, by method.",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id = current_trace_id()
        if trace_id:
            entry["trace_id"] = trace_id
        entry.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[0] is not None:
            # The exception's type and where it was raised, not its message: messages
            # of parsing libraries can quote the data they choked on.
            entry["error_type"] = record.exc_info[0].__name__
            tb = record.exc_info[2]
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None:
                entry["error_at"] = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def tracer_provider(
    service: str, *, to_console: bool, otlp_endpoint: str | None = None
) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": f"medimg-{service}"}))
    if to_console:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    if otlp_endpoint:
        # Batched and sent from the processor's own thread: a slow or absent collector
        # costs dropped spans (and a warning), never a slower or failed call.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    return provider


def configure_tracing(service: str, *, to_console: bool, otlp_endpoint: str | None = None) -> None:
    trace.set_tracer_provider(
        tracer_provider(service, to_console=to_console, otlp_endpoint=otlp_endpoint)
    )


def current_trace_id() -> str:
    """The W3C trace id of the current span as 32 hex digits, or '' outside a trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def start_metrics_server(port: int) -> None:
    if port:
        prometheus_client.start_http_server(port, addr="127.0.0.1")
