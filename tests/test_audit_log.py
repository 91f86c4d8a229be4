"""The audit log through the mesh: appends as workloads, checkpoints and proofs as auditors."""

from __future__ import annotations

import base64
import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import httpx
import pytest
from google.protobuf import timestamp_pb2

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_cli.platform import Platform
from medimg_cli.testing import error_reason
from tests.helpers import audit_log, bearer, channel, fresh_instance, upload


def event(platform: Platform, **fields: object) -> pb.AuditEvent:
    values: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "event_time": timestamp_pb2.Timestamp(seconds=1_790_000_000),
        "actor": pb.Actor(workload=platform.mesh.spiffe("ops")),
        "action": pb.ACTION_READ,
        "outcome": pb.OUTCOME_SUCCESS,
        "resource": "studies/9.9.9",
        "service": "training",
    }
    values.update(fields)
    return pb.AuditEvent(**values)  # type: ignore[arg-type]


def append(platform: Platform, *events: pb.AuditEvent) -> list[int]:
    with channel(platform, "audit", "training") as ch:
        answer = pb_grpc.AuditServiceStub(ch).AppendEvents(
            pb.AppendEventsRequest(events=events), timeout=10
        )
    return list(answer.log_indexes)


def test_a_retried_batch_is_appended_once(platform: Platform) -> None:
    batch = [event(platform), event(platform)]
    first = append(platform, *batch)
    assert append(platform, *batch) == first
    ids = [e.event_id for e in audit_log(platform)]
    assert all(ids.count(e.event_id) == 1 for e in batch)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"resource": "x" * 5000}, "EVENT_TOO_LARGE"),
        ({"actor": pb.Actor()}, "MISSING_ACTOR"),
        ({"action": 99}, "INVALID_ACTION"),
        ({"service": "ingest"}, "SERVICE_MISMATCH"),  # training may not report for ingest
    ],
)
def test_bad_events_are_refused_and_nothing_is_appended(
    platform: Platform, fields: dict[str, object], reason: str
) -> None:
    before = len(audit_log(platform))
    good = event(platform)
    with pytest.raises(grpc.RpcError) as caught:
        append(platform, good, event(platform, **fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == reason
    after = audit_log(platform)
    assert good.event_id not in {e.event_id for e in after}
    assert len(after) == before + 1  # the listing itself, nothing else


def test_auditors_get_checkpoints_and_proofs_over_rest(
    platform: Platform, rest: httpx.Client
) -> None:
    upload(platform, fresh_instance())
    auditor = bearer(platform, "ann", "auditor")
    made = rest.post("/v1/checkpoints", json={}, headers=auditor)
    assert made.status_code == 200, made.text
    checkpoint = made.json()
    size = int(checkpoint["treeSize"])
    assert size > 0
    body = base64.b64decode(checkpoint["body"]).decode().split("\n")
    assert body[0] == "medimg.local/audit" and int(body[1]) == size
    assert rest.get("/v1/checkpoints/latest", headers=auditor).json()["treeSize"] == str(size)
    assert rest.get(f"/v1/checkpoints/{size}", headers=auditor).json() == checkpoint
    listed = rest.get("/v1/checkpoints", headers=auditor).json()["checkpoints"]
    assert listed[-1] == checkpoint

    proof = rest.get(
        f"/v1/auditEvents/{size - 1}:inclusionProof", params={"treeSize": size}, headers=auditor
    )
    assert proof.status_code == 200, proof.text
    assert proof.json()["leafIndex"] == str(size - 1)
    consistency = rest.get(
        "/v1/consistencyProof", params={"firstSize": 1, "secondSize": size}, headers=auditor
    )
    assert consistency.status_code == 200, consistency.text

    too_far = rest.get(
        "/v1/auditEvents/0:inclusionProof", params={"treeSize": size + 10**6}, headers=auditor
    )
    assert too_far.status_code == 400
    assert too_far.json()["details"][0]["reason"] == "INVALID_TREE_SIZE"
    missing = rest.get("/v1/checkpoints/123456789", headers=auditor)
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/checkpoints/latest"),
        ("POST", "/v1/checkpoints"),
        ("GET", "/v1/consistencyProof?firstSize=1&secondSize=1"),
        ("GET", "/v1/auditEvents"),
    ],
)
def test_a_clinician_may_not_read_the_log(
    platform: Platform, rest: httpx.Client, method: str, path: str
) -> None:
    answer = rest.request(
        method,
        path,
        headers=bearer(platform, "dr-who", "clinician"),
        json={} if method == "POST" else None,
    )
    assert answer.status_code == 403


def test_auditors_filter_the_log(platform: Platform, rest: httpx.Client) -> None:
    ct = fresh_instance()
    [result] = upload(platform, ct).results
    study = result.instance.split("/series/")[0]
    auditor = bearer(platform, "ann", "auditor")
    found = rest.get(
        "/v1/auditEvents",
        params={"resource": study, "action": "ACTION_CREATE", "pageSize": 100},
        headers=auditor,
    ).json()["auditEvents"]
    assert [e["resource"] for e in found] == [result.instance]
    by_user = rest.get(
        "/v1/auditEvents", params={"actorUser": "ann", "pageSize": 1000}, headers=auditor
    ).json()["auditEvents"]
    assert by_user and all(e["actor"]["user"] == "ann" for e in by_user)
    bad = rest.get("/v1/auditEvents", params={"action": "ACTION_NOPE"}, headers=auditor)
    assert bad.status_code == 400


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [
        ("EXPORT_FORMAT_FHIR_JSON", "application/fhir+json"),
        ("EXPORT_FORMAT_DICOM_XML", "application/xml"),
    ],
)
def test_auditors_export_a_time_range(
    platform: Platform, rest: httpx.Client, fmt: str, content_type: str
) -> None:
    upload(platform, fresh_instance())
    now = datetime.now(UTC)
    params = {
        "startTime": (now - timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
        "endTime": (now + timedelta(minutes=1)).isoformat().replace("+00:00", "Z"),
        "format": fmt,
    }
    auditor = bearer(platform, "ann", "auditor")
    answer = rest.get("/v1/auditEvents:export", params=params, headers=auditor)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith(content_type)
    if fmt == "EXPORT_FORMAT_FHIR_JSON":
        bundle = answer.json()
        assert bundle["resourceType"] == "Bundle"
        assert {e["resource"]["resourceType"] for e in bundle["entry"]} == {"AuditEvent"}
    else:
        lines = answer.content.decode().splitlines()
        assert lines and all(line.startswith("<?xml") and "AuditMessage" in line for line in lines)
    exports = [e for e in audit_log(platform) if e.action == pb.ACTION_EXPORT]
    assert exports and exports[-1].actor.user == "ann"
    bad = rest.get(
        "/v1/auditEvents:export",
        params={**params, "format": "EXPORT_FORMAT_UNSPECIFIED"},
        headers=auditor,
    )
    assert bad.status_code == 400


def test_refused_calls_are_recorded(platform: Platform, rest: httpx.Client) -> None:
    """Permission denials are accesses too: the service that refused records the attempt."""
    denied = rest.get("/v1/auditEvents", headers=bearer(platform, "mallory", "clinician"))
    assert denied.status_code == 403
    no_role = rest.get("/v1/studies", headers=bearer(platform, "eve", "auditor"))
    assert no_role.status_code == 403

    def refused(events: list[pb.AuditEvent], user: str, method: str) -> list[pb.AuditEvent]:
        return [
            e for e in events
            if e.actor.user == user and e.method.endswith(method)
            and e.outcome == pb.OUTCOME_PERMISSION_DENIED
        ]  # fmt: skip

    deadline = time.monotonic() + 20
    while True:
        events = audit_log(platform)
        by_audit = refused(events, "mallory", "/ListAuditEvents")
        by_ingest = refused(events, "eve", "/ListStudies")
        if by_audit and by_ingest:
            break
        assert time.monotonic() < deadline, "the denials were not recorded"
        time.sleep(0.2)
    assert by_audit[-1].service == "audit" and by_audit[-1].action == pb.ACTION_READ
    assert list(by_audit[-1].actor.roles) == ["clinician"]
    assert by_ingest[-1].service == "ingest"
    assert by_ingest[-1].actor.workload == platform.mesh.spiffe("gateway")


def test_login_failures_at_the_gateway_are_recorded(platform: Platform, rest: httpx.Client) -> None:
    """A missing or bad token never reaches a service: the gateway reports the refusal."""
    trace = uuid.uuid4().hex
    missing = rest.get(
        "/v1/studies",
        params={"filter": "patient=secret"},  # the query is not recorded
        headers={"traceparent": f"00-{trace}-{'1' * 16}-01"},
    )
    assert missing.status_code == 401
    gateway = f"127.0.0.1:{platform.port(platform.mesh.gateway.port)}"
    with grpc.insecure_channel(gateway) as ch:
        stub = pb_grpc.AuditServiceStub(ch)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListCheckpoints(
                pb.ListCheckpointsRequest(),
                metadata=(("authorization", "Bearer forged"),),
                timeout=10,
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def failures(events: list[pb.AuditEvent], method: str) -> list[pb.AuditEvent]:
        return [
            e for e in events
            if e.method == method and e.outcome == pb.OUTCOME_UNAUTHENTICATED
        ]  # fmt: skip

    deadline = time.monotonic() + 20
    while True:
        events = audit_log(platform)
        rest_failures = [e for e in failures(events, "/v1/studies") if e.trace_id == trace]
        grpc_failures = failures(events, "/medimg.audit.v1.AuditService/ListCheckpoints")
        if rest_failures and grpc_failures:
            break
        assert time.monotonic() < deadline, "the login failures were not recorded"
        time.sleep(0.2)
    for failure in (rest_failures[-1], grpc_failures[-1]):
        assert failure.service == "gateway"
        assert failure.actor.workload == platform.mesh.spiffe("gateway")
        assert failure.actor.user == ""  # an unverified token names nobody
    assert grpc_failures[-1].action == pb.ACTION_READ
    assert "secret" not in rest_failures[-1].canonical.decode()
