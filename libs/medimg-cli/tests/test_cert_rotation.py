"""Mesh certificates rotate live: real Envoys reload a renewed pair through file-based SDS."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medimg_cli import k8s
from medimg_cli import mesh as meshlib
from medimg_cli.cli import main as medimg
from medimg_cli.pki import Pki, create_ca, ensure_pki, issue_certificate, renew
from medimg_cli.testing import envoy_counter, wait_until

REPO = Path(__file__).resolve().parents[3]
DESCRIPTOR_SET = REPO / "libs" / "medimg-protos" / "src" / "medimg_protos" / "descriptor_set.binpb"
#: How long Envoy may take to notice a rename and reload (it takes milliseconds).
RELOAD_WITHIN = 5.0
ROTATION_FAILED = f"sds.{meshlib.CERTIFICATE_SECRET}.key_rotation_failed"


@dataclass
class Sidecar:
    """A running sidecar Envoy of the mesh, on a PKI of its own."""

    mesh: meshlib.Mesh
    pki: Pki
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.mesh.services["ingest"].sidecar_port)

    def admin(self, path: str) -> str:
        port = self.mesh.services["ingest"].admin_port
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).text

    def counter(self, name: str) -> int:
        port = self.mesh.services["ingest"].admin_port
        return envoy_counter(f"http://127.0.0.1:{port}", name)


@pytest.fixture
def sidecar(base_mesh: meshlib.Mesh, mesh_port_offset: int, tmp_path: Path) -> Iterator[Sidecar]:
    """The ingest sidecar's Envoy, started on its rendered config and stopped after the test."""
    mesh = base_mesh.with_offset(mesh_port_offset)
    pki = ensure_pki(
        tmp_path / "pki", mesh.trust_domain, mesh.namespace, base_mesh.all_identities()
    )
    configs = meshlib.render(
        base_mesh,
        pki,
        DESCRIPTOR_SET,
        port_offset=mesh_port_offset,
        sds_dir=tmp_path / "envoy" / "sds",
    )
    config = meshlib.write_configs(configs, tmp_path / "envoy")["sidecar-ingest"]
    log = tmp_path / "envoy.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            meshlib.envoy_command(config, log_level="info", concurrency=1),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    running = Sidecar(mesh, pki, process, log)
    try:
        wait_until(lambda: _ready(running), 10, lambda: f"not ready: {log.read_text()}")
        yield running
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(sidecar: Sidecar) -> bool:
    if sidecar.process.poll() is not None:
        raise RuntimeError(f"envoy exited: {sidecar.log.read_text()}")
    try:
        return sidecar.admin("/ready").strip() == "LIVE"
    except httpx.TransportError:
        return False


def _client_context(pki: Pki, identity: str = "ops") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(pki.cert(identity), pki.key(identity))
    context.set_alpn_protocols(["h2"])
    return context


def _served_serial(sidecar: Sidecar) -> int:
    """The serial of the certificate the sidecar presents to a new TLS handshake."""
    with (
        socket.create_connection(sidecar.address, timeout=5) as raw,
        _client_context(sidecar.pki).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _serial_on_disk(pki: Pki, name: str) -> int:
    return x509.load_pem_x509_certificate(pki.cert(name).read_bytes()).serial_number


# HTTP/2 by hand: enough to show that a connection opened before a rotation still works.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS, _PING, _ACK = 0x4, 0x6, 0x1


def _frame(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + b"\0\0\0\0" + payload


def _ping(tls: ssl.SSLSocket) -> None:
    """Sends an HTTP/2 PING and waits for the server's acknowledgement of it."""
    opaque = secrets.token_bytes(8)
    tls.sendall(_frame(_PING, 0, opaque))
    buffer = b""
    while True:
        while len(buffer) < 9:
            chunk = tls.recv(65536)
            assert chunk, "the server closed the connection"
            buffer += chunk
        length = int.from_bytes(buffer[:3], "big")
        while len(buffer) < 9 + length:
            chunk = tls.recv(65536)
            assert chunk, "the server closed the connection"
            buffer += chunk
        kind, flags, payload = buffer[3], buffer[4], buffer[9 : 9 + length]
        buffer = buffer[9 + length :]
        if kind == _PING and flags & _ACK and payload == opaque:
            return


# --- the sidecar's own certificate ---------------------------------------------------------


def test_a_renewed_certificate_is_served_without_restarting_envoy(sidecar: Sidecar) -> None:
    before = _served_serial(sidecar)
    assert before == _serial_on_disk(sidecar.pki, "ingest")
    # A connection opened on the old certificate, which the rotation must not cut.
    raw = socket.create_connection(sidecar.address, timeout=5)
    with _client_context(sidecar.pki).wrap_socket(raw, server_hostname="localhost") as old:
        old.sendall(_PREFACE + _frame(_SETTINGS, 0, b""))
        _ping(old)

        renewed = renew(sidecar.pki, "ingest", sidecar.mesh.spiffe("ingest"))

        assert renewed.serial_number != before
        wait_until(
            lambda: _served_serial(sidecar) == renewed.serial_number,
            RELOAD_WITHIN,
            lambda: f"still serving {before:x}: {sidecar.log.read_text()}",
        )
        _ping(old)
    assert sidecar.process.poll() is None  # the same process: Envoy was not restarted
    assert sidecar.counter(ROTATION_FAILED) == 0
    # Envoy's admin shows what it serves (what docs/operations.md tells operators to check).
    assert f"{renewed.serial_number:x}" in sidecar.admin("/certs").lower()


def test_the_renewed_certificate_keeps_its_identity(sidecar: Sidecar) -> None:
    spiffe = sidecar.mesh.spiffe("ingest")
    renewed = renew(sidecar.pki, "ingest", sidecar.mesh.spiffe("ingest"))
    sans = renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe]
    renewed.verify_directly_issued_by(
        x509.load_pem_x509_certificate(sidecar.pki.ca_cert.read_bytes())
    )
    # The pair on disk matches: the key is the new certificate's.
    key = serialization.load_pem_private_key(sidecar.pki.key("ingest").read_bytes(), None)
    assert key.public_key() == renewed.public_key()
    # So does the name clients use for it (<name>.pem beside the CA).
    assert sidecar.pki.cert_link("ingest").read_bytes() == sidecar.pki.cert("ingest").read_bytes()


def _write_broken_version(pki: Pki, name: str, how: str) -> None:
    """Swaps in a pair the way the kubelet swaps a Secret, but a broken one."""
    directory = pki.identity_dir(name)
    version = directory / f"..broken.{secrets.token_hex(4)}"
    version.mkdir()
    good_key, good_cert = pki.key(name).read_bytes(), pki.cert(name).read_bytes()
    if how == "mismatched key":
        other = ec.generate_private_key(ec.SECP256R1())
        key = other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # A new certificate (a new serial), with a key that is not its own.
        work = pki.root.parent / f"work-{secrets.token_hex(4)}"
        work.mkdir()
        issue_certificate(
            pki.ca_cert, pki.ca_key, work / "c.pem", work / "k.pem", "spiffe://x/y", name
        )
        (version / "tls.crt").write_bytes((work / "c.pem").read_bytes())
        (version / "tls.key").write_bytes(key)
    else:  # a certificate cut off half-way, as a non-atomic writer would leave it
        (version / "tls.crt").write_bytes(good_cert[: len(good_cert) // 2])
        (version / "tls.key").write_bytes(good_key)
    link = directory / f"..data_tmp.{secrets.token_hex(4)}"
    os.symlink(version.name, link)
    os.replace(link, directory / "..data")


@pytest.mark.parametrize("how", ["mismatched key", "truncated certificate"])
def test_a_broken_pair_leaves_envoy_serving_the_old_one(sidecar: Sidecar, how: str) -> None:
    before = _served_serial(sidecar)

    _write_broken_version(sidecar.pki, "ingest", how)

    # Envoy reads the broken pair, refuses it and says so in a counter; it keeps running
    # and keeps serving the pair it had.
    wait_until(
        lambda: sidecar.counter(ROTATION_FAILED) >= 1,
        RELOAD_WITHIN,
        lambda: f"no failed rotation counted: {sidecar.log.read_text()}",
    )
    assert sidecar.process.poll() is None
    assert _ready(sidecar)
    assert _served_serial(sidecar) == before
    assert "Failed to reload certificates" in sidecar.log.read_text()

    # The next good pair is taken as usual.
    renewed = renew(sidecar.pki, "ingest", sidecar.mesh.spiffe("ingest"))
    wait_until(
        lambda: _served_serial(sidecar) == renewed.serial_number,
        RELOAD_WITHIN,
        lambda: f"the good pair after a broken one was not loaded: {sidecar.log.read_text()}",
    )


# --- the CA it trusts -------------------------------------------------------------------------


def _health_check(address: str, creds: grpc.ChannelCredentials) -> None:
    """One health check; its outcome is read from Envoy's counters by the callers."""
    with grpc.secure_channel(address, creds) as channel, contextlib.suppress(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)


def _call_as_ops_of(sidecar: Sidecar, pki_dir: Path) -> None:
    creds = grpc.ssl_channel_credentials(
        root_certificates=sidecar.pki.ca_cert.read_bytes(),
        private_key=(pki_dir / "ops-key.pem").read_bytes(),
        certificate_chain=(pki_dir / "ops.pem").read_bytes(),
    )
    _health_check(f"{sidecar.address[0]}:{sidecar.address[1]}", creds)


def test_a_new_ca_in_the_trust_bundle_is_trusted_without_restart(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    new = tmp_path / "new-ca"
    new.mkdir()
    create_ca(new / "ca.pem", new / "ca-key.pem", "the next mesh CA")
    spiffe = sidecar.mesh.spiffe("ops")
    issue_certificate(
        new / "ca.pem", new / "ca-key.pem", new / "ops.pem", new / "ops-key.pem", spiffe, "ops"
    )
    # Nothing serves on the sidecar's service port: a call that passes TLS and RBAC ends
    # UNAVAILABLE from Envoy's upstream, one refused at the handshake ends UNAVAILABLE too,
    # so the verdict is read from Envoy's TLS counters.
    failed = f"listener.127.0.0.1_{sidecar.address[1]}.ssl.fail_verify_error"
    handshakes = f"listener.127.0.0.1_{sidecar.address[1]}.ssl.handshake"
    _call_as_ops_of(sidecar, new)
    assert sidecar.counter(failed) >= 1

    # The trust bundle (old CA and new) replaces ca.pem by a rename, as rotation does.
    bundle = sidecar.pki.ca_cert.read_bytes() + (new / "ca.pem").read_bytes()
    tmp = sidecar.pki.root / ".ca.pem.tmp"
    tmp.write_bytes(bundle)
    os.replace(tmp, sidecar.pki.ca_cert)

    def accepted() -> bool:
        before = sidecar.counter(handshakes)
        _call_as_ops_of(sidecar, new)
        return sidecar.counter(handshakes) > before

    wait_until(accepted, RELOAD_WITHIN, lambda: f"new CA not trusted: {sidecar.log.read_text()}")
    assert sidecar.process.poll() is None


# --- the upstream side: the certificate Envoy presents as a client -------------------------


class Peer:
    """A TLS server in the place of the audit sidecar: it records the client certificate
    of every handshake and closes the connection."""

    def __init__(self, port: int, cert: Path, key: Path, ca: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.load_cert_chain(cert, key)
        self.context.load_verify_locations(cafile=str(ca))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.set_alpn_protocols(["h2"])
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.serials: list[int] = []
        self.refused = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(5)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    if der is not None:
                        self.serials.append(x509.load_der_x509_certificate(der).serial_number)
            except (ssl.SSLError, OSError):
                self.refused += 1
            finally:
                raw.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


def _call_upstream(sidecar: Sidecar) -> None:
    """One call through the sidecar's outbound listener to audit: Envoy dials the peer."""
    port = sidecar.mesh.services["ingest"].upstreams["audit"]
    # The peer closes every connection, so the call fails: only the handshake matters.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, contextlib.suppress(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)


@pytest.fixture
def audit_peer(sidecar: Sidecar) -> Iterator[Callable[[str], Peer]]:
    peers: list[Peer] = []

    def start(identity: str) -> Peer:
        pki = sidecar.pki
        port = sidecar.mesh.services["audit"].sidecar_port
        peers.append(Peer(port, pki.cert(identity), pki.key(identity), pki.ca_cert))
        return peers[-1]

    yield start
    for peer in peers:
        peer.stop()


def test_envoy_presents_the_renewed_client_certificate_upstream(
    sidecar: Sidecar, audit_peer: Callable[[str], Peer]
) -> None:
    peer = audit_peer("audit")
    _call_upstream(sidecar)
    assert peer.serials == [_serial_on_disk(sidecar.pki, "ingest")]

    renewed = renew(sidecar.pki, "ingest", sidecar.mesh.spiffe("ingest"))

    def presented() -> bool:
        _call_upstream(sidecar)
        return peer.serials[-1] == renewed.serial_number

    wait_until(presented, RELOAD_WITHIN, lambda: f"upstream saw {peer.serials}")
    assert sidecar.process.poll() is None


def test_envoy_still_checks_the_upstreams_spiffe_id(
    sidecar: Sidecar, audit_peer: Callable[[str], Peer]
) -> None:
    # A certificate of the mesh's CA, but training's: not the audit the cluster expects.
    peer = audit_peer("training")
    _call_upstream(sidecar)
    assert peer.serials == []
    assert sidecar.counter("cluster.outbound_audit.ssl.fail_verify_san") >= 1


# --- the local PKI and the command ------------------------------------------------------------


def test_renew_needs_the_ca(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="medimg certs"):
        renew(Pki(tmp_path / "pki"), "ingest", "spiffe://medimg.local/ns/medimg/sa/ingest")


def test_ensure_pki_moves_an_older_layout_to_the_watched_one(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    pki = ensure_pki(root, "medimg.local", "medimg", ["ingest"])
    # The layout of the previous release: plain files beside the CA, no directory.
    for path in (pki.cert_link("ingest"), pki.key_link("ingest")):
        path.unlink()
    issue_certificate(
        pki.ca_cert,
        pki.ca_key,
        pki.cert_link("ingest"),
        pki.key_link("ingest"),
        "spiffe://medimg.local/ns/medimg/sa/ingest",
        "ingest",
    )
    ensure_pki(root, "medimg.local", "medimg", ["ingest"])
    assert pki.cert_link("ingest").is_symlink()
    assert (pki.identity_dir("ingest") / "..data").is_symlink()
    assert pki.cert_link("ingest").read_bytes() == pki.cert("ingest").read_bytes()


def test_medimg_certs_renew(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert medimg(["--state", str(state), "certs"]) == 0
    pki = Pki(state / "pki")
    before = _serial_on_disk(pki, "ingest")
    (first,) = [p.name for p in pki.identity_dir("ingest").glob("..2*")]

    assert medimg(["--state", str(state), "certs", "--renew", "ingest", "--renew", "gateway"]) == 0

    after = _serial_on_disk(pki, "ingest")
    assert after != before
    assert f"renewed ingest: serial {after:x}" in capsys.readouterr().out
    assert medimg(["--state", str(state), "certs", "--renew", "ingest"]) == 0
    # The current version and the one it replaced are kept, older ones removed.
    versions = [p.name for p in pki.identity_dir("ingest").glob("..2*")]
    assert len(versions) == 2 and first not in versions
    assert medimg(["--state", str(state), "certs", "--renew", "nobody"]) == 2
    assert "nobody" in capsys.readouterr().err


def test_medimg_mesh_out_is_self_contained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`medimg mesh --out DIR` writes the SDS files its configs read under DIR (not under the
    state's PKI), and the configs name them there: DIR can be moved beside the PKI alone."""
    state, out = tmp_path / "state", tmp_path / "out"
    assert medimg(["--state", str(state), "mesh", "--out", str(out)]) == 0
    capsys.readouterr()
    mesh = meshlib.load_mesh(REPO / "deploy" / "mesh.toml")
    sds = {path.name for path in (out / "sds").iterdir()}
    assert sds == {"ca.json"} | {
        f"{identity}-certificate.json" for identity in [*mesh.services, meshlib.GATEWAY_IDENTITY]
    }
    assert not (state / "pki" / "sds").exists()
    for config in out.glob("*.json"):
        text = config.read_text()
        named = {
            line.split('"')[3]
            for line in text.splitlines()
            if '"path": "' in line and line.strip().endswith('.json"')
        }
        assert named, config.name
        assert all(Path(path).parent == (out / "sds").resolve() for path in named), named
    # And Envoy accepts what it wrote, SDS files included.
    done = subprocess.run(
        [*meshlib.envoy_command(out / "sidecar-ingest.json"), "--mode", "validate"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- Kubernetes -----------------------------------------------------------------------------


def test_pod_configs_read_certificates_from_the_secret_mount() -> None:
    configs = k8s.render_envoy(meshlib.load_mesh(REPO / "deploy" / "mesh.toml"), DESCRIPTOR_SET)
    for key, config in configs.items():
        certificate = config.secrets[f"{k8s.CONFIG_DIR}/{k8s.CERTIFICATE_SDS_FILE}"]
        ((secret,),) = [certificate["resources"]]
        assert secret["tls_certificate"] == {
            "certificate_chain": {"filename": f"{k8s.TLS_DIR}/tls.crt"},
            "private_key": {"filename": f"{k8s.TLS_DIR}/tls.key"},
            # The kubelet renames `..data` in the mount when cert-manager renews the Secret.
            "watched_directory": {"path": k8s.TLS_DIR},
        }, key
        # The CAs come from the trust bundle's mount (trust-manager), not the Secret's
        # ca.crt, so that a CA rotation can trust old and new CA at once.
        ((ca,),) = [config.secrets[f"{k8s.CONFIG_DIR}/{k8s.CA_SDS_FILE}"]["resources"]]
        assert ca["validation_context"] == {
            "trusted_ca": {"filename": f"{k8s.TRUST_DIR}/{k8s.TRUST_KEY}"},
            "watched_directory": {"path": k8s.TRUST_DIR},
        }, key


def test_pod_configs_and_their_sds_files_pass_envoy_validation(tmp_path: Path) -> None:
    """Envoy 1.40 accepts every pod config as the pod sees it: the generated ConfigMap's
    files (envoy.json and its SDS files) with the mounts replaced by local paths."""
    mesh = meshlib.load_mesh(REPO / "deploy" / "mesh.toml")
    pki = ensure_pki(tmp_path / "pki", mesh.trust_domain, mesh.namespace, mesh.all_identities())
    rendered = k8s.render(mesh, DESCRIPTOR_SET).files
    for key in [k for k in rendered if k.startswith("envoy/")]:
        name = Path(key).stem
        identity = name.removeprefix("sidecar-")
        mounts = {
            f"{k8s.TLS_DIR}/tls.crt": str(pki.cert(identity)),
            f"{k8s.TLS_DIR}/tls.key": str(pki.key(identity)),
            f"{k8s.TRUST_DIR}/{k8s.TRUST_KEY}": str(pki.ca_cert),
            k8s.JWKS_PATH: str(pki.jwks),
            k8s.DESCRIPTOR_PATH: str(DESCRIPTOR_SET),
        }
        config_dir = tmp_path / name
        config_dir.mkdir()
        mounts[k8s.CONFIG_DIR] = str(config_dir)
        mounts[k8s.TLS_DIR] = str(pki.identity_dir(identity))
        mounts[k8s.TRUST_DIR] = str(pki.root)
        for file in (k8s.CERTIFICATE_SDS_FILE, k8s.CA_SDS_FILE):
            mounts[f"{k8s.CONFIG_DIR}/{file}"] = str(config_dir / file)
            text = rendered[f"sds/{name}/{file}"]
            for mounted, local in mounts.items():
                text = text.replace(f'"{mounted}"', f'"{local}"')
            # Every mount the SDS files name (the trust bundle's too) was replaced.
            assert k8s.TLS_DIR not in text and k8s.TRUST_DIR not in text, file
            (config_dir / file).write_text(text)
        text = rendered[key]
        for mounted, local in mounts.items():
            text = text.replace(f'"{mounted}"', f'"{local}"')
        assert k8s.CONFIG_DIR not in text and k8s.TLS_DIR not in text
        (config_dir / "envoy.json").write_text(text)
        command = [*meshlib.envoy_command(config_dir / "envoy.json"), "--mode", "validate"]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        assert done.returncode == 0, f"{key}: {done.stdout}{done.stderr}"
