"""Training end to end through the gateway and the mesh: real DICOM ingested, a dataset
made of it (every series checked through ingest's pixel API), a tiny job on a local worker
that fetches its pixels through the training sidecar, watched to SUCCEEDED, its version
registered, then promoted (the event on Redis, the promotion in the audit log)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pydicom
import pytest
import redis

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg_cli.platform import Platform
from medimg_core.bundles import bundle_digest
from medimg_ingest.deid.keyed import replacement_uid
from tests.helpers import audit_log, bearer, fresh_instance, upload

pytestmark = pytest.mark.slow


def series_of(platform: Platform, data: bytes) -> str:
    """`studies/{study}/series/{series}` of `data` as the platform stores it."""
    assert platform.pki is not None
    key = platform.pki.deid_key.read_bytes()
    dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    study = replacement_uid(key, str(dataset.StudyInstanceUID))
    series = replacement_uid(key, str(dataset.SeriesInstanceUID))
    return f"studies/{study}/series/{series}"


def test_a_dataset_trains_registers_and_promotes(  # noqa: PLR0915 - one story, end to end
    platform: Platform, rest: httpx.Client
) -> None:
    files = [
        fresh_instance(name, PatientID=f"training-{index}")
        for index, name in enumerate(["CT_small.dcm", "MR_small.dcm"] * 4)
    ]
    answer = upload(platform, *files)
    assert all(r.outcome == ingest_pb.InstanceResult.OUTCOME_STORED for r in answer.results)
    items = [
        {"series": series_of(platform, data), "label": ["CT", "MR"][index % 2]}
        for index, data in enumerate(files)
    ]
    engineer = bearer(platform, "max", "ml-engineer")
    dataset: dict[str, Any] = {
        "task": "TASK_CLASSIFICATION",
        "classNames": ["CT", "MR"],
        "items": items,
        "splitFractions": {"train": 0.75, "validation": 0.25, "test": 0},
    }

    # A series ingest does not know is refused, and nothing is stored.
    missing = {**dataset, "items": [*items, {"series": "studies/1.2/series/3.4", "label": "CT"}]}
    refused = rest.post(
        "/v1/datasets", params={"datasetId": "modality"}, json=missing, headers=engineer
    )
    assert refused.status_code == 404, refused.text
    assert refused.json()["details"][0]["reason"] == "SERIES_NOT_FOUND"

    created = rest.post(
        "/v1/datasets", params={"datasetId": "modality"}, json=dataset, headers=engineer
    )
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["name"] == "datasets/modality/versions/1"
    pseudonyms = {item["patientPseudonym"] for item in body["items"]}
    assert len(pseudonyms) == 8 and "training-0" not in pseudonyms
    assert sum(body["splitCounts"]) == 8

    # A clinician may not train.
    spec = {
        "dataset": body["name"],
        "network": {"name": "DenseNet"},
        "imageSize": [32, 32],
        "batchSize": 2,
        "epochs": 2,
        "seed": "3",
        "model": "modality",
    }
    denied = rest.post(
        "/v1/trainingJobs",
        json={"spec": spec},
        headers=bearer(platform, "dr-who", "clinician"),
    )
    assert denied.status_code == 403
    bad = rest.post(
        "/v1/trainingJobs",
        json={"spec": {**spec, "network": {"name": "NoSuchNet"}}},
        headers=engineer,
    )
    assert bad.status_code == 400
    assert bad.json()["details"][0]["reason"] == "UNKNOWN_NETWORK"

    job = rest.post("/v1/trainingJobs", json={"spec": spec}, headers=engineer)
    assert job.status_code == 200, job.text
    name = job.json()["name"]

    # The progress stream through the gateway: a JSON array, one element per report.
    with httpx.Client(base_url=platform.gateway_url, timeout=300) as watcher:
        watched = watcher.get(f"/v1/{name}:watch", headers=engineer)
    assert watched.status_code == 200, watched.text
    reports = json.loads(watched.text)
    assert reports[-1]["state"] == "STATE_SUCCEEDED", reports[-1]
    stepping = [r for r in reports if r.get("state") == "STATE_RUNNING" and "loss" in r]
    assert stepping, reports
    assert {"epoch", "step", "totalSteps", "imagesPerSecond", "eta"} <= set(stepping[-1])

    done = rest.get(f"/v1/{name}", headers=engineer).json()
    assert done["state"] == "STATE_SUCCEEDED", done
    assert done["modelVersion"] == "registeredModels/modality/versions/1"
    version = rest.get(f"/v1/{done['modelVersion']}", headers=engineer).json()
    assert version["dataset"] == body["name"]
    assert version["trainingJob"] == name
    assert version["creator"] == "max"
    assert version["codeVersion"].startswith("0.1.0")
    bundle = Path(urlsplit(version["bundleUri"]).path)
    assert (bundle / "configs" / "metadata.json").is_file()
    assert version["sha256"] == bundle_digest(bundle)

    promoted = rest.post(f"/v1/{done['modelVersion']}:promote", json={}, headers=engineer)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["aliases"] == ["production"]
    client = redis.Redis.from_url(platform.server_redis_url, decode_responses=True)
    try:
        entries: Any = client.xrevrange("medimg:training:model-promoted", count=1)
    finally:
        client.close()
    assert entries[0][1] == {
        "model": "modality",
        "version": "1",
        "alias": "production",
        "bundle": bundle.as_uri(),
        "sha256": version["sha256"],
    }
    models = rest.get("/v1/registeredModels", headers=engineer).json()["models"]
    assert {"name": "registeredModels/modality", "aliases": {"production": "1"}}.items() <= next(
        m for m in models if m["name"] == "registeredModels/modality"
    ).items()

    # Inference follows the promotion: it installs the version and serves it, and a
    # clinician's Predict on an ingested series runs the network this job trained.
    clinician = bearer(platform, "dr-who", "clinician")
    deadline = time.monotonic() + 60
    while True:
        served = rest.get("/v1/models/modality", headers=clinician)
        if served.status_code == 200 and served.json().get("loadedVersion") == "1":  # int64 in JSON
            break
        assert time.monotonic() < deadline, served.text
        time.sleep(0.5)
    prediction = rest.post(
        "/v1/models/modality:predict", json={"target": items[0]["series"]}, headers=clinician
    )
    assert prediction.status_code == 200, prediction.text
    labels = prediction.json()["classification"]["labels"]
    assert [label["label"] for label in labels] == ["CT", "MR"]
    assert abs(sum(label["probability"] for label in labels) - 1) < 1e-4

    events = audit_log(platform)
    promotions = [e for e in events if e.resource.endswith(":promote/production")]
    assert promotions and promotions[-1].actor.user == "max"
    assert promotions[-1].service == "training"
    # The worker's pixel reads reached ingest as the training workload.
    reads = [
        e
        for e in events
        if e.method.endswith("GetSeriesPixels") and e.actor.workload.endswith("/sa/training")
    ]
    assert {e.resource for e in reads} >= {item["series"] for item in items}
