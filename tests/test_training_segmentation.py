"""Segmentation training end to end through the gateway and the mesh: real CT slices and a
DICOM SEG of them (a threshold mask made with highdicom) stored through DICOMweb, a
segmentation dataset found by a query on ingest's index (each CT series paired with the
SEG that segments it), a tiny UNet trained on a local worker that reads images and labels
through ingest's pixel API, Dice in its progress, the version registered and promoted, and
the inference service serving it for a segmentation Predict. Also a classification
dataset from a query, its labels from an index attribute."""

from __future__ import annotations

import json
import time
from io import BytesIO
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medimg_cli.platform import Platform
from medimg_ingest.deid.keyed import replacement_uid
from medimg_training.datasets import Split, split_of
from tests.helpers import bearer, pydicom_file

pytestmark = pytest.mark.slow

PATIENTS = 4
SLICES = 3


def ct_series(patient: str, shift: int) -> list[pydicom.Dataset]:
    """SLICES real CT slices (CT_small.dcm, shifted), 5 mm apart, a study of their own."""
    study, series = generate_uid(), generate_uid()
    slices: list[pydicom.Dataset] = []
    for k in range(SLICES):
        dataset = pydicom.dcmread(pydicom_file("CT_small.dcm"))
        dataset.PatientID = patient
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.InstanceNumber = k + 1
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        dataset.ImagePositionPatient = [x, y, z + 5.0 * k]
        dataset.PixelData = np.roll(dataset.pixel_array, shift + 11 * k, axis=1).tobytes()
        slices.append(dataset)
    return slices


def seg_of(slices: list[pydicom.Dataset]) -> pydicom.Dataset:
    """A SEG of the slices' bright voxels (stored value above 1100), made with highdicom."""
    mask = np.stack([s.pixel_array > 1100 for s in slices]).astype(np.uint8)
    return hd.seg.Segmentation(
        source_images=slices,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="bright",
                segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Structure"),
                segmented_property_type=hd.sr.CodedConcept("113343008", "SCT", "Organ"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        ],
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medimg",
        manufacturer_model_name="tests",
        software_versions="0",
        device_serial_number="0",
    )


def stow(rest: httpx.Client, headers: dict[str, str], datasets: list[pydicom.Dataset]) -> None:
    parts = []
    for dataset in datasets:
        out = BytesIO()
        dataset.save_as(out, enforce_file_format=True)
        parts.append(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + out.getvalue())
    body = b"\r\n".join(parts) + b"\r\n--b0undary--\r\n"
    stored = rest.post(
        "/dicomweb/studies",
        content=body,
        headers={**headers, "Content-Type": 'multipart/related; type="application/dicom"; '
                 "boundary=b0undary", "Accept": "application/dicom+json"},
    )  # fmt: skip
    assert stored.status_code == 200, stored.text


def test_a_unet_trains_on_seg_labels_and_serves_segmentations(  # noqa: PLR0915 - one story
    platform: Platform, rest: httpx.Client
) -> None:
    assert platform.pki is not None
    key = platform.pki.deid_key.read_bytes()
    clinician = bearer(platform, "dr-who", "clinician")
    engineer = bearer(platform, "max", "ml-engineer")
    run = generate_uid()[-8:]
    images: list[str] = []
    segs: list[str] = []
    pseudonyms: list[str] = []
    for index in range(PATIENTS):
        slices = ct_series(f"seg-{run}-{index}", shift=13 * index)
        made = seg_of(slices)
        stow(rest, clinician, [*slices, made])
        study = replacement_uid(key, str(slices[0].StudyInstanceUID))
        images.append(f"studies/{study}/series/{replacement_uid(key, slices[0].SeriesInstanceUID)}")
        segs.append(f"studies/{study}/series/{replacement_uid(key, made.SeriesInstanceUID)}")

    # Ingest serves the SEG as labels on its CT's grid: same slices, by (keyed) UID.
    for image, seg in zip(images, segs, strict=True):
        headers = [_header(platform, name) for name in (image, seg)]
        assert headers[0]["sop_instance_uids"] == headers[1]["sop_instance_uids"]
        assert headers[0]["shape"] == headers[1]["shape"] == [SLICES, 128, 128]
        pseudonyms.append(headers[0]["patient_pseudonym"])
    # A split seed that leaves both a training and a validation patient (splits are a
    # public, deterministic function of seed and pseudonym).
    fractions = (0.5, 0.5, 0.0)
    seed = next(
        f"seed-{n}"
        for n in range(100)
        if {split_of(p, f"seed-{n}", fractions) for p in pseudonyms}
        == {Split.TRAIN, Split.VALIDATION}
    )

    # A segmentation dataset from a query: this run's patients' CT series, paired with
    # their SEGs by ingest's index and pixel API.
    dataset: dict[str, Any] = {
        "task": "TASK_SEGMENTATION",
        "classNames": ["background", "bright"],
        "query": {"modalities": ["CT"], "patientPseudonyms": pseudonyms},
        "labelRule": {},
        "splitFractions": {"train": 0.5, "validation": 0.5, "test": 0},
        "splitSeed": seed,
    }
    created = rest.post(
        "/v1/datasets", params={"datasetId": f"bright-{run}"}, json=dataset, headers=engineer
    )
    assert created.status_code == 200, created.text
    body = created.json()
    assert sorted((i["series"], i["labelSeries"]) for i in body["items"]) == sorted(
        zip(images, segs, strict=True)
    )
    assert body["query"]["patientPseudonyms"] == pseudonyms
    assert sum(body["splitCounts"][:2]) == PATIENTS and min(body["splitCounts"][:2]) >= 1

    # A classification dataset from a query, labelled by Modality: the SEGs are left out.
    by_modality = rest.post(
        "/v1/datasets",
        params={"datasetId": f"modality-{run}"},
        json={"task": "TASK_CLASSIFICATION", "classNames": ["CT", "MR"],
              "query": {"patientPseudonyms": pseudonyms}, "labelRule": {"attribute": "Modality"}},
        headers=engineer,
    )  # fmt: skip
    assert by_modality.status_code == 200, by_modality.text
    assert sorted(i["series"] for i in by_modality.json()["items"]) == sorted(images)
    assert {i["label"] for i in by_modality.json()["items"]} == {"CT"}
    wrong_rule = rest.post(
        "/v1/datasets",
        params={"datasetId": f"nope-{run}"},
        json={
            "task": "TASK_CLASSIFICATION",
            "query": {},
            "labelRule": {"attribute": "PatientName"},
        },
        headers=engineer,
    )
    assert wrong_rule.status_code == 400
    assert wrong_rule.json()["details"][0]["reason"] == "INVALID_LABEL_RULE"

    # A spec with the wrong label count is refused before anything starts.
    spec = {
        "dataset": body["name"],
        "network": {"name": "UNet"},
        "loss": "DiceCELoss",
        "imageSize": [32, 32],
        "batchSize": 3,
        "epochs": 2,
        "seed": "4",
        "optimizer": {"learningRate": 0.01},
        "model": f"bright-{run}",
    }
    bad = rest.post(
        "/v1/trainingJobs",
        json={"spec": {**spec, "network": {"name": "UNet", "arguments": {"out_channels": 3}}}},
        headers=engineer,
    )
    assert bad.status_code == 400
    assert bad.json()["details"][0]["reason"] == "WRONG_LABEL_COUNT"

    job = rest.post("/v1/trainingJobs", json={"spec": spec}, headers=engineer)
    assert job.status_code == 200, job.text
    name = job.json()["name"]
    with httpx.Client(base_url=platform.gateway_url, timeout=300) as watcher:
        watched = watcher.get(f"/v1/{name}:watch", headers=engineer)
    assert watched.status_code == 200, watched.text
    reports = json.loads(watched.text)
    assert reports[-1]["state"] == "STATE_SUCCEEDED", reports[-1]
    dice = [r["metrics"]["dice"] for r in reports if "dice" in r.get("metrics", {})]
    assert dice and all(0 <= d <= 1 for d in dice), reports

    done = rest.get(f"/v1/{name}", headers=engineer).json()
    version = rest.get(f"/v1/{done['modelVersion']}", headers=engineer).json()
    assert version["dataset"] == body["name"]
    assert version["metrics"]["dice"] == dice[-1]
    promoted = rest.post(f"/v1/{done['modelVersion']}:promote", json={}, headers=engineer)
    assert promoted.status_code == 200, promoted.text

    # Inference serves it as a segmentation model, on the CT series' own grid.
    model = f"bright-{run}"
    deadline = time.monotonic() + 60
    while True:
        served = rest.get(f"/v1/models/{model}", headers=clinician)
        if served.status_code == 200 and served.json().get("loadedVersion") == "1":
            break
        assert time.monotonic() < deadline, served.text
        time.sleep(0.5)
    prediction = rest.post(
        f"/v1/models/{model}:predict",
        json={"target": images[0], "storeSegmentation": False},
        headers=clinician,
    )
    assert prediction.status_code == 200, prediction.text
    segmentation = prediction.json()["segmentation"]
    assert [int(s) for s in segmentation["shape"]] == [SLICES, 128, 128]
    labels = segmentation["labels"]
    assert [label["label"] for label in labels] == ["background", "bright"]
    assert sum(int(label.get("voxelCount", 0)) for label in labels) == SLICES * 128 * 128


def _header(platform: Platform, series: str) -> dict[str, Any]:
    """The volume header ingest serves for a series (as the training workload reads it)."""
    from google.protobuf import json_format

    from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
    from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
    from tests.helpers import channel

    with channel(platform, "ingest") as ch:
        stream = ingest_grpc.IngestServiceStub(ch).GetSeriesPixels(
            ingest_pb.GetSeriesPixelsRequest(name=series), timeout=30
        )
        first = next(iter(stream))
        stream.cancel()  # type: ignore[no-untyped-call]
    header: dict[str, Any] = json_format.MessageToDict(
        first.header, preserving_proto_field_name=True
    )
    header["shape"] = [int(s) for s in header["shape"]]
    return header
