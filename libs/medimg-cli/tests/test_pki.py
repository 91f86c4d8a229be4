"""Tests of the dev PKI: workload certificates, idempotence, file modes and JWTs."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from medimg_cli.pki import Pki, create_ca, ensure_pki, issue_certificate, mint_token, spiffe_id

NAMES = ("ingest", "audit", "gateway", "ops")


@pytest.fixture
def dev_pki(tmp_path: Path) -> Pki:
    return ensure_pki(tmp_path / "pki", "medimg.local", "medimg", NAMES)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_spiffe_id() -> None:
    assert spiffe_id("medimg.local", "medimg", "ingest") == (
        "spiffe://medimg.local/ns/medimg/sa/ingest"
    )


def test_workload_certificate(dev_pki: Pki) -> None:
    ca = _cert(dev_pki.ca_cert)
    for name in NAMES:
        cert = _cert(dev_pki.cert(name))
        cert.verify_directly_issued_by(ca)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://medimg.local/ns/medimg/sa/{name}"
        ]
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("127.0.0.1")]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and not usage.key_cert_sign
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert 364 <= lifetime.days <= 366


def test_ca_certificate(dev_pki: Pki) -> None:
    ca = _cert(dev_pki.ca_cert)
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650


def _files(root: Path) -> dict[str, bytes]:
    # Every file, those of the identities' directories (and their versions) included.
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_ensure_pki_is_idempotent(dev_pki: Pki) -> None:
    before = _files(dev_pki.root)
    again = ensure_pki(dev_pki.root, "medimg.local", "medimg", NAMES)
    assert _files(again.root) == before


def test_ensure_pki_adds_a_new_identity_and_keeps_the_others(dev_pki: Pki) -> None:
    before = dev_pki.cert("ingest").read_bytes()
    ensure_pki(dev_pki.root, "medimg.local", "medimg", (*NAMES, "training"))
    assert dev_pki.cert("ingest").read_bytes() == before
    _cert(dev_pki.cert("training")).verify_directly_issued_by(_cert(dev_pki.ca_cert))


def test_ensure_pki_reissues_a_certificate_of_another_ca(dev_pki: Pki, tmp_path: Path) -> None:
    create_ca(tmp_path / "other-ca.pem", tmp_path / "other-ca-key.pem", "other CA")
    issue_certificate(
        tmp_path / "other-ca.pem",
        tmp_path / "other-ca-key.pem",
        dev_pki.cert("ops"),
        dev_pki.key("ops"),
        spiffe_id("medimg.local", "medimg", "ops"),
        "ops",
    )
    ensure_pki(dev_pki.root, "medimg.local", "medimg", NAMES)
    _cert(dev_pki.cert("ops")).verify_directly_issued_by(_cert(dev_pki.ca_cert))


def test_file_modes(dev_pki: Pki) -> None:
    assert stat.S_IMODE(dev_pki.root.stat().st_mode) == 0o700
    keys = [dev_pki.ca_key, dev_pki.jwt_key, *(dev_pki.key(n) for n in NAMES)]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not [p for p in dev_pki.root.iterdir() if p.name.endswith(".tmp")]


def test_mint_token_verifies_against_the_jwks(dev_pki: Pki) -> None:
    token = mint_token(
        dev_pki,
        issuer="https://medimg.local/dev",
        audience="medimg",
        subject="alice",
        roles=["clinician", "researcher"],
        ttl_seconds=600,
    )
    jwks = jwt.PyJWKSet.from_dict(json.loads(dev_pki.jwks.read_text()))
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    key = next(k for k in jwks.keys if k.key_id == header["kid"])
    claims = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience="medimg",
        issuer="https://medimg.local/dev",
        options={"require": ["exp", "iat", "sub", "iss", "aud"]},
    )
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["clinician", "researcher"]
    assert claims["exp"] - claims["iat"] == 600


def test_a_token_of_another_key_does_not_verify(dev_pki: Pki, tmp_path: Path) -> None:
    other = ensure_pki(tmp_path / "other", "medimg.local", "medimg", ())
    token = mint_token(other, issuer="i", audience="a", subject="mallory", roles=["admin"])
    jwks = jwt.PyJWKSet.from_dict(json.loads(dev_pki.jwks.read_text()))
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, jwks.keys[0], algorithms=["ES256"], audience="a")
