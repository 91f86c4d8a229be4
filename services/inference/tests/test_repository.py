"""The model repository: layout, metadata.json parsing and its defaults, and a specific error
for each way a bundle can be malformed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medimg_core.errors import FailedPrecondition, InvalidArgument, MedimgError, NotFound
from medimg_inference.repository import (
    Accelerator,
    BatchingConfig,
    ModelRepository,
    Platform,
    Precision,
    build_transforms,
    warmup_shape,
)
from services.inference.tests.support import (
    classifier_metadata,
    metadata_json,
    random_patches,
    tensor_json,
    write_bundle,
)

ONNX = {"model.onnx": b"onnx"}  # parsing never opens the model file
Metadata = dict[str, Any]


def reason(error: pytest.ExceptionInfo[MedimgError]) -> str:
    return error.value.reason


def test_a_full_bundle_parses_into_typed_specs(tmp_path: Path) -> None:
    medimg = {
        "max_batch_size": 4,
        "max_queue_delay_us": 1500,
        "queue_limit": 16,
        "preferred_batch_sizes": [4, 2, 2],
        "instances": 2,
        "labels": ["computed tomography", "magnetic resonance"],
        "postprocessing": [{"_target_": "AsDiscrete", "argmax": True}],
        "response_cache": True,
        "optimize": True,
        "accelerator": "openvino",
    }
    write_bundle(tmp_path, "patches", 3, classifier_metadata(medimg), ONNX)

    config = ModelRepository(tmp_path).config("patches", 3)

    assert (config.name, config.version) == ("patches", 3)
    (patch,) = config.inputs
    assert (patch.name, patch.dtype, patch.shape) == ("patch", np.dtype(np.float32), (1, 16, 16))
    assert (patch.kind, patch.format, patch.value_range) == ("image", "magnitude", None)
    (probabilities,) = config.outputs
    assert probabilities.shape == (2,)
    assert dict(probabilities.channel_def) == {0: "CT", 1: "MR"}
    assert config.batching == BatchingConfig(
        max_batch_size=4, max_queue_delay_us=1500, queue_limit=16, preferred_batch_sizes=(2, 4)
    )
    assert config.execution.platform is Platform.ONNX
    assert config.execution.model_file == tmp_path / "patches/3/models/model.onnx"
    assert (config.execution.instances, config.execution.device) == (2, "cpu")
    assert config.execution.optimize
    assert config.execution.accelerator is Accelerator.OPENVINO
    assert config.labels == ("computed tomography", "magnetic resonance")
    assert config.metadata["task"] == "test model"
    assert config.response_cache


def test_a_plain_monai_bundle_loads_with_defaults(tmp_path: Path) -> None:
    metadata = classifier_metadata()
    del metadata["medimg"]
    write_bundle(tmp_path, "plain", 1, metadata, {"model.ts": b"ts"})

    config = ModelRepository(tmp_path).config("plain")

    assert config.batching == BatchingConfig()
    assert config.execution.platform is Platform.TORCHSCRIPT
    assert (config.execution.device, config.execution.precision) == ("cpu", Precision.FP32)
    assert config.execution.instances == 1
    assert not config.execution.optimize  # a 2D network
    assert config.execution.accelerator is Accelerator.NONE
    # Class names come from the output's channel_def.
    assert config.labels == ("CT", "MR")
    assert config.preprocessing == config.postprocessing == ()
    assert not config.response_cache


def test_a_volume_network_is_optimized_unless_told_not_to(tmp_path: Path) -> None:
    volume = tensor_json(1, [96, 96, 96])
    mask = tensor_json(2, [96, 96, 96], channel_def={"0": "background", "1": "organ"})
    for version, medimg in ((1, {}), (2, {"optimize": False})):
        metadata = metadata_json({"image": volume}, {"pred": mask}, medimg)
        write_bundle(tmp_path, "unet", version, metadata, {"model.ts": b"ts"})
    repository = ModelRepository(tmp_path)

    assert repository.config("unet", 1).execution.optimize
    assert not repository.config("unet", 2).execution.optimize


def test_the_preprocessing_is_a_monai_compose_of_the_configs(tmp_path: Path) -> None:
    write_bundle(tmp_path, "patches", 1, classifier_metadata(), ONNX)
    config = ModelRepository(tmp_path).config("patches")
    raw, _ = random_patches(4, np.random.default_rng(2), normalized=False)
    normalized, _ = random_patches(4, np.random.default_rng(2))

    preprocessing = build_transforms(config.preprocessing)

    for item, expected in zip(raw, normalized, strict=True):
        assert np.allclose(np.asarray(preprocessing(item)), expected, atol=1e-5)


def test_spatial_expressions_are_dynamic_sizes(tmp_path: Path) -> None:
    volume = tensor_json(1, ["32*n", 64, "*"])
    write_bundle(tmp_path, "volume", 1, metadata_json({"image": volume}, {"pred": volume}), ONNX)

    (image,) = ModelRepository(tmp_path).config("volume").inputs

    assert image.shape == (1, -1, 64, -1)
    assert image.spatial_shape == ("32*n", 64, "*")
    assert image.accepts((1, 96, 64, 7))
    assert not image.accepts((1, 96, 65, 7))
    assert not image.accepts((1, 96, 64))
    assert warmup_shape(image) == (1, 32, 64, 1)


def test_versions_are_positive_integer_directories(tmp_path: Path) -> None:
    for version in ("1", "2", "10"):
        write_bundle(tmp_path, "model", int(version), classifier_metadata(), ONNX)
    for ignored in ("01", "0", "latest", "-3"):
        (tmp_path / "model" / ignored).mkdir()
    (tmp_path / "model" / "11").write_text("a file, not a version")
    repository = ModelRepository(tmp_path)

    assert repository.versions("model") == [1, 2, 10]
    assert repository.config("model").version == 10
    assert repository.model_names() == ["model"]


def test_the_model_file_present_decides_the_platform_unless_medimg_names_one(
    tmp_path: Path,
) -> None:
    both = {"model.ts": b"ts", "model.onnx": b"onnx"}
    write_bundle(tmp_path, "both", 1, classifier_metadata(), both)
    write_bundle(tmp_path, "chosen", 1, classifier_metadata({"platform": "torchscript"}), both)
    write_bundle(tmp_path, "plan", 1, classifier_metadata({"device": "cuda"}), {"model.plan": b""})
    repository = ModelRepository(tmp_path)

    assert repository.config("both").execution.platform is Platform.ONNX
    assert repository.config("chosen").execution.platform is Platform.TORCHSCRIPT
    assert repository.config("plan").execution.platform is Platform.TENSORRT


def test_unknown_models_and_versions_are_not_found(tmp_path: Path) -> None:
    write_bundle(tmp_path, "model", 1, classifier_metadata(), ONNX)
    (tmp_path / "empty").mkdir()
    repository = ModelRepository(tmp_path)

    with pytest.raises(NotFound) as error:
        repository.config("missing")
    assert reason(error) == "MODEL_NOT_FOUND"
    with pytest.raises(NotFound) as error:
        repository.config("model", 2)
    assert reason(error) == "MODEL_VERSION_NOT_FOUND"
    with pytest.raises(NotFound) as error:
        repository.config("empty")
    assert reason(error) == "MODEL_VERSION_NOT_FOUND"


@pytest.mark.parametrize("name", ["..", "../model", "a/b", "", ".hidden", "x" * 129])
def test_a_model_name_cannot_leave_the_repository(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        ModelRepository(tmp_path).config(name)
    assert reason(error) == "INVALID_MODEL_NAME"


def test_a_missing_metadata_json(tmp_path: Path) -> None:
    (tmp_path / "model" / "1" / "models").mkdir(parents=True)
    with pytest.raises(FailedPrecondition) as error:
        ModelRepository(tmp_path).config("model")
    assert reason(error) == "METADATA_NOT_FOUND"
    assert error.value.metadata == {"model": "model", "version": "1"}


@pytest.mark.parametrize(
    ("text", "expected_reason"),
    [('{"network_data_format": ', "METADATA_NOT_JSON"), ("[1, 2]", "INVALID_METADATA")],
)
def test_a_metadata_json_that_is_not_a_json_object(
    tmp_path: Path, text: str, expected_reason: str
) -> None:
    write_bundle(tmp_path, "model", 1, text, ONNX)
    with pytest.raises(FailedPrecondition) as error:
        ModelRepository(tmp_path).config("model")
    assert reason(error) == expected_reason


def test_a_bundle_without_a_model_file(tmp_path: Path) -> None:
    write_bundle(tmp_path, "model", 1, classifier_metadata(), {"model.pt": b"weights only"})
    with pytest.raises(FailedPrecondition) as error:
        ModelRepository(tmp_path).config("model")
    assert reason(error) == "MODEL_FILE_NOT_FOUND"
    assert "models/model.onnx" in error.value.message


def test_a_platform_whose_model_file_is_missing(tmp_path: Path) -> None:
    write_bundle(tmp_path, "model", 1, classifier_metadata({"platform": "torchscript"}), ONNX)
    with pytest.raises(FailedPrecondition) as error:
        ModelRepository(tmp_path).config("model")
    assert reason(error) == "MODEL_FILE_NOT_FOUND"


def test_tensorrt_without_a_plan_builds_from_the_onnx_file(tmp_path: Path) -> None:
    tensorrt = classifier_metadata({"platform": "tensorrt", "device": "cuda"})
    write_bundle(tmp_path, "build", 1, tensorrt, ONNX)
    write_bundle(tmp_path, "neither", 1, tensorrt, {"model.ts": b"ts"})
    repository = ModelRepository(tmp_path)

    execution = repository.config("build").execution
    assert execution.platform is Platform.TENSORRT
    assert execution.model_file.name == "model.onnx"
    with pytest.raises(FailedPrecondition) as error:
        repository.config("neither")
    assert reason(error) == "MODEL_FILE_NOT_FOUND"
    assert "needs models/model.plan or models/model.onnx" in error.value.message


def test_an_engine_is_built_from_onnx_for_fixed_shapes_only(tmp_path: Path) -> None:
    metadata = classifier_metadata({"platform": "tensorrt", "device": "cuda"})
    _patch(metadata)["spatial_shape"] = ["16*n", 16]
    write_bundle(tmp_path, "dynamic", 1, metadata, ONNX)
    with pytest.raises(FailedPrecondition) as error:
        ModelRepository(tmp_path).config("dynamic")
    assert (reason(error), error.value.metadata["field"]) == ("INVALID_METADATA", "medimg.platform")
    assert "for fixed shapes only, but input 'patch' has a dynamic size" in error.value.message


def _inputs(metadata: Metadata) -> Any:
    return metadata["network_data_format"]["inputs"]


def _patch(metadata: Metadata) -> Any:
    return _inputs(metadata)["patch"]


def _medimg(metadata: Metadata) -> Any:
    return metadata["medimg"]


#: (what is wrong, the change that breaks the bundle, the reason, the field named).
MALFORMED: list[tuple[str, Callable[[Metadata], object], str, str]] = [
    ("an empty object", lambda m: m.clear(), "INVALID_METADATA", "network_data_format"),
    (
        "no network_data_format",
        lambda m: m.pop("network_data_format"),
        "INVALID_METADATA",
        "network_data_format",
    ),
    (
        "no inputs",
        lambda m: m["network_data_format"].pop("inputs"),
        "INVALID_METADATA",
        "network_data_format.inputs",
    ),
    (
        "empty inputs",
        lambda m: _inputs(m).clear(),
        "INVALID_METADATA",
        "network_data_format.inputs",
    ),
    (
        "tensor not an object",
        lambda m: _inputs(m).update(patch=[1, 16, 16]),
        "INVALID_METADATA",
        "network_data_format.inputs.patch",
    ),
    (
        "no dtype",
        lambda m: _patch(m).pop("dtype"),
        "INVALID_METADATA",
        "network_data_format.inputs.patch.dtype",
    ),
    (
        "unknown dtype",
        lambda m: _patch(m).update(dtype="complex64"),
        "UNSUPPORTED_DTYPE",
        "network_data_format.inputs.patch.dtype",
    ),
    (
        "no channels",
        lambda m: _patch(m).update(num_channels=0),
        "INVALID_METADATA",
        "network_data_format.inputs.patch.num_channels",
    ),
    (
        "channels a bool",
        lambda m: _patch(m).update(num_channels=True),
        "INVALID_METADATA",
        "network_data_format.inputs.patch.num_channels",
    ),
    (
        "spatial size zero",
        lambda m: _patch(m).update(spatial_shape=[0, 16]),
        "INVALID_METADATA",
        "network_data_format.inputs.patch.spatial_shape",
    ),
    (
        "spatial expression with an unknown variable",
        lambda m: _patch(m).update(spatial_shape=["16*q", 16]),
        "INVALID_METADATA",
        "network_data_format.inputs.patch.spatial_shape",
    ),
    (
        "spatial expression not Python",
        lambda m: _patch(m).update(spatial_shape=["16*", 16]),
        "INVALID_METADATA",
        "network_data_format.inputs.patch.spatial_shape",
    ),
    (
        "value_range of one",
        lambda m: _patch(m).update(value_range=[0]),
        "INVALID_METADATA",
        "network_data_format.inputs.patch.value_range",
    ),
    (
        "channel_def keys not indices",
        lambda m: _patch(m).update(channel_def={"first": "image"}),
        "INVALID_METADATA",
        "network_data_format.inputs.patch.channel_def",
    ),
    ("medimg not an object", lambda m: m.update(medimg=[]), "INVALID_METADATA", "medimg"),
    (
        "max_batch_size zero",
        lambda m: _medimg(m).update(max_batch_size=0),
        "INVALID_METADATA",
        "medimg.max_batch_size",
    ),
    (
        "response_cache not a bool",
        lambda m: _medimg(m).update(response_cache="yes"),
        "INVALID_METADATA",
        "medimg.response_cache",
    ),
    (
        "optimize not a bool",
        lambda m: _medimg(m).update(optimize=1),
        "INVALID_METADATA",
        "medimg.optimize",
    ),
    (
        "preferred batch size above the largest",
        lambda m: _medimg(m).update(max_batch_size=4, preferred_batch_sizes=[2, 8]),
        "INVALID_METADATA",
        "medimg.preferred_batch_sizes",
    ),
    (
        "preferred batch sizes not a list",
        lambda m: _medimg(m).update(preferred_batch_sizes=4),
        "INVALID_METADATA",
        "medimg.preferred_batch_sizes",
    ),
    (
        "negative delay",
        lambda m: _medimg(m).update(max_queue_delay_us=-1),
        "INVALID_METADATA",
        "medimg.max_queue_delay_us",
    ),
    (
        "queue_limit a string",
        lambda m: _medimg(m).update(queue_limit="64"),
        "INVALID_METADATA",
        "medimg.queue_limit",
    ),
    (
        "no instances",
        lambda m: _medimg(m).update(instances=0),
        "INVALID_METADATA",
        "medimg.instances",
    ),
    (
        "unknown device",
        lambda m: _medimg(m).update(device="gpu"),
        "INVALID_METADATA",
        "medimg.device",
    ),
    (
        "unknown precision",
        lambda m: _medimg(m).update(precision="fp8"),
        "INVALID_METADATA",
        "medimg.precision",
    ),
    (
        "half precision on the CPU",
        lambda m: _medimg(m).update(precision="fp16"),
        "INVALID_METADATA",
        "medimg.precision",
    ),
    (
        "half precision for ONNX",
        lambda m: _medimg(m).update(precision="fp16", device="cuda"),
        "INVALID_METADATA",
        "medimg.precision",
    ),
    (
        "unknown accelerator",
        lambda m: _medimg(m).update(accelerator="openvivo"),
        "INVALID_METADATA",
        "medimg.accelerator",
    ),
    (
        "an accelerator on a GPU",
        lambda m: _medimg(m).update(accelerator="openvino", device="cuda"),
        "INVALID_METADATA",
        "medimg.accelerator",
    ),
    (
        "unknown platform",
        lambda m: _medimg(m).update(platform="tflite"),
        "INVALID_METADATA",
        "medimg.platform",
    ),
    (
        "labels not strings",
        lambda m: _medimg(m).update(labels=[0, 1]),
        "INVALID_METADATA",
        "medimg.labels",
    ),
    (
        "preprocessing not a list",
        lambda m: _medimg(m).update(preprocessing={"_target_": "NormalizeIntensity"}),
        "INVALID_METADATA",
        "medimg.preprocessing",
    ),
    (
        "a transform without _target_",
        lambda m: _medimg(m).update(preprocessing=[{"a_min": 0}]),
        "INVALID_TRANSFORM",
        "medimg.preprocessing[0]",
    ),
    (
        "a transform MONAI does not have",
        lambda m: _medimg(m).update(postprocessing=[{"_target_": "MakeItBetter"}]),
        "INVALID_TRANSFORM",
        "medimg.postprocessing[0]",
    ),
    (
        "a target outside monai.transforms",
        lambda m: _medimg(m).update(preprocessing=[{"_target_": "os.system", "command": "id"}]),
        "INVALID_TRANSFORM",
        "medimg.preprocessing[0]",
    ),
    (
        "an expression",
        lambda m: _medimg(m)["preprocessing"].append(
            {"_target_": "ScaleIntensity", "minv": "$__import__('os').getpid()"}
        ),
        "INVALID_TRANSFORM",
        "medimg.preprocessing[1]",
    ),
    (
        "a debug mode",
        lambda m: _medimg(m).update(
            preprocessing=[{"_target_": "NormalizeIntensity", "_mode_": "debug"}]
        ),
        "INVALID_TRANSFORM",
        "medimg.preprocessing[0]",
    ),
    (
        "arguments the transform does not take",
        lambda m: _medimg(m).update(
            preprocessing=[{"_target_": "ScaleIntensityRange", "a_min": 0, "lower": 1}]
        ),
        "INVALID_TRANSFORM",
        "medimg.preprocessing",
    ),
]


@pytest.mark.parametrize(
    ("change", "expected_reason", "field"),
    [pytest.param(change, why, field, id=what) for what, change, why, field in MALFORMED],
)
def test_a_malformed_metadata_json_names_its_fault(
    tmp_path: Path, change: Callable[[Metadata], object], expected_reason: str, field: str
) -> None:
    metadata = classifier_metadata()
    change(metadata)
    write_bundle(tmp_path, "model", 1, metadata, ONNX)

    with pytest.raises(FailedPrecondition) as error:
        ModelRepository(tmp_path).config("model")

    assert (reason(error), error.value.metadata.get("field")) == (expected_reason, field)
    assert error.value.metadata["model"] == "model"
