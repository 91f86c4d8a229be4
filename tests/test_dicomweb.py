"""DICOMweb through the gateway with a JWT: a stock client (dicomweb-client) stores, searches
and retrieves; bad bodies and queries get specific errors; and the three doors (gRPC, DIMSE,
STOW-RS) store the same de-identified bytes for the same file."""

from __future__ import annotations

from io import BytesIO

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg_cli.platform import DIMSE_PORT, Platform
from tests.helpers import audit_log, bearer, fresh_instance, study_of, upload

MULTIPART = 'multipart/related; type="application/dicom"; boundary=b0undary'
ACCEPT_DICOM = 'multipart/related; type="application/dicom"'


def _series(count: int) -> list[pydicom.Dataset]:
    """`count` real CT slices of one new series of one new study."""
    study, series = generate_uid(), generate_uid()
    slices: list[pydicom.Dataset] = []
    for number in range(1, count + 1):
        dataset = pydicom.dcmread(BytesIO(fresh_instance()))
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = series
        dataset.InstanceNumber = number
        slices.append(dataset)
    return slices


def _bytes(dataset: pydicom.Dataset) -> bytes:
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _client(platform: Platform, *roles: str) -> DICOMwebClient:
    return DICOMwebClient(
        url=f"{platform.gateway_url}/dicomweb", headers=bearer(platform, "dr-web", *roles)
    )


def _multipart(*files: bytes, boundary: str = "b0undary", close: bool = True) -> bytes:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n"
        for f in files
    )
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def _reason(response: httpx.Response) -> str:
    details = response.json().get("details", [])
    return next(str(d["reason"]) for d in details if "reason" in d)


def test_a_stock_client_stores_searches_and_retrieves(platform: Platform) -> None:
    client = _client(platform, "clinician")
    slices = _series(3)
    stored = client.store_instances(slices)
    referenced = stored.ReferencedSOPSequence
    assert len(referenced) == 3
    assert "FailedSOPSequence" not in stored
    assert {str(r.ReferencedSOPClassUID) for r in referenced} == {CTImageStorage}

    study = study_of(platform, _bytes(slices[0]))
    found = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert len(found) == 1
    record = pydicom.Dataset.from_json(found[0])
    pseudonym = str(record.PatientID)
    assert pseudonym.startswith("ANON-")
    assert record.NumberOfStudyRelatedInstances == 3
    assert client.search_for_studies(
        search_filters={"PatientID": pseudonym, "ModalitiesInStudy": "CT"}
    )
    assert not client.search_for_studies(search_filters={"StudyDate": "19000101-19000102"})

    series = [pydicom.Dataset.from_json(s) for s in client.search_for_series(study)]
    assert [s.Modality for s in series] == ["CT"]
    series_uid = str(series[0].SeriesInstanceUID)
    instances = client.search_for_instances(study, series_uid, limit=2)
    assert len(instances) == 2
    assert len(client.search_for_instances(study, series_uid, offset=2)) == 1

    sop_uid = str(referenced[0].ReferencedSOPInstanceUID)
    one = client.retrieve_instance(study, series_uid, sop_uid)
    assert str(one.SOPInstanceUID) == sop_uid
    assert one.PatientIdentityRemoved == "YES"
    assert str(one.PatientID) == pseudonym
    assert one.pixel_array.shape == (128, 128)
    whole = client.retrieve_series(study, series_uid)
    assert sorted(int(d.InstanceNumber) for d in whole) == [1, 2, 3]
    assert len(client.retrieve_study(study)) == 3

    metadata = client.retrieve_study_metadata(study)
    assert len(metadata) == 3
    # Bulk data is not inline: Pixel Data is a BulkDataURI (tests/test_dicomweb_retrieve.py).
    assert all(set(m["7FE00010"]) == {"vr", "BulkDataURI"} for m in metadata)
    assert {m["00100020"]["Value"][0] for m in metadata} == {pseudonym}

    reads = [e for e in audit_log(platform) if e.resource.startswith(f"studies/{study}")]
    assert any(e.patient_pseudonym == pseudonym for e in reads)


def test_stow_reports_each_failure_with_its_reason(platform: Platform, rest: httpx.Client) -> None:
    headers = {**bearer(platform, "dr-web", "clinician"), "Content-Type": MULTIPART}
    good = fresh_instance()
    some = rest.post("/dicomweb/studies", content=_multipart(b"not dicom", good), headers=headers)
    assert some.status_code == 202, some.text
    answer = pydicom.Dataset.from_json(some.json())
    assert len(answer.ReferencedSOPSequence) == 1
    (failed,) = answer.FailedSOPSequence
    assert failed.FailureReason == 0xC000
    assert str(failed[0x00000902].value).startswith("NOT_DICOM")

    none = rest.post("/dicomweb/studies", content=_multipart(b"\x00" * 10), headers=headers)
    assert none.status_code == 409, none.text

    # A path naming a study: an instance of another study fails, and is not stored.
    other = fresh_instance()
    wrong = rest.post(
        f"/dicomweb/studies/{generate_uid()}", content=_multipart(other), headers=headers
    )
    assert wrong.status_code == 409, wrong.text
    assert pydicom.Dataset.from_json(wrong.json()).FailedSOPSequence[0].FailureReason == 0xA900
    assert rest.get(f"/v1/studies/{study_of(platform, other)}", headers=headers).status_code == 404
    original = str(pydicom.dcmread(BytesIO(other)).StudyInstanceUID)
    right = rest.post(f"/dicomweb/studies/{original}", content=_multipart(other), headers=headers)
    assert right.status_code == 200, right.text


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        ("application/dicom", b"x", "UNSUPPORTED_MEDIA_TYPE"),
        (
            'multipart/related; type="application/octet-stream"; boundary=b0undary',
            b"",
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        ('multipart/related; type="application/dicom"', b"", "INVALID_MULTIPART"),
        (MULTIPART, _multipart(b"DICM", close=False), "INVALID_MULTIPART"),
    ],
)
def test_a_bad_stow_body_is_refused(
    platform: Platform, rest: httpx.Client, content_type: str, body: bytes, reason: str
) -> None:
    headers = {**bearer(platform, "dr-web", "clinician"), "Content-Type": content_type}
    response = rest.post("/dicomweb/studies", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert _reason(response) == reason


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/dicomweb/studies?PatientSex=F", 400, "UNSUPPORTED_QUERY_KEY"),
        ("/dicomweb/studies?NoSuchKeyword=1", 400, "UNKNOWN_ATTRIBUTE"),
        ("/dicomweb/studies?StudyDate=2026-01-01", 400, "INVALID_DATE"),
        ("/dicomweb/studies?limit=-1", 400, "INVALID_QUERY_VALUE"),
        ("/dicomweb/studies?includefield=NotAnAttribute", 400, "UNKNOWN_ATTRIBUTE"),
        ("/dicomweb/series?SeriesNumber=one", 400, "INVALID_QUERY_VALUE"),
        (f"/dicomweb/studies/{generate_uid()}", 404, "NOT_FOUND"),
        (f"/dicomweb/studies/{generate_uid()}/metadata", 404, "NOT_FOUND"),
    ],
)
def test_a_bad_query_or_retrieval_is_refused(
    platform: Platform, rest: httpx.Client, path: str, status: int, reason: str
) -> None:
    response = rest.get(path, headers=bearer(platform, "dr-web", "researcher"))
    assert response.status_code == status, response.text
    assert _reason(response) == reason


def test_tags_work_as_query_keys(platform: Platform, rest: httpx.Client) -> None:
    data = fresh_instance()
    assert upload(platform, data).results[0].outcome == ingest_pb.InstanceResult.OUTCOME_STORED
    study = study_of(platform, data)
    response = rest.get(
        f"/dicomweb/studies?0020000D={study}&includefield=00081030",
        headers=bearer(platform, "dr-web", "researcher"),
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    assert [s["0020000D"]["Value"] for s in response.json()] == [[study]]


def test_roles_and_tokens_are_checked_first(platform: Platform, rest: httpx.Client) -> None:
    assert rest.get("/dicomweb/studies").status_code == 401
    stow = rest.post(
        "/dicomweb/studies",
        content=_multipart(fresh_instance()),
        headers={**bearer(platform, "someone", "researcher"), "Content-Type": MULTIPART},
    )
    assert stow.status_code == 403, stow.text


def test_an_unservable_transfer_syntax_is_not_acceptable(
    platform: Platform, rest: httpx.Client
) -> None:
    data = fresh_instance()
    upload(platform, data)
    headers = {
        **bearer(platform, "dr-web", "researcher"),
        "Accept": f"{ACCEPT_DICOM}; transfer-syntax=1.2.840.10008.1.2.4.50",
    }
    response = rest.get(f"/dicomweb/studies/{study_of(platform, data)}", headers=headers)
    assert response.status_code == 406, response.text
    assert _reason(response) == "NOT_ACCEPTABLE"


def test_the_three_doors_store_the_same_bytes(platform: Platform) -> None:
    """gRPC first, then DIMSE and STOW-RS: the same de-identified bytes (hence duplicates,
    not conflicts, which a different hash would be), and WADO-RS returns them."""
    data = fresh_instance()
    first = upload(platform, data).results[0]
    assert first.outcome == ingest_pb.InstanceResult.OUTCOME_STORED

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", platform.port(DIMSE_PORT), ae_title="MEDIMG")
    assert association.is_established
    try:
        status = association.send_c_store(pydicom.dcmread(BytesIO(data)))
    finally:
        association.release()
    assert status.Status == 0x0000

    client = _client(platform, "clinician")
    stow = client.store_instances([pydicom.dcmread(BytesIO(data))])
    (item,) = stow.ReferencedSOPSequence
    assert f"dicomweb/{first.instance}" in str(item.RetrieveURL)

    _, study, _, series, _, instance = first.instance.split("/")
    retrieved = requests.get(
        f"{platform.gateway_url}/dicomweb/{first.instance}",
        headers={
            **bearer(platform, "dr-web", "clinician"),
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
        },
        timeout=30,
    )
    assert retrieved.status_code == 200
    assert str(client.retrieve_instance(study, series, instance).SOPInstanceUID) == instance
    dimse_stored = [e for e in audit_log(platform) if e.resource == first.instance]
    assert len(dimse_stored) >= 3  # one store per door, each audited


def test_a_compressed_instance_is_served_as_stored_or_decoded(
    platform: Platform, rest: httpx.Client
) -> None:
    data = fresh_instance("MR_small_jpeg_ls_lossless.dcm")
    result = upload(platform, data).results[0]
    assert result.outcome == ingest_pb.InstanceResult.OUTCOME_STORED, result.message
    client = _client(platform, "researcher")
    _, study, _, series, _, instance = result.instance.split("/")
    as_stored = client.retrieve_instance(
        study, series, instance, media_types=(("application/dicom", "*"),)
    )
    assert as_stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    decoded = client.retrieve_instance(
        study, series, instance, media_types=(("application/dicom", ExplicitVRLittleEndian),)
    )
    assert decoded.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (decoded.pixel_array == as_stored.pixel_array).all()
