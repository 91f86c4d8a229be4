"""DICOM Segmentation (SEG) objects of stored series, built with highdicom: a label map on a
series' volume grid in, the Part 10 bytes of a SEG out, for the pipeline to store.

The SEG is made from the stored, de-identified source instances: it copies their patient and
study attributes (pseudonyms, shifted dates) and references their stored UIDs, so it carries
nothing the sources do not, and the pipeline stores it without de-identifying it again. Its
own dates are the source's (a creation date of today would tell how far the source's dates
were shifted), and its UIDs derive from the source series, the algorithm and the content, so
the same segmentation built twice gives the same bytes: a retry is a duplicate, not a second
SEG.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import highdicom
import numpy
import numpy.typing
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medimg_core.errors import FailedPrecondition, InvalidArgument
from medimg_ingest import volumes
from medimg_ingest.deid import values

LabelMap = numpy.typing.NDArray[numpy.unsignedinteger[Any]]

#: The voxel types a label map may come in (little endian), by name.
VOXEL_TYPES: dict[str, numpy.dtype[Any]] = {
    "uint8": numpy.dtype("<u1"),
    "uint16": numpy.dtype("<u2"),
}
#: DICOM LO, the VR of segment labels and the algorithm's name and version.
MAX_TEXT = 64
#: The coding scheme of segment types named by the model only (PS3.16 8.2: a private
#: scheme designator starts with 99).
LOCAL_SCHEME = "99MEDIMG"
MANUFACTURER = "medimg"
MANUFACTURER_MODEL_NAME = "medimg-ingest"
SOFTWARE_VERSION = "1"
#: The SEG series sorts after the source's in series lists.
SERIES_NUMBER_OFFSET = 1000
_UID = re.compile(r"[0-9][0-9.]{0,63}")
#: What the de-identification marked on the source, which highdicom does not copy.
_DEID_MARKS = ("DeidentificationMethodCodeSequence", "LongitudinalTemporalInformationModified")
#: Where the SEG's content date and time come from, first found first.
_DATES = (
    ("ContentDate", "ContentTime"),
    ("SeriesDate", "SeriesTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("StudyDate", "StudyTime"),
)
#: What the stand-in of a multi-frame source leaves out: pixels highdicom does not need, and
#: the functional groups it restates.
_LEFT_OUT_OF_STAND_IN = frozenset(
    {
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "PerFrameFunctionalGroupsSequence",
        "SharedFunctionalGroupsSequence",
    }
)
_PATIENT = highdicom.CoordinateSystemNames.PATIENT
#: highdicom warns when a Patient's Name has one component, as pseudonyms do; the warning
#: quotes the name, and under warnings-as-errors it would fail the build.
_PERSON_NAME_WARNING = r"The string .* is unlikely to represent the intended person name"


@dataclass(frozen=True)
class SegmentationSpec:
    """What a caller asks to store: a label map of `shape` (slices, rows, columns) on the
    volume grid of series `series_uid` (slices in the order GetSeriesPixels serves them),
    labels of `dtype`, label k (from 1) being segment `segment_labels[k - 1]`."""

    study_uid: str
    series_uid: str
    shape: tuple[int, int, int]
    dtype: numpy.dtype[Any]
    segment_labels: tuple[str, ...]
    algorithm_name: str
    algorithm_version: str

    @property
    def series_name(self) -> str:
        return f"studies/{self.study_uid}/series/{self.series_uid}"

    @property
    def size_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2] * self.dtype.itemsize


def check_spec(
    *,
    source_series: str,
    shape: Sequence[int],
    voxel_type: str | None,
    segment_labels: Sequence[str],
    algorithm_name: str,
    algorithm_version: str,
    max_bytes: int,
) -> SegmentationSpec:
    """The request as a spec, or INVALID_ARGUMENT saying what is wrong with it. `voxel_type`
    is a key of VOXEL_TYPES (None: not given)."""
    parts = source_series.split("/")
    if (
        len(parts) != 4
        or parts[0] != "studies"
        or parts[2] != "series"
        or not all(_UID.fullmatch(uid) for uid in parts[1::2])
    ):
        raise InvalidArgument(
            "INVALID_NAME", "source_series must look like studies/{study}/series/{series}"
        )
    if len(shape) != 3 or any(size < 1 for size in shape):
        raise InvalidArgument(
            "INVALID_SHAPE",
            f"shape must be 3 positive sizes (slices, rows, columns), not {list(shape)[:8]}",
        )
    if voxel_type not in VOXEL_TYPES:
        raise InvalidArgument("INVALID_VOXEL_TYPE", "voxel_type must be UINT8 or UINT16")
    dtype = VOXEL_TYPES[voxel_type]
    if not segment_labels:
        raise InvalidArgument(
            "SEGMENT_LABELS_REQUIRED",
            "name at least one segment: segment_labels[k - 1] names label k; 0 is background",
        )
    if len(segment_labels) > numpy.iinfo(dtype).max:
        raise InvalidArgument(
            "TOO_MANY_SEGMENTS",
            f"{len(segment_labels)} segments do not fit labels of {voxel_type}",
        )
    for index, label in enumerate(segment_labels):
        _check_text(label, "segment_labels", "INVALID_SEGMENT_LABEL", index=index)
    _check_text(algorithm_name, "algorithm_name", "INVALID_ALGORITHM")
    _check_text(algorithm_version, "algorithm_version", "INVALID_ALGORITHM")
    spec = SegmentationSpec(
        study_uid=parts[1],
        series_uid=parts[3],
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        dtype=dtype,
        segment_labels=tuple(segment_labels),
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
    )
    if spec.size_bytes > max_bytes:
        raise InvalidArgument(
            "LABEL_MAP_TOO_LARGE",
            f"the label map holds {spec.size_bytes} bytes; this service takes {max_bytes}",
            limit=max_bytes,
        )
    return spec


def _check_text(text: str, field: str, reason: str, **where: int) -> None:
    position = f"[{where['index']}]" if where else ""
    if not text.strip() or len(text) > MAX_TEXT or "\\" in text or not text.isprintable():
        raise InvalidArgument(
            reason,
            f"{field}{position} must be 1 to {MAX_TEXT} printable characters, without a backslash",
            field=field,
            **where,
        )


def label_map(spec: SegmentationSpec, data: bytes) -> LabelMap:
    """The label map in `data`; INVALID_ARGUMENT LABEL_MAP_SIZE_MISMATCH unless it holds
    exactly what the spec says, LABEL_OUT_OF_RANGE for a label no segment is named for."""
    if len(data) != spec.size_bytes:
        raise InvalidArgument(
            "LABEL_MAP_SIZE_MISMATCH",
            f"the label map holds {len(data)} bytes; shape {list(spec.shape)} of "
            f"{spec.dtype.name} needs {spec.size_bytes}",
        )
    labels: LabelMap = numpy.frombuffer(data, dtype=spec.dtype).reshape(spec.shape)
    highest = int(labels.max())
    if highest > len(spec.segment_labels):
        raise InvalidArgument(
            "LABEL_OUT_OF_RANGE",
            f"the label map holds label {highest}, but only {len(spec.segment_labels)} "
            "segment(s) are named",
            label=highest,
        )
    return labels


@dataclass(frozen=True)
class BuiltSegmentation:
    """A SEG as Part 10 bytes, with the UIDs it was given."""

    data: bytes
    series_uid: str
    sop_instance_uid: str


def build(
    spec: SegmentationSpec, labels: LabelMap, sources: Sequence[pydicom.Dataset]
) -> BuiltSegmentation:
    """The SEG of `labels` over the stored instances of the spec's series (`sources`, in any
    order): BINARY, AUTOMATIC segments by the spec's algorithm, in spatial order along the
    slice normal (highdicom's: from the last slice of the label map to the first).

    Single-frame sources: one frame per source instance and segment that has any of it,
    each referencing its source instance. Multi-frame sources (one, or a stack split over
    several): one frame per source frame and segment, empty ones included (a SEG names no
    count of source frames, so only a frame for each lets a reader rebuild the source's
    grid, see volumes.label_volume), each referencing its source instance and frame
    (Referenced Frame Number); label map slice k goes to the source frame that slice k of
    the series' volume came from.

    Refused: a label map whose shape is not the series' volume grid (INVALID_ARGUMENT
    LABEL_MAP_SHAPE_MISMATCH), and series whose frames are not each placed in the patient
    (FAILED_PRECONDITION SEGMENTATION_SOURCE_UNSUPPORTED)."""
    # The grid inference segmented: the volume GetSeriesPixels serves, slice by slice.
    volume = volumes.series_volume(sources)
    grid = tuple(volume.array.shape[:3])
    if labels.shape != grid:
        raise InvalidArgument(
            "LABEL_MAP_SHAPE_MISMATCH",
            f"the label map is {list(labels.shape)}; the volume of {spec.series_name} is "
            f"{list(grid)} (slices, rows, columns)",
        )
    positions = _placed(sources, volume)
    multi_frame = any(_multi_frame(source) for source in sources)
    by_uid = {str(source.SOPInstanceUID): source for source in sources}
    ordered = [by_uid[uid] for uid in dict.fromkeys(volume.sop_instance_uids)]
    # highdicom segments the frames of one multi-frame image, its geometry read from the
    # functional groups: for multi-frame sources, a stand-in whose frame k is slice k of the
    # volume, as the volume was built; its references then go to the real frames (_refer).
    images = [_geometry_stand_in(ordered[0], positions, volume)] if multi_frame else ordered
    content = hashlib.sha256(labels.astype("<u2").tobytes())
    content.update("\\".join(spec.segment_labels).encode())
    series_uid = _uid(spec.series_uid, spec.algorithm_name, spec.algorithm_version)
    sop_instance_uid = _uid(series_uid, str(spec.shape), content.hexdigest())
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name=spec.algorithm_name,
        version=spec.algorithm_version,
        family=codes.cid7162.ArtificialIntelligence,
    )
    segments = [
        highdicom.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.Tissue,
            # The model names its labels without a code: a code of our own scheme.
            segmented_property_type=highdicom.sr.CodedConcept(label, LOCAL_SCHEME, label),
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, label in enumerate(spec.segment_labels, start=1)
    ]
    description = f"{spec.algorithm_name} {spec.algorithm_version}"[:MAX_TEXT]
    source_number = _integer(ordered[0], "SeriesNumber")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _PERSON_NAME_WARNING, UserWarning)
        segmentation = highdicom.seg.Segmentation(
            source_images=images,
            # The other instances of a split stack, referenced beside the stand-in's first.
            further_source_images=ordered[1:] if multi_frame else None,
            pixel_array=labels,
            omit_empty_frames=not multi_frame,
            segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=series_uid,
            series_number=source_number + SERIES_NUMBER_OFFSET,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER_MODEL_NAME,
            software_versions=SOFTWARE_VERSION,
            device_serial_number=MANUFACTURER_MODEL_NAME,
            content_label="SEGMENTATION",
            content_description=description,
            series_description=description,
        )
    if multi_frame:
        _refer(segmentation, ordered, volume)
    _settle(segmentation, ordered[0], sop_instance_uid)
    out = BytesIO()
    segmentation.save_as(out, enforce_file_format=True)
    return BuiltSegmentation(out.getvalue(), series_uid, sop_instance_uid)


def _placed(sources: Sequence[pydicom.Dataset], volume: volumes.Volume) -> list[volumes.Vector]:
    """The position of each slice of the sources' volume; SEGMENTATION_SOURCE_UNSUPPORTED
    unless highdicom can place every frame of them."""
    positions = volume.positions
    if positions is None or any("FrameOfReferenceUID" not in s for s in sources):
        raise _unsupported(
            "its frames have no position in the patient (a Frame of Reference UID, and an "
            "Image Position and Orientation (Patient) for every frame, in the functional "
            "groups of a multi-frame image)"
        )
    if volumes.frame_macro(sources[0], 0, "PixelMeasuresSequence").get("PixelSpacing") is None:
        raise _unsupported("its images have no Pixel Spacing")
    return positions


def _unsupported(why: str) -> FailedPrecondition:
    return FailedPrecondition(
        "SEGMENTATION_SOURCE_UNSUPPORTED",
        f"no DICOM SEG can be built on this series: {why}; a SEG needs images whose every "
        "frame is placed in the patient",
    )


def _multi_frame(source: pydicom.Dataset) -> bool:
    """Whether highdicom reads `source` as a multi-frame image: its IOD has frames (then it
    has Number of Frames), even when this instance holds one."""
    return "NumberOfFrames" in source


def _geometry_stand_in(
    source: pydicom.Dataset, positions: Sequence[volumes.Vector], volume: volumes.Volume
) -> pydicom.Dataset:
    """`source` without its pixels, its geometry as functional groups the way highdicom
    reads it (orientation and pixel measures shared, a position per frame: `positions` in
    frame order), with the values the volume was built from: an enhanced image's as they
    are, moved to the shared group where they were per frame, and stated for an image
    without functional groups (RT Dose)."""
    stand_in = pydicom.Dataset()
    for element in source:
        if element.keyword not in _LEFT_OUT_OF_STAND_IN:
            stand_in.add(element)
    # A new element: the stand-in shares the source's, which must not change.
    stand_in.add(pydicom.DataElement("NumberOfFrames", "IS", len(positions)))
    stand_in.PerFrameFunctionalGroupsSequence = [
        _item(PlanePositionSequence=highdicom.PlanePositionSequence(_PATIENT, position))
        for position in positions
    ]
    measures = volumes.frame_macro(source, 0, "PixelMeasuresSequence")
    stand_in.SharedFunctionalGroupsSequence = [
        _item(
            PlaneOrientationSequence=highdicom.PlaneOrientationSequence(
                _PATIENT,
                volumes.frame_macro(source, 0, "PlaneOrientationSequence").ImageOrientationPatient,
            ),
            PixelMeasuresSequence=highdicom.PixelMeasuresSequence(
                measures.PixelSpacing,
                # A SEG reader needs a thickness (highdicom does); RT Dose has none: its grid's.
                measures.get("SliceThickness") or source.get("SliceThickness") or volume.spacing[0],
                measures.get("SpacingBetweenSlices") or source.get("SpacingBetweenSlices"),
            ),
        )
    ]
    return stand_in


def _refer(
    segmentation: pydicom.Dataset, sources: Sequence[pydicom.Dataset], volume: volumes.Volume
) -> None:
    """Points each frame of a SEG built on the stand-in (whose frame k is the volume's slice
    k) at the source instance and frame that slice came from."""
    classes = {str(source.SOPInstanceUID): source.SOPClassUID for source in sources}
    references = [
        reference
        for group in segmentation.PerFrameFunctionalGroupsSequence
        for derivation in group.DerivationImageSequence
        for reference in derivation.SourceImageSequence
    ]
    # All read before any is written: highdicom may share one item between the frames of
    # several segments.
    slices = [int(reference.ReferencedFrameNumber) - 1 for reference in references]
    for reference, k in zip(references, slices, strict=True):
        uid = volume.sop_instance_uids[k]
        reference.ReferencedSOPClassUID = classes[uid]
        reference.ReferencedSOPInstanceUID = uid
        reference.ReferencedFrameNumber = volume.frame_numbers[k]


def _item(**sequences: pydicom.Sequence) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for keyword, sequence in sequences.items():
        setattr(item, keyword, sequence)
    return item


def _uid(*parts: str) -> str:
    """A UID that only these parts give (their hash under pydicom's UID root)."""
    return str(generate_uid(entropy_srcs=list(parts)))


def _integer(dataset: pydicom.Dataset, keyword: str) -> int:
    try:
        return max(int(str(dataset.get(keyword, 0) or 0)), 0)
    except ValueError:
        return 0


def _settle(segmentation: pydicom.Dataset, source: pydicom.Dataset, sop_uid: str) -> None:
    """Makes what highdicom stamps with the time of day or at random follow from the source
    and the content, and carries the source's de-identification marks over."""
    for date_keyword, time_keyword in _DATES:
        if source.get(date_keyword):
            date, time = str(source.get(date_keyword)), str(source.get(time_keyword) or "")
            break
    else:  # the policy kept no date: the dummy the de-identification writes for one
        date, time = values.dummy("DA"), values.dummy("TM")
    segmentation.ContentDate, segmentation.ContentTime = date, time or values.dummy("TM")
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        if keyword in segmentation:
            delattr(segmentation, keyword)
    for item in segmentation.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    dimensions = _uid(sop_uid, "dimension organization")
    for item in (
        *(segmentation.get("DimensionOrganizationSequence") or []),
        *(segmentation.get("DimensionIndexSequence") or []),
    ):
        item.DimensionOrganizationUID = dimensions
    for keyword in _DEID_MARKS:
        if keyword in source and keyword not in segmentation:
            segmentation[keyword] = source[keyword]
