"""check_decodable on every pixel-bearing file of pydicom's test corpus and on damaged
copies of real files; series volumes from real CT, MR, RT Dose and ultrasound files.

Files of the separate pydicom-data package are used where it is installed and skipped
where it is not; nothing is downloaded.
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy
import pydicom
import pydicom.config
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    HTJ2K,
    JPEG2000MC,
    MPEG4HP41,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGLossless,
    JPEGLosslessSV1,
    generate_uid,
)

from medimg_core.errors import InvalidArgument
from medimg_ingest.pixels import check_decodable, decoded_frames, pixel_keyword
from medimg_ingest.volumes import Volume, series_volume

# As the ingest service reads files (see dicom.py): pydicom's value checks stay quiet.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

#: The pixel-bearing files of the corpus that are refused, and why; every other one passes.
REFUSED = {
    # Native pixel data cut short.
    "MR_truncated.dcm": "INCONSISTENT_PIXEL_DATA",
    # 128 bytes more native pixel data than the Image Pixel attributes describe.
    "MR_small_padded.dcm": "INCONSISTENT_PIXEL_DATA",
    # NumberOfFrames is "1A".
    "badVR.dcm": "INCONSISTENT_PIXEL_DATA",
    # Pixel Data without any Image Pixel attributes.
    "nested_priv_SQ.dcm": "INCONSISTENT_PIXEL_DATA",
    # No file meta, hence no transfer syntax (read_instance refuses these first).
    "OT-PAL-8-face.dcm": "UNSUPPORTED_TRANSFER_SYNTAX",
    "meta_missing_tsyntax.dcm": "UNSUPPORTED_TRANSFER_SYNTAX",
    # libjpeg: "a misplaced marker segment" (GDCM decodes this one; pylibjpeg does not).
    "JPEG-lossy.dcm": "UNDECODABLE_PIXEL_DATA",
    # A sequence delimiter inside the fragment: OpenJPEG finds no J2K header.
    "JPEG2000-embedded-sequence-delimiter.dcm": "UNDECODABLE_PIXEL_DATA",
}

#: (compressed, reference, largest difference allowed). The reference holds the same image
#: uncompressed (for lossy JPEG: as DCMTK decoded it) and is decoded by pydicom alone.
PAIRS = [
    ("MR_small_RLE.dcm", "MR_small.dcm", 0),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0),
    ("MR_small_bigendian.dcm", "MR_small.dcm", 0),
    ("rtdose_rle.dcm", "rtdose.dcm", 0),
    ("SC_rgb_jpeg.dcm", "SC_rgb_jpeg_dcmd.dcm", 1),
    # From here on, files of pydicom-data.
    ("emri_small_RLE.dcm", "emri_small.dcm", 0),
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm", 0),
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm", 0),
    ("693_J2KR.dcm", "693_UNCR.dcm", 0),
    ("693_J2KI.dcm", "693_UNCI.dcm", 0),
    ("JPEG2000.dcm", "JPEG2000_UNC.dcm", 0),
    ("US1_J2KR.dcm", "US1_UNCR.dcm", 0),
    ("OBXXXX1A_rle_2frame.dcm", "OBXXXX1A_2frame.dcm", 0),
    ("SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_16bit_2frame.dcm", 0),
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", 0),
    ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_dcmtk_ebcr_dcmd.dcm", 1),
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_ebcyn1_dcmd.dcm", 2),
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", 8),
]

#: Patient attributes whose values must never appear in a refusal.
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs")


def read(path: Path | str) -> pydicom.Dataset:
    # pydicom warns while reading a few corpus files; reading is not what is tested here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


def corpus_file(name: str) -> pydicom.Dataset:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} comes with pydicom-data, which is not installed")
    return read(str(path))


def refusal(dataset: pydicom.Dataset) -> InvalidArgument:
    """The error check_decodable raises, checked for patient data in its message."""
    with pytest.raises(InvalidArgument) as caught:
        check_decodable(dataset)
    for keyword in PHI_KEYWORDS:
        value = str(dataset.get(keyword, "") or "")
        if len(value) >= 3:
            assert value not in caught.value.message
    assert caught.value.code.name == "INVALID_ARGUMENT"
    return caught.value


def frames_of(dataset: pydicom.Dataset) -> numpy.typing.NDArray[numpy.generic]:
    return numpy.stack(list(decoded_frames(dataset)))


def pixel_files() -> list[Path]:
    paths = (Path(p) for p in sorted(get_testdata_files()))
    return [p for p in paths if p.is_file() and pixel_keyword(read(p)) is not None]


# -- check_decodable on the corpus -------------------------------------------------------


@pytest.mark.parametrize(
    "path", pixel_files(), ids=lambda p: f"{p.parent.name}/{p.name}" if isinstance(p, Path) else ""
)
def test_every_pixel_file_of_the_corpus_decodes_or_is_refused_for_its_reason(path: Path) -> None:
    dataset = read(path)
    expected = REFUSED.get(path.name)
    if expected is None:
        check_decodable(dataset)  # under warnings-as-errors: nothing pydicom warns about
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixel_array(dataset)  # and pydicom alone agrees that it decodes
    else:
        assert refusal(dataset).reason == expected


def test_the_list_of_refused_files_names_files_that_exist() -> None:
    names = {p.name for p in pixel_files()}
    wheel_only = {name for name in REFUSED if get_testdata_file(name, download=False)}
    assert wheel_only <= names


@pytest.mark.parametrize(("compressed", "reference", "tolerance"), PAIRS)
def test_decoded_pixels_match_pydicoms_uncompressed_reference(
    compressed: str, reference: str, tolerance: int
) -> None:
    original = corpus_file(reference)
    expected = pixel_array(original).astype(numpy.float64)
    if int(original.get("NumberOfFrames") or 1) == 1:
        expected = expected[numpy.newaxis]  # pydicom drops the frame axis of a single frame
    decoded = frames_of(corpus_file(compressed)).astype(numpy.float64)
    assert decoded.shape == expected.shape
    assert numpy.abs(decoded - expected).max() <= tolerance
    assert expected.max() > expected.min()  # a real image, not a flat one


def test_jpeg_lossless_process_14_decodes() -> None:
    # Selection value 1 is one of process 14's, so an SV1 codestream is a process 14 one.
    dataset = corpus_file("SC_rgb_jpeg_gdcm.dcm")
    assert dataset.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    expected = frames_of(dataset)
    dataset.file_meta.TransferSyntaxUID = JPEGLossless
    check_decodable(dataset)
    numpy.testing.assert_array_equal(frames_of(dataset), expected)


@pytest.mark.parametrize("syntax", [HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K])
def test_htj2k_syntaxes_decode_through_openjpeg(syntax: UID) -> None:
    # No HTJ2K-coded file ships with pydicom and OpenJPEG encodes none; HTJ2K decoders also
    # read Part 1 codestreams, which is what this checks the HTJ2K path with.
    dataset = corpus_file("MR_small_jp2klossless.dcm")
    dataset.file_meta.TransferSyntaxUID = syntax
    check_decodable(dataset)
    numpy.testing.assert_array_equal(
        frames_of(dataset)[0], pixel_array(corpus_file("MR_small.dcm"))
    )


def test_deflated_files_are_checked_as_the_native_pixels_they_inflate_to() -> None:
    dataset = corpus_file("image_dfl.dcm")
    assert dataset.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    check_decodable(dataset)
    dataset.PixelData = dataset.PixelData[:-64]
    assert refusal(dataset).reason == "INCONSISTENT_PIXEL_DATA"


@pytest.mark.parametrize("name", ["rtplan.dcm", "rtstruct.dcm", "test-SR.dcm"])
def test_instances_without_pixel_data_pass(name: str) -> None:
    dataset = corpus_file(name)
    assert pixel_keyword(dataset) is None
    check_decodable(dataset)


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
        "JPEG2000.dcm",  # JPEG 2000
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
        "JPGExtended.dcm",  # JPEG extended
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
        "MR_small_RLE.dcm",  # RLE lossless
    ],
)
@pytest.mark.parametrize("kept", [0.9, 0.5, 0.1])
def test_a_truncated_compressed_frame_is_undecodable(name: str, kept: float) -> None:
    dataset = corpus_file(name)
    [frame] = generate_frames(dataset.PixelData, number_of_frames=1)
    dataset.PixelData = encapsulate([frame[: int(len(frame) * kept)]])
    error = refusal(dataset)
    assert error.reason == "UNDECODABLE_PIXEL_DATA"
    assert error.metadata == {
        "transfer_syntax": str(dataset.file_meta.TransferSyntaxUID),
        "frame": "0",
    }


def test_the_refusal_names_the_truncated_frame_of_a_multi_frame_instance() -> None:
    dataset = corpus_file("examples_ybr_color.dcm")  # 30 JPEG baseline frames
    frames = list(generate_frames(dataset.PixelData, number_of_frames=dataset.NumberOfFrames))
    frames[17] = frames[17][: len(frames[17]) // 2]
    dataset.PixelData = encapsulate(frames)
    error = refusal(dataset)
    assert (error.reason, error.metadata["frame"]) == ("UNDECODABLE_PIXEL_DATA", "17")


def test_fewer_fragments_than_frames_is_undecodable() -> None:
    dataset = corpus_file("examples_ybr_color.dcm")
    frames = list(generate_frames(dataset.PixelData, number_of_frames=dataset.NumberOfFrames))
    dataset.PixelData = encapsulate(frames[:-1])
    assert refusal(dataset).reason == "UNDECODABLE_PIXEL_DATA"


@pytest.mark.parametrize("cut", [2, 100, 8000])
def test_truncated_native_pixel_data_is_inconsistent(cut: int) -> None:
    dataset = corpus_file("MR_small.dcm")
    dataset.PixelData = dataset.PixelData[:-cut]
    error = refusal(dataset)
    assert error.reason == "INCONSISTENT_PIXEL_DATA"
    assert error.metadata["expected_bytes"] == str(64 * 64 * 2)
    assert error.metadata["actual_bytes"] == str(64 * 64 * 2 - cut)


def test_native_pixel_data_longer_than_described_is_inconsistent() -> None:
    dataset = corpus_file("MR_small.dcm")
    dataset.PixelData = dataset.PixelData + bytes(64 * 2)
    assert refusal(dataset).reason == "INCONSISTENT_PIXEL_DATA"


@pytest.mark.parametrize(
    "keyword",
    [
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PixelRepresentation",
    ],
)
@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_jp2klossless.dcm"])
def test_a_missing_image_pixel_attribute_is_inconsistent(keyword: str, name: str) -> None:
    dataset = corpus_file(name)
    del dataset[keyword]
    error = refusal(dataset)
    assert (error.reason, error.metadata["keyword"]) == ("INCONSISTENT_PIXEL_DATA", keyword)


@pytest.mark.parametrize("value", ["0", "", "-2"])
def test_a_number_of_frames_that_is_not_positive_is_inconsistent(value: str) -> None:
    dataset = corpus_file("MR_small.dcm")
    dataset.NumberOfFrames = value
    assert refusal(dataset).reason == "INCONSISTENT_PIXEL_DATA"


def test_more_frames_than_the_native_data_holds_is_inconsistent() -> None:
    dataset = corpus_file("MR_small.dcm")
    dataset.NumberOfFrames = 2
    assert refusal(dataset).reason == "INCONSISTENT_PIXEL_DATA"


@pytest.mark.parametrize(
    "syntax",
    [
        UID("1.2.826.0.1.3680043.2.1143.999"),  # a private, unknown UID
        UID("1.2.840.10008.1.2.4.52"),  # retired JPEG process
        MPEG4HP41,  # video
        JPEG2000MC,  # JPEG 2000 Part 2 multi-component
    ],
)
def test_an_unknown_or_unsupported_transfer_syntax_is_refused_by_uid(syntax: UID) -> None:
    dataset = corpus_file("MR_small_jp2klossless.dcm")
    dataset.file_meta.TransferSyntaxUID = syntax
    error = refusal(dataset)
    assert error.reason == "UNSUPPORTED_TRANSFER_SYNTAX"
    assert str(syntax) in error.message
    assert error.metadata["transfer_syntax"] == str(syntax)


# -- series volumes ----------------------------------------------------------------------

#: An oblique plane: rows run along x, columns tilted 30 degrees from y towards -z.
ROW = (1.0, 0.0, 0.0)
COLUMN = (0.0, numpy.cos(numpy.pi / 6), -numpy.sin(numpy.pi / 6))
NORMAL = (0.0, numpy.sin(numpy.pi / 6), numpy.cos(numpy.pi / 6))  # ROW x COLUMN
ORIGIN = (-158.1, -179.0, -75.7)


def ct_series(count: int, *, spacing: float = 2.5) -> list[pydicom.Dataset]:
    """`count` copies of a real CT slice in slice order, `spacing` mm apart along NORMAL,
    slice k holding the stored values of the original plus k (so that order is visible),
    and InstanceNumbers that run backwards (so that position, not number, must order)."""
    original = corpus_file("CT_small.dcm")
    stored = pixel_array(original)
    series_uid = generate_uid()
    slices = []
    for k in range(count):
        dataset = copy.deepcopy(original)
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.InstanceNumber = count - k
        dataset.ImageOrientationPatient = [*ROW, *COLUMN]
        dataset.ImagePositionPatient = list(numpy.add(ORIGIN, numpy.multiply(NORMAL, k * spacing)))
        dataset.PixelSpacing = [0.7, 0.6]
        dataset.PixelData = (stored + k).astype(stored.dtype).tobytes()
        slices.append(dataset)
    return slices


def shuffled(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    mixed = list(datasets)
    random.Random(7).shuffle(mixed)
    assert mixed != datasets
    return mixed


@pytest.mark.parametrize(("slope", "intercept"), [(None, None), (0.5, -1000.5)])
def test_a_ct_series_comes_out_sorted_in_hounsfield_units_with_its_geometry(
    slope: float | None, intercept: float | None
) -> None:
    series = ct_series(6)
    if slope is not None:
        for dataset in series:
            dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
    volume = series_volume(shuffled(series))

    assert volume.sop_instance_uids == [d.SOPInstanceUID for d in series]
    assert volume.array.dtype == numpy.float32
    assert volume.array.shape == (6, 128, 128)
    for k, dataset in enumerate(series):
        stored = pixel_array(dataset).astype(numpy.float64)
        hounsfield = stored * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        numpy.testing.assert_array_equal(volume.array[k], hounsfield.astype(numpy.float32))
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.6))
    assert volume.origin == pytest.approx(ORIGIN)
    assert volume.direction == pytest.approx((*ROW, *COLUMN, *NORMAL))


def test_without_positions_slices_follow_instance_number() -> None:
    series = ct_series(5)
    for dataset in series:
        del dataset.ImagePositionPatient
    volume = series_volume(shuffled(series))
    assert volume.sop_instance_uids == [d.SOPInstanceUID for d in reversed(series)]
    assert volume.spacing[0] == float(series[0].SpacingBetweenSlices)
    assert volume.origin == (0.0, 0.0, 0.0)


def test_a_single_slice_is_a_volume_of_one() -> None:
    [dataset] = ct_series(1)
    volume = series_volume([dataset])
    assert volume.array.shape == (1, 128, 128)
    assert volume.spacing == pytest.approx((float(dataset.SpacingBetweenSlices), 0.7, 0.6))


def test_a_pixel_spacing_of_zero_counts_as_absent() -> None:
    # The CR of the corpus (RG1_UNCR) carries PixelSpacing 0\0: a volume with spacing 0
    # could not be placed by any consumer (inference refuses it), so it gets the nominal 1 mm.
    dataset = corpus_file("RG1_UNCR.dcm")
    assert [float(v) for v in dataset.PixelSpacing] == [0.0, 0.0]
    volume = series_volume([dataset])
    assert volume.spacing[1:] == (1.0, 1.0)
    assert min(volume.spacing) > 0


def _other_orientation(series: list[pydicom.Dataset]) -> None:
    series[2].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]


def _other_size(series: list[pydicom.Dataset]) -> None:
    other = corpus_file("MR_small.dcm")  # 64 x 64
    other.SeriesInstanceUID = series[0].SeriesInstanceUID
    series[2] = other


def _other_pixel_spacing(series: list[pydicom.Dataset]) -> None:
    series[2].PixelSpacing = [0.7, 0.7]


def _two_at_one_position(series: list[pydicom.Dataset]) -> None:
    series[3].ImagePositionPatient = series[2].ImagePositionPatient


def _a_slice_missing(series: list[pydicom.Dataset]) -> None:
    del series[2]


def _another_series(series: list[pydicom.Dataset]) -> None:
    series[2].SeriesInstanceUID = generate_uid()


def _no_order(series: list[pydicom.Dataset]) -> None:
    for dataset in series:
        del dataset.ImagePositionPatient
    del series[1].InstanceNumber


@pytest.mark.parametrize(
    ("spoil", "because"),
    [
        (_other_orientation, "differ in ImageOrientationPatient"),
        (_other_size, "differ in Rows"),
        (_other_pixel_spacing, "differ in PixelSpacing"),
        (_two_at_one_position, "same position"),
        (_a_slice_missing, "uneven"),
        (_another_series, "more than one series"),
        (_no_order, "order is unknown"),
    ],
)
def test_an_inconsistent_series_is_refused(
    spoil: Callable[[list[pydicom.Dataset]], None], because: str
) -> None:
    series = ct_series(5)
    spoil(series)
    with pytest.raises(InvalidArgument) as caught:
        series_volume(series)
    assert caught.value.reason == "INCONSISTENT_SERIES"
    assert because in caught.value.message


def test_a_series_with_undecodable_pixels_is_refused_as_such() -> None:
    series = ct_series(3)
    series[1].PixelData = series[1].PixelData[:-10]
    with pytest.raises(InvalidArgument) as caught:
        series_volume(series)
    assert caught.value.reason == "INCONSISTENT_PIXEL_DATA"


def test_an_rt_dose_grid_is_placed_by_its_frame_offsets() -> None:
    dataset = corpus_file("rtdose.dcm")
    volume = series_volume([dataset])
    offsets = [float(v) for v in dataset.GridFrameOffsetVector]
    assert volume.array.shape == (int(dataset.NumberOfFrames), dataset.Rows, dataset.Columns)
    assert volume.spacing == pytest.approx(
        (offsets[1] - offsets[0], *(float(v) for v in dataset.PixelSpacing))
    )
    assert volume.origin == pytest.approx([float(v) for v in dataset.ImagePositionPatient])
    numpy.testing.assert_array_equal(volume.array, pixel_array(dataset).astype(numpy.float32))
    assert volume.sop_instance_uids == [dataset.SOPInstanceUID] * int(dataset.NumberOfFrames)


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"])
def test_an_enhanced_mr_gives_frames_rows_columns(name: str) -> None:
    dataset = corpus_file(name)
    volume = series_volume([dataset])
    assert volume.array.shape == (10, 64, 64)
    assert volume.spacing[0] == float(dataset.SpacingBetweenSlices)
    reference = pixel_array(corpus_file("emri_small.dcm"))
    numpy.testing.assert_array_equal(volume.array, reference.astype(numpy.float32))


def test_an_enhanced_ct_takes_geometry_and_rescale_from_its_functional_groups() -> None:
    dataset = corpus_file("eCT_Supplemental.dcm")
    shared = dataset.SharedFunctionalGroupsSequence[0]
    # Rows run towards -x, so the normal points to -z and the frame at -149 mm comes first.
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        -1,
        0,
        0,
        0,
        1,
        0,
    ]
    positions = [
        [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        for frame in dataset.PerFrameFunctionalGroupsSequence
    ]
    assert [p[2] for p in positions] == [-159, -149]
    volume = series_volume([dataset])

    rescale = shared.PixelValueTransformationSequence[0]
    assert float(rescale.RescaleIntercept) != 0
    stored = pixel_array(dataset).astype(numpy.float64)
    hounsfield = stored * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    numpy.testing.assert_array_equal(volume.array, hounsfield[::-1].astype(numpy.float32))
    pixel_spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert volume.spacing == pytest.approx((10.0, *pixel_spacing))
    assert volume.origin == pytest.approx(positions[1])
    assert volume.direction == pytest.approx((-1, 0, 0, 0, 1, 0, 0, 0, -1))


def test_a_colour_ultrasound_cine_keeps_its_samples_as_rgb() -> None:
    dataset = corpus_file("examples_ybr_color.dcm")  # JPEG baseline, YBR_FULL_422
    volume: Volume = series_volume([dataset])
    assert volume.array.shape == (30, 240, 320, 3)
    numpy.testing.assert_array_equal(volume.array, pixel_array(dataset).astype(numpy.float32))
