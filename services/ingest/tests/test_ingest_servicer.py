"""The ingest service as its app builds it, behind the real server, with a real audit peer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import grpc
import numpy
import pydicom
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.audit.v1 import audit_service_pb2_grpc as audit_grpc
from medimg.ingest.v1 import ingest_service_pb2 as pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from medimg_core import redis as medimg_redis
from medimg_core.calls import Context
from medimg_core.identity import USER_HEADER, XFCC_HEADER
from medimg_core.pagination import encode_token
from medimg_core.server import Server
from medimg_ingest.app import build
from medimg_ingest.deid.keyed import replacement_uid
from medimg_ingest.settings import IngestSettings

SPIFFE = "spiffe://medimg.local/ns/medimg/sa/"
Metadata = tuple[tuple[str, str], ...]
DEID_KEY = bytes(range(32))
#: CT_small.dcm's study, as ingest stores it: its UID replaced under DEID_KEY.
CT_STUDY = replacement_uid(DEID_KEY, "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322")


def user(subject: str, *roles: str) -> Metadata:
    claims = base64.urlsafe_b64encode(json.dumps({"sub": subject, "roles": roles}).encode())
    return ((XFCC_HEADER, f"URI={SPIFFE}gateway"), (USER_HEADER, claims.decode()))


def workload(name: str) -> Metadata:
    return ((XFCC_HEADER, f"URI={SPIFFE}{name}"),)


CLINICIAN = user("dr-who", "clinician")


def dicom_file(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(str(path)).read_bytes()


def upload(*files: bytes, chunk: int = 4096) -> Iterator[pb.UploadInstancesRequest]:
    for data in files:
        pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
        for n, piece in enumerate(pieces):
            yield pb.UploadInstancesRequest(chunk=piece, last_chunk=n == len(pieces) - 1)


def reason(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "medimg.io"
    return str(info.reason), {str(k): str(v) for k, v in info.metadata.items()}


class Audit(audit_grpc.AuditServiceServicer):
    def __init__(self) -> None:
        self.events: list[audit_pb.AuditEvent] = []
        self.down = False

    async def AppendEvents(
        self, request: audit_pb.AppendEventsRequest, context: Context
    ) -> audit_pb.AppendEventsResponse:
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit is down")
        start = len(self.events)
        self.events.extend(request.events)
        return audit_pb.AppendEventsResponse(
            log_indexes=list(range(start, start + len(request.events)))
        )


@dataclass
class Ingest:
    stub: pb_grpc.IngestServiceAsyncStub
    audit: Audit
    objects: Path


def secret(path: Path, key: bytes) -> Path:
    path.write_bytes(key)
    return path


@contextlib.asynccontextmanager
async def running_ingest(database_url: str, redis: str, tmp_path: Path) -> AsyncIterator[Ingest]:
    """Ingest as its app builds it, with a fake audit peer and the given Redis."""
    audit = Audit()  # type: ignore[abstract]  # only AppendEvents is needed
    audit_server = grpc.aio.server()
    audit_grpc.add_AuditServiceServicer_to_server(audit, audit_server)
    audit_port = audit_server.add_insecure_port("127.0.0.1:0")
    await audit_server.start()
    settings = IngestSettings(
        port=0,
        database_url=database_url,
        redis_url=redis,
        object_dir=tmp_path / "objects",
        audit_target=f"127.0.0.1:{audit_port}",
        deid_key_file=secret(tmp_path / "deid.key", DEID_KEY),
        identity_key_file=secret(tmp_path / "identity.key", bytes(32)),
        max_instance_bytes=100_000,
        grace_seconds=1,
        dimse_port=0,  # no DIMSE door here (test_dimse.py has it): 11112 may be taken
    )
    async with AsyncExitStack() as resources:
        server = Server(settings, await build(settings, resources))
        port = await server.start()
        await server.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Ingest(pb_grpc.IngestServiceStub(channel), audit, tmp_path / "objects")
        await server.grpc.stop(None)
    await audit_server.stop(None)


@pytest.fixture
async def ingest(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Ingest]:
    redis = redis_url.rsplit("/", 1)[0] + "/6"
    client = medimg_redis.connect(redis)
    await client.flushdb()  # no spooled event of an earlier test drains into this one
    await client.aclose()
    async with running_ingest(database_url, redis, tmp_path) as running:
        yield running


async def test_a_clinician_uploads_and_the_access_is_audited(ingest: Ingest) -> None:
    response = await ingest.stub.UploadInstances(
        upload(dicom_file("CT_small.dcm"), dicom_file("MR_small.dcm")),
        metadata=CLINICIAN,
        timeout=10,
    )
    assert [r.index for r in response.results] == [0, 1]
    assert [r.outcome for r in response.results] == [pb.InstanceResult.OUTCOME_STORED] * 2
    ct = response.results[0].instance
    assert ct.startswith(f"studies/{CT_STUDY}/series/")
    [first, second] = ingest.audit.events
    assert (first.action, first.resource, first.service) == (audit_pb.ACTION_CREATE, ct, "ingest")
    assert first.actor.user == "dr-who"
    assert first.actor.workload == f"{SPIFFE}gateway"
    assert first.method == "/medimg.ingest.v1.IngestService/UploadInstances"
    assert second.resource == response.results[1].instance

    again = await ingest.stub.UploadInstances(
        upload(dicom_file("CT_small.dcm")), metadata=CLINICIAN, timeout=10
    )
    assert [r.outcome for r in again.results] == [pb.InstanceResult.OUTCOME_DUPLICATE]
    assert again.results[0].instance == ct


async def test_a_researcher_may_not_upload(ingest: Ingest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.UploadInstances(
            upload(dicom_file("CT_small.dcm")), metadata=user("r", "researcher"), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not any(p.is_file() for p in ingest.objects.rglob("*"))
    # Only the refusal is recorded: who tried what, and that it was denied.
    [refused] = ingest.audit.events
    assert (refused.outcome, refused.action) == (
        audit_pb.OUTCOME_PERMISSION_DENIED,
        audit_pb.ACTION_CREATE,
    )
    assert (refused.actor.user, list(refused.actor.roles)) == ("r", ["researcher"])


async def test_a_bad_file_is_refused_and_its_neighbours_stored(ingest: Ingest) -> None:
    response = await ingest.stub.UploadInstances(
        upload(b"GIF89a not dicom", dicom_file("CT_small.dcm")), metadata=CLINICIAN, timeout=10
    )
    refused, stored = response.results
    assert (refused.index, refused.outcome, refused.reason) == (
        0,
        pb.InstanceResult.OUTCOME_REJECTED,
        "NOT_DICOM",
    )
    assert refused.message and not refused.instance
    assert stored.outcome == pb.InstanceResult.OUTCOME_STORED
    assert stored.instance.startswith(f"studies/{CT_STUDY}/")
    assert stored.patient_pseudonym.startswith("ANON-")
    # Only the stored instance is in the audit log.
    assert [e.resource for e in ingest.audit.events] == [stored.instance]


async def test_an_oversized_file_is_refused(ingest: Ingest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.UploadInstances(upload(b"\0" * 100_001), metadata=CLINICIAN, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value) == ("INSTANCE_TOO_LARGE", {"index": "0", "limit": "100000"})


async def test_an_empty_upload_is_refused(ingest: Ingest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.UploadInstances(iter([]), metadata=CLINICIAN, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value)[0] == "EMPTY_UPLOAD"


async def test_get_study(ingest: Ingest) -> None:
    await ingest.stub.UploadInstances(
        upload(dicom_file("CT_small.dcm")), metadata=CLINICIAN, timeout=10
    )
    study = await ingest.stub.GetStudy(
        pb.GetStudyRequest(name=f"studies/{CT_STUDY}"),
        metadata=user("rita", "researcher"),
        timeout=5,
    )
    assert study.name == f"studies/{CT_STUDY}"
    assert study.study_instance_uid == CT_STUDY
    assert list(study.modalities) == ["CT"]
    assert (study.series_count, study.instance_count) == (1, 1)
    assert study.HasField("create_time")
    assert ingest.audit.events[-1].resource == f"studies/{CT_STUDY}"
    assert ingest.audit.events[-1].action == audit_pb.ACTION_READ


async def test_permission_is_checked_before_existence(ingest: Ingest) -> None:
    for name in (f"studies/{CT_STUDY}", "studies/1.2.3.4"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ingest.stub.GetStudy(
                pb.GetStudyRequest(name=name), metadata=user("ann", "auditor"), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.GetStudy(
            pb.GetStudyRequest(name="studies/1.2.3.4"), metadata=CLINICIAN, timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason(caught.value)[0] == "STUDY_NOT_FOUND"


@pytest.mark.parametrize("name", ["", "studies/", "series/1.2", "studies/1.2/series/3", "1.2.3"])
async def test_a_malformed_name_is_invalid_argument(ingest: Ingest, name: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.GetStudy(pb.GetStudyRequest(name=name), metadata=CLINICIAN, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value)[0] == "INVALID_NAME"


async def test_list_studies_pages_through_every_study_once(ingest: Ingest) -> None:
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm"):
        await ingest.stub.UploadInstances(upload(dicom_file(name)), metadata=CLINICIAN, timeout=10)
    reader = workload("training")
    seen: list[str] = []
    token = ""
    for _ in range(5):
        page = await ingest.stub.ListStudies(
            pb.ListStudiesRequest(page_size=3, page_token=token), metadata=reader, timeout=5
        )
        assert len(page.studies) <= 3
        seen += [s.study_instance_uid for s in page.studies]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 4
    assert len(set(seen)) == 4
    assert CT_STUDY in seen


@pytest.mark.parametrize(
    "token", ["garbage", encode_token({"t": "yesterday", "s": "1"}), encode_token({"t": 1})]
)
async def test_a_foreign_page_token_is_invalid_argument(ingest: Ingest, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.ListStudies(
            pb.ListStudiesRequest(page_token=token), metadata=CLINICIAN, timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value)[0] == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize(
    "position",
    [
        {"t": "2024-01-01T00:00:00", "s": "1.2"},
        {"t": "2024-01-01T00:00:00+00:00", "s": 5},
        {"t": "2024-01-01", "s": "1.2"},
    ],
)
async def test_a_well_formed_token_is_taken(ingest: Ingest, position: dict[str, object]) -> None:
    page = await ingest.stub.ListStudies(
        pb.ListStudiesRequest(page_token=encode_token(position)), metadata=CLINICIAN, timeout=5
    )
    assert list(page.studies) == []


async def test_an_upload_while_audit_is_down_is_recorded_once_it_is_back(
    ingest: Ingest,
) -> None:
    """The event waits in the Redis spool; the drainer delivers it, exactly once."""
    ingest.audit.down = True
    stored = await ingest.stub.UploadInstances(
        upload(dicom_file("CT_small.dcm")), metadata=CLINICIAN, timeout=10
    )
    assert stored.results[0].outcome == pb.InstanceResult.OUTCOME_STORED
    ingest.audit.down = False
    deadline = asyncio.get_running_loop().time() + 20
    while not any(e.action == audit_pb.ACTION_CREATE for e in ingest.audit.events):
        assert asyncio.get_running_loop().time() < deadline, "the spooled event never arrived"
        await asyncio.sleep(0.1)
    created = [e for e in ingest.audit.events if e.action == audit_pb.ACTION_CREATE]
    assert len(created) == len({e.event_id for e in created}) == 1


async def test_with_audit_and_its_spool_down_uploads_and_reads_fail_closed(
    database_url: str, tmp_path: Path
) -> None:
    """No instance becomes visible, and nothing is read, without a durable audit record."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    async with running_ingest(database_url, f"redis://127.0.0.1:{closed}/0", tmp_path) as ingest:
        ingest.audit.down = True
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ingest.stub.UploadInstances(
                upload(dicom_file("CT_small.dcm")), metadata=CLINICIAN, timeout=20
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason(caught.value)[0] == "AUDIT_UNAVAILABLE"
        with pytest.raises(grpc.aio.AioRpcError) as read:
            await ingest.stub.GetStudy(
                pb.GetStudyRequest(name=f"studies/{CT_STUDY}"), metadata=CLINICIAN, timeout=20
            )
        assert read.value.code() == grpc.StatusCode.UNAVAILABLE
        ingest.audit.down = False
        # The client goes straight to its (down) spool for a moment after audit failed.
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await ingest.stub.GetStudy(
                    pb.GetStudyRequest(name=f"studies/{CT_STUDY}"), metadata=CLINICIAN, timeout=20
                )
            if missing.value.code() != grpc.StatusCode.UNAVAILABLE:
                break
            assert asyncio.get_running_loop().time() < deadline, "audit never came back"
            await asyncio.sleep(0.2)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # the upload left no trace


async def test_only_an_admin_with_a_reason_reidentifies_and_it_is_audited(ingest: Ingest) -> None:
    response = await ingest.stub.UploadInstances(
        upload(dicom_file("CT_small.dcm")), metadata=CLINICIAN, timeout=10
    )
    name = f"patients/{response.results[0].patient_pseudonym}"
    admin = user("root", "admin")
    why = "critical finding must reach the referring clinician"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.ReidentifyPatient(
            pb.ReidentifyPatientRequest(name=name, reason=why), metadata=CLINICIAN, timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.ReidentifyPatient(
            pb.ReidentifyPatientRequest(name=name, reason="because"), metadata=admin, timeout=5
        )
    assert reason(caught.value)[0] == "REASON_REQUIRED"
    answer = await ingest.stub.ReidentifyPatient(
        pb.ReidentifyPatientRequest(name=name, reason=why), metadata=admin, timeout=5
    )
    assert answer.patient_id == pydicom_value("CT_small.dcm", "PatientID")
    event = ingest.audit.events[-1]
    assert (event.resource, event.break_glass_reason, event.actor.user) == (name, why, "root")
    assert event.patient_pseudonym == name.removeprefix("patients/")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.ReidentifyPatient(
            pb.ReidentifyPatientRequest(name="patients/ANON-NOBODY", reason=why),
            metadata=admin,
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert ingest.audit.events[-1].outcome == audit_pb.OUTCOME_FAILURE


def pydicom_value(name: str, keyword: str) -> str:
    return str(pydicom.dcmread(BytesIO(dicom_file(name))).get(keyword))


def ct_series(count: int) -> list[bytes]:
    """`count` slices of one CT series, 2.5 mm apart, sent in shuffled order."""
    study, series = generate_uid(), generate_uid()
    slices = []
    for n in range(count):
        dataset = pydicom.dcmread(BytesIO(dicom_file("CT_small.dcm")))
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        dataset.ImagePositionPatient = [x, y, z + 2.5 * n]
        out = BytesIO()
        dataset.save_as(out, enforce_file_format=True)
        slices.append(out.getvalue())
    return [slices[i] for i in (2, 0, 1)] if count == 3 else slices


async def test_a_series_streams_back_as_one_volume_in_modality_values(ingest: Ingest) -> None:
    response = await ingest.stub.UploadInstances(
        upload(*ct_series(3)), metadata=CLINICIAN, timeout=10
    )
    assert {r.outcome for r in response.results} == {pb.InstanceResult.OUTCOME_STORED}
    series = response.results[0].instance.rsplit("/instances/", 1)[0]
    reader = workload("training")
    messages = [
        m
        async for m in ingest.stub.GetSeriesPixels(
            pb.GetSeriesPixelsRequest(name=series), metadata=reader, timeout=10
        )
    ]
    header = messages[0].header
    assert list(header.shape) == [3, 128, 128]
    assert header.spacing[0] == pytest.approx(2.5)
    assert header.patient_pseudonym == response.results[0].patient_pseudonym
    volume = numpy.frombuffer(b"".join(m.data for m in messages[1:]), "<f4").reshape(3, 128, 128)
    original = pydicom.dcmread(BytesIO(dicom_file("CT_small.dcm")))
    hounsfield = original.pixel_array * float(original.RescaleSlope) + float(
        original.RescaleIntercept
    )
    assert numpy.array_equal(volume[0], hounsfield.astype(numpy.float32))
    # Slices come back in order along their normal, whatever order they were sent in.
    assert header.origin[2] == pytest.approx(float(original.ImagePositionPatient[2]))
    assert ingest.audit.events[-1].resource == series

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in ingest.stub.GetSeriesPixels(
            pb.GetSeriesPixelsRequest(name="studies/1/series/2"), metadata=reader, timeout=5
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
