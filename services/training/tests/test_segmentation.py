"""Segmentation: a UNet trained by a real worker process on real CT pixels with label
volumes, its loss falling and its Dice reported, exported as a bundle that the inference
service reads as a segmentation model and that computes what the trained module computes;
segmentation datasets and specs refused with reasons."""

from __future__ import annotations

import json
import statistics
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
import redis.asyncio as aioredis
import torch

from medimg_core.errors import InvalidArgument
from medimg_inference.predict import Task as InferenceTask
from medimg_inference.predict import task_of
from medimg_inference.repository import ModelRepository
from medimg_training import bundle, datasets, jobs, progress, specs, worker
from medimg_training.datasets import Dataset, Item, SeriesName, Task
from medimg_training.jobs import State
from medimg_training.runner import Runner
from medimg_training.settings import TrainingSettings
from services.training.tests.support import SEGMENTS, probe_of, segmentation_table
from services.training.tests.test_runner import ended, wait_for


@pytest.fixture
async def runner(
    pool: asyncpg.Pool,
    events: aioredis.Redis,
    settings: TrainingSettings,
    executor: ThreadPoolExecutor,
) -> AsyncIterator[Runner]:
    made = Runner(pool=pool, events=events, settings=settings, executor=executor, code_version="t")
    await made.start()
    yield made
    await made.close()


def seg_spec(dataset: Dataset, **changes: Any) -> specs.Spec:
    raw: dict[str, Any] = {
        "network": {"name": "UNet", "arguments": {}},
        "image_size": [32, 32],
        "batch_size": 4,
        "epochs": 4,
        "seed": 5,
        "optimizer": {"name": "Adam", "learning_rate": 0.01},
        **changes,
    }
    return specs.with_defaults(raw, dataset)


@pytest.mark.slow
async def test_a_unet_learns_reports_dice_and_exports_what_it_learned(
    pool: asyncpg.Pool,
    events: aioredis.Redis,
    segmentation_dataset: Dataset,
    settings: TrainingSettings,
    runner: Runner,
) -> None:
    spec = seg_spec(segmentation_dataset)
    specs.check(spec, segmentation_dataset, max_processes=2, gpus=0)
    specs.check_network(spec, segmentation_dataset)
    job = await jobs.create(pool, spec, "max")
    runner.wake()
    job = await wait_for(pool, job.job_id, ended)
    job_dir = settings.object_dir / "jobs" / job.job_id
    assert job.state is State.SUCCEEDED, (job.error_message, (job_dir / "worker.log").read_text())

    # Loss falls from the first epoch to the last; Dice is reported every epoch.
    entries: Any = await events.xrange(progress.stream(job.job_id))
    reports = [progress.decode(fields) for _, fields in entries if "loss" in fields]
    by_epoch: dict[int, list[float]] = {}
    for report in reports:
        by_epoch.setdefault(report["epoch"], []).append(report["loss"])
    assert sorted(by_epoch) == [1, 2, 3, 4]
    first, last = statistics.mean(by_epoch[1]), statistics.mean(by_epoch[4])
    assert last < first * 0.9, by_epoch
    dice = [r["metrics"]["dice"] for r in reports if "dice" in r.get("metrics", {})]
    assert dice and all(0 <= d <= 1 for d in dice)
    assert job.progress["metrics"]["dice"] == dice[-1]
    assert dice[-1] > 0.5, dice  # bright voxels are easy: well above chance
    version = await _version_metrics(pool, job.model_version)
    assert version == job.progress["metrics"]

    # The bundle, as the inference service reads it: a segmentation of the two labels.
    config = ModelRepository(settings.object_dir / "models").config("bright", 1)
    assert task_of(config) is InferenceTask.SEGMENTATION
    assert config.labels == SEGMENTS
    assert config.inputs[0].shape == (1, 32, 32)
    assert config.outputs[0].shape == (2, 32, 32)

    # The exported model computes what the trained module computes.
    trained = bundle.Probabilities(
        bundle.load_weights(json.loads((job_dir / "worker.json").read_text()))
    ).eval()
    example = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(example)
        with warnings.catch_warnings():  # TorchScript is what the inference service loads
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(config.path / "models" / "model.ts"))  # type: ignore[no-untyped-call]
        torch.testing.assert_close(scripted(example), expected, atol=1e-5, rtol=1e-4)
    onnx_file = config.path / "models" / "model.onnx"
    if onnx_file.is_file():
        import onnxruntime

        session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        got = session.run(["pred"], {"image": example.numpy()})[0]
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)


async def _version_metrics(pool: asyncpg.Pool, name: str) -> dict[str, float]:
    from medimg_training import registry

    return dict((await registry.get_version(pool, name)).metrics)


@pytest.mark.parametrize("multi_frame", [False, True])
def test_labels_are_matched_to_image_slices_by_instance_and_frame(
    tmp_path: Path, multi_frame: bool
) -> None:
    items, _, _ = segmentation_table(1, tmp_path, slices=4, multi_frame=multi_frame)
    config = {"cache_dir": str(tmp_path), "class_names": list(SEGMENTS)}
    item = {"series": items[0].series, "label_series": items[0].label_series}
    image, _ = worker.fetch_with_slices(config, item["series"])
    records = worker.segmentation_records(config, item, spatial_dims=2, group=0)
    assert len(records) == 4
    for k, record in enumerate(records):
        # Labels were cached in reverse slice order: matched by instance and frame, they
        # mark this slice.
        assert record["image"].shape == record["label"].shape == (1, 128, 128)
        np.testing.assert_array_equal(record["label"][0], (image[k] > 1100).T)
    [volume] = worker.segmentation_records(config, item, spatial_dims=3, group=0)
    assert volume["image"].shape == volume["label"].shape == (1, 128, 128, 4)


def test_a_label_beyond_the_named_labels_fails_with_its_reason(tmp_path: Path) -> None:
    items, _, _ = segmentation_table(1, tmp_path)
    labels, slices = worker.fetch_with_slices({"cache_dir": str(tmp_path)}, items[0].label_series)
    np.save(worker.cache_path(tmp_path, items[0].label_series), labels * 3)
    config = {"cache_dir": str(tmp_path), "class_names": list(SEGMENTS)}
    item = {"series": items[0].series, "label_series": items[0].label_series}
    with pytest.raises(ValueError, match="holds label 3, but the dataset names 2 labels"):
        worker.segmentation_records(config, item, spatial_dims=2, group=0)
    assert slices


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"network": {"name": "DenseNet"}}, "UNKNOWN_NETWORK"),
        ({"loss": "CrossEntropyLoss"}, "UNKNOWN_LOSS"),
        ({"image_size": [4, 4]}, "INVALID_IMAGE_SIZE"),
    ],
)
def test_a_bad_segmentation_spec_is_refused(
    segmentation_dataset: Dataset, changes: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        specs.check(seg_spec(segmentation_dataset, **changes), segmentation_dataset,
                    max_processes=4, gpus=0)  # fmt: skip
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("changes", "reason", "words"),
    [
        ({"network": {"name": "UNet", "arguments": {"out_channels": 3}}},
         "WRONG_LABEL_COUNT", "3 output channels"),
        ({"network": {"name": "SegResNet", "arguments": {"out_channels": 1}}},
         "WRONG_LABEL_COUNT", "1 output channels"),
        ({"image_size": [30, 30]}, "INVALID_IMAGE_SIZE", "[30, 30]"),
        ({"network": {"name": "UNet", "arguments": {"strides": [2]}}},
         "INVALID_NETWORK_ARGUMENTS", "UNet"),
    ],
)  # fmt: skip
def test_a_segmenter_that_does_not_fit_the_dataset_is_refused(
    segmentation_dataset: Dataset, changes: dict[str, Any], reason: str, words: str
) -> None:
    spec = seg_spec(segmentation_dataset, **changes)
    specs.check(spec, segmentation_dataset, max_processes=4, gpus=0)
    with pytest.raises(InvalidArgument) as caught:
        specs.check_network(spec, segmentation_dataset)
    assert caught.value.reason == reason
    assert words in caught.value.message


@pytest.mark.parametrize("network", ["UNet", "SegResNet", "BasicUNet", "AttentionUnet"])
@pytest.mark.parametrize("size", [[32, 32], [16, 32, 32]])
def test_each_segmenter_fits_by_default(
    segmentation_dataset: Dataset, network: str, size: list[int]
) -> None:
    spec = seg_spec(segmentation_dataset, network={"name": network}, image_size=size)
    specs.check(spec, segmentation_dataset, max_processes=4, gpus=0)
    specs.check_network(spec, segmentation_dataset)


async def test_a_label_series_must_segment_its_image_series(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    items, pseudonyms, volumes = segmentation_table(2, tmp_path)
    arguments: dict[str, Any] = {"dataset_id": "pairs", "task": Task.SEGMENTATION,
                                 "class_names": (), "fractions": None, "split_seed": "",
                                 "creator": "max"}  # fmt: skip
    # Image 0 with the labels of image 1: another patient.
    crossed = [Item(items[0].series, label_series=items[1].label_series)]
    with pytest.raises(InvalidArgument) as caught:
        await datasets.create(pool, probe_of(pseudonyms, volumes), items=crossed, **arguments)
    assert caught.value.reason == "LABEL_SERIES_OTHER_PATIENT"
    # Same patient, but the label slices belong to other instances.
    pseudonyms[items[1].label_series] = pseudonyms[items[0].series]
    with pytest.raises(InvalidArgument) as caught:
        await datasets.create(pool, probe_of(pseudonyms, volumes), items=crossed, **arguments)
    assert caught.value.reason == "LABEL_SERIES_MISMATCH"
    # Other rows and columns.
    shape, slices = volumes[items[0].label_series]
    volumes[items[0].label_series] = ((shape[0], 64, 64), slices)
    with pytest.raises(InvalidArgument) as caught:
        await datasets.create(pool, probe_of(pseudonyms, volumes), items=items[:1], **arguments)
    assert caught.value.reason == "LABEL_SERIES_MISMATCH"
    assert "64x64" in caught.value.message
    # Nothing was stored; a good pair is, with the default label names.
    volumes[items[0].label_series] = (shape, slices)
    created = await datasets.create(
        pool, probe_of(pseudonyms, volumes), items=items[:1], **arguments
    )
    assert created.name == "datasets/pairs/versions/1"
    assert created.class_names == datasets.DEFAULT_SEGMENT_NAMES
    assert created.items[0].label_series == items[0].label_series


def test_a_segmentation_dataset_with_one_label_name_is_refused() -> None:
    item = Item(SeriesName("studies/1/series/2"), label_series="studies/1/series/3")
    with pytest.raises(InvalidArgument) as caught:
        datasets.check_request("ok", Task.SEGMENTATION, ("background",), [item], None)
    assert caught.value.reason == "TOO_FEW_CLASSES"


def test_networks_see_images_in_the_axis_order_inference_gives_them() -> None:
    # (slices, rows, columns) in; MONAI's (channel, columns, rows[, slices]) out, as the
    # inference service's monai_input and slice_inputs hand series to a model.
    volume = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    slices = worker.network_inputs(volume, 2)
    assert len(slices) == 3
    for k, plane in enumerate(slices):
        np.testing.assert_array_equal(plane, volume[k].T[None])
    [whole] = worker.network_inputs(volume, 3)
    np.testing.assert_array_equal(whole, volume.transpose(2, 1, 0)[None])
    colour = np.stack([volume, 3 * volume], axis=-1)  # samples averaged into one channel
    np.testing.assert_array_equal(worker.network_inputs(colour, 2)[0], (2 * volume[0]).T[None])
