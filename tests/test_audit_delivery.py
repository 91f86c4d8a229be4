"""Audit service down for a while: the other services keep working (writes), the buffered
events arrive afterwards, none lost or duplicated (issue 3, item 6).

Runs on the shared platform: audit's process is stopped for real (its sidecar stays, and
answers 503 for it) and started again, and the test leaves it SERVING.
"""

from __future__ import annotations

import time
from collections import Counter

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg_cli.platform import Platform
from tests.helpers import audit_log, fresh_instance, upload

STORED = ingest_pb.InstanceResult.OUTCOME_STORED
SPOOLED = "medimg_audit_client_spooled_events_total"
DRAINED = "medimg_audit_client_drained_events_total"
SPOOL_LENGTH = "medimg_audit_client_spool_length"


def ingest_metric(platform: Platform, name: str) -> float:
    """A sample of ingest's audit client, scraped from its /metrics (0 if absent)."""
    port = platform.port(platform.mesh.services["ingest"].metrics_port)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == {"service": "ingest"}:
                return float(sample.value)
    return 0.0


def wait_until_serving(platform: Platform, service: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(platform.sidecar(service), platform.credentials("ops")) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert platform.services[service].running(), f"{service} exited: see its log"
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"{service} not SERVING after {timeout} s"
            time.sleep(0.2)


def test_audit_down_for_a_while_uploads_go_on_and_every_event_arrives_once(
    platform: Platform,
) -> None:
    spooled_before = ingest_metric(platform, SPOOLED)
    drained_before = ingest_metric(platform, DRAINED)
    audit = platform.services["audit"]
    assert audit.stop(grace=10) == 0
    instances: list[str] = []
    try:
        for _ in range(5):
            started = time.monotonic()
            answer = upload(platform, fresh_instance(), fresh_instance("MR_small.dcm"))
            assert time.monotonic() - started < 5.0  # patient work is not held up
            assert [r.outcome for r in answer.results] == [STORED, STORED]
            instances += [r.instance for r in answer.results]
        # They went to the spool, not anywhere else.
        assert ingest_metric(platform, SPOOLED) >= spooled_before + 10
        assert ingest_metric(platform, SPOOL_LENGTH) >= 10
    finally:
        # Other tests share the platform: audit comes back whatever happened above.
        platform.start_service("audit")
        wait_until_serving(platform, "audit")

    deadline = time.monotonic() + 60
    while ingest_metric(platform, SPOOL_LENGTH) > 0:
        assert time.monotonic() < deadline, "the spool did not drain"
        time.sleep(0.2)
    assert ingest_metric(platform, DRAINED) >= drained_before + 10

    log = audit_log(platform)
    # The log never holds an event id twice, resends included.
    repeated = [i for i, n in Counter(e.event_id for e in log).items() if n > 1]
    assert repeated == []
    created = Counter(
        e.resource
        for e in log
        if e.action == audit_pb.ACTION_CREATE and e.service == "ingest" and e.resource in instances
    )
    assert created == dict.fromkeys(instances, 1)  # each upload's record, exactly once
    for event in log:
        if event.resource in instances:
            assert event.method == "/medimg.ingest.v1.IngestService/UploadInstances"
            assert event.actor.workload == platform.mesh.spiffe("ops")
