"""WADO-RS frames, rendered and bulk data, and STOW-RS of DICOM JSON, on real files of pydicom's
corpus, without the platform: content negotiation, frame bytes against pydicom's own
decoding, rendering through the LUTs, bulk data paths, and JSON + bulk data assembled back into
the same dataset."""

from __future__ import annotations

import io
import json

import numpy
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from medimg_core.errors import InvalidArgument, NotFound
from medimg_ingest import dicomweb, rendering, stow_json, wado
from medimg_ingest.dicomweb import Part
from medimg_ingest.pipeline import Result
from services.ingest.tests.support import dicom_file

MULTIFRAME = "emri_small.dcm"  # Enhanced MR, 10 frames of 64x64, native
JPEG_LS = "emri_small_jpeg_ls_lossless.dcm"  # the same frames, JPEG-LS lossless
BIG_ENDIAN = "emri_small_big_endian.dcm"


def _decoded(name: str) -> numpy.typing.NDArray[numpy.uint16]:
    return pydicom.dcmread(io.BytesIO(dicom_file(name))).pixel_array


def _mr(kind: str, syntax: str = "") -> str:
    """A multipart/related media range of parts of `kind` (in `syntax`, if given)."""
    return f'multipart/related; type="{kind}"' + (f"; transfer-syntax={syntax}" if syntax else "")


OCTETS = "application/octet-stream"
JLS = "image/jls"


@pytest.mark.parametrize(
    ("accept", "stored", "media_type", "syntax"),
    [
        ("", JPEGLSLossless, OCTETS, ExplicitVRLittleEndian),
        (_mr("*/*"), JPEGLSLossless, OCTETS, ExplicitVRLittleEndian),
        (_mr(OCTETS), JPEGLSLossless, OCTETS, ExplicitVRLittleEndian),
        (_mr(JLS), JPEGLSLossless, JLS, JPEGLSLossless),
        (_mr("image/x-jls", JPEGLSLossless), JPEGLSLossless, JLS, JPEGLSLossless),
        (
            f"{_mr('image/jp2')}, {_mr(OCTETS)}; q=0.5",
            JPEGLSLossless,
            OCTETS,
            ExplicitVRLittleEndian,
        ),
        (f"{_mr(OCTETS)}; q=0.2, {_mr(JLS)}", JPEGLSLossless, JLS, JPEGLSLossless),
        (_mr("*/*", "*"), RLELossless, "image/dicom-rle", RLELossless),
        (_mr("*/*", "*"), ExplicitVRLittleEndian, OCTETS, ExplicitVRLittleEndian),
    ],
)
def test_accept_chooses_uncompressed_or_as_stored(
    accept: str, stored: str, media_type: str, syntax: str
) -> None:
    chosen = wado.negotiate(accept, stored)
    assert (chosen.media_type, chosen.transfer_syntax) == (media_type, syntax)


@pytest.mark.parametrize(
    ("accept", "stored"),
    [
        (_mr("image/jp2"), JPEGLSLossless),  # not what is stored
        (_mr(JLS), ExplicitVRLittleEndian),  # never re-encoded
        (_mr(JLS, JPEGLSNearLossless), JPEGLSLossless),
        (_mr(OCTETS, ImplicitVRLittleEndian), JPEGLSLossless),
        (OCTETS, ExplicitVRLittleEndian),  # a single part: not served
        (f"{_mr(OCTETS)}; q=0", ExplicitVRLittleEndian),
    ],
)
def test_an_accept_nothing_meets_is_not_acceptable(accept: str, stored: str) -> None:
    with pytest.raises(dicomweb.NotAcceptable) as refused:
        wado.negotiate(accept, stored)
    assert refused.value.reason == "NOT_ACCEPTABLE"
    assert OCTETS in refused.value.message


def test_native_frames_are_the_stored_bytes_in_the_order_asked() -> None:
    frames = wado.frames(dicom_file(MULTIFRAME), [3, 1, 10], wado.UNCOMPRESSED)
    expected = _decoded(MULTIFRAME)
    for number, frame in zip([3, 1, 10], frames, strict=True):
        assert numpy.array_equal(
            numpy.frombuffer(frame, "<u2").reshape(64, 64), expected[number - 1]
        )


def test_compressed_frames_decode_or_come_as_stored() -> None:
    data = dicom_file(JPEG_LS)
    expected = _decoded(MULTIFRAME)  # lossless: the same pixels
    for number, frame in zip([2, 7], wado.frames(data, [2, 7], wado.UNCOMPRESSED), strict=True):
        assert numpy.array_equal(
            numpy.frombuffer(frame, "<u2").reshape(64, 64), expected[number - 1]
        )
    stored = wado.stored_representation(JPEGLSLossless)
    assert stored is not None
    as_stored = wado.frames(data, [2], stored)
    dataset = pydicom.dcmread(io.BytesIO(data))
    assert as_stored == [list(generate_frames(dataset.PixelData, number_of_frames=10))[1]]


def test_big_endian_frames_come_little_endian() -> None:
    (frame,) = wado.frames(dicom_file(BIG_ENDIAN), [4], wado.UNCOMPRESSED)
    assert numpy.array_equal(
        numpy.frombuffer(frame, "<u2").reshape(64, 64), _decoded(MULTIFRAME)[3]
    )


@pytest.mark.parametrize("text", ["0", "1,,2", "a", "-1", "", "1;2"])
def test_a_bad_frame_list_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        wado.frame_numbers(text)
    assert refused.value.reason == "INVALID_FRAME_LIST"


def test_a_frame_beyond_the_last_is_not_found() -> None:
    with pytest.raises(NotFound) as refused:
        wado.frames(dicom_file(MULTIFRAME), [1, 11], wado.UNCOMPRESSED)
    assert refused.value.reason == "FRAME_NOT_FOUND"
    assert "10" in refused.value.message


def test_metadata_gives_bulk_data_uris_that_bulk_data_serves() -> None:
    dataset = pydicom.dcmread(io.BytesIO(dicom_file("CT_small.dcm")))
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.LUTData = numpy.arange(4096, dtype="<u2").tobytes()
    lut["LUTData"].VR = "OW"
    dataset.VOILUTSequence = [lut]
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    data = out.getvalue()

    answer = dicomweb.metadata(data, "http://h/dicomweb/studies/1/series/2/instances/3")
    base = "http://h/dicomweb/studies/1/series/2/instances/3/bulkdata/"
    assert answer["7FE00010"] == {"vr": "OW", "BulkDataURI": base + "7FE00010"}
    assert answer["00283010"]["Value"][0]["00283006"] == {
        "vr": "OW",
        "BulkDataURI": base + "00283010/1/00283006",
    }

    representation, (pixels,) = wado.bulk_data(data, "7FE00010", "")
    assert representation == wado.UNCOMPRESSED
    assert pixels == dataset.PixelData
    _, (value,) = wado.bulk_data(data, "00283010/1/00283006", "")
    assert value == lut.LUTData


@pytest.mark.parametrize(
    ("path", "error", "reason"),
    [
        ("7FE0", InvalidArgument, "INVALID_BULK_DATA_PATH"),
        ("00283010/0/00283006", InvalidArgument, "INVALID_BULK_DATA_PATH"),
        ("00283010/1", InvalidArgument, "INVALID_BULK_DATA_PATH"),
        ("00100010", InvalidArgument, "NOT_BULK_DATA"),
        ("00283010/1/00283006", NotFound, "BULK_DATA_NOT_FOUND"),
        ("60003000", NotFound, "BULK_DATA_NOT_FOUND"),
    ],
)
def test_a_bad_bulk_data_path_is_refused(path: str, error: type[Exception], reason: str) -> None:
    with pytest.raises(error) as refused:
        wado.bulk_data(dicom_file("CT_small.dcm"), path, "")
    assert getattr(refused.value, "reason", "") == reason


def test_compressed_pixel_data_as_bulk_data_is_one_part_per_frame() -> None:
    data = dicom_file(JPEG_LS)
    representation, parts = wado.bulk_data(data, "7FE00010", 'multipart/related; type="image/jls"')
    assert representation.media_type == "image/jls"
    assert len(parts) == 10
    _, (whole,) = wado.bulk_data(data, "7FE00010", "")
    assert numpy.array_equal(
        numpy.frombuffer(whole, "<u2").reshape(10, 64, 64), _decoded(MULTIFRAME)
    )


def _png(data: bytes) -> numpy.typing.NDArray[numpy.uint8]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return numpy.asarray(image)


def test_rendering_windows_the_modality_values() -> None:
    data = dicom_file("CT_small.dcm")
    dataset = pydicom.dcmread(io.BytesIO(data))
    hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    how = rendering.options("", {"window": ["40,400"]})
    image = _png(rendering.render(data, 1, how))
    assert image.shape == (128, 128)
    assert (image[hounsfield <= 40 - 200] == 0).all()
    assert (image[hounsfield > 40 + 200] == 255).all()
    middle = (hounsfield > -150) & (hounsfield < 150)
    expected = numpy.clip(((hounsfield - 39.5) / 399 + 0.5) * 255, 0, 255)
    assert numpy.abs(image[middle].astype(float) - expected[middle]).max() <= 1


def test_rendering_uses_the_instance_window_or_the_range() -> None:
    data = dicom_file("MR_small_jpeg_ls_lossless.dcm")  # window 600/1600 in the file
    dataset = pydicom.dcmread(io.BytesIO(data))
    values = dataset.pixel_array.astype(float)
    image = _png(rendering.render(data, 1, rendering.Options()))
    expected = numpy.clip(((values - 599.5) / 1599 + 0.5) * 255, 0, 255)
    assert numpy.abs(image.astype(float) - expected).max() <= 1
    # No window at all (emri_small): the frame's own range, so both ends are reached.
    frame = _png(rendering.render(dicom_file(MULTIFRAME), 5, rendering.Options()))
    assert (frame.min(), frame.max()) == (0, 255)


def test_rendering_jpeg_with_a_viewport_and_quality() -> None:
    how = rendering.options("image/jpeg", {"viewport": ["32,16"], "quality": ["50"]})
    image = Image.open(io.BytesIO(rendering.render(dicom_file("CT_small.dcm"), 1, how)))
    assert (image.format, image.size) == ("JPEG", (16, 16))


@pytest.mark.parametrize(
    ("accept", "params", "reason"),
    [
        ("image/gif", {}, "NOT_ACCEPTABLE"),
        ("", {"window": ["40"]}, "INVALID_WINDOW"),
        ("", {"window": ["40,0"]}, "INVALID_WINDOW"),
        ("", {"window": ["40,400,cubic"]}, "INVALID_WINDOW"),
        ("", {"viewport": ["0,10"]}, "INVALID_VIEWPORT"),
        ("", {"quality": ["101"]}, "INVALID_QUERY_VALUE"),
        ("", {"annotation": ["patient"]}, "UNSUPPORTED_QUERY_PARAMETER"),
    ],
)
def test_bad_rendering_options_are_refused(
    accept: str, params: dict[str, list[str]], reason: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        rendering.options(accept, params)
    assert refused.value.reason == reason


def _json_parts(
    dataset: pydicom.Dataset, pixel_parts: list[Part], uri: str = "bulk/pixels"
) -> list[Part]:
    item = dataset.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _: uri)
    metadata = Part("application/dicom+json", "", json.dumps([item]).encode())
    return [metadata, *pixel_parts]


def test_json_and_native_bulk_data_assemble_into_the_same_dataset() -> None:
    original = pydicom.dcmread(io.BytesIO(dicom_file(MULTIFRAME)))
    parts = _json_parts(
        original, [Part("application/octet-stream", "bulk/pixels", original.PixelData)]
    )
    (assembled,) = stow_json.instances(parts)
    assert isinstance(assembled, bytes)
    back = pydicom.dcmread(io.BytesIO(assembled))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPInstanceUID == original.SOPInstanceUID
    assert numpy.array_equal(back.pixel_array, original.pixel_array)


def test_json_and_compressed_frames_assemble_encapsulated() -> None:
    original = pydicom.dcmread(io.BytesIO(dicom_file(JPEG_LS)))
    frames = list(generate_frames(original.PixelData, number_of_frames=10))
    parts = _json_parts(original, [Part("image/jls", "bulk/pixels", f) for f in frames])
    (assembled,) = stow_json.instances(parts)
    assert isinstance(assembled, bytes)
    back = pydicom.dcmread(io.BytesIO(assembled))
    assert back.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert numpy.array_equal(back.pixel_array, _decoded(MULTIFRAME))


def test_bad_json_or_missing_bulk_data_is_refused_with_a_reason() -> None:
    original = pydicom.dcmread(io.BytesIO(dicom_file(MULTIFRAME)))
    missing = _json_parts(original, [Part("application/octet-stream", "elsewhere", b"\0")])
    not_json = [Part("application/dicom+json", "", b"[{]")]
    not_array = [Part("application/dicom+json", "", b'{"00100010": {"vr": "PN"}}')]
    empty = [Part("application/dicom+json", "", b"[]")]
    bad_value = [Part("application/dicom+json", "", b'[{"00280010": {"vr": "US", "Value": {}}}]')]
    wrong_type = _json_parts(original, [Part("image/gif", "bulk/pixels", b"GIF89a")])
    cases = [
        (missing, "MISSING_BULK_DATA"),
        (not_json, "INVALID_DICOM_JSON"),
        (not_array, "INVALID_DICOM_JSON"),
        (empty, "INVALID_DICOM_JSON"),
        (bad_value, "INVALID_DICOM_JSON"),
        (wrong_type, "UNSUPPORTED_MEDIA_TYPE"),
    ]
    for parts, reason in cases:
        (refused,) = stow_json.instances(parts)
        assert isinstance(refused, Result), reason
        assert refused.reason == reason, refused.message


def test_a_multipart_body_keeps_each_part_type_and_location() -> None:
    body = (
        b"--b\r\nContent-Type: application/dicom+json\r\n\r\n[]\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\nContent-Location: x/1\r\n\r\n\x00\x01"
        b"\r\n--b--\r\n"
    )
    root, parts = dicomweb.split_multipart(
        'multipart/related; type="application/dicom+json"; boundary=b', body
    )
    assert root == "application/dicom+json"
    assert [(p.content_type, p.location, p.data) for p in parts] == [
        ("application/dicom+json", "", b"[]"),
        ("application/octet-stream", "x/1", b"\x00\x01"),
    ]
