"""Segmentations stored back as DICOM SEG: the builder on a real, de-identified CT series
(highdicom output read back with highdicom and pydicom), and StoreSegmentation through the
service as its app builds it (real PostgreSQL, Redis and object store)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import grpc
import highdicom
import numpy
import numpy.typing
import pydicom
import pydicom.data
import pytest
import redis.asyncio as aioredis

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.ingest.v1 import ingest_service_pb2 as pb
from medimg_core import redis as medimg_redis
from medimg_core.errors import FailedPrecondition, InvalidArgument
from medimg_ingest import deid, segmentations
from medimg_ingest.pipeline import INSTANCE_STORED_STREAM
from medimg_ingest.volumes import series_volume
from services.ingest.tests.support import DEID_KEY, POLICY, dicom_file
from services.ingest.tests.test_ingest_servicer import (
    CLINICIAN,
    Ingest,
    reason,
    running_ingest,
    upload,
    user,
    workload,
)

#: A real CT series of five 16 x 16 slices, 2.5 mm apart (in pydicom's test files).
CT_SERIES = Path(pydicom.data.__file__).parent / "test_files/dicomdirtests/98892001/CT5N"
LABELS = ("lung", "soft tissue")
INFERENCE = workload("inference")


def ct_files() -> list[bytes]:
    return [path.read_bytes() for path in sorted(CT_SERIES.iterdir())]


def tissue_classes(
    volume: numpy.typing.NDArray[numpy.float32],
) -> numpy.typing.NDArray[numpy.uint8]:
    """A label map a model might give: 0 air (up to -500 HU), 1 lung (to 0), 2 denser."""
    return numpy.select([volume <= -500, volume <= 0], [0, 1], 2).astype(numpy.uint8)


class Deidentified:
    """The CT series as ingest stores it (de-identified under the tests' key), shuffled."""

    def __init__(self) -> None:
        self.originals = [pydicom.dcmread(BytesIO(data)) for data in ct_files()]
        self.sources = [
            deid.deidentify(original, POLICY, DEID_KEY).dataset for original in self.originals
        ][::-1]
        self.volume = series_volume(self.sources)
        self.labels = tissue_classes(self.volume.array)
        first = self.sources[0]
        self.name = f"studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"

    def spec(self, **changes: object) -> segmentations.SegmentationSpec:
        arguments: dict[str, object] = {
            "source_series": self.name,
            "shape": self.labels.shape,
            "voxel_type": "uint8",
            "segment_labels": LABELS,
            "algorithm_name": "tissue",
            "algorithm_version": "3",
            "max_bytes": 1 << 20,
            **changes,
        }
        return segmentations.check_spec(**arguments)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ct() -> Deidentified:
    return Deidentified()


@pytest.fixture(scope="module")
def built(ct: Deidentified) -> segmentations.BuiltSegmentation:
    return segmentations.build(ct.spec(), ct.labels, ct.sources)


def test_the_seg_holds_the_label_map_exactly_on_the_source_instances(
    ct: Deidentified, built: segmentations.BuiltSegmentation
) -> None:
    seg = highdicom.seg.segread(BytesIO(built.data))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert (seg.SOPInstanceUID, seg.SeriesInstanceUID) == (
        built.sop_instance_uid,
        built.series_uid,
    )
    assert ct.labels.max() == 2 and ct.labels.min() == 0  # every segment and background
    back = seg.get_pixels_by_source_instance(ct.volume.sop_instance_uids, combine_segments=True)
    assert back.shape == ct.labels.shape
    assert numpy.array_equal(back, ct.labels)

    # It references the stored (pseudonymous) source instances, frames in slice order.
    source = ct.sources[0]
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    [referenced] = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        str(s.SOPInstanceUID) for s in ct.sources
    }
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    for number in (1, 2):
        frames = [
            group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for group in seg.PerFrameFunctionalGroupsSequence
            if group.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number
        ]
        slices = [ct.volume.sop_instance_uids.index(uid) for uid in frames]
        # One frame per slice with any of the segment, in spatial order (highdicom's: from
        # the last slice along the normal).
        assert slices and slices == sorted(set(slices), reverse=True)


def test_the_segments_are_automatic_and_name_the_algorithm(
    built: segmentations.BuiltSegmentation,
) -> None:
    seg = highdicom.seg.segread(BytesIO(built.data))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(LABELS)
    types = [seg.get_segment_description(n).segmented_property_type for n in (1, 2)]
    assert [(t.value, t.scheme_designator) for t in types] == [(n, "99MEDIMG") for n in LABELS]
    for description in seg.SegmentSequence:
        assert description.SegmentAlgorithmType == "AUTOMATIC"
        [algorithm] = description.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("tissue", "3")
    assert seg.SeriesDescription == "tissue 3"


def test_the_seg_carries_nothing_the_stored_sources_do_not(
    ct: Deidentified, built: segmentations.BuiltSegmentation
) -> None:
    seg = pydicom.dcmread(BytesIO(built.data))
    source = ct.sources[0]
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "ReferringPhysicianName",
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "LongitudinalTemporalInformationModified",
    ):
        assert seg.get(keyword) == source.get(keyword), keyword
    assert str(seg.PatientID).startswith("ANON-")
    # Its dates are the source's (shifted): a date of today would reveal the shift.
    assert (seg.ContentDate, seg.ContentTime) == (source.ContentDate, source.ContentTime)
    assert "InstanceCreationDate" not in seg
    # No identifying value of the original files is anywhere in the bytes.
    original = ct.originals[0]
    identifying = [
        str(original.PatientID),
        str(original.PatientName),
        str(original.StudyInstanceUID),
        str(original.SeriesInstanceUID),
        str(original.FrameOfReferenceUID),
        *(str(o.SOPInstanceUID) for o in ct.originals),
        *(str(original.get(k)) for k in ("StudyDate", "InstitutionName") if original.get(k)),
    ]
    for value in identifying:
        assert value and value.encode() not in built.data, value


def test_the_same_segmentation_gives_the_same_bytes(
    ct: Deidentified, built: segmentations.BuiltSegmentation
) -> None:
    again = segmentations.build(ct.spec(), ct.labels.copy(), list(reversed(ct.sources)))
    assert again.data == built.data
    # Another label map by the same model version: another instance of the same series.
    other = ct.labels.copy()
    other[0, 0, 0] = (other[0, 0, 0] + 1) % 3
    changed = segmentations.build(ct.spec(), other, ct.sources)
    assert changed.series_uid == built.series_uid
    assert changed.sop_instance_uid != built.sop_instance_uid
    # Another version: a series of its own.
    assert segmentations.build(
        ct.spec(algorithm_version="4"), ct.labels, ct.sources
    ).series_uid != (built.series_uid)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"source_series": "studies/1.2/instances/3.4"}, "INVALID_NAME"),
        ({"source_series": "studies/1.2/series/x"}, "INVALID_NAME"),
        ({"shape": (5, 16)}, "INVALID_SHAPE"),
        ({"shape": (0, 16, 16)}, "INVALID_SHAPE"),
        ({"voxel_type": None}, "INVALID_VOXEL_TYPE"),
        ({"segment_labels": ()}, "SEGMENT_LABELS_REQUIRED"),
        ({"segment_labels": ("lung", "")}, "INVALID_SEGMENT_LABEL"),
        ({"segment_labels": ("a\\b",)}, "INVALID_SEGMENT_LABEL"),
        ({"segment_labels": ("x" * 65,)}, "INVALID_SEGMENT_LABEL"),
        ({"segment_labels": ("s",) * 256}, "TOO_MANY_SEGMENTS"),
        ({"algorithm_name": ""}, "INVALID_ALGORITHM"),
        ({"algorithm_version": "v" * 65}, "INVALID_ALGORITHM"),
        ({"max_bytes": 5 * 16 * 16 - 1}, "LABEL_MAP_TOO_LARGE"),
    ],
)
def test_a_bad_request_is_refused_with_its_reason(
    ct: Deidentified, changes: dict[str, object], expected: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ct.spec(**changes)
    assert caught.value.reason == expected


def test_a_label_map_that_does_not_fit_is_refused(ct: Deidentified) -> None:
    spec = ct.spec()
    with pytest.raises(InvalidArgument) as caught:
        segmentations.label_map(spec, ct.labels.tobytes()[:-1])
    assert caught.value.reason == "LABEL_MAP_SIZE_MISMATCH"
    with pytest.raises(InvalidArgument) as caught:
        segmentations.label_map(spec, (ct.labels + 1).tobytes())
    assert (caught.value.reason, caught.value.metadata) == ("LABEL_OUT_OF_RANGE", {"label": "3"})
    wide = ct.spec(voxel_type="uint16")
    assert numpy.array_equal(
        segmentations.label_map(wide, ct.labels.astype("<u2").tobytes()), ct.labels
    )
    # A grid other than the series' (a slice short).
    short = ct.spec(shape=(4, 16, 16))
    with pytest.raises(InvalidArgument) as caught:
        segmentations.build(short, ct.labels[:4], ct.sources)
    assert caught.value.reason == "LABEL_MAP_SHAPE_MISMATCH"
    assert "[5, 16, 16]" in caught.value.message


def test_a_series_without_patient_geometry_cannot_have_a_seg() -> None:
    # A real enhanced MR of 10 frames without functional groups: no frame has a position.
    mr = deid.deidentify(
        pydicom.dcmread(BytesIO(dicom_file("emri_small.dcm"))), POLICY, DEID_KEY
    ).dataset
    spec = segmentations.check_spec(
        source_series=f"studies/{mr.StudyInstanceUID}/series/{mr.SeriesInstanceUID}",
        shape=(10, 64, 64),
        voxel_type="uint8",
        segment_labels=["x"],
        algorithm_name="m",
        algorithm_version="1",
        max_bytes=1 << 20,
    )
    with pytest.raises(FailedPrecondition) as caught:
        segmentations.build(spec, numpy.zeros((10, 64, 64), numpy.uint8), [mr])
    assert caught.value.reason == "SEGMENTATION_SOURCE_UNSUPPORTED"
    assert "frames have no position in the patient" in caught.value.message


# Multi-frame sources -----------------------------------------------------------------------

#: The slice (along the normal) that each frame of the multi-frame CT holds, frame by frame:
#: not the spatial order, so that only the frames' positions tell where each slice goes.
FRAME_ORDER = (2, 4, 0, 3, 1)


def stored(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """`dataset` as ingest stores it: written, read back and de-identified."""
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return deid.deidentify(pydicom.dcmread(BytesIO(out.getvalue())), POLICY, DEID_KEY).dataset


def legacy_enhanced_ct(
    slices: Sequence[pydicom.Dataset], *, per_frame_geometry: bool = False
) -> pydicom.Dataset:
    """Real CT slices as one Legacy Converted Enhanced CT image (highdicom's converter: their
    pixels as frames, each frame's position in its Per-Frame Functional Groups). With
    `per_frame_geometry`, orientation and pixel measures sit in every frame's group instead
    of the shared one, as the standard allows."""
    image = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        slices,
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=7,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    if per_frame_geometry:
        shared = image.SharedFunctionalGroupsSequence[0]
        for group in image.PerFrameFunctionalGroupsSequence:
            group.PlaneOrientationSequence = deepcopy(shared.PlaneOrientationSequence)
            group.PixelMeasuresSequence = deepcopy(shared.PixelMeasuresSequence)
        del shared.PlaneOrientationSequence, shared.PixelMeasuresSequence
    return image


def multi_frame_ct(per_frame_geometry: bool = False) -> pydicom.Dataset:
    """The multi-frame CT (see multi_frame_ct_file) as stored."""
    return stored(multi_frame_ct_file(per_frame_geometry))


def multi_frame_ct_file(per_frame_geometry: bool = False) -> pydicom.Dataset:
    """The CT series as one multi-frame image (see legacy_enhanced_ct) whose frames are then
    stored in FRAME_ORDER (frame j holds slice FRAME_ORDER[j])."""
    slices = [pydicom.dcmread(BytesIO(data)) for data in ct_files()]
    image = legacy_enhanced_ct(slices, per_frame_geometry=per_frame_geometry)
    groups = list(image.PerFrameFunctionalGroupsSequence)
    # Axial slices: the normal is +z, so a frame's slice is the rank of its height.
    heights = [float(g.PlanePositionSequence[0].ImagePositionPatient[2]) for g in groups]
    by_height = [int(k) for k in numpy.argsort(heights)]
    frames = [by_height[position] for position in FRAME_ORDER]
    image.PerFrameFunctionalGroupsSequence = [groups[k] for k in frames]
    image.PixelData = image.pixel_array[frames].tobytes()
    return image


def enhanced_ct() -> pydicom.Dataset:
    """A real Enhanced CT of two 512 x 512 frames, stored against its slice normal (frame 1
    is the second slice of the volume), as stored."""
    return stored(pydicom.dcmread(BytesIO(dicom_file("eCT_Supplemental.dcm"))))


def spec_of(
    source: pydicom.Dataset, labels: segmentations.LabelMap
) -> segmentations.SegmentationSpec:
    return segmentations.check_spec(
        source_series=f"studies/{source.StudyInstanceUID}/series/{source.SeriesInstanceUID}",
        shape=labels.shape,
        voxel_type="uint8",
        segment_labels=LABELS,
        algorithm_name="tissue",
        algorithm_version="3",
        max_bytes=1 << 22,
    )


def known_labels(shape: tuple[int, ...]) -> segmentations.LabelMap:
    """A cube of label 1 from slice 1 on, and a corner of label 2 on slice 0 alone."""
    labels = numpy.zeros(shape, numpy.uint8)
    labels[1:, 4:12, 5:13] = 1
    labels[0, :3, :3] = 2
    return labels


def rt_dose() -> pydicom.Dataset:
    """A real RT Dose of fifteen 10 x 10 frames: no functional groups, its frames placed by
    GridFrameOffsetVector, no Slice Thickness; as stored."""
    return stored(pydicom.dcmread(BytesIO(dicom_file("rtdose.dcm"))))


def _split_in_two_multi_frame_instances(*, placed: bool = True) -> list[pydicom.Dataset]:
    """The CT series as two multi-frame images of one series (slices 3 to 5, then 1 and 2:
    stored out of order), each frame placed by its Plane Position unless `placed` is False."""
    slices = [pydicom.dcmread(BytesIO(data)) for data in ct_files()]
    images = [legacy_enhanced_ct(slices[2:]), legacy_enhanced_ct(slices[:2])]
    images[1].SeriesInstanceUID = images[0].SeriesInstanceUID
    images[1].InstanceNumber = 2
    if not placed:
        del images[1].PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    return [stored(image) for image in images]


def _two_single_frame_enhanced_images() -> list[pydicom.Dataset]:
    slices = [pydicom.dcmread(BytesIO(data)) for data in ct_files()[:2]]
    images = [legacy_enhanced_ct([s]) for s in slices]
    images[1].SeriesInstanceUID = images[0].SeriesInstanceUID
    return [stored(image) for image in images]


@pytest.mark.parametrize(
    ("make", "frames"),
    [
        (lambda: [multi_frame_ct()], [FRAME_ORDER.index(k) + 1 for k in range(len(FRAME_ORDER))]),
        (
            lambda: [multi_frame_ct(per_frame_geometry=True)],
            [FRAME_ORDER.index(k) + 1 for k in range(len(FRAME_ORDER))],
        ),
        (lambda: [enhanced_ct()], [2, 1]),
        (lambda: [rt_dose()], list(range(1, 16))),
        # A stack split over instances: along the slice normal, the first instance's frames
        # 3 to 1, then the second's 2 and 1.
        (_split_in_two_multi_frame_instances, [3, 2, 1, 2, 1]),
        (_two_single_frame_enhanced_images, [1, 1]),
    ],
    ids=[
        "shared-geometry",
        "per-frame-geometry",
        "enhanced-ct",
        "rt-dose",
        "split-over-two-instances",
        "two-single-frame-enhanced-images",
    ],
)
def test_a_seg_on_multi_frame_images_puts_each_slice_on_its_source_frame(
    make: Callable[[], list[pydicom.Dataset]], frames: list[int]
) -> None:
    sources = make()
    volume = series_volume(sources)
    assert volume.frame_numbers == frames  # volume slice k holds frame frames[k]
    assert volume.positions is not None
    labels = known_labels(volume.array.shape)

    built = segmentations.build(spec_of(sources[0], labels), labels, sources)

    seg = highdicom.seg.segread(BytesIO(built.data))
    [series] = seg.ReferencedSeriesSequence
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence} == {
        str(source.SOPInstanceUID) for source in sources
    }
    # A frame for every source frame and segment (empty ones too), each derived from its
    # source instance and frame and lying where that frame lies.
    slices = list(zip(volume.sop_instance_uids, volume.frame_numbers, strict=True))
    where = dict(zip(slices, volume.positions, strict=True))
    classes = {str(source.SOPInstanceUID): source.SOPClassUID for source in sources}
    framed = set()
    for group in seg.PerFrameFunctionalGroupsSequence:
        [derivation] = group.DerivationImageSequence
        [reference] = derivation.SourceImageSequence
        source_frame = (
            str(reference.ReferencedSOPInstanceUID),
            int(reference.ReferencedFrameNumber),
        )
        assert reference.ReferencedSOPClassUID == classes[source_frame[0]]
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx(where[source_frame])
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        framed.add((segment, *source_frame))
    assert framed == {(segment, *source_frame) for segment in (1, 2) for source_frame in where}
    # Source frame by source frame, the SEG holds the slice of the label map it became.
    for k, (uid, frame) in enumerate(slices):
        back = seg.get_pixels_by_source_frame(uid, [frame], combine_segments=True)
        numpy.testing.assert_array_equal(back[0], labels[k])
    # Served back, it is the label map voxel for voxel, on the volume's grid.
    served = series_volume([pydicom.dcmread(BytesIO(built.data))])
    numpy.testing.assert_array_equal(served.array, labels.astype(numpy.float32))
    assert (served.sop_instance_uids, served.frame_numbers) == (
        volume.sop_instance_uids,
        volume.frame_numbers,
    )
    assert served.positions is not None
    numpy.testing.assert_allclose(served.positions, volume.positions)
    assert served.spacing == pytest.approx(volume.spacing)
    assert served.origin == pytest.approx(volume.origin)
    assert served.direction == pytest.approx(volume.direction)
    # Built again, from the sources in another order, it is the same SEG.
    again = segmentations.build(spec_of(sources[0], labels), labels.copy(), sources[::-1])
    assert again == built


def test_a_seg_on_several_multi_frame_images_needs_every_frame_placed_to_be_read() -> None:
    sources = _split_in_two_multi_frame_instances()
    labels = known_labels(series_volume(sources).array.shape)
    built = segmentations.build(spec_of(sources[0], labels), labels, sources)
    seg = pydicom.dcmread(BytesIO(built.data))
    # No frame placed: the SEG's frames indexed by segment alone, as the standard allows.
    for group in seg.PerFrameFunctionalGroupsSequence:
        del group.PlanePositionSequence
        content = group.FrameContentSequence[0]
        content.DimensionIndexValues = content.DimensionIndexValues[:1]
    seg.DimensionIndexSequence = seg.DimensionIndexSequence[:1]

    with pytest.raises(InvalidArgument) as caught:
        series_volume([seg])

    assert caught.value.reason == "INVALID_SEGMENTATION"
    assert "only their positions put in order" in caught.value.message


def _a_frame_without_a_position() -> list[pydicom.Dataset]:
    """The CT series as one multi-frame image whose fourth frame has no Plane Position."""
    slices = [pydicom.dcmread(BytesIO(data)) for data in ct_files()]
    image = legacy_enhanced_ct(slices)
    del image.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    return [stored(image)]


@pytest.mark.parametrize(
    ("make", "why"),
    [(_a_frame_without_a_position, "frames have no position in the patient")],
    ids=["a-frame-without-position"],
)
def test_a_multi_frame_source_that_cannot_be_placed_is_refused_saying_why(
    make: Callable[[], list[pydicom.Dataset]], why: str
) -> None:
    sources = make()
    volume = series_volume(sources)
    labels = numpy.ones(volume.array.shape, numpy.uint8)
    with pytest.raises(FailedPrecondition) as caught:
        segmentations.build(spec_of(sources[0], labels), labels, sources)
    assert caught.value.reason == "SEGMENTATION_SOURCE_UNSUPPORTED"
    assert why in caught.value.message


def test_frames_of_several_multi_frame_instances_make_one_volume_in_patient_order() -> None:
    parts = _split_in_two_multi_frame_instances()
    single_frames = series_volume([pydicom.dcmread(BytesIO(data)) for data in ct_files()])

    volume = series_volume(parts)

    numpy.testing.assert_array_equal(volume.array, single_frames.array)
    assert volume.spacing == pytest.approx(single_frames.spacing)
    assert volume.origin == pytest.approx(single_frames.origin)
    assert volume.direction == pytest.approx(single_frames.direction)
    # Each slice names the instance and frame it came from: every frame once.
    uids = [str(part.SOPInstanceUID) for part in parts]
    assert sorted(zip(volume.sop_instance_uids, volume.frame_numbers, strict=True)) == sorted(
        [(uids[0], n) for n in (1, 2, 3)] + [(uids[1], n) for n in (1, 2)]
    )
    for uid, frame, position in zip(
        volume.sop_instance_uids, volume.frame_numbers, volume.positions or [], strict=True
    ):
        part = parts[uids.index(uid)]
        group = part.PerFrameFunctionalGroupsSequence[frame - 1]
        stored_at = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx(stored_at)


def test_frames_of_several_multi_frame_instances_not_all_placed_are_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        series_volume(_split_in_two_multi_frame_instances(placed=False))
    assert caught.value.reason == "INCONSISTENT_SERIES"
    assert "only when every frame is placed in the patient" in caught.value.message


# Through the service ----------------------------------------------------------------------


@pytest.fixture
def events_url(redis_url: str) -> str:
    """A Redis database of these tests' own, for the service's events."""
    return redis_url.rsplit("/", 1)[0] + "/5"


@pytest.fixture
async def events(events_url: str) -> AsyncIterator[aioredis.Redis]:
    client = medimg_redis.connect(events_url)
    await client.flushdb()  # before the service starts: no event of an earlier test
    yield client
    await client.aclose()


@pytest.fixture
async def ingest(
    database_url: str, events_url: str, events: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[Ingest]:
    async with running_ingest(database_url, events_url, tmp_path) as running:
        yield running


def store_requests(
    name: str,
    labels: segmentations.LabelMap,
    segment_labels: Sequence[str] = LABELS,
    chunk: int = 300,
) -> Iterator[pb.StoreSegmentationRequest]:
    header = pb.SegmentationHeader(
        source_series=name,
        shape=list(labels.shape),
        voxel_type=pb.SegmentationHeader.VOXEL_TYPE_UINT8,
        segment_labels=list(segment_labels),
        algorithm_name="tissue",
        algorithm_version="3",
    )
    yield pb.StoreSegmentationRequest(header=header)
    data = labels.astype("<u1").tobytes()
    for start in range(0, len(data), chunk):
        yield pb.StoreSegmentationRequest(data=data[start : start + chunk])


async def _stored_series(ingest: Ingest) -> tuple[str, str]:
    """Uploads the CT series in fresh UIDs; its name and patient pseudonym."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = []
    for data in ct_files():
        dataset = pydicom.dcmread(BytesIO(data))
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        out = BytesIO()
        dataset.save_as(out, enforce_file_format=True)
        files.append(out.getvalue())
    response = await ingest.stub.UploadInstances(upload(*files), metadata=CLINICIAN, timeout=10)
    assert {r.outcome for r in response.results} == {pb.InstanceResult.OUTCOME_STORED}
    first = response.results[0]
    return first.instance.rsplit("/instances/", 1)[0], first.patient_pseudonym


def _objects(ingest: Ingest) -> set[Path]:
    return {p for p in ingest.objects.rglob("*") if p.is_file()}


async def test_inference_stores_a_seg_once_and_it_is_audited(
    ingest: Ingest, ct: Deidentified, events: aioredis.Redis
) -> None:
    name, pseudonym = await _stored_series(ingest)
    before = _objects(ingest)
    ingest.audit.events.clear()

    stored = await ingest.stub.StoreSegmentation(
        store_requests(name, ct.labels), metadata=INFERENCE, timeout=20
    )

    assert stored.outcome == pb.InstanceResult.OUTCOME_STORED
    study = name.split("/")[1]
    assert stored.instance.startswith(f"studies/{study}/series/")
    [new] = _objects(ingest) - before
    seg = pydicom.dcmread(new)
    assert f"studies/{study}/series/{seg.SeriesInstanceUID}/instances/{seg.SOPInstanceUID}" == (
        stored.instance
    )
    assert seg.PatientID == pseudonym
    # The stored volume's slices are the series' as GetSeriesPixels serves them.
    pixels = [
        m
        async for m in ingest.stub.GetSeriesPixels(
            pb.GetSeriesPixelsRequest(name=name), metadata=workload("inference"), timeout=10
        )
    ]
    order = list(pixels[0].header.sop_instance_uids)
    back = highdicom.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        order, combine_segments=True
    )
    assert numpy.array_equal(back, ct.labels)
    read, created = ingest.audit.events[:2]
    assert (read.action, read.resource, read.outcome) == (
        audit_pb.ACTION_READ,
        name,
        audit_pb.OUTCOME_SUCCESS,
    )
    assert (created.action, created.resource, created.patient_pseudonym) == (
        audit_pb.ACTION_CREATE,
        stored.instance,
        pseudonym,
    )
    assert created.actor.workload.endswith("/sa/inference")
    assert created.method == "/medimg.ingest.v1.IngestService/StoreSegmentation"
    # Indexed in the source's study, and announced like every new instance.
    study_row = await ingest.stub.GetStudy(
        pb.GetStudyRequest(name=f"studies/{study}"), metadata=CLINICIAN, timeout=10
    )
    assert (study_row.series_count, study_row.instance_count) == (2, 6)
    assert sorted(study_row.modalities) == ["CT", "SEG"]
    announced = await events.xrange(INSTANCE_STORED_STREAM) or []
    assert [(fields or {}).get("instance") for _, fields in announced][-1] == stored.instance

    # A retry is the same SEG, not a second one.
    again = await ingest.stub.StoreSegmentation(
        store_requests(name, ct.labels, chunk=1 << 20), metadata=INFERENCE, timeout=20
    )
    assert (again.outcome, again.instance) == (pb.InstanceResult.OUTCOME_DUPLICATE, stored.instance)
    assert _objects(ingest) - before == {new}


async def test_an_unknown_series_is_not_found_after_permission(
    ingest: Ingest, ct: Deidentified
) -> None:
    missing = f"studies/1.2.3/series/{pydicom.uid.generate_uid()}"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.StoreSegmentation(
            store_requests(missing, ct.labels), metadata=INFERENCE, timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason(caught.value)[0] == "SERIES_NOT_FOUND"
    assert [(e.resource, e.outcome) for e in ingest.audit.events] == [
        (missing, audit_pb.OUTCOME_FAILURE)
    ]
    # A user (through the gateway) is refused before anything is looked up.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.StoreSegmentation(
            store_requests(missing, ct.labels), metadata=user("dr-who", "admin"), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(caught.value)[0] == "ROLE_NOT_ALLOWED"


async def test_a_seg_on_a_stored_multi_frame_image_serves_back_as_its_label_map(
    ingest: Ingest,
) -> None:
    image = multi_frame_ct_file()
    image.StudyInstanceUID, image.SeriesInstanceUID = (
        pydicom.uid.generate_uid(),
        pydicom.uid.generate_uid(),
    )
    out = BytesIO()
    image.save_as(out, enforce_file_format=True)
    response = await ingest.stub.UploadInstances(
        upload(out.getvalue()), metadata=CLINICIAN, timeout=10
    )
    [result] = response.results
    assert result.outcome == pb.InstanceResult.OUTCOME_STORED, result.message
    name = result.instance.rsplit("/instances/", 1)[0]
    # The volume inference gets, and a label map on it (slices along the normal).
    source = await _series_pixels(ingest, name)
    assert source.header.shape[0] == len(FRAME_ORDER)
    labels = known_labels(tuple(source.header.shape))

    stored_seg = await ingest.stub.StoreSegmentation(
        store_requests(name, labels), metadata=INFERENCE, timeout=20
    )

    assert stored_seg.outcome == pb.InstanceResult.OUTCOME_STORED
    seg_series = stored_seg.instance.rsplit("/instances/", 1)[0]
    served = await _series_pixels(ingest, seg_series)
    assert list(served.header.shape) == list(source.header.shape)
    assert served.header.sop_instance_uids == source.header.sop_instance_uids
    assert list(served.header.origin) == pytest.approx(list(source.header.origin))
    assert list(served.header.spacing) == pytest.approx(list(source.header.spacing))
    assert list(served.header.direction) == pytest.approx(list(source.header.direction))
    numpy.testing.assert_array_equal(served.array, labels.astype(numpy.float32))


@dataclass
class _Pixels:
    header: pb.VolumeHeader
    array: numpy.typing.NDArray[numpy.float32]


async def _series_pixels(ingest: Ingest, name: str) -> _Pixels:
    """GetSeriesPixels of `name` as inference reads it."""
    messages = [
        m
        async for m in ingest.stub.GetSeriesPixels(
            pb.GetSeriesPixelsRequest(name=name), metadata=INFERENCE, timeout=10
        )
    ]
    header = messages[0].header
    data = b"".join(m.data for m in messages[1:])
    return _Pixels(header, numpy.frombuffer(data, "<f4").reshape(tuple(header.shape)))


@pytest.mark.parametrize(
    ("shape", "segment_labels", "expected"),
    [
        ((5, 16, 15), LABELS, "LABEL_MAP_SHAPE_MISMATCH"),
        ((5, 16, 16), (), "SEGMENT_LABELS_REQUIRED"),
        ((5, 16, 16), ("lung",), "LABEL_OUT_OF_RANGE"),
    ],
)
async def test_a_bad_segmentation_is_refused_and_nothing_is_stored(
    ingest: Ingest,
    ct: Deidentified,
    shape: tuple[int, int, int],
    segment_labels: tuple[str, ...],
    expected: str,
) -> None:
    name, _ = await _stored_series(ingest)
    before = _objects(ingest)
    labels = ct.labels[tuple(slice(0, size) for size in shape)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.StoreSegmentation(
            store_requests(name, labels, segment_labels), metadata=INFERENCE, timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value)[0] == expected
    assert caught.value.details()
    assert _objects(ingest) == before
    created = [e.resource for e in ingest.audit.events if e.action == audit_pb.ACTION_CREATE]
    assert created and all(resource.startswith(f"{name}/") for resource in created)
