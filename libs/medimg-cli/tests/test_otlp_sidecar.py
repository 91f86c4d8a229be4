"""Spans leave a pod through its sidecar: the service's own OTLP exporter sends plaintext to
the sidecar's OTLP listener on 127.0.0.1, and a real Envoy forwards it over mTLS (the
service's mesh certificate) to a real OTLP/gRPC receiver that requires a client certificate
of the mesh CA, checking the receiver's SPIFFE id on the way."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import httpx
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from medimg_cli import mesh as meshlib
from medimg_cli.pki import Pki, ensure_pki
from medimg_cli.testing import envoy_counter, port_is_free, wait_until
from medimg_core.telemetry import tracer_provider

REPO = Path(__file__).resolve().parents[3]
DESCRIPTOR_SET = REPO / "libs" / "medimg-protos" / "src" / "medimg_protos" / "descriptor_set.binpb"
COLLECTOR = "otel-collector"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC receiver that records each export and the client certificate's SAN."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.peers: list[list[str]] = []
        self.received = threading.Event()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        (pem,) = context.auth_context()["x509_pem_cert"]
        # grpc's stubs type the values loosely; they are the PEM bytes.
        cert = x509.load_pem_x509_certificate(cast(bytes, pem))
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.peers.append(sans.get_values_for_type(x509.UniformResourceIdentifier))
        self.requests.append(request)
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()


@dataclass
class OtlpPath:
    """A receiver serving one identity's certificate, and the ingest sidecar in front of it."""

    receiver: Receiver
    endpoint: str  # what MEDIMG_INGEST_OTLP_ENDPOINT would be
    admin: str

    def counter(self, name: str) -> int:
        return envoy_counter(self.admin, name)


@pytest.fixture(scope="module")
def collector_pki(base_mesh: meshlib.Mesh, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return ensure_pki(
        tmp_path_factory.mktemp("pki"),
        base_mesh.trust_domain,
        base_mesh.namespace,
        [*base_mesh.all_identities(), COLLECTOR],
    )


@pytest.fixture
def otlp_path(
    request: pytest.FixtureRequest,
    base_mesh: meshlib.Mesh,
    mesh_port_offset: int,
    collector_pki: Pki,
    tmp_path: Path,
) -> Iterator[OtlpPath]:
    """The ingest sidecar rendered with a collector, and a receiver presenting the
    certificate of `request.param` (the collector's identity unless a test says)."""
    pki = collector_pki
    identity = getattr(request, "param", COLLECTOR)
    receiver = Receiver()
    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    credentials = grpc.ssl_server_credentials(
        [(pki.key(identity).read_bytes(), pki.cert(identity).read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    collector_port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    taken = {value for _, value in base_mesh.ports()}
    listen = next(
        p for p in range(7310, 7400) if p not in taken and port_is_free(p + mesh_port_offset)
    )
    configs = meshlib.render(
        base_mesh,
        pki,
        DESCRIPTOR_SET,
        port_offset=mesh_port_offset,
        collector=meshlib.Collector("127.0.0.1", collector_port, COLLECTOR, listen),
    )
    config = meshlib.write_configs(configs, tmp_path / "envoy")["sidecar-ingest"]
    log = tmp_path / "envoy.log"
    with log.open("wb") as out:
        envoy = subprocess.Popen(
            meshlib.envoy_command(config, concurrency=1),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    admin = f"http://127.0.0.1:{base_mesh.services['ingest'].admin_port + mesh_port_offset}"

    def ready() -> bool:
        if envoy.poll() is not None:
            raise RuntimeError(f"envoy exited: {log.read_text()}")
        try:
            return httpx.get(f"{admin}/ready", timeout=1).text.strip() == "LIVE"
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 10, lambda: f"envoy not ready: {log.read_text()}")
        yield OtlpPath(receiver, f"http://127.0.0.1:{listen + mesh_port_offset}", admin)
    finally:
        envoy.terminate()
        try:
            envoy.wait(5)
        except subprocess.TimeoutExpired:
            envoy.kill()
            envoy.wait()
        server.stop(None)


def _export_one_span(endpoint: str, name: str) -> tuple[int, bool]:
    """Exports one span as the ingest service does; (its trace id, whether the flush
    finished: the exporter gives up on an endpoint that fails)."""
    provider = tracer_provider("ingest", to_console=False, otlp_endpoint=endpoint)
    try:
        with provider.get_tracer("medimg-test").start_as_current_span(name) as span:
            trace_id = span.get_span_context().trace_id
        return trace_id, provider.force_flush(15_000)
    finally:
        provider.shutdown()


def test_spans_reach_the_collector_through_the_sidecar_over_mtls(
    otlp_path: OtlpPath, base_mesh: meshlib.Mesh
) -> None:
    trace_id, _ = _export_one_span(otlp_path.endpoint, "StoreInstances")
    assert otlp_path.receiver.received.wait(10), "no span reached the collector"
    (request,) = otlp_path.receiver.requests
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "medimg-ingest"
    (received,) = resource_spans.scope_spans[0].spans
    assert received.name == "StoreInstances"
    assert received.trace_id == trace_id.to_bytes(16, "big")
    # The collector saw the service's own mesh identity: the sidecar's certificate.
    assert otlp_path.receiver.peers == [[base_mesh.spiffe("ingest")]]


@pytest.mark.parametrize("otlp_path", ["audit"], indirect=True)
def test_a_receiver_without_the_collectors_identity_gets_nothing(otlp_path: OtlpPath) -> None:
    """A server of the mesh CA that is not the collector (here audit's certificate) is
    refused by the sidecar's SAN check: no span is handed to it."""
    _export_one_span(otlp_path.endpoint, "StoreInstances")
    wait_until(
        lambda: otlp_path.counter("cluster.otlp_collector.ssl.fail_verify_san") >= 1,
        10,
        lambda: "the sidecar did not refuse the collector's certificate",
    )
    assert not otlp_path.receiver.requests


def test_the_otlp_listener_forwards_trace_export_alone(otlp_path: OtlpPath) -> None:
    with (
        grpc.insecure_channel(otlp_path.endpoint.removeprefix("http://")) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED  # Envoy's 404
    assert otlp_path.counter("cluster.otlp_collector.upstream_rq_total") == 0


def test_without_a_collector_there_is_no_otlp_listener(base_mesh: meshlib.Mesh, pki: Pki) -> None:
    """The local run (`medimg up`) has no collector: its sidecars open no OTLP port."""
    configs = meshlib.render(base_mesh, pki, DESCRIPTOR_SET)
    for key, config in configs.items():
        names = {listener["name"] for listener in config["static_resources"]["listeners"]}
        assert "otlp" not in names, key
        clusters = {cluster["name"] for cluster in config["static_resources"]["clusters"]}
        assert meshlib.OTLP_CLUSTER not in clusters, key


def test_the_listener_may_not_take_a_port_of_the_mesh(base_mesh: meshlib.Mesh, pki: Pki) -> None:
    taken = base_mesh.services["audit"].sidecar_port
    with pytest.raises(ValueError, match=f"listen_port {taken} is also services.audit"):
        meshlib.render(
            base_mesh,
            pki,
            DESCRIPTOR_SET,
            collector=meshlib.Collector("127.0.0.1", 4317, COLLECTOR, taken),
        )
