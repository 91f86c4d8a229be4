"""Typed predictions on ingested series: a volume in, class probabilities or a segmentation
with its volumes out.

The flow of one prediction: `read_volume` assembles the stream ingest serves
(GetSeriesPixels: a VolumeHeader, then float32 bytes) into a `SeriesVolume`; `Predictor`
turns it into the MONAI input the model's preprocessing expects (`monai_input`), runs the
preprocessing, then the model through `ModelServer.infer` (so requests are batched with
everyone else's), then the postprocessing, and reads the result by the model's task.

A model with a 3D input gets the whole volume as one item. A model with a 2D input gets each
slice as its own item (its rows grouped into requests of up to max_batch_size rows):
classification answers the mean of the slices' probabilities, segmentation stacks the
slices' label maps.

Nothing here knows gRPC: the caller passes the pixel stream in and maps the errors out.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NewType, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from monai.data.meta_tensor import MetaTensor
from monai.transforms.compose import Compose

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg_core.errors import FailedPrecondition, InvalidArgument, NotFound
from medimg_inference.repository import ModelConfig, TensorSpec, check_model_name
from medimg_inference.serving import LoadedModel, ModelServer

T = TypeVar("T")
Float32Array = npt.NDArray[np.float32]
LabelMap = npt.NDArray[np.int64]
Vector = tuple[float, float, float]
#: A series as ingest names it: `studies/{study}/series/{series}`.
SeriesName = NewType("SeriesName", str)

#: A DICOM UID is at most 64 digits and dots.
_UID = r"[0-9][0-9.]{0,63}"
_TARGET = re.compile(
    rf"studies/(?P<study>{_UID})/series/(?P<series>{_UID})(/instances/(?P<instance>{_UID}))?"
)
#: Flips DICOM's patient coordinates (LPS) to MONAI's (RAS).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: How far a classification's probabilities may sum from 1 before they are refused.
_PROBABILITY_TOLERANCE = 1e-3
#: Bytes of label map per message of ingest's StoreSegmentation stream.
STORE_CHUNK_BYTES = 1024 * 1024


class Task(StrEnum):
    """What a model's first output means."""

    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"


@dataclass(frozen=True)
class Target:
    """What a prediction runs on: a series, or the slices (frames) of one of its instances."""

    study: str
    series: str
    instance: str = ""

    @property
    def series_name(self) -> SeriesName:
        return SeriesName(f"studies/{self.study}/series/{self.series}")

    @property
    def name(self) -> str:
        suffix = f"/instances/{self.instance}" if self.instance else ""
        return f"{self.series_name}{suffix}"

    @classmethod
    def parse(cls, name: str) -> Target:
        """The target `name` names; INVALID_ARGUMENT INVALID_TARGET if it names none."""
        match = _TARGET.fullmatch(name)
        if match:
            return cls(match["study"], match["series"], match["instance"] or "")
        raise InvalidArgument(
            "INVALID_TARGET",
            "target must look like studies/{study}/series/{series}"
            " or studies/{study}/series/{series}/instances/{instance}",
            target=name[:256],
        )


@dataclass(frozen=True, eq=False)
class SeriesVolume:
    """A series as ingest serves it, in DICOM patient coordinates (LPS, millimetres).

    `array` is float32, shape (slices, rows, columns), with a last axis of samples for colour;
    values after the Modality LUT (CT in Hounsfield units). `spacing` is in array axis order
    (between slices, rows, columns), in mm. `origin` is the position of voxel (0, 0, 0), in
    mm. `direction` is the row cosines (the way axis 2 runs), the column cosines (axis 1) and
    the slice normal (axis 0). `sop_instance_uids[k]` names the instance of slice k.
    """

    array: Float32Array
    spacing: Vector
    origin: Vector
    direction: tuple[float, ...]
    sop_instance_uids: list[str]
    patient_pseudonym: str

    @property
    def samples(self) -> int:
        """Samples per voxel: 1 for grey, 3 for colour."""
        return int(self.array.shape[3]) if self.array.ndim == 4 else 1

    def affine(self) -> npt.NDArray[np.float64]:
        """The 4x4 affine from MONAI voxel indices (i, j, k) = (column, row, slice) to RAS
        millimetres, as MONAI's image readers give it."""
        row_cosines, column_cosines, normal = (
            np.asarray(self.direction[start : start + 3]) for start in (0, 3, 6)
        )
        slice_spacing, row_spacing, column_spacing = self.spacing
        lps = np.eye(4)
        lps[:3, 0] = row_cosines * column_spacing
        lps[:3, 1] = column_cosines * row_spacing
        lps[:3, 2] = normal * slice_spacing
        lps[:3, 3] = self.origin
        affine: npt.NDArray[np.float64] = _LPS_TO_RAS @ lps
        return affine

    def instance(self, sop_instance_uid: str, target: str) -> SeriesVolume:
        """The slices of one instance (every frame of a multi-frame one), in series order;
        NOT_FOUND INSTANCE_NOT_FOUND if the series has none of it."""
        kept = [k for k, uid in enumerate(self.sop_instance_uids) if uid == sop_instance_uid]
        if not kept:
            raise NotFound("INSTANCE_NOT_FOUND", f"{target} is not in the index", target=target)
        if kept != list(range(kept[0], kept[-1] + 1)):
            raise InvalidArgument(
                "INSTANCE_NOT_CONTIGUOUS",
                f"the slices of {target} are not next to one another in the series",
                target=target,
            )
        normal = np.asarray(self.direction[6:9])
        origin = np.asarray(self.origin) + normal * self.spacing[0] * kept[0]
        return replace(
            self,
            array=self.array[kept[0] : kept[-1] + 1],
            origin=(float(origin[0]), float(origin[1]), float(origin[2])),
            sop_instance_uids=self.sop_instance_uids[kept[0] : kept[-1] + 1],
        )


async def read_volume(
    stream: AsyncIterable[ingest_pb.SeriesPixels], *, max_bytes: int
) -> SeriesVolume:
    """Assembles ingest's pixel stream: the header, then the float32 little-endian bytes in C
    order. FAILED_PRECONDITION MALFORMED_VOLUME if the stream does not hold what its header
    says; INVALID_ARGUMENT VOLUME_TOO_LARGE past `max_bytes`, before the data is read."""
    header: ingest_pb.VolumeHeader | None = None
    data = bytearray()
    expected = 0
    async for message in stream:
        if header is None:
            if not message.HasField("header"):
                raise _malformed("the stream does not start with a header")
            header = message.header
            expected = _check_header(header, max_bytes)
            continue
        data += message.data
        if len(data) > expected:
            raise _malformed(f"the stream holds more than the {expected} bytes of its header")
    if header is None:
        raise _malformed("the stream is empty")
    if len(data) != expected:
        raise _malformed(f"the stream holds {len(data)} bytes, its header says {expected}")
    array = np.frombuffer(bytes(data), dtype="<f4").astype(np.float32).reshape(tuple(header.shape))
    spacing, origin = tuple(header.spacing), tuple(header.origin)
    return SeriesVolume(
        array=array,
        spacing=(spacing[0], spacing[1], spacing[2]),
        origin=(origin[0], origin[1], origin[2]),
        direction=tuple(header.direction),
        sop_instance_uids=list(header.sop_instance_uids),
        patient_pseudonym=header.patient_pseudonym,
    )


def _check_header(header: ingest_pb.VolumeHeader, max_bytes: int) -> int:
    shape = list(header.shape)
    if len(shape) not in (3, 4) or any(size < 1 for size in shape):
        raise _malformed(f"the header's shape {shape} is not (slices, rows, columns[, samples])")
    if len(header.spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in header.spacing):
        raise _malformed("the header's spacing is not 3 positive numbers")
    if len(header.origin) != 3 or len(header.direction) != 9:
        raise _malformed("the header's origin or direction has the wrong length")
    if len(header.sop_instance_uids) != shape[0]:
        raise _malformed("the header does not name the instance of every slice")
    size = math.prod(shape) * 4
    if size > max_bytes:
        raise InvalidArgument(
            "VOLUME_TOO_LARGE",
            f"the series holds {size} bytes of float32 voxels; this service takes {max_bytes}",
            max_bytes=max_bytes,
        )
    return size


def _malformed(message: str) -> FailedPrecondition:
    return FailedPrecondition("MALFORMED_VOLUME", f"ingest's volume is unreadable: {message}")


def monai_input(volume: SeriesVolume) -> MetaTensor:
    """The volume as MONAI's image readers give one: channel first, then the spatial axes in
    MONAI order (X, Y, Z) = (columns, rows, slices), float32, with the RAS affine in mm
    (`affine`, also kept as `original_affine`) and `spatial_shape` in its metadata. Colour
    samples become channels."""
    array = volume.array if volume.array.ndim == 4 else volume.array[..., None]
    # (slices, rows, columns, samples) -> (samples, columns, rows, slices)
    channel_first = np.ascontiguousarray(array.transpose(3, 2, 1, 0))
    affine = torch.as_tensor(volume.affine(), dtype=torch.float64)
    return MetaTensor(
        torch.from_numpy(channel_first),
        meta={
            "affine": affine,
            "original_affine": affine.clone(),
            "spatial_shape": np.asarray(channel_first.shape[1:]),
            "space": "RAS",
            "original_channel_dim": 0,
        },
    )


def slice_inputs(volume: SeriesVolume) -> list[MetaTensor]:
    """Each slice as a 2D MONAI image: (C, X, Y) = (samples, columns, rows), float32, with a
    3x3 affine of the in-plane spacing in mm (the in-plane part of the RAS affine)."""
    image = monai_input(volume)
    full = volume.affine()
    in_plane = np.eye(3)
    in_plane[:2, :2] = full[:2, :2]
    affine = torch.as_tensor(in_plane, dtype=torch.float64)
    return [
        MetaTensor(
            image.as_tensor()[..., k].contiguous(),
            meta={
                "affine": affine,
                "original_affine": affine.clone(),
                "spatial_shape": np.asarray(image.shape[1:3]),
                "original_channel_dim": 0,
            },
        )
        for k in range(image.shape[3])
    ]


def task_of(config: ModelConfig) -> Task:
    """The model's task: `medimg.task` in metadata.json when it says, else its first output's
    shape (no spatial axes: classification; as many as the input: segmentation)."""
    section = config.metadata.get("medimg", {})
    declared = section.get("task") if isinstance(section, dict) else None
    if declared is not None:
        if declared not in list(Task):
            raise FailedPrecondition(
                "UNSUPPORTED_TASK",
                f"medimg.task is {declared!r}, not one of {', '.join(Task)}",
                model=config.name,
            )
        return Task(declared)
    spatial_out = len(config.outputs[0].shape) - 1
    if spatial_out == 0:
        return Task.CLASSIFICATION
    if spatial_out == len(config.inputs[0].shape) - 1:
        return Task.SEGMENTATION
    raise FailedPrecondition(
        "UNSUPPORTED_TASK",
        f"model {config.name}'s first output has {spatial_out} spatial axes: neither a "
        "classification nor a segmentation of its input",
        model=config.name,
    )


@dataclass(frozen=True)
class LabelProbability:
    label: str
    probability: float


@dataclass(frozen=True)
class Classification:
    """Every label with its probability, in the model's label order."""

    probabilities: tuple[LabelProbability, ...]


@dataclass(frozen=True)
class LabelVolume:
    """How much of the source grid one label covers: voxels, and millilitres (voxels x the
    source voxel volume in mm^3 / 1000)."""

    label: str
    voxel_count: int
    volume_ml: float


@dataclass(frozen=True, eq=False)
class Segmentation:
    """The label map on the source grid, in the volume's axis order (slices, rows, columns),
    values indexing `labels`, and the volume per label."""

    label_map: LabelMap
    volumes: tuple[LabelVolume, ...]


def segmentation_upload(
    segmentation: Segmentation, source: SeriesName, model: str, version: int
) -> Iterator[ingest_pb.StoreSegmentationRequest]:
    """The stream of ingest's StoreSegmentation that stores `segmentation` of series `source`
    as a DICOM SEG: the header, then the label map (one byte a voxel, two past 255 labels) in
    chunks. Label 0, the model's first label (background, as in MONAI's segmentation
    networks), is no segment; label k is segment k, named by the model's k-th label."""
    labels = [volume.label for volume in segmentation.volumes]
    wide = len(labels) > 256
    header = ingest_pb.SegmentationHeader(
        source_series=source,
        shape=list(segmentation.label_map.shape),
        voxel_type=(
            ingest_pb.SegmentationHeader.VOXEL_TYPE_UINT16
            if wide
            else ingest_pb.SegmentationHeader.VOXEL_TYPE_UINT8
        ),
        segment_labels=labels[1:],
        algorithm_name=model,
        algorithm_version=str(version),
    )
    yield ingest_pb.StoreSegmentationRequest(header=header)
    data = memoryview(segmentation.label_map.astype("<u2" if wide else "<u1").tobytes())
    for start in range(0, len(data), STORE_CHUNK_BYTES):
        yield ingest_pb.StoreSegmentationRequest(
            data=bytes(data[start : start + STORE_CHUNK_BYTES])
        )


@dataclass(frozen=True, eq=False)
class Prediction:
    model: str
    version: int
    task: Task
    result: Classification | Segmentation


@dataclass
class Predictor:
    """Runs predictions with the models of `server`. A model that does not serve yet is
    loaded (its newest version, or the one asked for) on first use. Torch work (transforms)
    runs in `executor`, never on the event loop: the service gives it backends.TORCH_CPU."""

    server: ModelServer
    executor: Executor | None = None
    _loading: dict[str, asyncio.Lock] = field(default_factory=dict)

    async def model(self, name: str, version: int | None) -> LoadedModel:
        """The loaded model, loading it if nothing serves; NOT_FOUND MODEL_NOT_FOUND or
        MODEL_VERSION_NOT_FOUND from the repository, UNAVAILABLE MODEL_NOT_READY when another
        version than the one asked for serves."""
        model = check_model_name(name)
        async with self._loading.setdefault(model, asyncio.Lock()):
            if not self.server.ready(model):
                await self.server.load(model, version)
        loaded = self.server.model(model, version)
        _check_servable(loaded.config)
        return loaded

    async def predict(
        self, loaded: LoadedModel, volume: SeriesVolume, deadline: float | None = None
    ) -> Prediction:
        """The prediction of `loaded` on `volume`; `deadline` is a time.monotonic() value."""
        config = loaded.config
        task = task_of(config)
        spec = config.inputs[0]
        if volume.samples != spec.shape[0]:
            raise InvalidArgument(
                "CHANNELS_MISMATCH",
                f"the series has {volume.samples} sample(s) per voxel, model {config.name} "
                f"takes {spec.shape[0]} channel(s)",
                model=config.name,
            )
        inputs = await self._run(_preprocess, loaded.preprocessing, volume, spec)
        outputs = await self._infer(loaded, inputs, deadline)
        labels = _labels(config)
        if task is Task.CLASSIFICATION:
            result: Classification | Segmentation = await self._run(
                _classify, loaded.postprocessing, outputs, labels, config.name
            )
        else:
            result = await self._run(_segment, loaded, inputs, outputs, labels, volume)
        return Prediction(config.name, config.version, task, result)

    async def _infer(
        self, loaded: LoadedModel, inputs: Sequence[MetaTensor], deadline: float | None
    ) -> list[torch.Tensor]:
        config = loaded.config
        spec, out = config.inputs[0], config.outputs[0]
        rows = config.batching.max_batch_size
        results: list[torch.Tensor] = []
        for start in range(0, len(inputs), rows):
            chunk = np.stack(
                [item.as_tensor().numpy() for item in inputs[start : start + rows]]
            ).astype(spec.dtype, copy=False)
            answer = await self.server.infer(
                config.name, config.version, {spec.name: chunk}, deadline
            )
            results += [torch.from_numpy(np.array(row)) for row in answer[out.name]]
        return results

    async def _run(self, work: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, work, *args)


def _check_servable(config: ModelConfig) -> None:
    spec = config.inputs[0]
    if len(config.inputs) != 1 or len(spec.shape) not in (3, 4):
        raise FailedPrecondition(
            "UNSUPPORTED_MODEL_INPUTS",
            f"model {config.name} must take one 2D or 3D image (channel first) to predict on "
            "a series",
            model=config.name,
        )


def _labels(config: ModelConfig) -> tuple[str, ...]:
    channels = config.outputs[0].shape[0]
    if len(config.labels) == channels:
        return config.labels
    # A label map in one channel (after argmax in the model) still has its labels.
    if channels == 1 and config.labels:
        return config.labels
    return tuple(f"label_{index}" for index in range(max(channels, 1)))


def _preprocess(pipeline: Compose, volume: SeriesVolume, spec: TensorSpec) -> list[MetaTensor]:
    """The volume (a 3D input) or each slice (a 2D input) through the model's preprocessing;
    INVALID_ARGUMENT SERIES_SHAPE_UNSUPPORTED if what comes out does not fit the model."""
    items = [monai_input(volume)] if len(spec.shape) == 4 else slice_inputs(volume)
    done: list[MetaTensor] = []
    for item in items:
        output = pipeline(item)
        if not isinstance(output, MetaTensor):
            output = MetaTensor(torch.as_tensor(output), meta=dict(item.meta))
        if not spec.accepts(tuple(output.shape)):
            raise InvalidArgument(
                "SERIES_SHAPE_UNSUPPORTED",
                f"after its preprocessing the series is {list(output.shape)}, the model takes "
                f"{list(spec.shape)} (-1: any size)",
                input=spec.name,
            )
        done.append(output)
    return done


def _classify(
    pipeline: Compose, outputs: list[torch.Tensor], labels: Sequence[str], model: str
) -> Classification:
    """The postprocessed probabilities, averaged over the items (slices)."""
    rows = [torch.as_tensor(pipeline(output)).double().reshape(-1) for output in outputs]
    mean = torch.stack(rows).mean(dim=0).numpy()
    if (
        len(mean) != len(labels)
        or not np.all(np.isfinite(mean))
        or mean.min() < -_PROBABILITY_TOLERANCE
        or abs(float(mean.sum()) - 1.0) > _PROBABILITY_TOLERANCE * len(mean)
    ):
        raise FailedPrecondition(
            "INVALID_MODEL_OUTPUT",
            f"model {model} did not answer one probability per label that sum to 1 (add an "
            'Activations(softmax=true) to its "postprocessing")',
            model=model,
        )
    return Classification(
        tuple(LabelProbability(label, float(p)) for label, p in zip(labels, mean, strict=True))
    )


def _label_map(output: torch.Tensor, classes: int) -> torch.Tensor:
    """A postprocessed segmentation output (C, *spatial) as one label per voxel (*spatial):
    the argmax over several channels; one channel holding labels as is; one channel of
    probabilities thresholded at 0.5 (label 1 where above)."""
    if output.shape[0] > 1:
        return output.argmax(dim=0)
    single = output[0]
    if classes > 2 or torch.equal(single, single.round()):
        return single.round().long()
    return (single > 0.5).long()


def _segment(
    loaded: LoadedModel,
    inputs: list[MetaTensor],
    outputs: list[torch.Tensor],
    labels: Sequence[str],
    volume: SeriesVolume,
) -> Segmentation:
    """The label map on the source grid: each item's labels, one-hot, carried back through the
    inverse of the preprocessing (resampling, cropping, padding, orientation), then the argmax
    again; the volume per label from the source spacing."""
    classes = len(labels)
    maps = []
    for item, output in zip(inputs, outputs, strict=True):
        labelled = _label_map(torch.as_tensor(loaded.postprocessing(output)), classes)
        one_hot = torch.nn.functional.one_hot(labelled.clamp(0, classes - 1), classes)
        one_hot = one_hot.movedim(-1, 0).float()
        carried = MetaTensor(one_hot, meta=dict(item.meta))
        carried.applied_operations = [dict(op) for op in item.applied_operations]
        back = carried
        if item.applied_operations:  # else nothing moved the grid
            try:
                back = loaded.preprocessing.inverse(carried)  # type: ignore[no-untyped-call]
            except Exception as error:  # MONAI raises several types for what it cannot undo
                raise _not_invertible(loaded, str(error)) from error
        maps.append(torch.as_tensor(back).argmax(dim=0).numpy())
    # Back to the volume's axis order: (X, Y, Z) -> (slices, rows, columns).
    label_map = maps[0].transpose(2, 1, 0) if len(maps) == 1 and maps[0].ndim == 3 else None
    if label_map is None:
        label_map = np.stack([m.transpose(1, 0) for m in maps])
    expected = volume.array.shape[:3]
    if label_map.shape != expected:
        raise _not_invertible(loaded, f"{list(label_map.shape)} != {list(expected)}")
    voxel_ml = math.prod(volume.spacing) / 1000
    counts = np.bincount(label_map.reshape(-1), minlength=classes)
    return Segmentation(
        label_map=label_map.astype(np.int64),
        volumes=tuple(
            LabelVolume(label, int(counts[index]), float(counts[index]) * voxel_ml)
            for index, label in enumerate(labels)
        ),
    )


def _not_invertible(loaded: LoadedModel, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        "SEGMENTATION_NOT_INVERTIBLE",
        f"model {loaded.config.name}'s preprocessing cannot be inverted onto the series grid "
        f"({why}): use invertible spatial transforms (Spacing, Resize, pads, crops)",
        model=loaded.config.name,
    )
