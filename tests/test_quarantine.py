"""The review of quarantined instances through the gateway: an admin lists what was held
back, looks at it, and releases it into the index or rejects it, each step audited with
the reviewer's reason; nobody else can, and nothing is served before a release."""

from __future__ import annotations

import io

import httpx
import pydicom
from PIL import Image

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg_cli.platform import Platform
from tests.helpers import audit_log, bearer, fresh_instance, study_of, upload

QUARANTINED = ingest_pb.InstanceResult.OUTCOME_QUARANTINED
DUPLICATE = ingest_pb.InstanceResult.OUTCOME_DUPLICATE
WHY = {"reason": "looked at every frame: no burned-in text"}


def _reason(response: httpx.Response) -> str:
    return next(str(d["reason"]) for d in response.json()["details"] if "reason" in d)


def _held(platform: Platform) -> tuple[bytes, ingest_pb.InstanceResult]:
    """A real CT that says its pixels carry burned-in text: quarantined at the door."""
    data = fresh_instance("CT_small.dcm", BurnedInAnnotation="YES")
    [result] = upload(platform, data).results
    assert result.outcome == QUARANTINED and result.reason == "BURNED_IN_ANNOTATION"
    return data, result


def _listed(rest: httpx.Client, admin: dict[str, str]) -> dict[str, dict[str, object]]:
    listed: dict[str, dict[str, object]] = {}
    token = ""
    while True:
        page = rest.get(
            "/v1/quarantinedInstances", params={"pageSize": 2, "pageToken": token}, headers=admin
        )
        assert page.status_code == 200, page.text
        listed.update({h["name"]: h for h in page.json().get("quarantinedInstances", [])})
        token = page.json().get("nextPageToken", "")
        if not token:
            return listed


def test_an_admin_looks_then_releases_and_the_instance_is_served(
    platform: Platform, rest: httpx.Client
) -> None:
    data, result = _held(platform)
    uid = result.instance.rsplit("/", 1)[1]
    name = f"quarantinedInstances/{uid}"
    admin = bearer(platform, "root", "admin")
    clinician = bearer(platform, "dr-house", "clinician")
    study = f"/v1/studies/{study_of(platform, data)}"
    assert rest.get(study, headers=clinician).status_code == 404  # held back: not served

    held = _listed(rest, admin)[name]
    assert held["instance"] == result.instance
    assert held["patientPseudonym"] == result.patient_pseudonym
    assert held["reason"] == "BURNED_IN_ANNOTATION"
    # Only admins review, and permission comes before existence.
    for path in (
        "/v1/quarantinedInstances",
        f"/v1/{name}:render",
        "/v1/quarantinedInstances/x:render",
    ):
        assert rest.get(path, headers=clinician).status_code == 403

    image = rest.get(f"/v1/{name}:render", headers=admin)
    assert image.status_code == 200, image.text
    assert image.headers["content-type"] == "image/png"
    stored = pydicom.dcmread(io.BytesIO(data))
    assert Image.open(io.BytesIO(image.content)).size == (stored.Columns, stored.Rows)

    short = rest.post(f"/v1/{name}:release", json={"reason": "ok"}, headers=admin)
    assert (short.status_code, _reason(short)) == (400, "REASON_REQUIRED")
    released = rest.post(f"/v1/{name}:release", json=WHY, headers=admin)
    assert released.status_code == 200, released.text
    assert released.json()["name"] == name

    served = rest.get(study, headers=clinician)
    assert served.status_code == 200, served.text
    assert served.json()["instanceCount"] == 1
    assert name not in _listed(rest, admin)
    again = rest.post(f"/v1/{name}:release", json=WHY, headers=admin)
    assert (again.status_code, _reason(again)) == (404, "QUARANTINED_INSTANCE_NOT_FOUND")
    # Sent again once released: the stored instance, not a new case for review.
    [resent] = upload(platform, data).results
    assert (resent.outcome, resent.instance) == (DUPLICATE, result.instance)
    assert name not in _listed(rest, admin)
    assert rest.get(study, headers=clinician).json()["instanceCount"] == 1

    [decision] = [
        e for e in audit_log(platform)
        if e.resource == name and e.action == audit_pb.ACTION_UPDATE
        and e.outcome == audit_pb.OUTCOME_SUCCESS
    ]  # fmt: skip
    assert (decision.actor.user, decision.break_glass_reason) == ("root", WHY["reason"])
    assert decision.patient_pseudonym == result.patient_pseudonym


def test_a_rejected_instance_is_never_served(platform: Platform, rest: httpx.Client) -> None:
    data, result = _held(platform)
    name = f"quarantinedInstances/{result.instance.rsplit('/', 1)[1]}"
    admin = bearer(platform, "root", "admin")
    why = {"reason": "the patient's name is burned into the image"}
    rejected = rest.post(f"/v1/{name}:reject", json=why, headers=admin)
    assert rejected.status_code == 200, rejected.text
    assert name not in _listed(rest, admin)
    released = rest.post(f"/v1/{name}:release", json=WHY, headers=admin)
    assert (released.status_code, _reason(released)) == (404, "QUARANTINED_INSTANCE_NOT_FOUND")
    clinician = bearer(platform, "dr-house", "clinician")
    assert rest.get(f"/v1/studies/{study_of(platform, data)}", headers=clinician).status_code == 404
    [decision] = [
        e for e in audit_log(platform)
        if e.resource == name and e.action == audit_pb.ACTION_DELETE
    ]  # fmt: skip
    assert decision.break_glass_reason == why["reason"]


def test_an_instance_not_in_quarantine_is_not_found(platform: Platform, rest: httpx.Client) -> None:
    admin = bearer(platform, "root", "admin")
    missing = rest.get("/v1/quarantinedInstances/1.2.3:render", headers=admin)
    assert (missing.status_code, _reason(missing)) == (404, "QUARANTINED_INSTANCE_NOT_FOUND")
