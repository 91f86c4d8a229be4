"""DICOM SEG series as label volumes on the grid of the series they segment: SEGs made with
highdicom from real CT slices of pydicom's test corpus, written and read back as files."""

from __future__ import annotations

import random
from io import BytesIO

import highdicom as hd
import numpy
import pydicom
import pydicom.config
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medimg_core.errors import InvalidArgument
from medimg_ingest.volumes import series_volume

# As the ingest service reads files (see dicom.py): pydicom's value checks stay quiet.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

SLICES = 5
SPACING = 2.5


def ct_series() -> list[pydicom.Dataset]:
    """Five real CT slices (CT_small.dcm, its pixels shifted per slice), 2.5 mm apart."""
    path = get_testdata_file("CT_small.dcm", download=False)
    assert path is not None
    study, series = generate_uid(), generate_uid()
    slices: list[pydicom.Dataset] = []
    for k in range(SLICES):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.InstanceNumber = k + 1
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        dataset.ImagePositionPatient = [x, y, z + SPACING * k]
        dataset.PixelData = numpy.roll(dataset.pixel_array, 7 * k, axis=1).tobytes()
        slices.append(dataset)
    return slices


def segment(number: int, label: str) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("113343008", "SCT", "Organ"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


def seg_of(
    sources: list[pydicom.Dataset], masks: numpy.ndarray, *, omit_empty_frames: bool = True
) -> pydicom.Dataset:
    """A binary SEG of `sources` (masks: slices, rows, columns, segments; for one multi-frame
    source, slices in its frame order), as stored."""
    made = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks.astype(numpy.uint8),
        omit_empty_frames=omit_empty_frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment(n + 1, f"s{n + 1}") for n in range(masks.shape[-1])],
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medimg",
        manufacturer_model_name="tests",
        software_versions="0",
        device_serial_number="0",
    )
    out = BytesIO()
    made.save_as(out)
    return pydicom.dcmread(BytesIO(out.getvalue()))


def test_a_seg_is_a_label_volume_on_its_source_grid() -> None:
    sources = ct_series()
    pixels = numpy.stack([s.pixel_array for s in sources])
    bright, dark = pixels > 1100, (pixels > 200) & (pixels < 600)
    seg = seg_of(sources, numpy.stack([bright, dark], axis=-1))
    shuffled = sources[:]
    random.Random(3).shuffle(shuffled)
    image = series_volume(shuffled)

    labels = series_volume([seg])

    assert labels.array.dtype == numpy.float32
    assert labels.array.shape == image.array.shape == (SLICES, 128, 128)
    assert labels.sop_instance_uids == image.sop_instance_uids
    assert labels.spacing == pytest.approx(image.spacing)
    assert labels.origin == pytest.approx(image.origin)
    assert labels.direction == pytest.approx(image.direction)
    expected = numpy.where(bright, 1, numpy.where(dark, 2, 0))
    numpy.testing.assert_array_equal(labels.array, expected.astype(numpy.float32))
    assert set(numpy.unique(labels.array)) == {0.0, 1.0, 2.0}


def test_a_source_without_segmented_frames_gets_zeros_and_keeps_its_uid() -> None:
    sources = ct_series()
    masks = numpy.stack([s.pixel_array > 1100 for s in sources])
    masks[0] = False  # highdicom leaves empty frames out: slice 0 has no frame, no position
    seg = seg_of(sources, masks[..., None])
    assert int(seg.NumberOfFrames) == SLICES - 1

    labels = series_volume([seg])

    assert sorted(labels.sop_instance_uids) == sorted(s.SOPInstanceUID for s in sources)
    by_uid = dict(zip(labels.sop_instance_uids, labels.array, strict=True))
    for source, mask in zip(sources, masks, strict=True):
        numpy.testing.assert_array_equal(by_uid[source.SOPInstanceUID], mask.astype(numpy.float32))


def test_overlapping_segments_are_refused() -> None:
    sources = ct_series()
    bright = numpy.stack([s.pixel_array > 1100 for s in sources])
    seg = seg_of(sources, numpy.stack([bright, bright], axis=-1))
    with pytest.raises(InvalidArgument) as caught:
        series_volume([seg])
    assert caught.value.reason == "INVALID_SEGMENTATION"
    assert "overlap" in caught.value.message


def test_a_seg_series_of_two_instances_is_refused() -> None:
    sources = ct_series()
    masks = numpy.stack([s.pixel_array > 1100 for s in sources])[..., None]
    first, second = seg_of(sources, masks), seg_of(sources, masks)
    second.SeriesInstanceUID = first.SeriesInstanceUID
    with pytest.raises(InvalidArgument) as caught:
        series_volume([first, second])
    assert caught.value.reason == "INCONSISTENT_SERIES"


# SEGs on one multi-frame image ------------------------------------------------------------

#: The slice (along the normal) each frame of the multi-frame CT holds, frame by frame.
FRAME_ORDER = (3, 0, 4, 1, 2)


def multi_frame_ct() -> pydicom.Dataset:
    """The five CT slices as one Legacy Converted Enhanced CT (highdicom's converter: each
    frame's position in its functional group), frames stored in FRAME_ORDER, as stored."""
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        ct_series(),
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    groups = list(image.PerFrameFunctionalGroupsSequence)
    heights = [float(g.PlanePositionSequence[0].ImagePositionPatient[2]) for g in groups]
    by_height = [int(k) for k in numpy.argsort(heights)]  # axial: the normal is +z
    frames = [by_height[position] for position in FRAME_ORDER]
    image.PerFrameFunctionalGroupsSequence = [groups[k] for k in frames]
    image.PixelData = image.pixel_array[frames].tobytes()
    out = BytesIO()
    image.save_as(out)
    return pydicom.dcmread(BytesIO(out.getvalue()))


def test_a_seg_of_every_frame_of_a_multi_frame_image_is_a_label_volume_on_its_grid() -> None:
    source = multi_frame_ct()
    image = series_volume([source])
    assert image.frame_numbers == [FRAME_ORDER.index(k) + 1 for k in range(SLICES)]
    frames = source.pixel_array  # in stored order, as highdicom takes the masks
    bright, dark = frames > 1100, (frames > 200) & (frames < 600)
    bright[FRAME_ORDER.index(0)] = False  # slice 0 has nothing of segment 1
    seg = seg_of([source], numpy.stack([bright, dark], axis=-1), omit_empty_frames=False)

    labels = series_volume([seg])

    assert labels.array.shape == image.array.shape == (SLICES, 128, 128)
    assert labels.sop_instance_uids == [source.SOPInstanceUID] * SLICES
    assert labels.frame_numbers == image.frame_numbers
    assert labels.positions is not None and image.positions is not None
    numpy.testing.assert_allclose(labels.positions, image.positions)
    assert labels.spacing == pytest.approx(image.spacing)
    assert labels.origin == pytest.approx(image.origin)
    assert labels.direction == pytest.approx(image.direction)
    expected = numpy.where(bright, 1, numpy.where(dark, 2, 0))
    for k, frame in enumerate(labels.frame_numbers):
        numpy.testing.assert_array_equal(labels.array[k], expected[frame - 1])
    assert set(numpy.unique(labels.array[0])) <= {0.0, 2.0}


def test_a_seg_that_leaves_out_frames_of_a_multi_frame_image_is_refused() -> None:
    source = multi_frame_ct()
    masks = source.pixel_array > 1100
    masks[1] = False  # highdicom leaves the empty frame 2 out: the grid has a hole
    seg = seg_of([source], masks[..., None])
    assert int(seg.NumberOfFrames) == SLICES - 1
    with pytest.raises(InvalidArgument) as caught:
        series_volume([seg])
    assert caught.value.reason == "INVALID_SEGMENTATION"
    assert "source frame(s) [2] have no frame in the SEG" in caught.value.message
