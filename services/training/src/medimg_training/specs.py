"""Training job specs: defaults, and every check that can refuse a spec before it runs.

A spec is plain JSON (as stored with the job and handed to the workers); the servicer
turns the proto into it. `check` refuses with a specific reason anything that could only
fail later in a worker: an unknown network or loss, arguments the network rejects, a
class (or label) count that does not match the dataset, a segmenter whose output is not on
its input's grid, an empty training split, resources this node does not have, a
`max_runtime` out of range. Durations stay in their JSON form (`"3600s"`), as the proto
gives them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from google.protobuf import duration_pb2

from medimg_core.errors import InvalidArgument
from medimg_training.datasets import Dataset, Split, Task

Spec = dict[str, Any]

#: Networks of `monai.networks.nets` a job may name, by task.
CLASSIFIERS = ("DenseNet121", "DenseNet169", "DenseNet201", "DenseNet", "ResNet")
SEGMENTERS = ("UNet", "BasicUNet", "SegResNet", "AttentionUnet")
LOSSES = {Task.CLASSIFICATION: ("CrossEntropyLoss",), Task.SEGMENTATION: ("DiceLoss", "DiceCELoss")}
OPTIMIZERS = ("Adam", "AdamW", "SGD")
SCHEDULES = ("constant", "cosine")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_EPOCHS = 10_000
MAX_BATCH = 4096
MAX_RUNTIME = timedelta(days=7)


def with_defaults(raw: Mapping[str, Any], dataset: Dataset) -> Spec:
    spec: Spec = copy.deepcopy(dict(raw))
    spec.setdefault("network", {})
    spec["network"].setdefault("arguments", {})
    spec["loss"] = spec.get("loss") or LOSSES[dataset.task][0]
    optimizer = spec.setdefault("optimizer", {})
    optimizer["name"] = optimizer.get("name") or "Adam"
    optimizer["learning_rate"] = optimizer.get("learning_rate") or 1e-3
    optimizer["weight_decay"] = optimizer.get("weight_decay") or 0.0
    spec["schedule"] = spec.get("schedule") or "constant"
    spec["epochs"] = spec.get("epochs") or 1
    spec["batch_size"] = spec.get("batch_size") or 8
    spec["mixed_precision"] = bool(spec.get("mixed_precision", False))
    spec["seed"] = int(spec.get("seed") or 0)
    resources = spec.setdefault("resources", {})
    resources["processes"] = resources.get("processes") or 1
    resources["gpus"] = resources.get("gpus") or 0
    spec["image_size"] = list(spec.get("image_size") or [64, 64])
    spec["checkpoint_every_steps"] = spec.get("checkpoint_every_steps") or 0
    spec["resume_on_restart"] = bool(spec.get("resume_on_restart", False))
    spec["model"] = spec.get("model") or dataset.dataset_id
    spec["max_steps"] = spec.get("max_steps") or 0
    spec["dataset"] = dataset.name
    return spec


def max_runtime(spec: Mapping[str, Any]) -> timedelta | None:
    """The spec's `max_runtime` (None: no limit)."""
    text = spec.get("max_runtime")
    if text is None:
        return None
    duration = duration_pb2.Duration()
    try:
        duration.FromJsonString(str(text))
    except ValueError as error:
        raise InvalidArgument(
            "INVALID_MAX_RUNTIME", f"max_runtime {text!r} is no duration such as '3600s'"
        ) from error
    return duration.ToTimedelta()


def network_arguments(spec: Mapping[str, Any], dataset: Dataset) -> dict[str, Any]:
    """The network's keyword arguments: the spec's, over defaults from the dataset."""
    arguments: dict[str, Any] = {
        "spatial_dims": len(spec["image_size"]),
        "in_channels": 1,
        "out_channels": len(dataset.class_names),
    }
    name = spec["network"]["name"]
    if name == "UNet":
        arguments.update(channels=[8, 16, 32], strides=[2, 2], num_res_units=1)
    if name == "AttentionUnet":
        arguments.update(channels=[8, 16, 32], strides=[2, 2])
    if name == "SegResNet":
        arguments.update(init_filters=8, blocks_down=[1, 1, 1], blocks_up=[1, 1])
    if name == "DenseNet":
        arguments.update(init_features=8, growth_rate=8, block_config=[2, 2])
    if name == "ResNet":
        arguments.update(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64])
        arguments["n_input_channels"] = arguments.pop("in_channels")
        arguments["num_classes"] = arguments.pop("out_channels")
    arguments.update(spec["network"].get("arguments") or {})
    # JSON has no integers apart from floats in a Struct: give whole numbers back their type.
    return {key: _ints(value) for key, value in arguments.items()}


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _ints(item) for key, item in value.items()}
    return value


def check(  # noqa: PLR0912 - one check per rule, in order
    spec: Spec, dataset: Dataset, *, max_processes: int, gpus: int, pod_per_process: bool = False
) -> None:
    """Refuses a spec (with defaults applied) that cannot run; see `check_network` too.
    `gpus`: what one node has for the job's processes, or with `pod_per_process` (Kubeflow
    PyTorchJob) what each process's own pod may have."""
    network = spec["network"].get("name", "")
    if not network:
        raise InvalidArgument("NETWORK_REQUIRED", "spec.network.name is required")
    known = CLASSIFIERS if dataset.task is Task.CLASSIFICATION else SEGMENTERS
    if network not in known:
        raise InvalidArgument(
            "UNKNOWN_NETWORK",
            f"network {network!r} is not one of {', '.join(known)} (for {dataset.task})",
        )
    if spec["loss"] not in LOSSES[dataset.task]:
        raise InvalidArgument(
            "UNKNOWN_LOSS", f"loss {spec['loss']!r} is not one of {LOSSES[dataset.task]}"
        )
    if spec["optimizer"]["name"] not in OPTIMIZERS:
        raise InvalidArgument(
            "UNKNOWN_OPTIMIZER",
            f"optimizer {spec['optimizer']['name']!r} is not one of {OPTIMIZERS}",
        )
    if spec["optimizer"]["learning_rate"] <= 0:
        raise InvalidArgument("INVALID_LEARNING_RATE", "the learning rate must be above 0")
    if spec["schedule"] not in SCHEDULES:
        raise InvalidArgument("UNKNOWN_SCHEDULE", f"schedule is one of {SCHEDULES}")
    if not 1 <= spec["epochs"] <= MAX_EPOCHS:
        raise InvalidArgument("INVALID_EPOCHS", f"epochs must be 1 to {MAX_EPOCHS}")
    if not 1 <= spec["batch_size"] <= MAX_BATCH:
        raise InvalidArgument("INVALID_BATCH_SIZE", f"batch_size must be 1 to {MAX_BATCH}")
    if spec["max_steps"] < 0 or spec["checkpoint_every_steps"] < 0:
        raise InvalidArgument("INVALID_STEPS", "max_steps and checkpoint_every_steps are >= 0")
    size = spec["image_size"]
    if len(size) not in (2, 3) or not all(8 <= s <= 1024 for s in size):
        raise InvalidArgument(
            "INVALID_IMAGE_SIZE", "image_size is 2 or 3 sizes, each from 8 to 1024"
        )
    processes, wanted_gpus = spec["resources"]["processes"], spec["resources"]["gpus"]
    if not 1 <= processes <= max_processes:
        raise InvalidArgument(
            "IMPOSSIBLE_RESOURCES",
            f"a job may have 1 to {max_processes} processes, not {processes}",
        )
    if pod_per_process and not 0 <= wanted_gpus <= gpus:
        raise InvalidArgument(
            "IMPOSSIBLE_RESOURCES",
            f"{wanted_gpus} GPU(s) for each process, but a worker pod may have {gpus}",
        )
    if not pod_per_process and (wanted_gpus < 0 or wanted_gpus * processes > gpus):
        raise InvalidArgument(
            "IMPOSSIBLE_RESOURCES",
            f"{wanted_gpus} GPU(s) for each of {processes} process(es), but this node has {gpus}",
        )
    if spec["batch_size"] % processes:
        raise InvalidArgument(
            "BATCH_NOT_DIVISIBLE",
            f"the global batch_size {spec['batch_size']} must divide among {processes} processes",
        )
    if not MODEL_NAME.fullmatch(spec["model"]):
        raise InvalidArgument(
            "INVALID_MODEL_NAME", "model is 1 to 128 letters, digits, '_', '.' or '-'"
        )
    runtime = max_runtime(spec)
    if runtime is not None and not timedelta(0) < runtime <= MAX_RUNTIME:
        raise InvalidArgument(
            "INVALID_MAX_RUNTIME",
            f"max_runtime must be above 0 and at most {MAX_RUNTIME.days} days, not {runtime}",
        )
    train = sum(1 for item in dataset.items if item.split is Split.TRAIN)
    if train == 0:
        raise InvalidArgument(
            "EMPTY_TRAINING_SPLIT", f"{dataset.name} has no item in its training split"
        )


def check_network(spec: Spec, dataset: Dataset) -> None:
    """Builds the network once (torch: call it off the event loop) to refuse bad arguments
    and a class count that does not match the dataset."""
    from medimg_training import networks

    arguments = network_arguments(spec, dataset)
    try:
        model = networks.build(spec["network"]["name"], arguments)
    except Exception as error:  # the constructor's own error says what is wrong
        raise InvalidArgument(
            "INVALID_NETWORK_ARGUMENTS",
            f"{spec['network']['name']} refused its arguments: {type(error).__name__}: {error}",
        ) from error
    size = spec["image_size"]
    if dataset.task is Task.CLASSIFICATION:
        outputs = networks.output_channels(model, arguments, size)
        if outputs != len(dataset.class_names):
            raise InvalidArgument(
                "WRONG_LABEL_COUNT",
                f"the network has {outputs} outputs but {dataset.name} has "
                f"{len(dataset.class_names)} classes",
            )
        return
    try:
        shape = networks.output_shape(model, arguments, size)
    except Exception as error:  # e.g. a size the strides cannot halve: the network's words
        raise InvalidArgument(
            "INVALID_IMAGE_SIZE",
            f"{spec['network']['name']} cannot segment an image of size {size}: "
            f"{type(error).__name__}: {error}",
        ) from error
    if shape[0] != len(dataset.class_names):
        raise InvalidArgument(
            "WRONG_LABEL_COUNT",
            f"the network has {shape[0]} output channels but {dataset.name} has "
            f"{len(dataset.class_names)} labels ({', '.join(dataset.class_names)})",
        )
    if list(shape[1:]) != list(size):
        raise InvalidArgument(
            "INVALID_IMAGE_SIZE",
            f"{spec['network']['name']} turns an image of size {size} into a label map of "
            f"size {list(shape[1:])}: choose sizes its strides divide",
        )
