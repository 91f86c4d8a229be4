"""Tests of the mesh description and of the rendered Envoy configs, run in real Envoys."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.api import httpbody_pb2
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# The asyncio servicer, as medimg_core.server imports it (the stubs lack health.aio).
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb2
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli import mesh as meshlib
from medimg_cli.pki import Pki, create_ca, issue_certificate, mint_token

INGEST = "medimg.ingest.v1.IngestService"
INFERENCE = "medimg.inference.v1.InferenceService"
KSERVE = "inference.GRPCInferenceService"
USER_HEADER = "x-medimg-jwt-payload"
XFCC = "x-forwarded-client-cert"


# --- the description ------------------------------------------------------------------------


def test_load_mesh_reads_the_repository_description(base_mesh: meshlib.Mesh) -> None:
    assert base_mesh.trust_domain == "medimg.local"
    assert base_mesh.identities == ("gateway", "ops")
    services = ["ingest", "inference", "training", "audit"]
    assert base_mesh.all_identities() == [*services, "gateway", "ops"]
    ingest = base_mesh.services["ingest"]
    assert ingest.grpc_service == INGEST
    assert ingest.grpc_services == (INGEST,)
    inference = base_mesh.services["inference"]
    assert inference.grpc_services == (INFERENCE, KSERVE)
    assert inference.grpc_service == INFERENCE  # the gateway's, the service's own API
    assert ingest.sidecar_port == 7001
    assert dict(ingest.upstreams) == {"audit": 7211}
    assert ingest.allowed("UploadInstances") == ("gateway", "ops")
    assert base_mesh.spiffe("ingest") == "spiffe://medimg.local/ns/medimg/sa/ingest"
    assert base_mesh.gateway.user_header == USER_HEADER


def test_load_mesh_finds_the_description_by_itself(
    monkeypatch: pytest.MonkeyPatch, mesh_toml: Path, tmp_path: Path
) -> None:
    monkeypatch.delenv("MEDIMG_MESH", raising=False)
    assert meshlib.load_mesh() == meshlib.load_mesh(mesh_toml)
    moved = tmp_path / "elsewhere.toml"
    moved.write_text(mesh_toml.read_text().replace('namespace = "medimg"', 'namespace = "dev"'))
    monkeypatch.setenv("MEDIMG_MESH", str(moved))
    assert meshlib.load_mesh().namespace == "dev"


def test_with_offset_moves_every_port(base_mesh: meshlib.Mesh) -> None:
    moved = base_mesh.with_offset(40000)
    assert moved.gateway.port == base_mesh.gateway.port + 40000
    pairs = zip(base_mesh.ports(), moved.ports(), strict=True)
    assert all(new == (owner, old + 40000) for (owner, old), new in pairs)
    assert meshlib.port(7001, 40000) == 47001
    with pytest.raises(ValueError, match=r"outside 1\.\.65535"):
        base_mesh.with_offset(60000)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'UploadInstances = ["gateway"]',
            'UploadInstances = ["gatewy"]',
            r"services\.ingest\.callers\.UploadInstances: unknown caller identity 'gatewy'",
        ),
        (
            "service_port = 7102",
            "service_port = 7101",
            r"duplicate port 7101: services\.ingest\.service_port and "
            r"services\.inference\.service_port",
        ),
        (
            "upstreams = { audit = 7211 }",
            "upstreams = { audti = 7211 }",
            r"services\.ingest\.upstreams: unknown upstream service 'audti'",
        ),
        (
            "sidecar_port = 7001",
            "sidecarport = 7001",
            r"unknown key services\.ingest\.sidecarport; "
            r"missing key services\.ingest\.sidecar_port",
        ),
        ("admin_port = 7300", 'admin_port = "7300"', r"gateway\.admin_port: must be a port"),
        ('identities = ["gateway", "ops"]', 'identities = ["ops"]', r"must include 'gateway'"),
        ('audit = "audit"', 'audit = "audti"', r"gateway\.audit: unknown service 'audti'"),
        (
            f'grpc_services = ["{INFERENCE}", "{KSERVE}"]',
            f'grpc_services = ["{INFERENCE}", "{INFERENCE}"]',
            r"services\.inference\.grpc_services: a service is listed twice",
        ),
        (
            f'grpc_services = ["{INFERENCE}", "{KSERVE}"]',
            "grpc_services = []",
            r"services\.inference\.grpc_services: must be a non-empty list",
        ),
        (
            f'grpc_services = ["{INFERENCE}", "{KSERVE}"]',
            f'grpc_service = "{INFERENCE}"\ngrpc_services = ["{KSERVE}"]',
            r"unknown key services\.inference\.grpc_service\b",
        ),
    ],
)
def test_load_mesh_rejects_a_bad_description(
    tmp_path: Path, mesh_toml: Path, old: str, new: str, message: str
) -> None:
    text = mesh_toml.read_text()
    assert old in text
    bad = tmp_path / "mesh.toml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(ValueError, match=message):
        meshlib.load_mesh(bad)


def test_render_rejects_a_method_the_service_does_not_have(
    tmp_path: Path, mesh_toml: Path, pki: Pki, descriptor_set: Path
) -> None:
    bad = tmp_path / "mesh.toml"
    bad.write_text(mesh_toml.read_text().replace("GetStudy = ", "GetStudies = ", 1))
    with pytest.raises(ValueError, match=r"IngestService has no method 'GetStudies'"):
        meshlib.render(meshlib.load_mesh(bad), pki, descriptor_set)


def test_render_resolves_methods_across_a_services_grpc_services(
    tmp_path: Path, mesh_toml: Path, pki: Pki, descriptor_set: Path
) -> None:
    configs = meshlib.render(meshlib.load_mesh(mesh_toml), pki, descriptor_set)
    listener = configs["sidecar-inference"]["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    rbac = hcm["http_filters"][0]["typed_config"]["rules"]["policies"]

    def paths(policy: str) -> list[str]:
        return [next(iter(p["url_path"]["path"].values())) for p in rbac[policy]["permissions"]]

    assert paths("method-ModelInfer") == [f"/{KSERVE}/ModelInfer"]
    assert paths("method-ListModels") == [f"/{INFERENCE}/ListModels"]
    assert {f"/{INFERENCE}/", f"/{KSERVE}/"} <= set(paths("all-methods"))
    # The gateway routes and transcodes the service's own API only: no REST for KServe.
    gateway = json.dumps(configs["gateway"])
    assert KSERVE not in gateway
    assert INFERENCE in gateway


@pytest.mark.parametrize(
    "change",
    [
        (
            "ModelInfer = ",
            "ModelInferr = ",
            rf"services\.inference\.callers: {INFERENCE} and {KSERVE} have no method "
            r"'ModelInferr'",
        ),
        (
            f'grpc_services = ["{INFERENCE}", "{KSERVE}"]',
            f'grpc_services = ["{INFERENCE}", "medimg.training.v1.TrainingService"]',
            rf"'ListModels' is ambiguous: {INFERENCE} and medimg\.training\.v1\.TrainingService",
        ),
        (
            f'grpc_services = ["{INFERENCE}", "{KSERVE}"]',
            f'grpc_services = ["{INFERENCE}", "inference.KServe"]',
            r"services\.inference\.grpc_services: inference\.KServe is not in",
        ),
    ],
)
def test_render_rejects_a_method_none_or_two_of_the_services_have(
    tmp_path: Path, mesh_toml: Path, pki: Pki, descriptor_set: Path, change: tuple[str, str, str]
) -> None:
    old, new, message = change
    text = mesh_toml.read_text()
    assert old in text
    bad = tmp_path / "mesh.toml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(ValueError, match=message):
        meshlib.render(meshlib.load_mesh(bad), pki, descriptor_set)


def test_every_rendered_config_passes_envoy_validation(config_paths: dict[str, Path]) -> None:
    assert sorted(config_paths) == [
        "gateway",
        "sidecar-audit",
        "sidecar-inference",
        "sidecar-ingest",
        "sidecar-training",
    ]
    for path in config_paths.values():
        result = subprocess.run(
            [*meshlib.envoy_command(path), "--mode", "validate"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr


# --- a test double of the services, behind real Envoys --------------------------------------


class RecordingIngest(ingest_grpc.IngestServiceServicer):
    """Answers with canned data and records the metadata and deadline each call arrived with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.time_remaining: list[float | None] = []

    def _record(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.calls.append((method, metadata))
        self.time_remaining.append(context.time_remaining())
        return metadata

    async def ListStudies(
        self,
        request: ingest_pb2.ListStudiesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_pb2.ListStudiesResponse:
        metadata = self._record("ListStudies", context)
        # Echoed so that a gRPC caller sees what the sidecar passed on.
        context.set_trailing_metadata(((XFCC, metadata.get(XFCC, "")),))
        study = ingest_pb2.Study(
            name="studies/1.2.3", study_instance_uid="1.2.3", modalities=["CT"], series_count=1
        )
        return ingest_pb2.ListStudiesResponse(studies=[study])

    async def GetStudy(
        self,
        request: ingest_pb2.GetStudyRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_pb2.Study:
        self._record("GetStudy", context)
        trailing: tuple[tuple[str, bytes], ...] = ()
        if request.name == "studies/detailed":
            # What the platform's error interceptor sends: google.rpc.Status with ErrorInfo.
            info = any_pb2.Any()
            info.Pack(error_details_pb2.ErrorInfo(reason="STUDY_NOT_FOUND", domain="ingest"))
            status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="no study", details=[info])
            trailing = (("grpc-status-details-bin", status.SerializeToString()),)
        await context.abort(grpc.StatusCode.NOT_FOUND, "no study", trailing_metadata=trailing)

    async def UploadInstances(
        self,
        request_iterator: Any,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_pb2.UploadInstancesResponse:
        self._record("UploadInstances", context)
        async for _ in request_iterator:
            pass
        return ingest_pb2.UploadInstancesResponse()

    async def GetSeriesPixels(
        self,
        request: ingest_pb2.GetSeriesPixelsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[ingest_pb2.SeriesPixels]:
        self._record("GetSeriesPixels", context)
        yield ingest_pb2.SeriesPixels()

    async def ReidentifyPatient(
        self,
        request: ingest_pb2.ReidentifyPatientRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_pb2.ReidentifyPatientResponse:
        self._record("ReidentifyPatient", context)
        return ingest_pb2.ReidentifyPatientResponse()

    async def StoreInstances(
        self, request: ingest_pb2.StoreInstancesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> httpbody_pb2.HttpBody:
        self._record("StoreInstances", context)
        return httpbody_pb2.HttpBody()

    async def SearchStudies(
        self, request: ingest_pb2.SearchStudiesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> httpbody_pb2.HttpBody:
        self._record("SearchStudies", context)
        return httpbody_pb2.HttpBody()

    async def SearchSeries(
        self, request: ingest_pb2.SearchSeriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> httpbody_pb2.HttpBody:
        self._record("SearchSeries", context)
        return httpbody_pb2.HttpBody()

    async def SearchInstances(
        self,
        request: ingest_pb2.SearchInstancesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> httpbody_pb2.HttpBody:
        self._record("SearchInstances", context)
        return httpbody_pb2.HttpBody()

    async def RetrieveMetadata(
        self,
        request: ingest_pb2.RetrieveMetadataRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> httpbody_pb2.HttpBody:
        self._record("RetrieveMetadata", context)
        return httpbody_pb2.HttpBody()

    async def RetrieveRendered(
        self,
        request: ingest_pb2.RetrieveRenderedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> httpbody_pb2.HttpBody:
        self._record("RetrieveRendered", context)
        return httpbody_pb2.HttpBody()

    async def RetrieveFrames(
        self,
        request: ingest_pb2.RetrieveFramesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        self._record("RetrieveFrames", context)
        yield httpbody_pb2.HttpBody()

    async def RetrieveBulkdata(
        self,
        request: ingest_pb2.RetrieveBulkdataRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        self._record("RetrieveBulkdata", context)
        yield httpbody_pb2.HttpBody()

    async def StoreSegmentation(
        self,
        request_iterator: Any,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_pb2.StoreSegmentationResponse:
        self._record("StoreSegmentation", context)
        async for _ in request_iterator:
            pass
        return ingest_pb2.StoreSegmentationResponse()

    async def RetrieveInstances(
        self,
        request: ingest_pb2.RetrieveInstancesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        self._record("RetrieveInstances", context)
        yield httpbody_pb2.HttpBody()


class Services:
    """grpc.aio servers on one event loop in a background thread, so the tests stay sync."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[grpc.aio.Server] = []

    def serve(self, port: int, ingest: RecordingIngest | None = None) -> None:
        async def start() -> None:
            server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(AsyncHealthServicer(), server)
            names = [health.SERVICE_NAME, reflection.SERVICE_NAME]
            if ingest is not None:
                ingest_grpc.add_IngestServiceServicer_to_server(ingest, server)
                names.append(INGEST)
            reflection.enable_server_reflection(names, server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            self.servers.append(server)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def stop(self) -> None:
        async def stop() -> None:
            await asyncio.gather(*(server.stop(0) for server in self.servers))

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def ingest_servicer() -> RecordingIngest:
    # A double: it implements what the mesh tests call; the rest answer UNIMPLEMENTED.
    return RecordingIngest()  # type: ignore[abstract]


@pytest.fixture(scope="module")
def live(
    mesh: meshlib.Mesh,
    config_paths: dict[str, Path],
    start_envoy: Callable[[Path, int], None],
    ingest_servicer: RecordingIngest,
) -> Iterator[meshlib.Mesh]:
    """The ingest and audit services with their sidecars, and the gateway, all running."""
    services = Services()
    try:
        services.serve(mesh.services["ingest"].service_port, ingest_servicer)
        services.serve(mesh.services["audit"].service_port)
        start_envoy(config_paths["sidecar-ingest"], mesh.services["ingest"].admin_port)
        start_envoy(config_paths["sidecar-audit"], mesh.services["audit"].admin_port)
        start_envoy(config_paths["gateway"], mesh.gateway.admin_port)
        yield mesh
    finally:
        services.stop()


@pytest.fixture(autouse=True)
def _fresh_calls(ingest_servicer: RecordingIngest) -> None:
    ingest_servicer.calls.clear()
    ingest_servicer.time_remaining.clear()


def credentials(pki: Pki, identity: str | None) -> grpc.ChannelCredentials:
    if identity is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=pki.key(identity).read_bytes(),
        certificate_chain=pki.cert(identity).read_bytes(),
    )


def sidecar(mesh: meshlib.Mesh, service: str, creds: grpc.ChannelCredentials) -> grpc.Channel:
    return grpc.secure_channel(f"127.0.0.1:{mesh.services[service].sidecar_port}", creds)


def list_studies(channel: grpc.Channel, **kwargs: Any) -> tuple[Any, Any]:
    stub = ingest_grpc.IngestServiceStub(channel)
    return stub.ListStudies.with_call(ingest_pb2.ListStudiesRequest(), timeout=5, **kwargs)


def health_check(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def list_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    answers = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    return {service.name for service in answers[0].list_services_response.service}


def decode_payload(header: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    return value


# --- the sidecar ------------------------------------------------------------------------------


def test_ops_calls_health_reflection_and_methods(
    live: meshlib.Mesh, pki: Pki, ingest_servicer: RecordingIngest
) -> None:
    with sidecar(live, "ingest", credentials(pki, "ops")) as channel:
        assert health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert INGEST in list_services(channel)
        response, call = list_studies(channel)
    assert [s.name for s in response.studies] == ["studies/1.2.3"]
    ((method, metadata),) = ingest_servicer.calls
    assert method == "ListStudies"
    assert f"URI={live.spiffe('ops')}" in metadata[XFCC].split(";")
    assert dict(call.trailing_metadata())[XFCC] == metadata[XFCC]


def test_the_client_deadline_reaches_the_service(
    live: meshlib.Mesh, pki: Pki, ingest_servicer: RecordingIngest
) -> None:
    with sidecar(live, "ingest", credentials(pki, "ops")) as channel:
        list_studies(channel)
    (remaining,) = ingest_servicer.time_remaining
    assert remaining is not None
    assert 0 < remaining <= 5


def test_every_identity_of_the_mesh_may_check_health(live: meshlib.Mesh, pki: Pki) -> None:
    with sidecar(live, "ingest", credentials(pki, "audit")) as channel:
        assert health_check(channel) == health_pb2.HealthCheckResponse.SERVING


def test_a_caller_without_a_client_certificate_is_refused(live: meshlib.Mesh, pki: Pki) -> None:
    with (
        sidecar(live, "ingest", credentials(pki, None)) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        health_check(channel)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_of_another_ca_is_refused(
    live: meshlib.Mesh, pki: Pki, tmp_path: Path
) -> None:
    ca, ca_key, cert, key = (tmp_path / n for n in ("ca.pem", "ca-key.pem", "c.pem", "k.pem"))
    create_ca(ca, ca_key, "another CA")
    # The SPIFFE id of the real ops identity: only the issuer differs.
    issue_certificate(ca, ca_key, cert, key, live.spiffe("ops"), "ops")
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    with sidecar(live, "ingest", creds) as channel, pytest.raises(grpc.RpcError) as error:
        health_check(channel)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_sidecar_speaks_tls_1_3_with_alpn_h2_only(live: meshlib.Mesh, pki: Pki) -> None:
    address = ("127.0.0.1", live.services["ingest"].sidecar_port)
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(pki.cert("ops"), pki.key("ops"))
    context.set_alpn_protocols(["h2", "http/1.1"])
    # server_hostname="localhost" also checks the DNS SAN of the sidecar's certificate.
    with (
        socket.create_connection(address, timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == "h2"
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(address, timeout=5) as raw,
        pytest.raises(ssl.SSLError),
        context.wrap_socket(raw, server_hostname="localhost"),
    ):
        pass


def test_a_method_the_caller_may_not_call_is_denied_by_envoy(
    live: meshlib.Mesh, pki: Pki, ingest_servicer: RecordingIngest
) -> None:
    with sidecar(live, "ingest", credentials(pki, "inference")) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        request = ingest_pb2.UploadInstancesRequest(chunk=b"DICM", last_chunk=True)
        with pytest.raises(grpc.RpcError) as error:
            stub.UploadInstances(iter([request]), timeout=5)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Reflection follows callers["*"], which inference is not in.
        with pytest.raises(grpc.RpcError) as error:
            list_services(channel)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # What callers does grant the same identity goes through.
        list_studies(channel)
    assert [method for method, _ in ingest_servicer.calls] == ["ListStudies"]


def test_a_client_sent_xfcc_is_replaced(
    live: meshlib.Mesh, pki: Pki, ingest_servicer: RecordingIngest
) -> None:
    forged = f"URI={live.spiffe('gateway')}"
    with sidecar(live, "ingest", credentials(pki, "training")) as channel:
        list_studies(channel, metadata=((XFCC, forged),))
    ((_, metadata),) = ingest_servicer.calls
    assert forged not in metadata[XFCC].split(";")
    assert f"URI={live.spiffe('training')}" in metadata[XFCC].split(";")


def test_grpc_stats_carry_the_dotted_service_name(live: meshlib.Mesh, pki: Pki) -> None:
    with sidecar(live, "ingest", credentials(pki, "ops")) as channel:
        list_studies(channel)
    admin = live.services["ingest"].admin_port
    text = httpx.get(f"http://127.0.0.1:{admin}/stats/prometheus").text
    success = [line for line in text.splitlines() if line.startswith("envoy_cluster_grpc_success{")]
    assert any(
        f'envoy_grpc_bridge_service="{INGEST}"' in line
        and 'envoy_grpc_bridge_method="ListStudies"' in line
        for line in success
    ), success


def test_the_outbound_listener_originates_mtls_to_the_upstream(live: meshlib.Mesh) -> None:
    outbound = live.services["ingest"].upstreams["audit"]
    with grpc.insecure_channel(f"127.0.0.1:{outbound}") as channel:
        assert health_check(channel) == health_pb2.HealthCheckResponse.SERVING


# --- the gateway ------------------------------------------------------------------------------


@pytest.fixture
def gateway(live: meshlib.Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{live.gateway.port}", timeout=5) as client:
        yield client


@pytest.fixture
def bearer(live: meshlib.Mesh, pki: Pki) -> dict[str, str]:
    token = mint_token(
        pki,
        issuer=live.gateway.jwt_issuer,
        audience=live.gateway.jwt_audience,
        subject="alice",
        roles=["clinician"],
    )
    return {"authorization": f"Bearer {token}"}


def assert_json_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["message"]
    return body


def test_gateway_requires_a_jwt(gateway: httpx.Client, ingest_servicer: RecordingIngest) -> None:
    for headers in ({}, {"authorization": "Bearer x.y.z"}):
        body = assert_json_error(gateway.get("/v1/studies", headers=headers), 401)
        assert body["code"] == 401
    assert ingest_servicer.calls == []


def test_gateway_rejects_a_token_of_another_issuer(
    live: meshlib.Mesh, gateway: httpx.Client, pki: Pki
) -> None:
    token = mint_token(
        pki, issuer="https://elsewhere", audience=live.gateway.jwt_audience, subject="a", roles=[]
    )
    response = gateway.get("/v1/studies", headers={"authorization": f"Bearer {token}"})
    assert assert_json_error(response, 401)["code"] == 401


def test_gateway_transcodes_and_forwards_the_verified_user(
    live: meshlib.Mesh,
    gateway: httpx.Client,
    bearer: dict[str, str],
    ingest_servicer: RecordingIngest,
) -> None:
    forged = base64.urlsafe_b64encode(b'{"sub":"mallory","roles":["admin"]}').decode()
    response = gateway.get(
        "/v1/studies", headers={**bearer, USER_HEADER: forged, XFCC: "URI=forged"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    study = response.json()["studies"][0]
    assert study["name"] == "studies/1.2.3"
    assert study["studyInstanceUid"] == "1.2.3"
    # always_print_primitive_fields: zero values are present, not omitted.
    assert study["instanceCount"] == 0
    ((method, metadata),) = ingest_servicer.calls
    assert method == "ListStudies"
    payload = decode_payload(metadata[USER_HEADER])
    assert payload["sub"] == "alice"
    assert payload["roles"] == ["clinician"]
    assert "forged" not in metadata[XFCC]
    assert f"URI={live.spiffe('gateway')}" in metadata[XFCC].split(";")
    # The bearer token itself stays at the gateway.
    assert "authorization" not in metadata


def test_gateway_answers_unknown_paths_with_json_404(
    gateway: httpx.Client, bearer: dict[str, str]
) -> None:
    body = assert_json_error(gateway.get("/v1/nope", headers=bearer), 404)
    assert body["code"] == 404


def test_gateway_rejects_unknown_query_parameters(
    gateway: httpx.Client, bearer: dict[str, str], ingest_servicer: RecordingIngest
) -> None:
    body = assert_json_error(gateway.get("/v1/studies?bogus=1", headers=bearer), 400)
    assert body["code"] == 400
    assert ingest_servicer.calls == []


def test_gateway_turns_a_grpc_error_into_http_and_json(
    gateway: httpx.Client, bearer: dict[str, str]
) -> None:
    body = assert_json_error(gateway.get("/v1/studies/gone", headers=bearer), 404)
    # The transcoder's body is the google.rpc.Status: its code is the gRPC code.
    assert body["code"] == code_pb2.NOT_FOUND


def test_gateway_renders_error_details(gateway: httpx.Client, bearer: dict[str, str]) -> None:
    # Needs google/rpc/error_details.proto in the descriptor set: without it the transcoder
    # answers an error that carries ErrorInfo with an empty, application/grpc body.
    body = assert_json_error(gateway.get("/v1/studies/detailed", headers=bearer), 404)
    assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert body["details"][0]["reason"] == "STUDY_NOT_FOUND"
