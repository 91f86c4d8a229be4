"""The local dev PKI: a CA, one SPIFFE X.509 identity per workload, and the JWT signing key.

Each identity's certificate and key live in a directory of their own, laid out as the
kubelet lays out a mounted Secret: the files are in a versioned subdirectory, `..data` is a
symlink to the current version, and `tls.crt` and `tls.key` are symlinks through `..data`.
A renewal writes a new version and renames a new `..data` over the old one, so the pair
changes in one atomic step, and Envoy (which watches the directory for that rename,
mesh.py) reloads it live exactly as it does in Kubernetes.

`ca.pem` is what every identity trusts (Envoy's trusted CA, clients' root): normally the one
CA, during a CA rotation the bundle of the current CA and the next one. The rotation has
three steps, each an atomic rename Envoy reloads on (docs/operations.md, "Rotate
certificates"): start_ca_rotation makes the next CA and trusts both; renew then issues
under the next CA; retire_ca makes the next CA the only one, once every leaf is its.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "Pki",
    "create_ca",
    "ensure_pki",
    "issue_certificate",
    "jwk_thumbprint",
    "mint_token",
    "renew",
    "retire_ca",
    "spiffe_id",
    "start_ca_rotation",
]

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=365)
# Backdating absorbs small clock differences between the issuer and a verifier.
BACKDATE = dt.timedelta(minutes=5)
# A leaf this close to expiry is re-issued by ensure_pki rather than kept.
RENEW_BEFORE = dt.timedelta(days=7)
ORGANIZATION = "medimg dev"
JWT_ALGORITHM = "ES256"
#: The symlink to an identity's current version, as the kubelet names it.
DATA_LINK = "..data"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


def spiffe_id(trust_domain: str, namespace: str, name: str) -> str:
    """The SPIFFE id of a workload, e.g. spiffe://medimg.local/ns/medimg/sa/ingest."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{name}"


@dataclass(frozen=True)
class Pki:
    """Where the files of one dev PKI live (all under one directory)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The key of the CA that issues, outside a rotation."""
        return self.root / "ca-key.pem"

    @property
    def next_ca_cert(self) -> Path:
        """The next CA during a rotation (start_ca_rotation to retire_ca): it issues then."""
        return self.root / "ca-next.pem"

    @property
    def next_ca_key(self) -> Path:
        return self.root / "ca-next-key.pem"

    @property
    def rotating(self) -> bool:
        return self.next_ca_key.exists()

    def issuer(self) -> tuple[Path, Path]:
        """The certificate file and key of the CA new leaves are issued by: the next CA
        during a rotation, the current one otherwise."""
        if self.rotating:
            return self.next_ca_cert, self.next_ca_key
        return self.ca_cert, self.ca_key

    def identity_dir(self, name: str) -> Path:
        """The directory of one identity's certificate and key (what Envoy watches)."""
        return self.root / name

    def cert(self, name: str) -> Path:
        return self.identity_dir(name) / CERT_FILE

    def key(self, name: str) -> Path:
        return self.identity_dir(name) / KEY_FILE

    def cert_link(self, name: str) -> Path:
        """<name>.pem beside the CA: a stable name for clients (grpcurl, the docs)."""
        return self.root / f"{name}.pem"

    def key_link(self, name: str) -> Path:
        return self.root / f"{name}-key.pem"

    @property
    def jwt_key(self) -> Path:
        return self.root / "jwt-key.pem"

    @property
    def jwks(self) -> Path:
        return self.root / "jwks.json"

    @property
    def audit_key(self) -> Path:
        """The Ed25519 key that signs the audit log's checkpoints."""
        return self.root / "audit-log-key.pem"

    @property
    def audit_public_key(self) -> Path:
        """Its public half: what a verifier of the audit log trusts."""
        return self.root / "audit-log-pub.pem"

    @property
    def deid_key(self) -> Path:
        """The HMAC key of ingest's de-identification: replacement UIDs, pseudonyms, date
        shifts. The same key keeps them stable across restarts and doors."""
        return self.root / "deid-key.bin"

    @property
    def identity_key(self) -> Path:
        """The AES-256-GCM key that seals the pseudonym-to-patient links."""
        return self.root / "identity-key.bin"


def ensure_pki(root: Path, trust_domain: str, namespace: str, names: Iterable[str]) -> Pki:
    """Creates whatever of the PKI under root is missing and keeps what is there and valid.

    A restart therefore keeps every identity. A leaf is re-issued only when it is missing,
    no longer chains to the CA, carries another SPIFFE id, or is about to expire.
    """
    pki = Pki(root)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    if not (pki.ca_cert.exists() and pki.ca_key.exists()):
        create_ca(pki.ca_cert, pki.ca_key, "medimg dev CA")
    # Mid-rotation, a leaf of either CA is kept (both are trusted); a new one is the next's.
    trusted = _load_certs(pki.ca_cert)
    for name in names:
        spiffe = spiffe_id(trust_domain, namespace, name)
        if not _leaf_is_current(pki, name, trusted, spiffe):
            _install(pki, name, *_new_leaf(*pki.issuer(), spiffe, name))
    if not (pki.jwt_key.exists() and pki.jwks.exists()):
        _create_jwt_key(pki.jwt_key, pki.jwks)
    if not (pki.audit_key.exists() and pki.audit_public_key.exists()):
        create_signing_key(pki.audit_key, pki.audit_public_key)
    for secret in (pki.deid_key, pki.identity_key):
        if not secret.exists():
            _write_atomically(secret, os.urandom(32), 0o600)
    return pki


def renew(pki: Pki, name: str, spiffe: str) -> x509.Certificate:
    """Re-issues an identity's certificate for spiffe: new key, new serial, signed by the
    issuing CA (the next one during a CA rotation).

    The new pair replaces the old one in one rename (see the module's docstring), so a
    reader (Envoy) sees either the old pair or the new one, never a mix. The old pair need
    not be readable: renewing is also how a broken pair is repaired.
    """
    if not pki.ca_key.exists():
        raise ValueError(f"no CA key at {pki.ca_key}: run `medimg certs` first")
    key_pem, cert_pem = _new_leaf(*pki.issuer(), spiffe, name)
    _install(pki, name, key_pem, cert_pem)
    return x509.load_pem_x509_certificate(cert_pem)


def start_ca_rotation(pki: Pki) -> x509.Certificate:
    """Step 1 of a CA rotation: makes the next CA and trusts it beside the current one.

    ca.pem becomes the bundle of both in one rename, so every Envoy (and every client that
    reads ca.pem) accepts leaves of either CA from then on; no leaf changes yet. Renewals
    after this are issued by the next CA. Calling it again mid-rotation keeps the next CA
    it made (its leaves stay valid) and only re-asserts the bundle.
    """
    if not (pki.ca_cert.exists() and pki.ca_key.exists()):
        raise ValueError(f"no CA at {pki.ca_cert}: run `medimg certs` first")
    if not pki.rotating:
        # Key last: its presence is what marks a rotation (Pki.rotating).
        work = pki.root / f".ca-next.{secrets.token_hex(4)}"
        work.mkdir(mode=0o700)
        try:
            create_ca(
                work / "ca.pem", work / "ca-key.pem", f"medimg dev CA {_now():%Y-%m-%d %H:%M:%S}"
            )
            os.replace(work / "ca.pem", pki.next_ca_cert)
            os.replace(work / "ca-key.pem", pki.next_ca_key)
        finally:
            for entry in work.iterdir():
                entry.unlink()
            work.rmdir()
    current = _issuing_cert(pki.ca_cert, pki.ca_key)
    following = _load_cert(pki.next_ca_cert)
    _write_public(pki.ca_cert, _pem(current) + _pem(following))
    return following


def retire_ca(pki: Pki, names: Iterable[str]) -> x509.Certificate:
    """Step 3 of a CA rotation: the next CA becomes the only CA every identity trusts.

    Refused (nothing changes) while any of names still holds a leaf of the old CA: once
    the old CA is no longer trusted such a leaf would be refused by every peer. Each file
    is replaced by a rename, in an order where an interruption leaves a PKI that works
    and that calling this again completes.
    """
    if not pki.rotating:
        raise ValueError("no CA rotation under way: start one with `medimg certs --ca-next`")
    following = _load_cert(pki.next_ca_cert)
    stale = [name for name in names if not _issued_by(pki, name, following)]
    if stale:
        raise ValueError(
            f"still issued by the old CA: {', '.join(stale)}; "
            f"re-issue them first (`medimg certs --renew {' --renew '.join(stale)}`)"
        )
    _write_atomically(pki.ca_key, pki.next_ca_key.read_bytes(), 0o600)
    _write_public(pki.ca_cert, _pem(following))
    pki.next_ca_key.unlink()  # the rotation ends here (Pki.rotating)
    pki.next_ca_cert.unlink()
    return following


def _issued_by(pki: Pki, name: str, ca: x509.Certificate) -> bool:
    try:
        cert = _load_cert(pki.cert(name))
    except (OSError, ValueError):
        return False
    return _verifies(cert, ca)


def _issuing_cert(cert_path: Path, key_path: Path) -> x509.Certificate:
    """The certificate in cert_path (a CA or a bundle of CAs) whose key is key_path's."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    for cert in _load_certs(cert_path):
        if cert.public_key() == key.public_key():
            return cert
    raise ValueError(f"{cert_path}: no CA certificate matches the key {key_path}")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def create_signing_key(key_path: Path, public_path: Path) -> None:
    """Writes a new Ed25519 key pair (PKCS#8 and SubjectPublicKeyInfo PEM)."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomically(key_path, pem, 0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_public(public_path, public)


def create_ca(cert_path: Path, key_path: Path, common_name: str) -> None:
    """Writes a new self-signed EC P-256 root CA (10 years) and its private key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        # path_length=0: this CA signs workload leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private_key(key_path, key)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def issue_certificate(  # noqa: PLR0917 - the signature the launcher and tests call
    ca_cert: Path,
    ca_key: Path,
    cert_path: Path,
    key_path: Path,
    spiffe: str,
    common_name: str,
) -> None:
    """Writes a new EC P-256 workload certificate (1 year) for spiffe, signed by the CA."""
    key_pem, cert_pem = _new_leaf(ca_cert, ca_key, spiffe, common_name)
    # Key first: a reader that finds the certificate then also finds its key.
    _write_atomically(key_path, key_pem, 0o600)
    _write_public(cert_path, cert_pem)


def _new_leaf(ca_cert: Path, ca_key: Path, spiffe: str, common_name: str) -> tuple[bytes, bytes]:
    """A new key and workload certificate for spiffe, signed by the CA, both PEM.

    The certificate serves both ends of mTLS (serverAuth and clientAuth) and also names
    localhost and 127.0.0.1, so local clients verify a sidecar without a name override.
    """
    # ca_cert may be the trust bundle of a rotation: the issuer is the CA of ca_key.
    issuer = _issuing_cert(ca_cert, ca_key)
    issuer_key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(issuer_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key}: the CA key must be an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + LEAF_VALIDITY, issuer.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(spiffe),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _install(pki: Pki, name: str, key_pem: bytes, cert_pem: bytes) -> None:
    """Makes key_pem and cert_pem the identity's pair in one atomic step.

    The kubelet's way of updating a Secret volume: write a new version directory, point a
    new symlink at it and rename that over `..data`. The rename is the one event Envoy
    reacts to, and after it both files are the new ones.
    """
    directory = pki.identity_dir(name)
    directory.mkdir(mode=0o700, exist_ok=True)
    stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S', time.gmtime())}.{secrets.token_hex(4)}"
    version = directory / stamp
    version.mkdir(mode=0o700)
    _write_atomically(version / KEY_FILE, key_pem, 0o600)
    _write_public(version / CERT_FILE, cert_pem)
    data = directory / DATA_LINK
    previous = os.readlink(data) if data.is_symlink() else None
    _symlink_atomically(data, stamp)
    for filename in (CERT_FILE, KEY_FILE):
        _symlink_atomically(directory / filename, f"{DATA_LINK}/{filename}")
    _symlink_atomically(pki.cert_link(name), f"{name}/{CERT_FILE}")
    _symlink_atomically(pki.key_link(name), f"{name}/{KEY_FILE}")
    # The version just replaced stays: a reader may have resolved `..data` to it a moment
    # ago. Any older one goes.
    for old in directory.glob("..*"):
        if old.is_dir() and not old.is_symlink() and old.name not in (stamp, previous):
            for entry in old.iterdir():
                entry.unlink()
            old.rmdir()


def _symlink_atomically(path: Path, target: str) -> None:
    if path.is_symlink() and os.readlink(path) == target:
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def mint_token(
    pki: Pki,
    *,
    issuer: str,
    audience: str,
    subject: str,
    roles: Sequence[str],
    ttl_seconds: int = 3600,
) -> str:
    """An ES256 JWT signed with the PKI's JWT key, verifiable against its jwks.json."""
    key = serialization.load_pem_private_key(pki.jwt_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{pki.jwt_key}: the JWT key must be an EC P-256 private key")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "roles": list(roles),
        "iat": now,
        "exp": now + ttl_seconds,
    }
    kid = jwk_thumbprint(_public_jwk(key.public_key()))
    return jwt.encode(claims, key, algorithm=JWT_ALGORITHM, headers={"kid": kid})


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """The RFC 7638 thumbprint of an EC public JWK (used as its kid)."""
    canonical = json.dumps(
        {name: jwk[name] for name in ("crv", "kty", "x", "y")},
        separators=(",", ":"),
        sort_keys=True,
    )
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def _create_jwt_key(key_path: Path, jwks_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = _public_jwk(key.public_key())
    jwks = {"keys": [{**jwk, "kid": jwk_thumbprint(jwk), "use": "sig", "alg": JWT_ALGORITHM}]}
    _write_private_key(key_path, key)
    _write_public(jwks_path, (json.dumps(jwks, indent=2) + "\n").encode())


def _public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    numbers = public_key.public_numbers()
    size = (public_key.curve.key_size + 7) // 8
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x.to_bytes(size, "big")),
        "y": _b64url(numbers.y.to_bytes(size, "big")),
    }


def _leaf_is_current(pki: Pki, name: str, trusted: Sequence[x509.Certificate], spiffe: str) -> bool:
    cert_path, key_path = pki.cert(name), pki.key(name)
    if not (cert_path.exists() and key_path.exists()):
        return False
    if not (pki.cert_link(name).is_symlink() and pki.key_link(name).is_symlink()):
        return False  # the layout of an older release: re-issued into the new one
    try:
        cert = _load_cert(cert_path)
        if not any(_verifies(cert, ca) for ca in trusted):
            return False
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    if key.public_key() != cert.public_key():
        return False
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    return uris == [spiffe] and cert.not_valid_after_utc - _now() > RENEW_BEFORE


def _verifies(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _load_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(path, pem, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_atomically(path, data, 0o644)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    # The file is created with its final mode (a key is never readable by others, even
    # briefly) and renamed into place, so a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
