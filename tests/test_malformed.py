"""Bad input at the doors: a specific INVALID_ARGUMENT with a reason, and nothing stored."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli import demo
from medimg_cli.platform import Platform
from medimg_cli.testing import error_reason
from tests.helpers import bearer, channel, fresh_instance, pydicom_file, study_of


def stored_objects(platform: Platform) -> set[str]:
    return {str(p) for p in (platform.state / "objects").rglob("*") if p.is_file()}


def upload_stream(
    platform: Platform, requests: Iterator[ingest_pb.UploadInstancesRequest]
) -> ingest_pb.UploadInstancesResponse:
    with channel(platform, "ingest") as ch:
        answer: ingest_pb.UploadInstancesResponse = ingest_grpc.IngestServiceStub(
            ch
        ).UploadInstances(requests, timeout=10)
        return answer


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ([b"this is not a DICOM file at all" * 10], "NOT_DICOM"),
        ([b"\0" * 128 + b"DICM" + b"\x02\x00"], "MALFORMED_DICOM"),
        ([pydicom_file("CT_small.dcm").getvalue()[:1000]], "TRUNCATED_FILE"),
        ([pydicom_file("CT_small.dcm").getvalue()[:-10]], "TRUNCATED_FILE"),
    ],
    ids=["not-dicom", "preamble-only", "truncated-header", "truncated-pixels"],
)
def test_bad_file_is_rejected_and_nothing_is_stored(
    platform: Platform, files: list[bytes], reason: str
) -> None:
    before = stored_objects(platform)
    [result] = upload_stream(platform, demo.chunks(*files)).results
    assert (result.outcome, result.reason) == (ingest_pb.InstanceResult.OUTCOME_REJECTED, reason)
    assert result.message and not result.instance
    assert stored_objects(platform) == before


def test_empty_stream_is_rejected(platform: Platform) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload_stream(platform, iter(()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "EMPTY_UPLOAD"


def test_file_without_required_uid_is_rejected(platform: Platform) -> None:
    data = fresh_instance(SOPInstanceUID="")
    [result] = upload_stream(platform, demo.chunks(data)).results
    assert result.reason == "MISSING_SOP_INSTANCE_UID"


def test_one_bad_file_does_not_fail_its_neighbours(platform: Platform, rest: httpx.Client) -> None:
    good = fresh_instance()
    stored, refused = upload_stream(platform, demo.chunks(good, b"garbage" * 100)).results
    assert stored.outcome == ingest_pb.InstanceResult.OUTCOME_STORED
    assert (refused.outcome, refused.reason) == (
        ingest_pb.InstanceResult.OUTCOME_REJECTED,
        "NOT_DICOM",
    )
    assert "file 1" in refused.message
    headers = bearer(platform, "dr-house", "clinician")
    assert rest.get(f"/v1/studies/{study_of(platform, good)}", headers=headers).status_code == 200


def test_bad_page_token_is_invalid_argument(platform: Platform, rest: httpx.Client) -> None:
    answer = rest.get(
        "/v1/studies",
        params={"pageToken": "definitely-not-ours"},
        headers=bearer(platform, "dr-house", "clinician"),
    )
    assert answer.status_code == 400
    assert answer.json()["details"][0]["reason"] == "INVALID_PAGE_TOKEN"


def test_bad_study_name_is_invalid_argument(platform: Platform) -> None:
    with channel(platform, "ingest") as ch, pytest.raises(grpc.RpcError) as caught:
        ingest_grpc.IngestServiceStub(ch).GetStudy(
            ingest_pb.GetStudyRequest(name="series/1.2"), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "INVALID_NAME"
