"""The thin slice, shown: one DICOM file in over gRPC, the study out over REST, the audit trail."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
from pydicom.data import get_testdata_file

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli.pki import mint_token
from medimg_cli.platform import Platform

CHUNK = 1024 * 1024


def chunks(*files: bytes, size: int = CHUNK) -> Iterator[ingest_pb.UploadInstancesRequest]:
    """The upload stream of whole files, each cut into chunks of `size` bytes."""
    for data in files:
        pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        for n, piece in enumerate(pieces):
            yield ingest_pb.UploadInstancesRequest(chunk=piece, last_chunk=n == len(pieces) - 1)


def sample_file() -> Path:
    path = get_testdata_file("CT_small.dcm", download=False)
    assert path is not None, "pydicom's test data is missing"
    return Path(str(path))


def token(platform: Platform, user: str, *roles: str) -> str:
    assert platform.pki is not None
    gateway = platform.mesh.gateway
    return mint_token(
        platform.pki,
        issuer=gateway.jwt_issuer,
        audience=gateway.jwt_audience,
        subject=user,
        roles=list(roles),
    )


def run(platform: Platform) -> None:
    data = sample_file().read_bytes()
    print(
        f"\n1. gRPC: upload {sample_file().name} ({len(data)} bytes) to ingest through its sidecar"
        " (de-identified at the door: new UIDs, a patient pseudonym)"
    )
    with grpc.secure_channel(platform.sidecar("ingest"), platform.credentials("ops")) as channel:
        answer = ingest_grpc.IngestServiceStub(channel).UploadInstances(chunks(data), timeout=30)
    for result in answer.results:
        outcome = ingest_pb.InstanceResult.Outcome.Name(result.outcome)
        print(f"   {outcome}: {result.instance} (patient {result.patient_pseudonym})")

    print(f"\n2. REST: GET {platform.gateway_url}/v1/studies as a clinician")
    headers = {"Authorization": f"Bearer {token(platform, 'dr-demo', 'clinician')}"}
    studies = httpx.get(f"{platform.gateway_url}/v1/studies", headers=headers).json()
    print("   " + json.dumps(studies, indent=2).replace("\n", "\n   "))

    print(f"\n3. REST: GET {platform.gateway_url}/v1/auditEvents as an auditor (last 3 events)")
    headers = {"Authorization": f"Bearer {token(platform, 'auditor-demo', 'auditor')}"}
    events = httpx.get(
        f"{platform.gateway_url}/v1/auditEvents", params={"pageSize": 1000}, headers=headers
    ).json()["auditEvents"]
    for event in events[-3:]:
        actor = event["actor"]
        print(
            f"   #{event['logIndex']} {event['action']} {event['resource']} by "
            f"{actor.get('user') or actor['workload']} via {event['service']}"
        )
