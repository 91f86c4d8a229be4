"""Predict end to end: a real multi-frame MR series ingested, two models in the platform's
model repository, predictions through the gateway with a JWT, every one in the audit log."""

from __future__ import annotations

import math
import uuid

import httpx
import numpy as np
import pydicom
import pytest
import torch
from monai.networks.nets.densenet import DenseNet
from monai.transforms.intensity.array import NormalizeIntensity
from monai.transforms.spatial.array import Resize

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.inference.v1 import inference_service_pb2 as inference_pb
from medimg.inference.v1 import inference_service_pb2_grpc as inference_grpc
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg_cli.platform import Platform
from medimg_inference.predict import SeriesVolume, monai_input
from medimg_ingest.deid.keyed import replacement_uid
from medimg_ingest.volumes import series_volume
from services.inference.tests.support import (
    THRESHOLD,
    ThresholdSegmenter,
    export_traced,
    metadata_json,
    segmenter_metadata,
    tensor_json,
    write_bundle,
)
from tests.helpers import audit_log, bearer, channel, fresh_instance, upload

#: (C, X, Y, Z) the classifier takes.
CLASSIFIER_INPUT: list[int | str] = [32, 32, 8]


def _reason(response: httpx.Response) -> str:
    details = response.json().get("details", [])
    return next(str(d["reason"]) for d in details if "reason" in d)


class Ingested:
    """emri_small.dcm (10 frames of 64 x 64 MR), ingested under fresh UIDs."""

    def __init__(self, platform: Platform) -> None:
        data = fresh_instance("emri_small.dcm")
        result = upload(platform, data).results[0]
        assert result.outcome == ingest_pb.InstanceResult.OUTCOME_STORED, result.message
        original = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        assert platform.pki is not None
        key = platform.pki.deid_key.read_bytes()
        self.study = replacement_uid(key, str(original.StudyInstanceUID))
        self.series = replacement_uid(key, str(original.SeriesInstanceUID))
        self.instance = replacement_uid(key, str(original.SOPInstanceUID))
        self.name = f"studies/{self.study}/series/{self.series}"
        self.pseudonym = result.patient_pseudonym
        # What ingest serves, computed here from the same file, as the reference.
        self.volume = series_volume([original])


@pytest.fixture(scope="module")
def ingested(platform: Platform) -> Ingested:
    return Ingested(platform)


@pytest.fixture(scope="module")
def models(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A 3D MONAI DenseNet classifier and a thresholding segmenter, in the repository under
    names of their own (the platform is shared by the session)."""
    files = tmp_path_factory.mktemp("networks")
    suffix = uuid.uuid4().hex[:8]
    torch.manual_seed(0)
    densenet = DenseNet(3, 1, 2, init_features=4, growth_rate=4, block_config=(2, 2)).eval()
    write_bundle(
        platform.model_repository,
        f"densenet-{suffix}",
        1,
        metadata_json(
            {"image": tensor_json(1, CLASSIFIER_INPUT)},
            {"logits": tensor_json(2, [], kind="probabilities")},
            {
                "labels": ["normal", "abnormal"],
                "preprocessing": [
                    {"_target_": "NormalizeIntensity"},
                    {"_target_": "Resize", "spatial_size": CLASSIFIER_INPUT},
                ],
                "postprocessing": [{"_target_": "Activations", "softmax": True}],
            },
        ),
        {"model.ts": export_traced(densenet, torch.zeros(2, 1, 32, 32, 8), files / "d.ts")},
    )
    write_bundle(
        platform.model_repository,
        f"bright-{suffix}",
        1,
        segmenter_metadata(),
        {
            "model.ts": export_traced(
                ThresholdSegmenter(), torch.zeros(2, 1, 4, 4, 4), files / "t.ts"
            )
        },
    )
    return {
        "classifier": f"densenet-{suffix}",
        "segmenter": f"bright-{suffix}",
        "densenet": densenet,
    }


def _predict(
    rest: httpx.Client, platform: Platform, model: str, target: str, *roles: str, **body: object
) -> httpx.Response:
    return rest.post(
        f"/v1/models/{model}:predict",
        json={"target": target, **body},
        headers=bearer(platform, "dr-quinn", *(roles or ("clinician",))),
    )


def test_classification_gives_every_label_its_probability(
    platform: Platform, rest: httpx.Client, ingested: Ingested, models: dict[str, object]
) -> None:
    answer = _predict(rest, platform, str(models["classifier"]), ingested.name, "ml-engineer")

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == f"models/{models['classifier']}"
    assert int(body["modelVersion"]) == 1
    assert body["target"] == ingested.name
    labels = body["classification"]["labels"]
    assert [item["label"] for item in labels] == ["normal", "abnormal"]
    volume = ingested.volume
    source = SeriesVolume(volume.array, volume.spacing, volume.origin, volume.direction, [], "")
    image = Resize(spatial_size=[32, 32, 8])(
        torch.as_tensor(NormalizeIntensity()(monai_input(source)))
    )
    densenet = models["densenet"]
    assert isinstance(densenet, DenseNet)
    with torch.inference_mode():
        expected = torch.softmax(densenet(torch.as_tensor(image)[None])[0], 0).numpy()
    np.testing.assert_allclose([item["probability"] for item in labels], expected, atol=1e-4)

    # The model's resource now says it serves.
    model = rest.get(
        f"/v1/models/{models['classifier']}", headers=bearer(platform, "ann", "researcher")
    )
    assert model.status_code == 200, model.text
    assert model.json()["state"] == "STATE_READY"
    assert model.json()["task"] == "TASK_CLASSIFICATION"
    assert int(model.json()["loadedVersion"]) == 1


def test_segmentation_volumes_are_in_ml_on_the_source_grid(
    platform: Platform, rest: httpx.Client, ingested: Ingested, models: dict[str, object]
) -> None:
    answer = _predict(rest, platform, str(models["segmenter"]), ingested.name)

    assert answer.status_code == 200, answer.text
    result = answer.json()["segmentation"]
    assert [int(size) for size in result["shape"]] == list(ingested.volume.array.shape)
    truth = int((ingested.volume.array > THRESHOLD).sum())
    assert 0 < truth < ingested.volume.array.size
    background, bright = result["labels"]
    assert (bright["label"], int(bright["voxelCount"])) == ("bright", truth)
    assert int(background["voxelCount"]) == ingested.volume.array.size - truth
    voxel_ml = math.prod(ingested.volume.spacing) / 1000
    assert bright["volumeMl"] == pytest.approx(truth * voxel_ml)


def test_a_prediction_is_audited_with_the_patient_pseudonym(
    platform: Platform, rest: httpx.Client, ingested: Ingested, models: dict[str, object]
) -> None:
    target = f"{ingested.name}/instances/{ingested.instance}"
    answer = _predict(rest, platform, str(models["segmenter"]), target, "researcher")
    assert answer.status_code == 200, answer.text

    events = [e for e in audit_log(platform) if e.service == "inference" and e.resource == target]
    assert len(events) == 1
    event = events[0]
    assert event.method == "/medimg.inference.v1.InferenceService/Predict"
    assert event.patient_pseudonym == ingested.pseudonym != ""
    assert event.actor.user == "dr-quinn"
    assert list(event.actor.roles) == ["researcher"]
    assert event.actor.workload == platform.mesh.spiffe("gateway")


@pytest.mark.parametrize(
    "case",
    [
        ("segmenter", "studies/1.2.3", 400, "INVALID_TARGET"),
        ("segmenter", "series/1.2.3/studies/4.5", 400, "INVALID_TARGET"),
        ("missing", "{series}", 404, "MODEL_NOT_FOUND"),
        ("segmenter", "studies/{study}/series/1.2.3.4.5", 404, "SERIES_NOT_FOUND"),
        ("segmenter", "{series}/instances/1.2.3.4.5", 404, "INSTANCE_NOT_FOUND"),
    ],
)
def test_bad_predictions_get_a_specific_error(
    platform: Platform,
    rest: httpx.Client,
    ingested: Ingested,
    models: dict[str, object],
    case: tuple[str, str, int, str],
) -> None:
    model, target, status, reason = case
    name = str(models.get(model, f"missing-{uuid.uuid4().hex[:8]}"))
    target = target.format(series=ingested.name, study=ingested.study)
    answer = _predict(rest, platform, name, target)
    assert answer.status_code == status, answer.text
    assert _reason(answer) == reason


def test_a_missing_series_read_is_audited_as_a_failure(
    platform: Platform, rest: httpx.Client, ingested: Ingested, models: dict[str, object]
) -> None:
    target = f"studies/{ingested.study}/series/9.{uuid.uuid4().int % 10**20}"
    assert _predict(rest, platform, str(models["segmenter"]), target).status_code == 404
    events = [e for e in audit_log(platform) if e.service == "inference" and e.resource == target]
    assert [e.outcome for e in events] == [audit_pb.OUTCOME_FAILURE]


@pytest.mark.parametrize("roles", [("auditor",), ()])
def test_a_caller_without_the_role_learns_nothing(
    platform: Platform,
    rest: httpx.Client,
    ingested: Ingested,
    models: dict[str, object],
    roles: tuple[str, ...],
) -> None:
    headers = bearer(platform, "eve", *roles)
    real = rest.post(
        f"/v1/models/{models['classifier']}:predict",
        json={"target": ingested.name},
        headers=headers,
    )
    missing = rest.post(
        "/v1/models/no-such-model:predict",
        json={"target": "studies/1.2/series/3.4"},
        headers=headers,
    )
    assert real.status_code == missing.status_code == 403
    assert _reason(real) == _reason(missing) == "ROLE_NOT_ALLOWED"
    assert real.json()["message"].replace(str(models["classifier"]), "") == missing.json()[
        "message"
    ].replace("no-such-model", "")


def test_models_are_listed_through_the_mesh_and_got_through_the_gateway(
    platform: Platform, rest: httpx.Client, models: dict[str, object]
) -> None:
    # ListModels over gRPC as the training workload: GET /v1/models is also claimed by the
    # training service's model registry, so the gateway cannot resolve it (see the report).
    names, token = [], ""
    with channel(platform, "inference", identity="training") as ch:
        stub = inference_grpc.InferenceServiceStub(ch)
        while True:
            page = stub.ListModels(
                inference_pb.ListModelsRequest(page_size=1, page_token=token), timeout=10
            )
            names += [m.name for m in page.models]
            token = page.next_page_token
            if not token:
                break
    assert {f"models/{models['classifier']}", f"models/{models['segmenter']}"} <= set(names)
    assert names == sorted(names)
    headers = bearer(platform, "ann", "clinician")
    segmenter = rest.get(f"/v1/models/{models['segmenter']}", headers=headers)
    assert segmenter.status_code == 200, segmenter.text
    assert segmenter.json()["task"] == "TASK_SEGMENTATION"
    assert segmenter.json()["labels"] == ["background", "bright"]
    assert segmenter.json()["platform"] == "PLATFORM_TORCHSCRIPT"
    missing = rest.get("/v1/models/no-such-model", headers=headers)
    assert missing.status_code == 404 and _reason(missing) == "MODEL_NOT_FOUND"
