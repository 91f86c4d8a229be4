"""Helpers of the cross-service tests: calls through the real mesh, as a workload or a user."""

from __future__ import annotations

import re
from io import BytesIO
from pathlib import Path

import grpc
import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.audit.v1 import audit_service_pb2_grpc as audit_grpc
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli import demo
from medimg_cli.platform import Platform
from medimg_ingest.deid.keyed import replacement_uid


def pydicom_file(name: str) -> BytesIO:
    """One of the real DICOM files that ship with pydicom."""
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return BytesIO(Path(str(path)).read_bytes())


def fresh_instance(name: str = "CT_small.dcm", **changes: object) -> bytes:
    """A real pydicom test file with new study/series/instance UIDs (so tests do not collide)."""
    dataset = pydicom.dcmread(pydicom_file(name))
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    out = pydicom.filebase.DicomBytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def study_of(platform: Platform, data: bytes) -> str:
    """The study of `data` as the platform stores it: its UID replaced under the dev key."""
    assert platform.pki is not None
    original = str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).StudyInstanceUID)
    return replacement_uid(platform.pki.deid_key.read_bytes(), original)


def channel(platform: Platform, service: str, identity: str = "ops") -> grpc.Channel:
    return grpc.secure_channel(platform.sidecar(service), platform.credentials(identity))


def upload(
    platform: Platform, *files: bytes, identity: str = "ops"
) -> ingest_pb.UploadInstancesResponse:
    with channel(platform, "ingest", identity) as ch:
        stub = ingest_grpc.IngestServiceStub(ch)
        response: ingest_pb.UploadInstancesResponse = stub.UploadInstances(
            demo.chunks(*files, size=16 * 1024), timeout=30
        )
        return response


def audit_log(platform: Platform) -> list[audit_pb.AuditEvent]:
    """The whole audit log, read page by page through audit's sidecar as `ops`."""
    events: list[audit_pb.AuditEvent] = []
    token = ""
    with channel(platform, "audit") as ch:
        stub = audit_grpc.AuditServiceStub(ch)
        while True:
            page = stub.ListAuditEvents(
                audit_pb.ListAuditEventsRequest(page_size=1000, page_token=token), timeout=10
            )
            events += page.audit_events
            token = page.next_page_token
            if not token:
                return events


def bearer(platform: Platform, user: str, *roles: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {demo.token(platform, user, *roles)}"}


def metric(platform: Platform, service: str, name: str, **labels: str) -> float:
    """One sample of a service's Prometheus metrics, scraped for real (0 if absent)."""
    spec = platform.mesh.services[service]
    text = httpx.get(f"http://127.0.0.1:{platform.port(spec.metrics_port)}/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and ",".join(sorted(match[1].split(","))) == wanted:
            return float(match[2])
    return 0.0
