"""The mesh CA rotates with no failed call: two real sidecar Envoys calling each other over
mTLS, and an operator client, while `medimg certs --ca-next`, `--renew` and `--ca-retire`
run one after the other (docs/operations.md, "Rotate certificates")."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from medimg_cli import mesh as meshlib
from medimg_cli.cli import main as medimg
from medimg_cli.pki import DATA_LINK, Pki, create_ca, renew, retire_ca, start_ca_rotation
from medimg_cli.testing import envoy_counter, wait_until

REPO = Path(__file__).resolve().parents[3]
DESCRIPTOR_SET = REPO / "libs" / "medimg-protos" / "src" / "medimg_protos" / "descriptor_set.binpb"
SIDES = ("ingest", "audit")
#: Generous: Envoy reloads in milliseconds, but CI machines are loaded.
RELOAD_WITHIN = 15.0
#: Calls of each kind that must succeed between two steps of the rotation.
CALLS_PER_STEP = 5


def _serials(pem: bytes) -> set[int]:
    return {cert.serial_number for cert in x509.load_pem_x509_certificates(pem)}


def _pair(pki: Pki, name: str) -> tuple[bytes, bytes]:
    """An identity's certificate and key from one version directory: read through the
    `..data` link resolved once, so a renewal in between cannot pair a key with another
    certificate (a client reading tls.crt and tls.key separately could)."""
    version = pki.identity_dir(name) / os.readlink(pki.identity_dir(name) / DATA_LINK)
    return (version / "tls.crt").read_bytes(), (version / "tls.key").read_bytes()


@dataclass
class Envoy:
    name: str
    admin_port: int
    process: subprocess.Popen[bytes]
    log: Path

    def admin(self, path: str) -> str:
        return httpx.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5).text

    def counter(self, name: str) -> int:
        return envoy_counter(f"http://127.0.0.1:{self.admin_port}", name)

    def trusted(self) -> list[set[int]]:
        """The serials of the CAs each TLS context of this Envoy trusts (from /certs)."""
        contexts = json.loads(self.admin("/certs"))["certificates"]
        return [{int(ca["serial_number"], 16) for ca in c.get("ca_cert", [])} for c in contexts]

    def presented(self) -> set[int]:
        """The serials of the certificates its TLS contexts present (from /certs)."""
        contexts = json.loads(self.admin("/certs"))["certificates"]
        return {int(cert["serial_number"], 16) for c in contexts for cert in c["cert_chain"]}


@dataclass
class Mesh:
    """Two sidecars (ingest calls audit) with a gRPC health service behind each, on a dev
    PKI made by `medimg certs` in state/pki."""

    mesh: meshlib.Mesh
    state: Path
    envoys: dict[str, Envoy]
    pki: Pki = field(init=False)

    def __post_init__(self) -> None:
        self.pki = Pki(self.state / "pki")

    def certs(self, *args: str) -> None:
        assert medimg(["--state", str(self.state), "certs", *args]) == 0, args

    def inbound(self, side: str) -> str:
        return f"127.0.0.1:{self.mesh.services[side].sidecar_port}"

    def call_as_ops(self, side: str, pair: tuple[bytes, bytes] | None = None) -> None:
        """One health check on a side's inbound mTLS port, as the operator (grpcurl's
        identity): a new channel, so a new handshake, with the files on disk now."""
        cert, key = pair or _pair(self.pki, "ops")
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca_cert.read_bytes(), private_key=key, certificate_chain=cert
        )
        with grpc.secure_channel(self.inbound(side), creds) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def call_audit_through_ingest(self) -> None:
        """ingest's Envoy originates mTLS to audit's (a new connection per call, see below)."""
        port = self.mesh.services["ingest"].upstreams["audit"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def served(self, side: str) -> x509.Certificate:
        """The certificate a side's Envoy presents to a new handshake."""
        context = ssl.create_default_context(cadata=self.pki.ca_cert.read_text())
        cert, key = _pair(self.pki, "ops")
        work = self.state / f"ops-{time.monotonic_ns()}"
        work.mkdir()
        (work / "c.pem").write_bytes(cert)
        (work / "k.pem").write_bytes(key)
        context.load_cert_chain(work / "c.pem", work / "k.pem")
        context.set_alpn_protocols(["h2"])
        host, port = self.inbound(side).split(":")
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


class Callers:
    """Calls every path of the mesh in a loop, in a thread, and keeps every failure."""

    def __init__(self, mesh: Mesh) -> None:
        self.calls: list[tuple[str, Callable[[], None]]] = [
            ("ops -> ingest", lambda: mesh.call_as_ops("ingest")),
            ("ops -> audit", lambda: mesh.call_as_ops("audit")),
            ("ingest -> audit", mesh.call_audit_through_ingest),
        ]
        self.rounds = 0
        self.failures: list[str] = []
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for what, call in self.calls:
                try:
                    call()
                except (grpc.RpcError, AssertionError, OSError, ValueError) as error:
                    self.failures.append(f"{self.phase}: {what}: {error}")
            self.rounds += 1

    def __enter__(self) -> Callers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def step(self, phase: str) -> None:
        """Waits until every path has been called CALLS_PER_STEP more times, then names
        the calls that follow."""
        target = self.rounds + CALLS_PER_STEP
        wait_until(
            lambda: self.rounds >= target or not self._thread.is_alive(),
            60,
            lambda: f"calls stalled in {self.phase}",
        )
        self.phase = phase


def _serve_health(port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    return server


@pytest.fixture
def two_sidecars(base_mesh: meshlib.Mesh, mesh_port_offset: int, tmp_path: Path) -> Iterator[Mesh]:
    state = tmp_path / "state"
    assert medimg(["--state", str(state), "certs"]) == 0
    mesh = base_mesh.with_offset(mesh_port_offset)
    configs = meshlib.render(
        base_mesh,
        Pki(state / "pki"),
        DESCRIPTOR_SET,
        port_offset=mesh_port_offset,
        sds_dir=tmp_path / "envoy" / "sds",
    )
    # Envoy keeps an upstream connection for the next call: one request per connection
    # makes every call a new handshake, the thing a CA rotation can break.
    (audit,) = [
        c
        for c in configs["sidecar-ingest"]["static_resources"]["clusters"]
        if c["name"] == "outbound_audit"
    ]
    options = audit["typed_extension_protocol_options"]
    options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "common_http_protocol_options"
    ] = {"max_requests_per_connection": 1}
    paths = meshlib.write_configs(configs, tmp_path / "envoy")
    servers = [_serve_health(mesh.services[side].service_port) for side in SIDES]
    envoys: dict[str, Envoy] = {}
    try:
        for side in SIDES:
            log = tmp_path / f"envoy-{side}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    meshlib.envoy_command(
                        paths[f"sidecar-{side}"], log_level="info", concurrency=1
                    ),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            envoys[side] = Envoy(side, mesh.services[side].admin_port, process, log)
        for envoy in envoys.values():
            wait_until(partial(_ready, envoy), 15, envoy.log.read_text)
        yield Mesh(mesh, state, envoys)
    finally:
        for envoy in envoys.values():
            envoy.process.terminate()
            try:
                envoy.process.wait(5)
            except subprocess.TimeoutExpired:
                envoy.process.kill()
                envoy.process.wait()
        for server in servers:
            server.stop(0)


def _ready(envoy: Envoy) -> bool:
    if envoy.process.poll() is not None:
        raise RuntimeError(f"envoy {envoy.name} exited: {envoy.log.read_text()}")
    try:
        return envoy.admin("/ready").strip() == "LIVE"
    except httpx.TransportError:
        return False


def _wait_trusting(mesh: Mesh, serials: set[int]) -> None:
    def trusts(envoy: Envoy) -> bool:
        return all(trusted == serials for trusted in envoy.trusted())

    def why(envoy: Envoy) -> str:
        return f"{envoy.name} trusts {envoy.trusted()}, not {serials}: {envoy.log.read_text()}"

    for envoy in mesh.envoys.values():
        wait_until(partial(trusts, envoy), RELOAD_WITHIN, partial(why, envoy))


def _wait_presenting(mesh: Mesh, side: str) -> None:
    serial = x509.load_pem_x509_certificate(mesh.pki.cert(side).read_bytes()).serial_number
    envoy = mesh.envoys[side]
    wait_until(
        lambda: envoy.presented() == {serial},
        RELOAD_WITHIN,
        lambda: f"{side} presents {envoy.presented()}, not {serial}",
    )


def test_a_ca_rotation_fails_no_call(two_sidecars: Mesh) -> None:
    mesh = two_sidecars
    old_ca = x509.load_pem_x509_certificate(mesh.pki.ca_cert.read_bytes())
    old_ops = _pair(mesh.pki, "ops")
    with Callers(mesh) as callers:
        callers.step("1: trust the next CA too")
        mesh.certs("--ca-next")
        new_ca = x509.load_pem_x509_certificate(mesh.pki.next_ca_cert.read_bytes())
        _wait_trusting(mesh, {old_ca.serial_number, new_ca.serial_number})

        # 2: every leaf re-issued under the next CA, at different moments.
        for name in ("ingest", "ops", "audit"):
            callers.step(f"2: renew {name}")
            mesh.certs("--renew", name)
            if name in SIDES:
                _wait_presenting(mesh, name)
        callers.step("2: renew all")
        mesh.certs("--renew", "all")
        for side in SIDES:
            _wait_presenting(mesh, side)

        callers.step("3: retire the old CA")
        mesh.certs("--ca-retire")
        _wait_trusting(mesh, {new_ca.serial_number})
        callers.step("done")

    assert callers.failures == []
    # Calls ran all along: CALLS_PER_STEP rounds between each two steps at least, and each
    # call through ingest was a handshake of its own with audit.
    assert callers.rounds >= 7 * CALLS_PER_STEP
    connections = mesh.envoys["ingest"].counter("cluster.outbound_audit.upstream_cx_total")
    assert connections >= callers.rounds
    assert mesh.pki.ca_cert.read_bytes() == new_ca.public_bytes(serialization.Encoding.PEM)
    assert not mesh.pki.rotating
    for side in SIDES:
        # Each side presents a certificate of the new CA ...
        mesh.served(side).verify_directly_issued_by(new_ca)
        # ... and refuses one of the old CA, which it accepted before the rotation.
        envoy = mesh.envoys[side]
        refused = (
            f"listener.127.0.0.1_{mesh.mesh.services[side].sidecar_port}.ssl.fail_verify_error"
        )
        before = envoy.counter(refused)
        with pytest.raises(grpc.RpcError):
            mesh.call_as_ops(side, old_ops)
        assert envoy.counter(refused) > before
        assert envoy.process.poll() is None  # never restarted


def test_without_the_trust_bundle_calls_fail(two_sidecars: Mesh) -> None:
    """The failure the bundle step prevents: the issuer switched to a new CA that only the
    renewed workloads trust (what cert-manager's per-workload ca.crt amounts to). Here the
    dev PKI's shared ca.pem is simply replaced by the new CA, then one leaf renewed."""
    mesh = two_sidecars
    with Callers(mesh) as callers:
        callers.step("switched without a bundle")
        work = mesh.state / "new-ca"
        work.mkdir()
        create_ca(work / "ca.pem", work / "ca-key.pem", "the next CA, not bundled")
        shutil.copyfile(work / "ca-key.pem", mesh.pki.ca_key)
        os.replace(work / "ca.pem", mesh.pki.ca_cert)
        mesh.certs("--renew", "ingest")
        wait_until(
            lambda: len(callers.failures) > 0,
            RELOAD_WITHIN,
            lambda: "no call failed although the old CA was dropped before re-issuing",
        )
    assert any("ingest" in failure for failure in callers.failures)


# --- the commands, without Envoy ----------------------------------------------------------


def test_the_steps_refuse_what_would_fail_calls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    pki = Pki(state / "pki")
    assert medimg(["--state", str(state), "certs", "--ca-retire"]) == 1
    assert "no CA rotation under way" in capsys.readouterr().err
    # Steps are separate commands: each must have reached every Envoy before the next.
    assert medimg(["--state", str(state), "certs", "--ca-next", "--renew", "all"]) == 2
    assert not pki.rotating

    assert medimg(["--state", str(state), "certs", "--ca-next"]) == 0
    bundle = pki.ca_cert.read_bytes()
    old_key = pki.ca_key.read_bytes()
    assert len(_serials(bundle)) == 2
    # Again mid-rotation: the same next CA (leaves it issued stay valid).
    assert medimg(["--state", str(state), "certs", "--ca-next"]) == 0
    assert pki.ca_cert.read_bytes() == bundle

    assert medimg(["--state", str(state), "certs", "--renew", "ingest"]) == 0
    capsys.readouterr()
    # Retiring now would strand every other leaf: refused, and nothing changes.
    assert medimg(["--state", str(state), "certs", "--ca-retire"]) == 1
    err = capsys.readouterr().err
    assert "gateway" in err and "ops" in err and "ingest," not in err
    assert pki.ca_cert.read_bytes() == bundle and pki.ca_key.read_bytes() == old_key
    assert pki.rotating


def test_a_restart_mid_rotation_keeps_the_next_cas_leaves(tmp_path: Path) -> None:
    """`medimg up` runs ensure_pki at every start: a leaf of the next CA is current."""
    state = tmp_path / "state"
    assert medimg(["--state", str(state), "certs"]) == 0
    pki = Pki(state / "pki")
    start_ca_rotation(pki)
    renewed = renew(pki, "ingest", "spiffe://medimg.local/ns/medimg/sa/ingest")
    renewed.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.next_ca_cert.read_bytes()))
    assert medimg(["--state", str(state), "certs"]) == 0
    assert x509.load_pem_x509_certificate(pki.cert("ingest").read_bytes()) == renewed
    # A leaf missing mid-rotation is issued by the next CA too.
    shutil.rmtree(pki.identity_dir("gateway"))
    assert medimg(["--state", str(state), "certs"]) == 0
    x509.load_pem_x509_certificate(pki.cert("gateway").read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(pki.next_ca_cert.read_bytes())
    )
    with pytest.raises(ValueError, match="still issued by the old CA"):
        retire_ca(pki, ["ingest", "gateway", "ops"])
