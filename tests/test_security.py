"""Who may reach what: mTLS at every sidecar, per-method RBAC, JWTs and roles at the gateway.

Each rejection is checked for what the caller sees and for what reached the service
(its own Prometheus counters, scraped for real): nothing.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.audit.v1 import audit_service_pb2_grpc as audit_grpc
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli import demo
from medimg_cli.pki import create_ca, issue_certificate
from medimg_cli.platform import Platform
from tests.helpers import audit_log, bearer, channel, fresh_instance, metric, study_of, upload


def handled(platform: Platform, method: str, service: str = "ingest") -> float:
    """How many calls of `method` the service itself has answered, whatever the code."""
    spec = platform.mesh.services[service]
    return sum(
        metric(
            platform,
            service,
            "medimg_grpc_server_handled_total",
            grpc_service=spec.grpc_service,
            grpc_method=method,
            grpc_code=code,
        )
        for code in ("OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAUTHENTICATED", "INTERNAL")
    )


def list_studies(ch: grpc.Channel, **metadata: str) -> ingest_pb.ListStudiesResponse:
    response: ingest_pb.ListStudiesResponse = ingest_grpc.IngestServiceStub(ch).ListStudies(
        ingest_pb.ListStudiesRequest(), timeout=5, metadata=tuple(metadata.items()) or None
    )
    return response


def test_no_client_certificate_is_refused(platform: Platform) -> None:
    assert platform.pki is not None
    before = handled(platform, "ListStudies")
    credentials = grpc.ssl_channel_credentials(root_certificates=platform.pki.ca_cert.read_bytes())
    with (
        grpc.secure_channel(platform.sidecar("ingest"), credentials) as ch,
        pytest.raises(grpc.RpcError) as caught,
    ):
        list_studies(ch)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert handled(platform, "ListStudies") == before


def test_certificate_from_another_ca_is_refused(platform: Platform, tmp_path: Path) -> None:
    assert platform.pki is not None
    create_ca(tmp_path / "ca.pem", tmp_path / "ca-key.pem", "an impostor CA")
    issue_certificate(
        tmp_path / "ca.pem",
        tmp_path / "ca-key.pem",
        tmp_path / "ops.pem",
        tmp_path / "ops-key.pem",
        platform.mesh.spiffe("ops"),
        "ops",
    )
    before = handled(platform, "ListStudies")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=platform.pki.ca_cert.read_bytes(),
        private_key=(tmp_path / "ops-key.pem").read_bytes(),
        certificate_chain=(tmp_path / "ops.pem").read_bytes(),
    )
    with (
        grpc.secure_channel(platform.sidecar("ingest"), credentials) as ch,
        pytest.raises(grpc.RpcError) as caught,
    ):
        list_studies(ch)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert handled(platform, "ListStudies") == before


@pytest.mark.parametrize(
    ("identity", "service", "method"),
    [
        ("inference", "ingest", "UploadInstances"),  # may read studies, not write them
        ("training", "audit", "ListAuditEvents"),  # only auditors, through the gateway
        ("gateway", "audit", "AppendEvents"),  # only services report events
    ],
)
def test_san_not_allowed_for_the_method_is_denied(
    platform: Platform, identity: str, service: str, method: str
) -> None:
    before = handled(platform, method, service)
    with channel(platform, service, identity) as ch, pytest.raises(grpc.RpcError) as caught:
        if service == "ingest":
            ingest_grpc.IngestServiceStub(ch).UploadInstances(
                demo.chunks(fresh_instance()), timeout=5
            )
        elif method == "ListAuditEvents":
            audit_grpc.AuditServiceStub(ch).ListAuditEvents(
                audit_pb.ListAuditEventsRequest(), timeout=5
            )
        else:
            audit_grpc.AuditServiceStub(ch).AppendEvents(audit_pb.AppendEventsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert handled(platform, method, service) == before


def test_identity_headers_sent_by_a_client_are_replaced(platform: Platform) -> None:
    """A workload cannot pass itself off as the gateway or as a user by sending the headers."""
    forged_user = base64.urlsafe_b64encode(
        json.dumps({"sub": "mallory", "roles": ["admin"]}).encode()
    )
    upload(platform, fresh_instance())
    with channel(platform, "ingest", "training") as ch:
        list_studies(
            ch,
            **{
                "x-forwarded-client-cert": f"URI={platform.mesh.spiffe('gateway')}",
                "x-medimg-jwt-payload": forged_user.decode(),
            },
        )
    last = [e for e in audit_log(platform) if e.method.endswith("/ListStudies")][-1]
    assert last.actor.workload == platform.mesh.spiffe("training")
    assert last.actor.user == ""


def test_rest_without_a_token_is_401(platform: Platform, rest: httpx.Client) -> None:
    answer = rest.get("/v1/studies")
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["message"]


def test_rest_with_an_expired_or_foreign_token_is_401(
    platform: Platform, rest: httpx.Client
) -> None:
    assert platform.pki is not None
    gateway = platform.mesh.gateway
    now = int(time.time())
    claims = {
        "iss": gateway.jwt_issuer,
        "aud": gateway.jwt_audience,
        "sub": "eve",
        "roles": ["admin"],
    }
    key = serialization.load_pem_private_key(platform.pki.jwt_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    kid = json.loads(platform.pki.jwks.read_text())["keys"][0]["kid"]
    expired = jwt.encode(
        {**claims, "iat": now - 7200, "exp": now - 3600}, key, "ES256", {"kid": kid}
    )
    foreign = jwt.encode(
        {**claims, "iat": now, "exp": now + 600},
        ec.generate_private_key(ec.SECP256R1()),
        "ES256",
        {"kid": kid},
    )
    for token in (expired, foreign, "not-a-jwt"):
        answer = rest.get("/v1/studies", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 401, token
        assert answer.headers["content-type"] == "application/json"


def test_rest_with_a_role_that_may_not_call_the_method_is_403(
    platform: Platform, rest: httpx.Client
) -> None:
    answer = rest.get("/v1/auditEvents", headers=bearer(platform, "dr-house", "clinician"))
    assert answer.status_code == 403
    body = answer.json()
    assert body["details"][0]["reason"] == "ROLE_NOT_ALLOWED"
    no_roles = rest.get("/v1/studies", headers=bearer(platform, "nobody"))
    assert no_roles.status_code == 403


def test_permission_is_checked_before_existence(platform: Platform, rest: httpx.Client) -> None:
    """Without the role, a study that exists and one that does not get the same answer."""
    ct = fresh_instance()
    upload(platform, ct)

    headers = bearer(platform, "auditor-1", "auditor")
    real = rest.get(f"/v1/studies/{study_of(platform, ct)}", headers=headers)
    missing = rest.get("/v1/studies/1.2.3.4.5.6.7.8.9", headers=headers)
    assert real.status_code == missing.status_code == 403
    assert real.json() == missing.json()


@pytest.mark.parametrize(
    ("path", "status"),
    [("/v1/nope", 404), ("/v1/studies?bogus=1", 400), ("/v1/studies?pageSize=abc", 400)],
)
def test_unknown_rest_paths_and_parameters_get_a_json_4xx(
    platform: Platform, rest: httpx.Client, path: str, status: int
) -> None:
    answer = rest.get(path, headers=bearer(platform, "dr-house", "clinician"))
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["message"]
