"""Series volumes: a series' pixels as one float32 array with its geometry, so that inference
and training get a ready tensor and never parse DICOM.

Geometry is read per frame from the functional groups of enhanced (multi-frame) objects,
per-frame first and then shared, and otherwise from the top-level attributes; RT Dose's
GridFrameOffsetVector gives its frames' positions.

A DICOM Segmentation (SEG) series is served as a label volume on the grid of the series it
segments (see `label_volume`): training and inference read labels as they read images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy
import numpy.typing
import pydicom
from pydicom.pixels.processing import apply_modality_lut

from medimg_core.errors import InvalidArgument
from medimg_ingest.pixels import decoded_frames, frame_count, pixel_keyword

#: SOP Class UID of Segmentation Storage (PS3.4 B.5).
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

Float32Array = numpy.typing.NDArray[numpy.float32]
Vector = tuple[float, float, float]

#: Direction cosines that count as the same orientation (scanners print about 6 decimals).
_ORIENTATION_TOLERANCE = 1e-4
#: Pixel spacings (mm) that count as the same.
_SPACING_TOLERANCE = 1e-4
#: How far (as a fraction of the mean spacing, at least 1 µm) a gap between neighbouring
#: slices may stray from the mean before the series counts as having a slice missing.
_UNEVEN_FRACTION = 0.01
_UNEVEN_MINIMUM_MM = 1e-3
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True, eq=False)
class Volume:
    """A series (or one multi-frame instance) as one array, in the patient coordinate system
    of DICOM (LPS, millimetres).

    `array` is float32, values after the Modality LUT (CT in Hounsfield units), shape
    (slices, rows, columns); colour keeps a last axis of samples, RGB for YBR data. For one
    multi-frame instance the slices are its frames. Palette colour stays as indices;
    MONOCHROME1 is not inverted; RT Dose's DoseGridScaling is not applied.
    `spacing` is in array axis order: (between slices, between rows, between columns), the
    last two from PixelSpacing. The slice spacing comes from the slice positions when every
    slice has one; otherwise from SpacingBetweenSlices, else SliceThickness, else 1.0.
    `origin` is the ImagePositionPatient of slice 0 ((0, 0, 0) when it has none).
    `direction` is 9 numbers: the row cosines (the way axis 2 runs), the column cosines
    (axis 1) and the slice normal, their cross product (axis 0); identity without
    ImageOrientationPatient.
    `sop_instance_uids[k]` names the instance slice k came from, `frame_numbers[k]` its frame
    (from 1; 1 for a single-frame instance).
    `positions[k]` is the ImagePositionPatient of slice k when every slice has one and there
    is an orientation (the slices are then in order along the normal), else None: a volume
    with positions is placed in the patient, frame by frame.
    """

    array: Float32Array
    spacing: Vector
    origin: Vector
    direction: tuple[float, ...]
    sop_instance_uids: list[str]
    frame_numbers: list[int]
    positions: list[Vector] | None


@dataclass(frozen=True)
class _Slice:
    """One frame of one instance and where it lies."""

    instance: int
    frame: int
    position: Vector | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None


def series_volume(datasets: Sequence[pydicom.Dataset]) -> Volume:
    """Builds the volume of the instances of one series: single-frame ones, one multi-frame
    one, or several multi-frame ones (an Enhanced MR stack split over instances, say).

    Slices (frames) are sorted along the slice normal by the projection of
    ImagePositionPatient on it. When a slice has no position (or there is no orientation),
    single-frame slices are sorted by InstanceNumber and the frames of one multi-frame
    instance keep their stored order. Refused (InvalidArgument INCONSISTENT_SERIES): several
    series, frames of several instances (multi-frame ones among them) not all placed, slices
    differing in rows, columns, samples, orientation or pixel spacing, two slices at one
    position, uneven slice spacing (a slice missing), or an order that cannot be told.
    Pixel data that do not decode are refused as by `pixels.check_decodable`.
    """
    if not datasets:
        raise InvalidArgument("EMPTY_SERIES", "a volume needs at least one instance")
    if any(str(d.get("SOPClassUID", "")) == SEGMENTATION_STORAGE for d in datasets):
        return label_volume(datasets)
    _check_instances(datasets)
    # Checks every instance's pixel data up front, before any frame is decoded.
    frames_of = [decoded_frames(dataset) for dataset in datasets]
    slices = [
        _slice_of(dataset, instance, frame, frame_count(dataset))
        for instance, dataset in enumerate(datasets)
        for frame in range(frame_count(dataset))
    ]
    orientation = _common(
        [s.orientation for s in slices], "ImageOrientationPatient", _ORIENTATION_TOLERANCE
    )
    pixel_spacing = _common([s.pixel_spacing for s in slices], "PixelSpacing", _SPACING_TOLERANCE)
    normal = _normal(orientation) if orientation else None
    slice_spacing: float | None = None
    placed = [s.position for s in slices if s.position is not None]
    positions: list[Vector] | None = None
    if normal is not None and len(placed) == len(slices):
        order, slice_spacing = _by_position(placed, normal)
        positions = [placed[k] for k in order]
    elif len(datasets) > 1 and any(frame_count(d) > 1 for d in datasets):
        raise _inconsistent(
            "the frames of several instances, multi-frame ones among them, make a volume "
            "only when every frame is placed in the patient (ImagePositionPatient and "
            "ImageOrientationPatient), and some are not"
        )
    else:
        order = _by_instance_number(slices, datasets)
    slices = [slices[k] for k in order]
    first = datasets[0]
    rows, columns, samples = int(first.Rows), int(first.Columns), int(first.SamplesPerPixel)
    shape = (len(slices), rows, columns) + ((samples,) if samples > 1 else ())
    array: Float32Array = numpy.empty(shape, dtype=numpy.float32)
    rank = {(s.instance, s.frame): k for k, s in enumerate(slices)}
    for instance, (dataset, frames) in enumerate(zip(datasets, frames_of, strict=True)):
        for frame, pixels in enumerate(frames):
            array[rank[instance, frame]] = _modality_values(pixels, dataset, frame, samples)
    row_spacing, column_spacing = pixel_spacing or (1.0, 1.0)
    return Volume(
        array=array,
        spacing=(slice_spacing or _nominal_slice_spacing(first), row_spacing, column_spacing),
        origin=slices[0].position or (0.0, 0.0, 0.0),
        direction=(
            (*orientation, *(float(n) for n in normal))
            if orientation and normal is not None
            else _IDENTITY
        ),
        sop_instance_uids=[str(datasets[s.instance].SOPInstanceUID) for s in slices],
        frame_numbers=[s.frame + 1 for s in slices],
        positions=positions,
    )


def label_volume(datasets: Sequence[pydicom.Dataset]) -> Volume:
    """A SEG series as a label volume on the grid of the series it segments (read with
    highdicom).

    One slice per source frame: per source instance the SEG references (its Referenced
    Series Sequence) when those are single-frame images, per frame 1 to N of each when it
    segments the frames of multi-frame images (N the highest frame number its frames
    reference there); rows and columns those of the source. Each voxel holds the number of
    the segment it belongs to, 0 for none, as float32 like every volume. `sop_instance_uids[k]` and
    `frame_numbers[k]` name the source instance and frame of slice k (ingest replaces the
    SEG's references with the same keyed UIDs as the source's own), so a reader pairs labels
    with the source volume's slices by UID and frame. Slices follow the source's order along
    its slice normal when the SEG places every source frame (the plane positions of its
    frames), and otherwise the SEG's list of references (single-frame sources; one without
    any segmented frame has no position in the SEG) or the frame numbers (one multi-frame
    source); the geometry is that of the source grid as the SEG describes it. Refused:
    several instances in the series (INCONSISTENT_SERIES); a SEG that highdicom cannot read,
    that references no series or several, frames of multi-frame sources mixed with whole
    instances, a multi-frame source with a frame the SEG leaves out (its empty frames
    omitted: the source's grid cannot be told), several multi-frame sources with a frame
    the SEG does not place, or overlapping segments (INVALID_SEGMENTATION).
    """
    if len(datasets) > 1:
        raise _inconsistent(
            f"a segmentation series is read from one SEG instance, this one has {len(datasets)}"
        )
    from highdicom.seg import Segmentation  # imported only here: it is heavy

    dataset = datasets[0]
    try:
        segmentation = Segmentation.from_dataset(dataset, copy=True)
        sources = segmentation.get_source_image_uids()
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as error:
        raise _invalid_segmentation("highdicom cannot read the instance as a SEG") from error
    if len({series for _, series, _ in sources}) != 1:
        raise _invalid_segmentation(
            f"the SEG references {len({s for _, s, _ in sources})} series; a label volume is "
            "on the grid of exactly one"
        )
    uids = [str(uid) for _, _, uid in sources]
    derived = _derivations(dataset)
    multi_frame = any(frames for _, frames, _ in derived)
    if multi_frame:
        counts = _source_frames(derived, uids)
        uids = [uid for uid, count in counts.items() for _ in range(count)]
        numbers = [number for count in counts.values() for number in range(1, count + 1)]
        located = {
            (uid, frames[0]): position
            for uid, frames, position in derived
            if len(frames) == 1 and position
        }
        positions = [located.get(key) for key in zip(uids, numbers, strict=True)]
        if len(counts) > 1 and None in positions:
            raise _invalid_segmentation(
                f"it segments the frames of {len(counts)} multi-frame instances, which only "
                "their positions put in order, and some frames have none"
            )
    else:
        located_instances = {uid: position for uid, _, position in derived if position}
        numbers, positions = [1] * len(uids), [located_instances.get(uid) for uid in uids]
    try:
        if multi_frame:
            labels = numpy.concatenate([
                segmentation.get_pixels_by_source_frame(
                    uid, list(range(1, count + 1)), combine_segments=True
                )
                for uid, count in counts.items()
            ])  # fmt: skip
        else:
            labels = segmentation.get_pixels_by_source_instance(uids, combine_segments=True)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        overlap = "overlap" in str(error).lower()
        raise _invalid_segmentation(
            "segments overlap, so a voxel has no single label"
            if overlap
            else "its frames cannot be placed on the source frames it references"
        ) from error
    orientation = _numbers(
        frame_macro(dataset, 0, "PlaneOrientationSequence"), "ImageOrientationPatient", 6
    )
    normal = _normal(orientation) if orientation else None
    order, slice_spacing = list(range(len(uids))), None
    placed = [position for position in positions if position is not None]
    located_all = normal is not None and len(placed) == len(positions)
    if located_all and normal is not None:
        order, slice_spacing = _by_position(placed, normal)
    pixel_spacing = _pixel_spacing(frame_macro(dataset, 0, "PixelMeasuresSequence"))
    row_spacing, column_spacing = pixel_spacing or (1.0, 1.0)
    return Volume(
        array=numpy.ascontiguousarray(labels[order], dtype=numpy.float32),
        spacing=(slice_spacing or _nominal_slice_spacing(dataset), row_spacing, column_spacing),
        origin=positions[order[0]] or (0.0, 0.0, 0.0),
        direction=(
            (*orientation, *(float(n) for n in normal))
            if orientation and normal is not None
            else _IDENTITY
        ),
        sop_instance_uids=[uids[k] for k in order],
        frame_numbers=[numbers[k] for k in order],
        positions=[placed[k] for k in order] if located_all else None,
    )


#: What a SEG frame is derived from: the source instance, the source frames (none for a
#: single-frame source) and where the SEG frame lies.
_Derivation = tuple[str, tuple[int, ...], Vector | None]


def _derivations(dataset: pydicom.Dataset) -> list[_Derivation]:
    """What each frame of a SEG is derived from (its Derivation Image Sequence), with the
    plane position of that frame."""
    derived: list[_Derivation] = []
    for frame, group in enumerate(dataset.get("PerFrameFunctionalGroupsSequence") or []):
        position = _numbers(
            frame_macro(dataset, frame, "PlanePositionSequence"), "ImagePositionPatient", 3
        )
        for derivation in group.get("DerivationImageSequence") or []:
            for source in derivation.get("SourceImageSequence") or []:
                uid = str(source.get("ReferencedSOPInstanceUID", ""))
                frames = _integers(source.get("ReferencedFrameNumber"))
                if uid:
                    derived.append((uid, frames, _vector(position) if position else None))
    return derived


def _source_frames(derived: list[_Derivation], uids: list[str]) -> dict[str, int]:
    """The multi-frame sources a SEG segments, each with its count of frames N, in the order
    the SEG references them; INVALID_SEGMENTATION unless the SEG segments frames alone (no
    whole instance) and has a frame for each of 1 to N of every source."""
    if not all(frames for _, frames, _ in derived):
        raise _invalid_segmentation(
            "the SEG segments frames of multi-frame images and whole images at once; a "
            "label volume is on the grid of either"
        )
    numbers: dict[str, set[int]] = {uid: set() for uid in uids}
    for uid, frames, _ in derived:
        numbers.setdefault(uid, set()).update(frames)
    counts = {}
    for uid, referenced in numbers.items():
        if not referenced:
            raise _invalid_segmentation(f"source instance {uid} has no frame in the SEG")
        if min(referenced) < 1:
            raise _invalid_segmentation(f"the SEG references source frame {min(referenced)}")
        missing = sorted(set(range(1, max(referenced) + 1)) - referenced)
        if missing:
            raise _invalid_segmentation(
                f"source frame(s) {missing[:8]} have no frame in the SEG (empty frames left "
                "out), so the grid of the source cannot be told; a SEG with a frame for every "
                "source frame can be read"
            )
        counts[uid] = max(referenced)
    return counts


def _integers(value: Any) -> tuple[int, ...]:
    """An IS element's values (one or many) as integers; () when absent or malformed."""
    if value is None:
        return ()
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        return tuple(int(item) for item in items)
    except (TypeError, ValueError):
        return ()


def _invalid_segmentation(message: str) -> InvalidArgument:
    return InvalidArgument("INVALID_SEGMENTATION", message)


def _check_instances(datasets: Sequence[pydicom.Dataset]) -> None:
    if len({str(d.get("SeriesInstanceUID", "")) for d in datasets}) > 1:
        raise _inconsistent("the instances belong to more than one series")
    for index, dataset in enumerate(datasets):
        if pixel_keyword(dataset) is None:
            raise InvalidArgument(
                "NO_PIXEL_DATA", f"instance {index} has no pixel data", index=index
            )
    for keyword in ("Rows", "Columns", "SamplesPerPixel"):
        if len({d.get(keyword) for d in datasets}) > 1:
            raise _inconsistent(f"the slices differ in {keyword}", keyword=keyword)


def _slice_of(dataset: pydicom.Dataset, instance: int, frame: int, frames: int) -> _Slice:
    orientation = _numbers(
        frame_macro(dataset, frame, "PlaneOrientationSequence"), "ImageOrientationPatient", 6
    )
    source = frame_macro(dataset, frame, "PlanePositionSequence")
    position = _numbers(source, "ImagePositionPatient", 3)
    if frames > 1 and source is dataset:
        # A multi-frame object's top-level position is its first frame's; only RT Dose's
        # GridFrameOffsetVector (offsets along the normal) places the others.
        offsets = _numbers(dataset, "GridFrameOffsetVector", frames)
        if position and orientation and offsets:
            step = _normal(orientation) * (offsets[frame] - offsets[0])
            position = tuple(numpy.asarray(position) + step)
        else:
            position = None
    return _Slice(
        instance=instance,
        frame=frame,
        position=_vector(position) if position else None,
        orientation=orientation,
        pixel_spacing=_pixel_spacing(frame_macro(dataset, frame, "PixelMeasuresSequence")),
    )


def frame_macro(dataset: pydicom.Dataset, frame: int, sequence: str) -> pydicom.Dataset:
    """The item of a functional group macro that applies to `frame` (from 0; per-frame, then
    shared, PS3.3 C.7.6.16), or the dataset itself for objects without functional groups."""
    for groups_keyword, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = dataset.get(groups_keyword) or []
        if index < len(groups) and groups[index].get(sequence):
            item: pydicom.Dataset = groups[index].get(sequence)[0]
            return item
    return dataset


def _numbers(source: pydicom.Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """The element's values as finite floats, or None when absent, malformed or of another
    length: geometry that does not parse is treated as missing."""
    try:
        value = source.get(keyword)
        if value is None:
            return None
        items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(numpy.isfinite(numbers)):
        return None
    return numbers


def _pixel_spacing(source: pydicom.Dataset) -> tuple[float, ...] | None:
    """PixelSpacing (row, column) in mm; None when it is absent or not positive (some CR
    files carry 0\\0), so the volume gets the nominal 1 mm rather than a spacing that no
    consumer can place."""
    spacing = _numbers(source, "PixelSpacing", 2)
    return spacing if spacing is not None and min(spacing) > 0 else None


def _common(
    values: list[tuple[float, ...] | None], keyword: str, tolerance: float
) -> tuple[float, ...] | None:
    """The value every slice shares (absent everywhere counts as shared), or a refusal."""
    first = values[0]
    for value in values[1:]:
        if (value is None) != (first is None) or (
            value is not None
            and first is not None
            and not numpy.allclose(value, first, rtol=0, atol=tolerance)
        ):
            raise _inconsistent(f"the slices differ in {keyword}", keyword=keyword)
    return first


def _normal(orientation: tuple[float, ...]) -> numpy.typing.NDArray[numpy.float64]:
    normal = numpy.cross(orientation[:3], orientation[3:])
    length = float(numpy.linalg.norm(normal))
    if length < 0.5:  # cosines that are not (nearly) orthonormal describe no plane
        raise _inconsistent("ImageOrientationPatient does not describe a plane")
    result: numpy.typing.NDArray[numpy.float64] = normal / length
    return result


def _by_position(
    positions: list[Vector], normal: numpy.typing.NDArray[numpy.float64]
) -> tuple[list[int], float | None]:
    """The slice order along the normal and the spacing between neighbours (None for one
    slice)."""
    distances = numpy.array([numpy.dot(position, normal) for position in positions])
    order = [int(k) for k in numpy.argsort(distances, kind="stable")]
    if len(positions) == 1:
        return order, None
    gaps = numpy.diff(distances[order])
    spacing = float(gaps.mean())
    if float(gaps.min()) < _UNEVEN_MINIMUM_MM:
        raise _inconsistent("two slices lie at the same position")
    if float(numpy.abs(gaps - spacing).max()) > max(_UNEVEN_FRACTION * spacing, _UNEVEN_MINIMUM_MM):
        raise _inconsistent("the slice spacing is uneven: a slice may be missing")
    return order, spacing


def _by_instance_number(slices: list[_Slice], datasets: Sequence[pydicom.Dataset]) -> list[int]:
    """Frames keep their stored order; single-frame slices follow InstanceNumber."""
    if len(datasets) == 1:
        return list(range(len(slices)))
    numbers = [_numbers(d, "InstanceNumber", 1) for d in datasets]
    keys = [n[0] for n in numbers if n is not None]
    if len(set(keys)) != len(datasets):  # one missing (keys is then short), or two the same
        raise _inconsistent(
            "the slice order is unknown: positions are missing and InstanceNumber is "
            "missing or repeated"
        )
    return sorted(range(len(slices)), key=lambda k: keys[slices[k].instance])


def _nominal_slice_spacing(dataset: pydicom.Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _numbers(frame_macro(dataset, 0, "PixelMeasuresSequence"), keyword, 1)
        value = value or _numbers(dataset, keyword, 1)
        if value and value[0] > 0:
            return value[0]
    return 1.0


def _modality_values(
    pixels: numpy.typing.NDArray[Any], dataset: pydicom.Dataset, frame: int, samples: int
) -> numpy.typing.NDArray[Any]:
    """Stored values to modality values (e.g. CT to HU); colour has no Modality LUT."""
    if samples > 1:
        return pixels
    if dataset.get("ModalityLUTSequence"):
        lut: numpy.typing.NDArray[Any] = apply_modality_lut(pixels, dataset)
        return lut
    rescale = frame_macro(dataset, frame, "PixelValueTransformationSequence")
    slope = _numbers(rescale, "RescaleSlope", 1) or (1.0,)
    intercept = _numbers(rescale, "RescaleIntercept", 1) or (0.0,)
    if (slope[0], intercept[0]) == (1.0, 0.0):
        return pixels
    # In float64 as pydicom's apply_modality_lut does, then stored as float32.
    values: numpy.typing.NDArray[numpy.float64] = pixels.astype(numpy.float64)
    return values * slope[0] + intercept[0]


def _vector(values: Sequence[float]) -> Vector:
    x, y, z = (float(v) for v in values)
    return (x, y, z)


def _inconsistent(message: str, **metadata: str | int) -> InvalidArgument:
    return InvalidArgument("INCONSISTENT_SERIES", message, **metadata)
