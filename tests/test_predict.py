"""Predict end to end: a real multi-frame MR series and a real CT series ingested, models in
the platform's model repository, predictions through the gateway with a JWT, every one in the
audit log; a segmentation of a series stored back as a DICOM SEG and read back by WADO-RS."""

from __future__ import annotations

import math
import uuid
from io import BytesIO
from pathlib import Path

import grpc
import highdicom
import httpx
import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from dicomweb_client.api import DICOMwebClient
from monai.networks.nets.densenet import DenseNet
from monai.transforms.intensity.array import NormalizeIntensity
from monai.transforms.spatial.array import Resize

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.inference.v1 import inference_service_pb2 as inference_pb
from medimg.inference.v1 import inference_service_pb2_grpc as inference_grpc
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
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
#: A real CT series of five 16 x 16 slices, 2.5 mm apart (in pydicom's test files).
CT_SERIES = Path(pydicom.data.__file__).parent / "test_files/dicomdirtests/98892001/CT5N"
TISSUES = ["air", "lung", "soft tissue"]


class TissueSegmenter(torch.nn.Module):
    """A 1x1x1 convolution with logits (-x - 500, 0, x): its argmax labels air up to -500 HU,
    lung up to 0 HU and soft tissue above (ties go to the lower label), an answer a test
    knows. (N, 1, X, Y, Z) -> (N, 3, X, Y, Z)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 1)
        self.conv.weight = torch.nn.Parameter(torch.tensor([-1.0, 0.0, 1.0]).reshape(3, 1, 1, 1, 1))
        self.conv.bias = torch.nn.Parameter(torch.tensor([-500.0, 0.0, 0.0]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.conv(image)
        return logits


def tissues(volume: np.typing.NDArray[np.float32]) -> np.typing.NDArray[np.int64]:
    """What TissueSegmenter answers, computed here."""
    return np.select([volume <= -500, volume <= 0], [0, 1], 2).astype(np.int64)


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


class IngestedSeries:
    """The CT series (five single-frame slices), ingested under fresh UIDs."""

    def __init__(self, platform: Platform) -> None:
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        originals, files = [], []
        for path in sorted(CT_SERIES.iterdir()):
            dataset = pydicom.dcmread(path)
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = (
                pydicom.uid.generate_uid()
            )
            out = BytesIO()
            dataset.save_as(out, enforce_file_format=True)
            originals.append(dataset)
            files.append(out.getvalue())
        results = upload(platform, *files).results
        assert {r.outcome for r in results} == {ingest_pb.InstanceResult.OUTCOME_STORED}
        assert platform.pki is not None
        key = platform.pki.deid_key.read_bytes()
        self.study = replacement_uid(key, study)
        self.series = replacement_uid(key, series)
        self.name = f"studies/{self.study}/series/{self.series}"
        self.pseudonym = results[0].patient_pseudonym
        # The volume ingest serves, computed here from the same files, as the reference; its
        # slices named by the stored (replaced) UIDs.
        self.volume = series_volume(originals)
        self.slices = [replacement_uid(key, uid) for uid in self.volume.sop_instance_uids]


@pytest.fixture(scope="module")
def ct_series(platform: Platform) -> IngestedSeries:
    return IngestedSeries(platform)


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
    spatial: list[int | str] = ["*", "*", "*"]
    write_bundle(
        platform.model_repository,
        f"tissue-{suffix}",
        2,
        metadata_json(
            {"image": tensor_json(1, spatial)},
            {"logits": tensor_json(3, spatial, kind="segmentation")},
            {"labels": TISSUES, "postprocessing": [{"_target_": "AsDiscrete", "argmax": True}]},
        ),
        {"model.ts": export_traced(TissueSegmenter(), torch.zeros(2, 1, 4, 4, 4), files / "s.ts")},
    )
    return {
        "classifier": f"densenet-{suffix}",
        "segmenter": f"bright-{suffix}",
        "tissue": f"tissue-{suffix}",
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
    # emri_small has no position in the patient, so no SEG can be made of it: not asked for.
    answer = _predict(
        rest, platform, str(models["segmenter"]), ingested.name, storeSegmentation=False
    )

    assert answer.status_code == 200, answer.text
    result = answer.json()["segmentation"]
    assert not result.get("segmentationInstance")
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


def test_a_segmentation_is_stored_as_a_seg_that_reads_back_as_the_label_map(
    platform: Platform,
    rest: httpx.Client,
    ct_series: IngestedSeries,
    models: dict[str, object],
) -> None:
    answer = _predict(rest, platform, str(models["tissue"]), ct_series.name)

    assert answer.status_code == 200, answer.text
    result = answer.json()["segmentation"]
    instance = result["segmentationInstance"]
    _, study, _, seg_series, _, seg_uid = instance.split("/")
    assert study == ct_series.study and seg_series != ct_series.series
    # WADO-RS through the gateway, with a stock DICOMweb client.
    client = DICOMwebClient(
        url=f"{platform.gateway_url}/dicomweb", headers=bearer(platform, "dr-quinn", "clinician")
    )
    dataset = client.retrieve_instance(study, seg_series, seg_uid)
    seg = highdicom.seg.Segmentation.from_dataset(dataset)
    assert seg.SegmentationType == "BINARY"
    assert seg.PatientID == ct_series.pseudonym
    assert [s.SegmentLabel for s in seg.SegmentSequence] == TISSUES[1:]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (models["tissue"], "2")
    # Its mask is the model's label map on the series grid, slice by slice.
    mask = seg.get_pixels_by_source_instance(ct_series.slices, combine_segments=True)
    expected = tissues(ct_series.volume.array)
    assert len(np.unique(expected)) == 3
    np.testing.assert_array_equal(mask, expected)
    # Its volumes, from the SEG's own geometry, are the ones Predict answered.
    volume = seg.get_volume(combine_segments=True)
    voxel_ml = math.prod(volume.spacing) / 1000
    assert voxel_ml == pytest.approx(math.prod(ct_series.volume.spacing) / 1000)
    for label, item in enumerate(result["labels"]):
        assert item["label"] == TISSUES[label]
        count = int((volume.array == label).sum())
        assert int(item["voxelCount"]) == count
        assert item["volumeMl"] == pytest.approx(count * voxel_ml)

    # Asked again: the same SEG, not a second one.
    again = _predict(rest, platform, str(models["tissue"]), ct_series.name)
    assert again.status_code == 200, again.text
    assert again.json()["segmentation"]["segmentationInstance"] == instance
    series = [pydicom.Dataset.from_json(s) for s in client.search_for_series(study)]
    assert sorted(str(s.Modality) for s in series) == ["CT", "SEG"]
    assert len(client.search_for_instances(study, seg_series)) == 1

    # The store is audited: by ingest as made by inference, by inference for the user.
    events = [e for e in audit_log(platform) if e.resource == instance]
    stores = {(e.service, e.action, e.patient_pseudonym, e.actor.user) for e in events}
    assert ("ingest", audit_pb.ACTION_CREATE, ct_series.pseudonym, "") in stores
    assert ("inference", audit_pb.ACTION_CREATE, ct_series.pseudonym, "dr-quinn") in stores
    ingest_store = next(e for e in events if e.service == "ingest")
    assert ingest_store.actor.workload == platform.mesh.spiffe("inference")
    assert ingest_store.method == "/medimg.ingest.v1.IngestService/StoreSegmentation"


def test_a_segmentation_of_a_multi_frame_image_is_stored_on_its_frames(
    platform: Platform, rest: httpx.Client, models: dict[str, object]
) -> None:
    # A real Enhanced CT: two 512 x 512 frames, each placed by its functional groups, stored
    # against the slice normal (so volume slice k is not frame k + 1).
    data = fresh_instance("eCT_Supplemental.dcm")
    result = upload(platform, data).results[0]
    assert result.outcome == ingest_pb.InstanceResult.OUTCOME_STORED, result.message
    original = pydicom.dcmread(BytesIO(data))
    volume = series_volume([original])
    assert volume.frame_numbers == [2, 1]
    name = result.instance.rsplit("/instances/", 1)[0]

    answer = _predict(rest, platform, str(models["tissue"]), name)

    assert answer.status_code == 200, answer.text
    instance = answer.json()["segmentation"]["segmentationInstance"]
    _, study, _, seg_series, _, seg_uid = instance.split("/")
    client = DICOMwebClient(
        url=f"{platform.gateway_url}/dicomweb", headers=bearer(platform, "dr-quinn", "clinician")
    )
    seg = highdicom.seg.Segmentation.from_dataset(
        client.retrieve_instance(study, seg_series, seg_uid)
    )
    source = result.instance.rsplit("/", 1)[1]
    references = {
        int(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for group in seg.PerFrameFunctionalGroupsSequence
    }
    assert references == {1, 2}
    # Each source frame holds the model's labels of the volume slice it became.
    expected = tissues(volume.array)
    assert len(np.unique(expected)) > 1
    for k, frame in enumerate(volume.frame_numbers):
        mask = seg.get_pixels_by_source_frame(source, [frame], combine_segments=True)
        np.testing.assert_array_equal(mask[0], expected[k])


def test_a_segmentation_that_is_not_stored_fails_the_prediction_or_is_not_asked_for(
    platform: Platform,
    rest: httpx.Client,
    ingested: Ingested,
    ct_series: IngestedSeries,
    models: dict[str, object],
) -> None:
    # emri_small's frames have no position: no SEG can be made, and Predict says so.
    refused = _predict(rest, platform, str(models["segmenter"]), ingested.name)
    assert refused.status_code == 400, refused.text
    assert _reason(refused) == "SEGMENTATION_SOURCE_UNSUPPORTED"
    assert "store_segmentation" in refused.json()["message"]
    # A SEG covers a whole series: not asked for on an instance, refused when asked for.
    target = f"{ingested.name}/instances/{ingested.instance}"
    on_instance = _predict(rest, platform, str(models["segmenter"]), target)
    assert on_instance.status_code == 200, on_instance.text
    assert not on_instance.json()["segmentation"].get("segmentationInstance")
    asked = _predict(rest, platform, str(models["segmenter"]), target, storeSegmentation=True)
    assert asked.status_code == 400 and _reason(asked) == "STORE_NEEDS_SERIES_TARGET"
    # Not asked for on a series: measured, nothing stored.
    unstored = _predict(
        rest, platform, str(models["tissue"]), ct_series.name, storeSegmentation=False
    )
    assert unstored.status_code == 200, unstored.text
    assert not unstored.json()["segmentation"].get("segmentationInstance")


@pytest.mark.parametrize("identity", ["training", "gateway"])
def test_only_inference_may_store_a_segmentation(
    platform: Platform, ct_series: IngestedSeries, identity: str
) -> None:
    header = ingest_pb.SegmentationHeader(
        source_series=ct_series.name,
        shape=list(ct_series.volume.array.shape),
        voxel_type=ingest_pb.SegmentationHeader.VOXEL_TYPE_UINT8,
        segment_labels=["lung"],
        algorithm_name="forged",
        algorithm_version="1",
    )
    requests = [
        ingest_pb.StoreSegmentationRequest(header=header),
        ingest_pb.StoreSegmentationRequest(data=bytes(ct_series.volume.array.size)),
    ]
    with channel(platform, "ingest", identity) as ch, pytest.raises(grpc.RpcError) as caught:
        ingest_grpc.IngestServiceStub(ch).StoreSegmentation(iter(requests), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
