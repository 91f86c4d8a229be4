"""The thin slice, end to end through the real mesh: DICOM in over gRPC, studies out over
REST, every access in the audit log."""

from __future__ import annotations

import random
import uuid

import httpx
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli.platform import Platform
from tests.helpers import audit_log, bearer, channel, fresh_instance, study_of, upload

STORED = ingest_pb.InstanceResult.OUTCOME_STORED
DUPLICATE = ingest_pb.InstanceResult.OUTCOME_DUPLICATE


def audit_events(rest: httpx.Client, platform: Platform) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    token = ""
    headers = bearer(platform, "auditor-1", "auditor")
    while True:
        page = rest.get(
            "/v1/auditEvents", params={"pageSize": 1000, "pageToken": token}, headers=headers
        )
        assert page.status_code == 200, page.text
        body = page.json()
        events += body.get("auditEvents", [])
        token = body.get("nextPageToken", "")
        if not token:
            return events


def test_upload_through_sidecar_then_list_through_gateway(
    platform: Platform, rest: httpx.Client
) -> None:
    ct, mr = fresh_instance("CT_small.dcm"), fresh_instance("MR_small.dcm")
    answer = upload(platform, ct, mr)
    assert [r.outcome for r in answer.results] == [STORED, STORED]
    assert [r.index for r in answer.results] == [0, 1]

    headers = bearer(platform, "dr-house", "clinician")
    studies = rest.get("/v1/studies", params={"pageSize": 1000}, headers=headers)
    assert studies.status_code == 200, studies.text
    by_name = {s["name"]: s for s in studies.json()["studies"]}
    ct_study = by_name[f"studies/{study_of(platform, ct)}"]
    assert ct_study["modalities"] == ["CT"]
    assert ct_study["seriesCount"] == 1
    assert ct_study["instanceCount"] == 1
    assert by_name[f"studies/{study_of(platform, mr)}"]["modalities"] == ["MR"]

    one = rest.get(f"/v1/studies/{study_of(platform, ct)}", headers=headers)
    assert one.status_code == 200
    assert one.json()["studyInstanceUid"] == study_of(platform, ct)

    events = audit_events(rest, platform)
    study = study_of(platform, ct)
    created = [e for e in events if e["action"] == "ACTION_CREATE" and study in str(e["resource"])]
    assert len(created) == 1
    assert created[0]["actor"] == {"workload": platform.mesh.spiffe("ops"), "user": "", "roles": []}
    assert created[0]["service"] == "ingest"
    assert created[0]["method"] == "/medimg.ingest.v1.IngestService/UploadInstances"
    assert len(str(created[0]["traceId"])) == 32
    reads = [
        e
        for e in events
        if e["action"] == "ACTION_READ" and e["resource"] == f"studies/{study_of(platform, ct)}"
    ]
    assert reads and reads[-1]["actor"] == {
        "workload": platform.mesh.spiffe("gateway"),
        "user": "dr-house",
        "roles": ["clinician"],
    }
    # Reading the audit log is itself in the audit log.
    assert any(e["resource"] == "auditEvents" and e["service"] == "audit" for e in events)
    indexes = [int(str(e["logIndex"])) for e in events]
    assert indexes == list(range(len(indexes)))


def test_second_upload_is_a_duplicate_and_changes_nothing(
    platform: Platform, rest: httpx.Client
) -> None:
    ct = fresh_instance()
    assert upload(platform, ct).results[0].outcome == STORED
    assert upload(platform, ct).results[0].outcome == DUPLICATE
    headers = bearer(platform, "dr-house", "clinician")
    study = rest.get(f"/v1/studies/{study_of(platform, ct)}", headers=headers).json()
    assert study["instanceCount"] == 1


def test_workload_lists_studies_through_its_certificate(platform: Platform) -> None:
    ct = fresh_instance()
    upload(platform, ct)
    with channel(platform, "ingest", identity="training") as ch:
        page = ingest_grpc.IngestServiceStub(ch).ListStudies(
            ingest_pb.ListStudiesRequest(page_size=1000), timeout=10
        )
    assert f"studies/{study_of(platform, ct)}" in {s.name for s in page.studies}
    last_list = [e for e in audit_log(platform) if e.method.endswith("/ListStudies")][-1]
    assert last_list.actor.workload == platform.mesh.spiffe("training")
    assert last_list.actor.user == ""


def test_pagination_walks_every_study_once(platform: Platform, rest: httpx.Client) -> None:
    for _ in range(3):
        upload(platform, fresh_instance())
    headers = bearer(platform, "dr-house", "clinician")
    everything = rest.get("/v1/studies", params={"pageSize": 1000}, headers=headers).json()[
        "studies"
    ]
    seen, token = [], ""
    while True:
        page = rest.get("/v1/studies", params={"pageSize": 2, "pageToken": token}, headers=headers)
        body = page.json()
        assert len(body["studies"]) <= 2
        seen += [s["name"] for s in body["studies"]]
        token = body.get("nextPageToken", "")
        if not token:
            break
    assert seen == [s["name"] for s in everything]
    assert len(seen) == len(set(seen)) >= 3


def test_a_file_far_larger_than_4_mib_streams_in_chunks(
    platform: Platform, rest: httpx.Client
) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("big.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "OT"
    dataset.BurnedInAnnotation = "NO"  # else secondary capture waits in quarantine
    dataset.Rows, dataset.Columns = 2048, 2048
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.SamplesPerPixel, dataset.PixelRepresentation = 1, 0
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.PixelData = random.Random(0).randbytes(2048 * 2048 * 2)
    out = pydicom.filebase.DicomBytesIO()
    dataset.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    assert len(data) > 8 * 1024 * 1024

    assert upload(platform, data).results[0].outcome == STORED
    headers = bearer(platform, "dr-house", "clinician")
    study = rest.get(f"/v1/studies/{study_of(platform, data)}", headers=headers)
    assert study.status_code == 200
    stored = list((platform.state / "objects").rglob("*.dcm"))
    assert any(p.stat().st_size > 8 * 1024 * 1024 for p in stored)


def test_inference_and_training_answer_through_the_mesh(
    platform: Platform, rest: httpx.Client
) -> None:
    from medimg.inference.v1 import inference_service_pb2 as inf_pb
    from medimg.inference.v1 import inference_service_pb2_grpc as inf_grpc

    with channel(platform, "inference") as ch:
        answer = inf_grpc.InferenceServiceStub(ch).ListModels(
            inf_pb.ListModelsRequest(), timeout=10
        )
        assert all(model.name.startswith("models/") for model in answer.models)
    jobs = rest.get("/v1/trainingJobs", headers=bearer(platform, "ml-1", "ml-engineer"))
    assert jobs.status_code == 200, jobs.text
    models = rest.get("/v1/models", headers=bearer(platform, "ml-1", "ml-engineer"))
    assert models.status_code == 200, models.text


def test_trace_context_crosses_the_gateway_and_the_mesh(
    platform: Platform, rest: httpx.Client
) -> None:
    """A caller's W3C trace id reaches ingest through gateway and sidecar, and the audit
    event ingest reports through the mesh carries it."""
    ct = fresh_instance()
    upload(platform, ct)
    trace_id = uuid.uuid4().hex
    headers = {
        **bearer(platform, "dr-house", "clinician"),
        "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01",
    }
    assert rest.get(f"/v1/studies/{study_of(platform, ct)}", headers=headers).status_code == 200
    events = audit_events(rest, platform)
    read = [e for e in events if e["resource"] == f"studies/{study_of(platform, ct)}"]
    assert read[-1]["traceId"] == trace_id


def test_an_admin_reidentifies_a_patient_over_rest_and_it_is_audited(
    platform: Platform, rest: httpx.Client
) -> None:
    ct = fresh_instance(PatientID="MRN-4711")
    [result] = upload(platform, ct).results
    path = f"/v1/patients/{result.patient_pseudonym}:reidentify"
    why = {"reason": "critical finding for the referring clinician"}
    refused = rest.post(path, json=why, headers=bearer(platform, "dr-house", "clinician"))
    assert refused.status_code == 403
    answer = rest.post(path, json=why, headers=bearer(platform, "root", "admin"))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"patientId": "MRN-4711"}
    events = audit_log(platform)
    [event] = [e for e in events if e.resource == f"patients/{result.patient_pseudonym}"
               and e.outcome == audit_pb.OUTCOME_SUCCESS]  # fmt: skip
    assert (event.actor.user, event.break_glass_reason) == ("root", why["reason"])
    # The audit log names the pseudonym, never the identifier it stands for.
    assert "MRN-4711" not in str(events)
