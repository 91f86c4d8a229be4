"""Bad specs are refused with a reason before anything starts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from medimg_core.errors import InvalidArgument
from medimg_training import specs
from medimg_training.datasets import Dataset


def spec_of(dataset: Dataset, **changes: Any) -> specs.Spec:
    raw: dict[str, Any] = {"network": {"name": "DenseNet", "arguments": {}}, "image_size": [32, 32]}
    raw.update(changes)
    return specs.with_defaults(raw, dataset)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"network": {"name": "AlexNet"}}, "UNKNOWN_NETWORK"),
        ({"network": {"name": "UNet"}}, "UNKNOWN_NETWORK"),
        ({"loss": "DiceLoss"}, "UNKNOWN_LOSS"),
        ({"optimizer": {"name": "Adagrad"}}, "UNKNOWN_OPTIMIZER"),
        ({"resources": {"processes": 64}}, "IMPOSSIBLE_RESOURCES"),
        ({"resources": {"gpus": 1}}, "IMPOSSIBLE_RESOURCES"),
        ({"resources": {"processes": 3}, "batch_size": 4}, "BATCH_NOT_DIVISIBLE"),
        ({"image_size": [4, 4]}, "INVALID_IMAGE_SIZE"),
        ({"epochs": 100_000}, "INVALID_EPOCHS"),
        ({"model": "../etc"}, "INVALID_MODEL_NAME"),
        ({"max_runtime": "0s"}, "INVALID_MAX_RUNTIME"),
        ({"max_runtime": "-60s"}, "INVALID_MAX_RUNTIME"),
        ({"max_runtime": "604801s"}, "INVALID_MAX_RUNTIME"),  # 7 days and a second
        ({"max_runtime": "an hour"}, "INVALID_MAX_RUNTIME"),
    ],
)
def test_a_bad_spec_is_refused(dataset: Dataset, changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        specs.check(spec_of(dataset, **changes), dataset, max_processes=4, gpus=0)
    assert caught.value.reason == reason


def test_the_network_must_have_one_output_per_class(dataset: Dataset) -> None:
    spec = spec_of(dataset, network={"name": "DenseNet", "arguments": {"out_channels": 3}})
    specs.check(spec, dataset, max_processes=4, gpus=0)
    with pytest.raises(InvalidArgument) as caught:
        specs.check_network(spec, dataset)
    assert caught.value.reason == "WRONG_LABEL_COUNT"
    assert "3 outputs" in caught.value.message


def test_arguments_the_network_refuses_are_named(dataset: Dataset) -> None:
    spec = spec_of(dataset, network={"name": "DenseNet", "arguments": {"no_such_thing": 1}})
    with pytest.raises(InvalidArgument) as caught:
        specs.check_network(spec, dataset)
    assert caught.value.reason == "INVALID_NETWORK_ARGUMENTS"


def test_a_dataset_without_training_items_is_refused(dataset: Dataset) -> None:
    empty = Dataset(**{**dataset.__dict__, "items": ()})
    with pytest.raises(InvalidArgument) as caught:
        specs.check(spec_of(empty), empty, max_processes=4, gpus=0)
    assert caught.value.reason == "EMPTY_TRAINING_SPLIT"


def test_a_good_spec_passes(dataset: Dataset) -> None:
    spec = spec_of(dataset)
    specs.check(spec, dataset, max_processes=4, gpus=0)
    specs.check_network(spec, dataset)
    assert spec["model"] == "ct-or-mr"
    assert spec["dataset"] == "datasets/ct-or-mr/versions/1"


def test_a_max_runtime_up_to_seven_days_passes(dataset: Dataset) -> None:
    spec = spec_of(dataset, max_runtime="604800s")
    specs.check(spec, dataset, max_processes=4, gpus=0)
    assert specs.max_runtime(spec) == timedelta(days=7)
    assert specs.max_runtime(spec_of(dataset)) is None
