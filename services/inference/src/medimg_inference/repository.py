"""The model repository: `<root>/<model name>/<version>/` holds one MONAI bundle, on disk and,
where one is set, on S3 (s3_models.py) with the same layout.

A version directory is named by a positive integer and holds a MONAI-bundle-style
directory::

    configs/metadata.json     MONAI bundle metadata, plus an optional "medimg" section
    models/model.ts           TorchScript, or
    models/model.onnx         ONNX, or
    models/model.plan         a serialized TensorRT engine (or, with platform "tensorrt",
                              one built from models/model.onnx when the version loads)

`network_data_format` (MONAI bundle specification) names and types the tensors: each input
and output has `num_channels`, `spatial_shape` and `dtype`; a tensor's shape per batch item
is `(num_channels, *spatial_shape)` (channel first, no batch axis). A spatial size is an
integer or an expression of the specification ("*", "16*n", "2**p"): such a size is dynamic
(-1 here). TorchScript models take their inputs positionally, in the order metadata.json
lists them, and return their outputs in the order it lists them (or as a dict by name);
ONNX models name them.

The optional "medimg" section says how to serve the model; every key has a default, so a
plain MONAI bundle loads::

    "medimg": {
        "platform": "onnx",            # "torchscript" | "onnx" | "tensorrt"; default: the
                                       #   model file present (model.plan, model.onnx, model.ts).
                                       #   "tensorrt" without a model.plan builds an engine
                                       #   from model.onnx, cached per GPU (backends)
        "max_batch_size": 8,           # rows per execution; 1 turns batching off
        "max_queue_delay_us": 2000,    # how long a batch may wait for more requests
        "preferred_batch_sizes": [4, 8],  # batch sizes to run at once when they can form,
                                       #   without waiting out the delay (Triton's
                                       #   preferred_batch_size); default: none
        "queue_limit": 64,             # requests waiting per model before RESOURCE_EXHAUSTED
        "instances": 1,                # copies of the model, each with its own worker; on
                                       #   the CPU they run at once only with fewer threads
                                       #   per execution than cores
                                       #   (MEDIMG_INFERENCE_INTRA_OP_THREADS)
        "device": "cpu",               # "cpu" | "cuda" | "cuda:N"
        "precision": "fp32",           # "fp32" | "fp16" | "bf16" (reduced: TorchScript on CUDA)
        "optimize": true,              # TorchScript on the CPU: freeze the module and run its
                                       #   convolutions on oneDNN at every batch size; false:
                                       #   as stored. Default: true for a model with a 3D input
                                       #   (torch's own choice runs its small batches slowly),
                                       #   false otherwise (bench/README, inference run 3)
        "accelerator": "none",         # "openvino": run the TorchScript or ONNX file on the
                                       #   CPU in OpenVINO, converted when it loads (Triton's
                                       #   cpu_execution_accelerator); "none": its own runtime
        "labels": ["CT", "MR"],        # class names; default: the first output's channel_def
        "preprocessing": [{"_target_": "ScaleIntensityRange", "a_min": -1000, ...}],
        "postprocessing": [{"_target_": "AsDiscrete", "argmax": true}],
        "response_cache": false        # answer repeated identical requests from the
                                       #   response cache (Redis), as Triton's does
    }

Pre- and postprocessing are MONAI array transforms, instantiated by `monai.bundle.ConfigParser`.
They are restricted to classes of `monai.transforms` and plain values: no "$" expressions, no
"%" macros, no other `_target_`, because a model bundle must not be able to run code on the
server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, NewType, Protocol

import numpy as np
from monai.bundle.config_parser import ConfigParser
from monai.transforms.compose import Compose
from monai.transforms.transform import Transform

from medimg_core.errors import FailedPrecondition, InvalidArgument, NotFound

#: A model's name: its directory in the repository.
ModelName = NewType("ModelName", str)
#: A model version: a positive integer, its directory under the model's.
ModelVersion = NewType("ModelVersion", int)

METADATA_PATH = Path("configs/metadata.json")

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Canonical positive integers only, so that "1" and "01" cannot both name version 1.
_VERSION_DIR = re.compile(r"[1-9][0-9]*")
_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


class Platform(StrEnum):
    """The format of a model file, which decides the backend that runs it."""

    TORCHSCRIPT = "torchscript"
    ONNX = "onnx"
    TENSORRT = "tensorrt"


#: The model file of each platform, inside the bundle.
MODEL_FILES: Mapping[Platform, Path] = MappingProxyType(
    {
        Platform.TENSORRT: Path("models/model.plan"),
        Platform.ONNX: Path("models/model.onnx"),
        Platform.TORCHSCRIPT: Path("models/model.ts"),
    }
)


class Accelerator(StrEnum):
    """A runtime that runs a model file in place of its own, on the CPU."""

    NONE = "none"
    OPENVINO = "openvino"


class Precision(StrEnum):
    """The floating-point precision a backend computes in."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


#: The tensor dtypes a model may declare (those of the KServe v2 protocol, less BYTES),
#: by their MONAI metadata spelling.
DTYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        name: np.dtype(name)
        for name in (
            "bool",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "int8",
            "int16",
            "int32",
            "int64",
            "float16",
            "float32",
            "float64",
        )
    }
)

#: A spatial size as the MONAI specification writes it: an integer, or an expression.
SpatialSize = int | str


@dataclass(frozen=True, eq=False)
class TensorSpec:
    """One named input or output tensor of a model.

    `shape` is the shape of one batch item, channel first: `(num_channels, *spatial)`, no
    batch axis; -1 marks a dynamic size. `spatial_shape` keeps the sizes as metadata.json
    wrote them (expressions included). `kind` and `format` are MONAI's `type` and `format`
    (e.g. "image" / "hounsfield", "probabilities" / "classes"); `value_range` is (min, max)
    or None when unknown; `channel_def` maps a channel index to what it holds.
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    spatial_shape: tuple[SpatialSize, ...]
    kind: str
    format: str
    modality: str
    value_range: tuple[float, float] | None
    is_patch_data: bool
    channel_def: Mapping[int, str]

    def accepts(self, item_shape: Sequence[int]) -> bool:
        """Whether one batch item of this shape (no batch axis) fits the fixed sizes."""
        return len(item_shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, item_shape, strict=True)
        )


@dataclass(frozen=True)
class BatchingConfig:
    """How requests are grouped: see the module docstring's "medimg" section."""

    max_batch_size: int = 8
    # No wait by default: a batch forms from what queued while the instances were busy,
    # which adds no latency; a model that gains from fuller batches sets a delay.
    max_queue_delay_us: int = 0
    queue_limit: int = 64
    #: Ascending, each at most max_batch_size. A batch of one of these sizes (the largest
    #: that can form) runs at once, without waiting out the delay.
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class ExecutionConfig:
    """Where and how a model runs: its platform, model file, device and copies."""

    platform: Platform
    model_file: Path
    device: str = "cpu"
    precision: Precision = Precision.FP32
    instances: int = 1
    #: TorchScript on the CPU: frozen and optimized for inference (see backends._optimized).
    optimize: bool = False
    accelerator: Accelerator = Accelerator.NONE

    @property
    def uses_cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True, eq=False)
class ModelConfig:
    """Everything the repository says about one version of one model.

    `preprocessing` and `postprocessing` are the raw MONAI transform configs (JSON values);
    `build_transforms` turns them into a `Compose`. `metadata` is the whole metadata.json,
    for the fields this service does not interpret (task, description, authors, ...).
    """

    name: ModelName
    version: ModelVersion
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingConfig
    execution: ExecutionConfig
    labels: tuple[str, ...]
    preprocessing: tuple[Mapping[str, Any], ...]
    postprocessing: tuple[Mapping[str, Any], ...]
    metadata: Mapping[str, Any]
    #: Whether identical requests are answered from the response cache (see cache.py).
    response_cache: bool = False


def check_model_name(name: str) -> ModelName:
    """`name` as a ModelName, or INVALID_MODEL_NAME: it becomes a path, so no separators."""
    if not _MODEL_NAME.fullmatch(name):
        raise InvalidArgument(
            "INVALID_MODEL_NAME",
            "a model name is 1 to 128 letters, digits, '_', '.' or '-', not starting with "
            "'.', '_' or '-'",
            model=name[:128],
        )
    return ModelName(name)


class RemoteModels(Protocol):
    """Model directories kept elsewhere (s3_models.S3Models): listed there, fetched to local
    disk to be read."""

    def model_dirs(self) -> list[str]:
        """The names of the model directories, unchecked."""
        ...

    def version_dirs(self, model: ModelName) -> list[str]:
        """The names of the version directories of `model`, unchecked."""
        ...

    def fetch(self, model: ModelName, version: ModelVersion) -> Path:
        """A local copy of the version's bundle."""
        ...


class ModelRepository:
    """The models under one root directory, and under a remote location if there is one.
    Reads the disk (and lists the remote) on every call: the repository may change while
    the service runs (a new version dropped in), and it is small.

    With a remote, the repository is both: a version in the root directory (installed by a
    promotion, or put there by hand) is read from there, any other from the remote, which
    fetches it to local disk first."""

    def __init__(self, root: Path, remote: RemoteModels | None = None) -> None:
        self.root = root
        self.remote = remote

    def model_names(self) -> list[ModelName]:
        """The names of the model directories, sorted."""
        names = set()
        if self.root.is_dir():
            names = {entry.name for entry in self.root.iterdir() if entry.is_dir()}
        if self.remote is not None:
            names.update(self.remote.model_dirs())
        return sorted(ModelName(name) for name in names if _MODEL_NAME.fullmatch(name))

    def versions(self, name: str) -> list[ModelVersion]:
        """The versions of model `name`, oldest first; MODEL_NOT_FOUND if there is no such
        model. Entries that are not positive integers are ignored, as Triton does."""
        model = check_model_name(name)
        model_dir = self.root / model
        found = model_dir.is_dir()
        entries = set()
        if found:
            entries = {entry.name for entry in model_dir.iterdir() if entry.is_dir()}
        if self.remote is not None:
            remote = self.remote.version_dirs(model)
            found = found or bool(remote) or model in self.remote.model_dirs()
            entries.update(remote)
        if not found:
            raise NotFound("MODEL_NOT_FOUND", f"no model {name!r} in the repository", model=name)
        return sorted(ModelVersion(int(e)) for e in entries if _VERSION_DIR.fullmatch(e))

    def latest_version(self, name: str) -> ModelVersion:
        versions = self.versions(name)
        if not versions:
            raise NotFound(
                "MODEL_VERSION_NOT_FOUND", f"model {name!r} has no version directory", model=name
            )
        return versions[-1]

    def config(self, name: str, version: int | None = None) -> ModelConfig:
        """The parsed configuration of `name` at `version` (the newest when None)."""
        model = check_model_name(name)
        if version is None:
            version = self.latest_version(model)
        elif version not in self.versions(model):
            raise NotFound(
                "MODEL_VERSION_NOT_FOUND",
                f"model {name!r} has no version {version}",
                model=name,
                version=version,
            )
        path = self.root / model / str(version)
        if not path.is_dir() and self.remote is not None:
            path = self.remote.fetch(model, ModelVersion(version))
        return load_bundle(path, model, ModelVersion(version))


def load_bundle(path: Path, name: ModelName, version: ModelVersion) -> ModelConfig:
    """Parses the bundle at `path`; FAILED_PRECONDITION with a specific reason if it is not a
    bundle this service can serve. Reads only metadata.json: the model file is opened by
    the backend."""
    where: dict[str, str | int] = {"model": name, "version": version}
    metadata = _read_metadata(path / METADATA_PATH, where)
    fields = _Fields(where)
    data_format = fields.mapping(metadata, "network_data_format")
    inputs = fields.tensors(data_format, "network_data_format.inputs")
    outputs = fields.tensors(data_format, "network_data_format.outputs")
    section = metadata.get("medimg", {})
    if not isinstance(section, Mapping):
        raise fields.invalid("medimg", "must be an object")
    medimg = _MedimgSection(section, fields)
    config = ModelConfig(
        name=name,
        version=version,
        path=path,
        inputs=inputs,
        outputs=outputs,
        batching=BatchingConfig(
            max_batch_size=medimg.positive_int("max_batch_size", BatchingConfig.max_batch_size),
            max_queue_delay_us=medimg.int_at_least(
                "max_queue_delay_us", BatchingConfig.max_queue_delay_us, 0
            ),
            queue_limit=medimg.positive_int("queue_limit", BatchingConfig.queue_limit),
            preferred_batch_sizes=medimg.batch_sizes(
                "preferred_batch_sizes",
                up_to=medimg.positive_int("max_batch_size", BatchingConfig.max_batch_size),
            ),
        ),
        execution=_execution(path, medimg, fields, inputs),
        labels=medimg.labels(outputs),
        preprocessing=medimg.transforms("preprocessing"),
        postprocessing=medimg.transforms("postprocessing"),
        metadata=MappingProxyType(dict(metadata)),
        response_cache=medimg.boolean("response_cache", False),
    )
    # Instantiating now turns a bad transform into a load failure, not a failure per request.
    for stage in ("preprocessing", "postprocessing"):
        build_transforms(getattr(config, stage), field=f"medimg.{stage}", **where)
    return config


def build_transforms(
    configs: Sequence[Mapping[str, Any]], *, field: str = "transforms", **where: str | int
) -> Compose:
    """A `monai.transforms.Compose` of the transform configs, instantiated by MONAI's
    ConfigParser. Each transform is an array transform: it takes one batch item, channel
    first ((C, H, W) or (C, H, W, D)), as numpy or torch, and returns one.

    FAILED_PRECONDITION INVALID_TRANSFORM names the offending entry if a config is not a
    `monai.transforms` class with plain arguments, or MONAI cannot instantiate it."""
    checked = [
        _checked_transform(config, f"{field}[{index}]", where)
        for index, config in enumerate(configs)
    ]
    try:
        transforms = ConfigParser({"transforms": checked}).get_parsed_content("transforms")
    except Exception as error:  # MONAI wraps the constructor's own error, of any type
        # MONAI's first line names the transform (its second suggests a debug mode that is
        # refused here); the constructor's own error says what is wrong with the arguments.
        cause = error.__cause__
        because = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        raise FailedPrecondition(
            "INVALID_TRANSFORM",
            f"{field}: {str(error).splitlines()[0]}{because}",
            field=field,
            **where,
        ) from error
    return Compose(transforms)


def _checked_transform(config: Any, field: str, where: Mapping[str, str | int]) -> Any:
    """`config` with its `_target_` names spelled out in full, or INVALID_TRANSFORM."""

    def invalid(message: str) -> FailedPrecondition:
        return FailedPrecondition("INVALID_TRANSFORM", f"{field}: {message}", field=field, **where)

    if not isinstance(config, Mapping) or "_target_" not in config:
        raise invalid('must be an object with a "_target_"')

    def checked(value: Any) -> Any:
        if isinstance(value, str) and value[:1] in ("$", "%"):
            raise invalid(f"expressions and macros are not allowed: {value!r}")
        if isinstance(value, list):
            return [checked(item) for item in value]
        if not isinstance(value, Mapping):
            return value
        result = {key: checked(item) for key, item in value.items()}
        if "_target_" in value:
            result["_target_"] = _transform_path(value["_target_"], invalid)
        if value.get("_mode_", "default") != "default":
            raise invalid('"_mode_" is not allowed')
        return result

    return checked(config)


def _transform_path(target: Any, invalid: Any) -> str:
    """The full import path of a `monai.transforms` class named bare or in full. Spelling it
    out also spares MONAI's search of every module for a bare name (seconds)."""
    import monai.transforms

    name = target.removeprefix("monai.transforms.") if isinstance(target, str) else ""
    found = getattr(monai.transforms, name, None) if name.isidentifier() else None
    if not (isinstance(found, type) and issubclass(found, Transform)):
        raise invalid(f'"_target_" {target!r} is not a class of monai.transforms')
    return f"monai.transforms.{name}"


def _read_metadata(path: Path, where: Mapping[str, str | int]) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FailedPrecondition(
            "METADATA_NOT_FOUND", f"the bundle has no {METADATA_PATH}", **where
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise FailedPrecondition(
            "METADATA_UNREADABLE", f"{METADATA_PATH} cannot be read: {error}", **where
        ) from error
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise FailedPrecondition(
            "METADATA_NOT_JSON", f"{METADATA_PATH} is not JSON: {error}", **where
        ) from error
    if not isinstance(metadata, dict):
        raise FailedPrecondition(
            "INVALID_METADATA", f"{METADATA_PATH} must hold a JSON object", field="", **where
        )
    return metadata


class _Fields:
    """Reads typed fields of metadata.json; every error names the field's dotted path."""

    def __init__(self, where: Mapping[str, str | int]) -> None:
        self.where = where

    def invalid(self, field: str, message: str, reason: str = "INVALID_METADATA") -> Exception:
        return FailedPrecondition(
            reason, f"{METADATA_PATH}: {field} {message}", field=field, **self.where
        )

    def mapping(self, parent: Mapping[str, Any], key: str, path: str = "") -> Mapping[str, Any]:
        field = f"{path}{key}"
        if key not in parent:
            raise self.invalid(field, "is missing")
        value = parent[key]
        if not isinstance(value, Mapping):
            raise self.invalid(field, "must be an object")
        return value

    def tensors(self, data_format: Mapping[str, Any], field: str) -> tuple[TensorSpec, ...]:
        key = field.rsplit(".", 1)[1]
        specs = self.mapping(data_format, key, "network_data_format.")
        if not specs:
            raise self.invalid(field, "must name at least one tensor")
        return tuple(self.tensor(name, spec, f"{field}.{name}") for name, spec in specs.items())

    def tensor(self, name: str, spec: Any, field: str) -> TensorSpec:
        if not isinstance(spec, Mapping):
            raise self.invalid(field, "must be an object")
        for key in ("type", "num_channels", "spatial_shape", "dtype"):
            if key not in spec:
                raise self.invalid(f"{field}.{key}", "is missing")
        dtype_name = spec["dtype"]
        if dtype_name not in DTYPES:
            raise self.invalid(
                f"{field}.dtype",
                f"is {dtype_name!r}, not one of {', '.join(DTYPES)}",
                reason="UNSUPPORTED_DTYPE",
            )
        channels = spec["num_channels"]
        if not _is_int(channels) or channels < 1:
            raise self.invalid(f"{field}.num_channels", "must be a positive integer")
        spatial = spec["spatial_shape"]
        if not isinstance(spatial, list) or not all(
            (_is_int(size) and size > 0) or (isinstance(size, str) and size) for size in spatial
        ):
            raise self.invalid(
                f"{field}.spatial_shape",
                'must be a list of positive integers or expressions such as "*" or "16*n"',
            )
        for size in spatial:
            if isinstance(size, str):
                self.expression(size, f"{field}.spatial_shape")
        value_range = spec.get("value_range", [])
        if not isinstance(value_range, list) or len(value_range) not in (0, 2):
            raise self.invalid(f"{field}.value_range", "must be [] or [min, max]")
        if value_range and not all(_is_number(bound) for bound in value_range):
            raise self.invalid(f"{field}.value_range", "must hold numbers")
        channel_def = spec.get("channel_def", {})
        if not isinstance(channel_def, Mapping) or not all(
            str(key).isdigit() for key in channel_def
        ):
            raise self.invalid(f"{field}.channel_def", "must map channel indices to text")
        return TensorSpec(
            name=name,
            dtype=DTYPES[dtype_name],
            shape=(channels, *(size if isinstance(size, int) else -1 for size in spatial)),
            spatial_shape=tuple(spatial),
            kind=str(spec["type"]),
            format=str(spec.get("format", "")),
            modality=str(spec.get("modality", "n/a")),
            value_range=(float(value_range[0]), float(value_range[1])) if value_range else None,
            is_patch_data=bool(spec.get("is_patch_data", False)),
            channel_def=MappingProxyType(
                {int(key): str(text) for key, text in sorted(channel_def.items(), key=_by_int)}
            ),
        )

    def expression(self, size: str, field: str) -> None:
        # MONAI's own reading of spatial-shape expressions: "*", and "p"/"n" as variables.
        from monai.bundle.scripts import _get_fake_spatial_shape

        try:
            _get_fake_spatial_shape([size])
        except Exception as error:  # a SyntaxError, NameError or ValueError from the expression
            raise self.invalid(field, f"has a size MONAI cannot read: {size!r}") from error


def warmup_shape(spec: TensorSpec) -> tuple[int, ...]:
    """A shape that `spec` accepts, for one batch item: each expression's smallest size
    (variables set to 1, "*" to 1), as MONAI's bundle verification chooses its fake input."""
    from monai.bundle.scripts import _get_fake_spatial_shape

    return (spec.shape[0], *(int(size) for size in _get_fake_spatial_shape(spec.spatial_shape)))


class _MedimgSection:
    def __init__(self, section: Mapping[str, Any], fields: _Fields) -> None:
        self.section = section
        self.fields = fields

    def int_at_least(self, key: str, default: int, minimum: int) -> int:
        value = self.section.get(key, default)
        if not _is_int(value) or value < minimum:
            raise self.fields.invalid(f"medimg.{key}", f"must be an integer >= {minimum}")
        return int(value)

    def positive_int(self, key: str, default: int) -> int:
        return self.int_at_least(key, default, 1)

    def batch_sizes(self, key: str, up_to: int) -> tuple[int, ...]:
        value = self.section.get(key, [])
        if not isinstance(value, list) or not all(
            _is_int(size) and 1 <= size <= up_to for size in value
        ):
            raise self.fields.invalid(
                f"medimg.{key}", f"must be a list of integers from 1 to max_batch_size ({up_to})"
            )
        return tuple(sorted(set(value)))

    def boolean(self, key: str, default: bool) -> bool:
        value = self.section.get(key, default)
        if not isinstance(value, bool):
            raise self.fields.invalid(f"medimg.{key}", "must be true or false")
        return value

    def choice(self, key: str, default: str, allowed: Sequence[str]) -> str:
        value = self.section.get(key, default)
        if value not in allowed:
            raise self.fields.invalid(f"medimg.{key}", f"must be one of {', '.join(allowed)}")
        return str(value)

    def labels(self, outputs: Sequence[TensorSpec]) -> tuple[str, ...]:
        if "labels" not in self.section:
            channel_def = outputs[0].channel_def
            # Only a channel_def that names every channel 0..n-1 can stand for class names.
            if list(channel_def) == list(range(outputs[0].shape[0])):
                return tuple(channel_def.values())
            return ()
        labels = self.section["labels"]
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise self.fields.invalid("medimg.labels", "must be a list of strings")
        return tuple(labels)

    def transforms(self, key: str) -> tuple[Mapping[str, Any], ...]:
        configs = self.section.get(key, [])
        if not isinstance(configs, list):
            raise self.fields.invalid(f"medimg.{key}", "must be a list of transform configs")
        return tuple(configs)


def _execution(
    path: Path, medimg: _MedimgSection, fields: _Fields, inputs: Sequence[TensorSpec]
) -> ExecutionConfig:
    device = medimg.section.get("device", "cpu")
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise fields.invalid("medimg.device", 'must be "cpu", "cuda" or "cuda:N"')
    precision = Precision(medimg.choice("precision", Precision.FP32, list(Precision)))
    model_file = None
    if "platform" in medimg.section:
        platform = Platform(medimg.choice("platform", "", list(Platform)))
        model_file = path / MODEL_FILES[platform]
        if platform is Platform.TENSORRT and not model_file.is_file():
            model_file = path / MODEL_FILES[Platform.ONNX]  # the engine is built from it
        if not model_file.is_file():
            raise FailedPrecondition(
                "MODEL_FILE_NOT_FOUND",
                f"platform {platform} needs {MODEL_FILES[platform]}"
                + (f" or {MODEL_FILES[Platform.ONNX]}" if platform is Platform.TENSORRT else "")
                + ", which the bundle lacks",
                **fields.where,
            )
    else:
        present = [platform for platform, file in MODEL_FILES.items() if (path / file).is_file()]
        if not present:
            raise FailedPrecondition(
                "MODEL_FILE_NOT_FOUND",
                "the bundle has none of " + ", ".join(str(file) for file in MODEL_FILES.values()),
                **fields.where,
            )
        # The first in MODEL_FILES order: an engine built for this deployment beats a
        # portable format; medimg.platform chooses otherwise.
        platform = present[0]
    if model_file is not None and platform is Platform.TENSORRT and model_file.suffix == ".onnx":
        dynamic = [spec.name for spec in inputs if -1 in spec.shape]
        if dynamic:
            raise fields.invalid(
                "medimg.platform",
                f'"tensorrt" builds an engine from {MODEL_FILES[Platform.ONNX]} for fixed '
                f"shapes only, but input {dynamic[0]!r} has a dynamic size: ship a model.plan, "
                'or serve the ONNX file with "platform": "onnx"',
            )
    # Reduced precision casts a TorchScript model's weights on the GPU; an ONNX model or a
    # TensorRT engine has its precision fixed when it is exported or built.
    if precision is not Precision.FP32 and not (
        platform is Platform.TORCHSCRIPT and device.startswith("cuda")
    ):
        raise fields.invalid(
            "medimg.precision", f"{precision} needs a TorchScript model on a cuda device"
        )
    accelerator = Accelerator(medimg.choice("accelerator", Accelerator.NONE, list(Accelerator)))
    if accelerator is not Accelerator.NONE and (platform is Platform.TENSORRT or device != "cpu"):
        raise fields.invalid(
            "medimg.accelerator", f"{accelerator} runs a TorchScript or ONNX model on the cpu"
        )
    return ExecutionConfig(
        platform=platform,
        model_file=model_file or path / MODEL_FILES[platform],
        device=device,
        precision=precision,
        instances=medimg.positive_int("instances", 1),
        # Volumes (channel and three spatial axes) gain; 2D networks such as DenseNet, whose
        # convolutions torch already runs on oneDNN, show no gain (bench/README, runs 3, 4).
        optimize=medimg.boolean("optimize", any(len(spec.shape) == 4 for spec in inputs)),
        accelerator=accelerator,
    )


def _is_int(value: Any) -> bool:
    # JSON true/false are bools, which Python counts as ints.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _by_int(item: tuple[Any, Any]) -> int:
    return int(item[0])
