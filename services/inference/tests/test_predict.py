"""Predictions on a real series volume (the frames of pydicom's emri_small.dcm) with real
networks exported to TorchScript: a thresholding convolution with a known answer, a small
MONAI UNet, a small MONAI DenseNet, and the trained patch classifier run slice by slice."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.networks.nets.densenet import DenseNet
from monai.networks.nets.unet import UNet
from monai.transforms.croppad.array import DivisiblePad
from monai.transforms.intensity.array import NormalizeIntensity
from monai.transforms.spatial.array import Resize
from pydicom import dcmread
from pydicom.data import get_testdata_file

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg_core.errors import FailedPrecondition, InvalidArgument, NotFound
from medimg_inference.backends import BackendOptions
from medimg_inference.predict import (
    STORE_CHUNK_BYTES,
    Classification,
    LabelVolume,
    Predictor,
    Segmentation,
    SeriesName,
    SeriesVolume,
    Target,
    Task,
    monai_input,
    read_volume,
    segmentation_upload,
)
from medimg_inference.repository import ModelRepository
from medimg_inference.serving import ModelServer
from services.inference.tests.support import (
    CLASSES,
    THRESHOLD,
    TORCHSCRIPT_DEPRECATED,
    ThresholdSegmenter,
    TrainedClassifier,
    export_traced,
    metadata_json,
    segmenter_metadata,
    tensor_json,
    write_bundle,
)

pytestmark = pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)

#: (between slices, rows, columns), mm: not isotropic, so a wrong axis order shows.
SPACING = (1.2, 0.8, 0.5)


@pytest.fixture(scope="module")
def volume() -> SeriesVolume:
    """The 10 frames of emri_small.dcm (a real multi-frame MR), 10 x 64 x 64."""
    path = get_testdata_file("emri_small.dcm", download=False)
    assert isinstance(path, str)
    pixels = dcmread(path).pixel_array.astype(np.float32)
    assert pixels.shape == (10, 64, 64)
    return SeriesVolume(
        array=pixels,
        spacing=SPACING,
        origin=(-10.0, 20.0, 30.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        sop_instance_uids=[f"1.2.3.{k // 5}" for k in range(10)],
        patient_pseudonym="PSEUDO",
    )


def trace(network: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    return export_traced(network, example, path)


def segmenter_bundle(root: Path, name: str, network: Path, preprocessing: list[Any]) -> None:
    write_bundle(root, name, 1, segmenter_metadata(preprocessing), {"model.ts": network})


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ModelServer]:
    server = ModelServer(ModelRepository(tmp_path / "models"), BackendOptions(intra_op_threads=1))
    yield server
    await server.close()


async def stream(volume: SeriesVolume, chunk: int = 1000) -> AsyncIterator[ingest_pb.SeriesPixels]:
    yield ingest_pb.SeriesPixels(
        header=ingest_pb.VolumeHeader(
            shape=volume.array.shape,
            spacing=volume.spacing,
            origin=volume.origin,
            direction=volume.direction,
            sop_instance_uids=volume.sop_instance_uids,
            patient_pseudonym=volume.patient_pseudonym,
        )
    )
    data = volume.array.astype("<f4").tobytes()
    for start in range(0, len(data), chunk):
        yield ingest_pb.SeriesPixels(data=data[start : start + chunk])


async def test_read_volume_assembles_the_stream(volume: SeriesVolume) -> None:
    read = await read_volume(stream(volume), max_bytes=1 << 30)
    np.testing.assert_array_equal(read.array, volume.array)
    assert (read.spacing, read.origin, read.patient_pseudonym) == (
        SPACING,
        volume.origin,
        "PSEUDO",
    )


async def test_read_volume_refuses_a_short_stream_and_a_large_volume(volume: SeriesVolume) -> None:
    async def short() -> AsyncIterator[ingest_pb.SeriesPixels]:
        async for message in stream(volume):
            if message.data:
                yield ingest_pb.SeriesPixels(data=message.data[:10])
                return
            yield message

    with pytest.raises(FailedPrecondition) as malformed:
        await read_volume(short(), max_bytes=1 << 30)
    assert malformed.value.reason == "MALFORMED_VOLUME"
    with pytest.raises(InvalidArgument) as large:
        await read_volume(stream(volume), max_bytes=1000)
    assert large.value.reason == "VOLUME_TOO_LARGE"


def test_monai_input_is_channel_first_xyz_with_a_ras_affine(volume: SeriesVolume) -> None:
    image = monai_input(volume)
    assert tuple(image.shape) == (1, 64, 64, 10)  # (C, columns, rows, slices)
    assert image[0, 5, 7, 3] == volume.array[3, 7, 5]
    affine = image.affine.numpy()
    # Voxel (i, j, k) -> LPS origin + i*0.5*x + j*0.8*y + k*1.2*z, then x and y flipped.
    np.testing.assert_allclose(affine @ [2, 3, 4, 1], [10 - 1.0, -20 - 2.4, 30 + 4.8, 1])


def test_targets_parse_or_are_refused() -> None:
    assert Target.parse("studies/1.2/series/3.4") == Target("1.2", "3.4")
    assert Target.parse("studies/1.2/series/3.4/instances/5.6").instance == "5.6"
    for bad in ("studies/1.2", "series/3.4", "studies/1.2/series/x", "studies//series/3"):
        with pytest.raises(InvalidArgument) as caught:
            Target.parse(bad)
        assert caught.value.reason == "INVALID_TARGET"


async def test_segmentation_counts_the_known_voxels_in_ml(
    tmp_path: Path, server: ModelServer, volume: SeriesVolume
) -> None:
    network = trace(ThresholdSegmenter(), torch.zeros(2, 1, 4, 4, 4), tmp_path / "t.ts")
    segmenter_bundle(tmp_path / "models", "bright", network, [])
    predictor = Predictor(server)

    prediction = await predictor.predict(await predictor.model("bright", None), volume)

    assert prediction.task is Task.SEGMENTATION and prediction.version == 1
    result = prediction.result
    assert isinstance(result, Segmentation)
    truth = volume.array > THRESHOLD
    np.testing.assert_array_equal(result.label_map, truth.astype(np.int64))
    voxel_ml = math.prod(SPACING) / 1000
    bright = result.volumes[1]
    assert (bright.label, bright.voxel_count) == ("bright", int(truth.sum()))
    assert bright.volume_ml == pytest.approx(truth.sum() * voxel_ml)
    assert result.volumes[0].voxel_count == truth.size - truth.sum()


async def test_a_segmentation_is_uploaded_as_its_label_map_with_named_segments(
    tmp_path: Path, server: ModelServer, volume: SeriesVolume
) -> None:
    network = trace(ThresholdSegmenter(), torch.zeros(2, 1, 4, 4, 4), tmp_path / "t.ts")
    segmenter_bundle(tmp_path / "models", "bright", network, [])
    predictor = Predictor(server)
    result = (await predictor.predict(await predictor.model("bright", None), volume)).result
    assert isinstance(result, Segmentation)

    header, *chunks = segmentation_upload(result, SeriesName("studies/1.2/series/3.4"), "bright", 7)

    assert header.HasField("header") and not header.data
    sent = header.header
    assert (sent.source_series, list(sent.shape)) == ("studies/1.2/series/3.4", [10, 64, 64])
    assert sent.voxel_type == ingest_pb.SegmentationHeader.VOXEL_TYPE_UINT8
    # Label 0 (background) is no segment; label 1 is the model's second label.
    assert list(sent.segment_labels) == ["bright"]
    assert (sent.algorithm_name, sent.algorithm_version) == ("bright", "7")
    data = b"".join(chunk.data for chunk in chunks)
    assert not any(chunk.HasField("header") for chunk in chunks)
    np.testing.assert_array_equal(np.frombuffer(data, "<u1").reshape(10, 64, 64), result.label_map)

    # Past 255 segments, two bytes a label, in chunks of STORE_CHUNK_BYTES.
    many = Segmentation(
        label_map=np.full((3, 512, 512), 300, dtype=np.int64),
        volumes=tuple(LabelVolume(f"l{k}", 0, 0.0) for k in range(301)),
    )
    header, *chunks = segmentation_upload(many, SeriesName("studies/1/series/2"), "m", 1)
    assert header.header.voxel_type == ingest_pb.SegmentationHeader.VOXEL_TYPE_UINT16
    assert len(header.header.segment_labels) == 300
    size = 3 * 512 * 512 * 2
    assert [len(c.data) for c in chunks] == [STORE_CHUNK_BYTES, size - STORE_CHUNK_BYTES]
    assert set(np.frombuffer(b"".join(c.data for c in chunks), "<u2")) == {300}


async def test_segmentation_on_a_resampled_grid_is_measured_on_the_source_grid(
    tmp_path: Path, server: ModelServer, volume: SeriesVolume
) -> None:
    network = trace(ThresholdSegmenter(), torch.zeros(2, 1, 4, 4, 4), tmp_path / "t.ts")
    # Half the columns and rows, twice the slices: each voxel of the model's grid is
    # another size than the source's.
    resize = {"_target_": "Resize", "spatial_size": [32, 32, 20], "mode": "trilinear"}
    segmenter_bundle(tmp_path / "models", "resampled", network, [resize])
    predictor = Predictor(server)

    prediction = await predictor.predict(await predictor.model("resampled", None), volume)

    result = prediction.result
    assert isinstance(result, Segmentation)
    assert result.label_map.shape == (10, 64, 64)
    truth = int((volume.array > THRESHOLD).sum())
    assert result.volumes[1].voxel_count == pytest.approx(truth, rel=0.1)
    assert result.volumes[1].volume_ml == pytest.approx(
        result.volumes[1].voxel_count * math.prod(SPACING) / 1000
    )


async def test_a_monai_unet_segments_through_padding_and_back(
    tmp_path: Path, server: ModelServer, volume: SeriesVolume
) -> None:
    torch.manual_seed(0)
    unet = UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    network = trace(unet, torch.zeros(2, 1, 8, 8, 8), tmp_path / "unet.ts")
    spatial: list[int | str] = ["4*n", "4*n", "4*n"]
    preprocessing = [{"_target_": "NormalizeIntensity"}, {"_target_": "DivisiblePad", "k": 4}]
    write_bundle(
        tmp_path / "models",
        "unet",
        1,
        metadata_json(
            {"image": tensor_json(1, spatial)},
            {"logits": tensor_json(3, spatial, kind="segmentation")},
            {"labels": ["background", "a", "b"], "preprocessing": preprocessing},
        ),
        {"model.ts": network},
    )
    predictor = Predictor(server)

    prediction = await predictor.predict(await predictor.model("unet", None), volume)

    result = prediction.result
    assert isinstance(result, Segmentation)
    image = DivisiblePad(k=4)(torch.as_tensor(NormalizeIntensity()(monai_input(volume))))
    assert tuple(image.shape) == (1, 64, 64, 12)  # 10 slices padded to 12, 1 on each side
    with torch.inference_mode():
        expected = unet.eval()(torch.as_tensor(image)[None])[0].argmax(0)[:, :, 1:11]
    np.testing.assert_array_equal(result.label_map, expected.numpy().transpose(2, 1, 0))
    assert sum(v.voxel_count for v in result.volumes) == volume.array.size
    assert [v.label for v in result.volumes] == ["background", "a", "b"]


async def test_a_monai_densenet_classifies_the_volume(
    tmp_path: Path, server: ModelServer, volume: SeriesVolume
) -> None:
    torch.manual_seed(0)
    densenet = DenseNet(3, 1, 2, init_features=4, growth_rate=4, block_config=(2, 2))
    network = trace(densenet, torch.zeros(2, 1, 32, 32, 8), tmp_path / "densenet.ts")
    write_bundle(
        tmp_path / "models",
        "densenet",
        1,
        metadata_json(
            {"image": tensor_json(1, [32, 32, 8])},
            {"logits": tensor_json(2, [], kind="probabilities")},
            {
                "labels": ["normal", "abnormal"],
                "preprocessing": [
                    {"_target_": "NormalizeIntensity"},
                    {"_target_": "Resize", "spatial_size": [32, 32, 8]},
                ],
                "postprocessing": [{"_target_": "Activations", "softmax": True}],
            },
        ),
        {"model.ts": network},
    )
    predictor = Predictor(server)

    prediction = await predictor.predict(await predictor.model("densenet", None), volume)

    assert prediction.task is Task.CLASSIFICATION
    result = prediction.result
    assert isinstance(result, Classification)
    image = Resize(spatial_size=[32, 32, 8])(
        torch.as_tensor(NormalizeIntensity()(monai_input(volume)))
    )
    with torch.inference_mode():
        expected = torch.softmax(densenet.eval()(torch.as_tensor(image)[None])[0], 0)
    assert [p.label for p in result.probabilities] == ["normal", "abnormal"]
    np.testing.assert_allclose(
        [p.probability for p in result.probabilities], expected.numpy(), atol=1e-5
    )


async def test_a_2d_classifier_answers_the_mean_of_the_slices(
    tmp_path: Path, server: ModelServer, volume: SeriesVolume, classifier: TrainedClassifier
) -> None:
    write_bundle(
        tmp_path / "models",
        "patches",
        1,
        metadata_json(
            {"patch": tensor_json(1, [16, 16])},
            {"probabilities": tensor_json(2, [], kind="probabilities")},
            {
                "labels": list(CLASSES),
                "max_batch_size": 4,
                "preprocessing": [
                    {"_target_": "Resize", "spatial_size": [16, 16]},
                    {"_target_": "NormalizeIntensity"},
                ],
            },
        ),
        {"model.ts": classifier.torchscript},
    )
    predictor = Predictor(server)
    one_instance = volume.instance("1.2.3.1", "studies/1/series/2/instances/1.2.3.1")

    prediction = await predictor.predict(await predictor.model("patches", None), one_instance)

    result = prediction.result
    assert isinstance(result, Classification)
    slices = [
        NormalizeIntensity()(Resize(spatial_size=[16, 16])(one_instance.array[k].T[None]))
        for k in range(5)
    ]
    expected = classifier.expected(np.stack([np.asarray(s) for s in slices])).mean(axis=0)
    np.testing.assert_allclose([p.probability for p in result.probabilities], expected, atol=1e-5)
    assert [p.label for p in result.probabilities] == list(CLASSES)


async def test_unknown_models_and_instances_are_not_found(
    server: ModelServer, volume: SeriesVolume
) -> None:
    predictor = Predictor(server)
    with pytest.raises(NotFound) as model:
        await predictor.model("nothing-here", None)
    assert model.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(NotFound) as instance:
        volume.instance("9.9", "studies/1/series/2/instances/9.9")
    assert instance.value.reason == "INSTANCE_NOT_FOUND"
