"""DICOMweb beyond instances, through the gateway with a JWT and the stock dicomweb-client:
WADO-RS frames (uncompressed, or as stored), rendered frames, metadata with BulkDataURIs and
the bulk data they name, and STOW-RS of DICOM JSON with bulk data, on real files of pydicom's
corpus (a multi-frame MR, native and JPEG-LS). Each bad request gets its specific error, and
each read of patient data is audited."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import httpx
import numpy
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import JPEGLSLossless, generate_uid

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg_cli.platform import Platform
from tests.helpers import audit_log, bearer, fresh_instance, study_of, upload

MULTIFRAME = "emri_small.dcm"  # Enhanced MR: 10 frames of 64x64, 16 bits, native
JPEG_LS = "emri_small_jpeg_ls_lossless.dcm"  # the same frames, JPEG-LS lossless
OCTETS = 'multipart/related; type="application/octet-stream"'


@dataclass(frozen=True)
class Stored:
    """An instance stored through the platform: what was sent, and where it is now."""

    sent: bytes
    study: str
    series: str
    instance: str

    @property
    def path(self) -> str:
        return f"/dicomweb/studies/{self.study}/series/{self.series}/instances/{self.instance}"

    @property
    def frames(self) -> numpy.typing.NDArray[numpy.uint16]:
        """The frames as pydicom decodes the file that was sent (de-identification keeps
        pixels as they are)."""
        pixels: numpy.typing.NDArray[numpy.uint16] = pydicom.dcmread(
            io.BytesIO(self.sent)
        ).pixel_array
        return pixels


def _store(platform: Platform, data: bytes) -> Stored:
    result = upload(platform, data).results[0]
    assert result.outcome == ingest_pb.InstanceResult.OUTCOME_STORED, result.message
    _, study, _, series, _, instance = result.instance.split("/")
    return Stored(data, study, series, instance)


@pytest.fixture(scope="module")
def native(platform: Platform) -> Stored:
    return _store(platform, fresh_instance(MULTIFRAME))


@pytest.fixture(scope="module")
def jpeg_ls(platform: Platform) -> Stored:
    return _store(platform, fresh_instance(JPEG_LS))


@pytest.fixture(scope="module")
def ct_with_voi_lut(platform: Platform) -> tuple[Stored, bytes]:
    """A CT slice with a VOI LUT Sequence: LUT Data is bulk data inside a sequence item."""
    dataset = pydicom.dcmread(io.BytesIO(fresh_instance()))
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.LUTData = numpy.arange(4095, -1, -1, dtype="<u2").tobytes()  # inverting
    lut["LUTData"].VR = "OW"
    dataset.VOILUTSequence = [lut]
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return _store(platform, out.getvalue()), lut.LUTData


def _client(
    platform: Platform, *extra: tuple[str, str], role: str = "researcher"
) -> DICOMwebClient:
    return DICOMwebClient(
        url=f"{platform.gateway_url}/dicomweb",
        headers={**bearer(platform, "dr-wado", role), **dict(extra)},
    )


def _reason(response: httpx.Response) -> str:
    details = response.json().get("details", [])
    return next(str(d["reason"]) for d in details if "reason" in d)


def _words(frame: bytes) -> numpy.typing.NDArray[numpy.uint16]:
    return numpy.frombuffer(frame, "<u2").reshape(64, 64)


# --- frames ------------------------------------------------------------------------------


def test_a_stock_client_gets_frames_uncompressed(platform: Platform, native: Stored) -> None:
    client = _client(platform)
    frames = client.retrieve_instance_frames(
        native.study, native.series, native.instance, [3, 1, 10]
    )
    assert [len(f) for f in frames] == [64 * 64 * 2] * 3
    for number, frame in zip([3, 1, 10], frames, strict=True):
        assert numpy.array_equal(_words(frame), native.frames[number - 1])


def test_compressed_frames_come_decoded_or_as_stored(platform: Platform, jpeg_ls: Stored) -> None:
    client = _client(platform)
    ids = (jpeg_ls.study, jpeg_ls.series, jpeg_ls.instance)
    decoded = client.retrieve_instance_frames(*ids, [2, 9])
    assert numpy.array_equal(_words(decoded[0]), jpeg_ls.frames[1])
    assert numpy.array_equal(_words(decoded[1]), jpeg_ls.frames[8])

    as_stored = client.retrieve_instance_frames(*ids, [2, 9], media_types=("image/jls",))
    stored = client.retrieve_instance(*ids, media_types=(("application/dicom", "*"),))
    assert stored.file_meta.TransferSyntaxUID == JPEGLSLossless
    codestreams = list(generate_frames(stored.PixelData, number_of_frames=10))
    assert as_stored == [codestreams[1], codestreams[8]]
    assert as_stored[0][:2] == b"\xff\xd8"  # a JPEG-LS codestream, not pixels


def test_frames_answer_with_their_media_type(
    platform: Platform, rest: httpx.Client, jpeg_ls: Stored
) -> None:
    headers = {**bearer(platform, "dr-wado", "researcher"), "Accept": f"{OCTETS}"}
    response = rest.get(f"{jpeg_ls.path}/frames/1", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(OCTETS)
    assert b"Content-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1" in (
        response.content
    )
    jls = {**headers, "Accept": 'multipart/related; type="image/jls"'}
    response = rest.get(f"{jpeg_ls.path}/frames/1", headers=jls)
    assert response.headers["content-type"].startswith('multipart/related; type="image/jls"')


# --- rendered ----------------------------------------------------------------------------


def test_a_stock_client_gets_rendered_frames(platform: Platform, native: Stored) -> None:
    client = _client(platform)
    ids = (native.study, native.series, native.instance)
    png = Image.open(io.BytesIO(client.retrieve_instance_rendered(*ids)))
    assert (png.format, png.size, png.mode) == ("PNG", (64, 64), "L")
    # Without a window in the instance, a frame is shown over its own range.
    frame = native.frames[4].astype(float)
    expected = (frame - frame.min()) / (frame.max() - frame.min()) * 255
    fifth = client.retrieve_instance_frames_rendered(*ids, [5], media_types=("image/png",))
    assert numpy.abs(numpy.asarray(Image.open(io.BytesIO(fifth)), float) - expected).max() <= 1

    jpeg = client.retrieve_instance_frames_rendered(
        *ids, [5], media_types=("image/jpeg",), params={"viewport": "32,32", "quality": "80"}
    )
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    assert Image.open(io.BytesIO(jpeg)).size == (32, 32)


def test_rendering_applies_the_query_window_or_the_voi_lut(
    platform: Platform, ct_with_voi_lut: tuple[Stored, bytes]
) -> None:
    stored, _ = ct_with_voi_lut
    client = _client(platform)
    ids = (stored.study, stored.series, stored.instance)
    sent = pydicom.dcmread(io.BytesIO(stored.sent))
    hounsfield = sent.pixel_array * float(sent.RescaleSlope) + float(sent.RescaleIntercept)

    windowed = client.retrieve_instance_rendered(*ids, params={"window": "40,400,linear"})
    image = numpy.asarray(Image.open(io.BytesIO(windowed)), float)
    expected = numpy.clip(((hounsfield - 39.5) / 399 + 0.5) * 255, 0, 255)
    assert numpy.abs(image - expected).max() <= 1

    # The instance's own VOI LUT (4095 - x over 0..4095) maps the modality values.
    inverted = numpy.asarray(Image.open(io.BytesIO(client.retrieve_instance_rendered(*ids))), float)
    expected = (4095 - numpy.clip(numpy.rint(hounsfield), 0, 4095)) / 4095 * 255
    assert numpy.abs(inverted - expected).max() <= 1


# --- metadata and bulk data --------------------------------------------------------------


def test_metadata_names_bulk_data_that_a_stock_client_follows(
    platform: Platform, ct_with_voi_lut: tuple[Stored, bytes]
) -> None:
    stored, lut_data = ct_with_voi_lut
    # The gateway's address as clients reach it, as a proxy in front would say (the stock
    # client sends a Host header without the port, and this gateway is on a test port).
    host = platform.gateway_url.split("://", 1)[1]
    client = _client(platform, ("X-Forwarded-Host", host))
    ids = (stored.study, stored.series, stored.instance)
    metadata = client.retrieve_instance_metadata(*ids)
    base = f"{platform.gateway_url}{stored.path}/bulkdata/"
    assert metadata["7FE00010"] == {"vr": "OW", "BulkDataURI": base + "7FE00010"}
    lut_uri = metadata["00283010"]["Value"][0]["00283006"]["BulkDataURI"]
    assert lut_uri == base + "00283010/1/00283006"

    (pixels,) = client.retrieve_bulkdata(metadata["7FE00010"]["BulkDataURI"])
    assert pixels == client.retrieve_instance(*ids).PixelData
    assert client.retrieve_bulkdata(lut_uri) == [lut_data]
    # Without one, the gateway names the host the client asked for.
    plain = httpx.get(
        f"{platform.gateway_url}{stored.path}/metadata",
        headers=bearer(platform, "dr-wado", "researcher"),
    )
    assert plain.json()[0]["7FE00010"]["BulkDataURI"] == base + "7FE00010"
    relative = _client(platform).retrieve_instance_metadata(*ids)
    assert "InlineBinary" not in json.dumps(relative)


def test_compressed_pixel_data_as_bulk_data(platform: Platform, jpeg_ls: Stored) -> None:
    client = _client(platform)
    url = f"{platform.gateway_url}{jpeg_ls.path}/bulkdata/7FE00010"
    (whole,) = client.retrieve_bulkdata(url)
    assert numpy.array_equal(numpy.frombuffer(whole, "<u2").reshape(10, 64, 64), jpeg_ls.frames)
    frames = client.retrieve_bulkdata(url, media_types=("image/jls",))
    assert len(frames) == 10
    assert all(f[:2] == b"\xff\xd8" for f in frames)


# --- errors, permission, audit -----------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        ("/frames/0", "", 400, "INVALID_FRAME_LIST"),
        ("/frames/1,x", "", 400, "INVALID_FRAME_LIST"),
        ("/frames/11", "", 404, "FRAME_NOT_FOUND"),
        ("/frames/1", 'multipart/related; type="image/jp2"', 406, "NOT_ACCEPTABLE"),
        ("/frames/1,2/rendered", "", 400, "INVALID_FRAME_LIST"),
        ("/frames/12/rendered", "", 404, "FRAME_NOT_FOUND"),
        ("/rendered", "image/gif", 406, "NOT_ACCEPTABLE"),
        ("/rendered?window=40", "", 400, "INVALID_WINDOW"),
        ("/rendered?viewport=0,0", "", 400, "INVALID_VIEWPORT"),
        ("/rendered?annotation=patient", "", 400, "UNSUPPORTED_QUERY_PARAMETER"),
        ("/bulkdata/7FE0", "", 400, "INVALID_BULK_DATA_PATH"),
        ("/bulkdata/00100020", "", 400, "NOT_BULK_DATA"),
        ("/bulkdata/60003000", "", 404, "BULK_DATA_NOT_FOUND"),
        ("/bulkdata/7FE00010", 'multipart/related; type="image/jp2"', 406, "NOT_ACCEPTABLE"),
    ],
)
def test_a_bad_frame_rendering_or_bulk_data_request_is_refused(
    platform: Platform,
    rest: httpx.Client,
    jpeg_ls: Stored,
    case: tuple[str, str, int, str],
) -> None:
    suffix, accept, status, reason = case
    headers = bearer(platform, "dr-wado", "researcher")
    if accept:
        headers["Accept"] = accept
    response = rest.get(jpeg_ls.path + suffix, headers=headers)
    assert response.status_code == status, response.text
    assert _reason(response) == reason
    assert response.json()["message"]


@pytest.mark.parametrize("suffix", ["/frames/1", "/rendered", "/bulkdata/7FE00010"])
def test_permission_comes_before_existence(
    platform: Platform, rest: httpx.Client, native: Stored, suffix: str
) -> None:
    missing = (
        f"/dicomweb/studies/{generate_uid()}/series/{generate_uid()}/instances/{generate_uid()}"
    )
    reader = bearer(platform, "dr-wado", "researcher")
    assert rest.get(missing + suffix, headers=reader).status_code == 404
    auditor = bearer(platform, "ann", "auditor")
    assert rest.get(missing + suffix, headers=auditor).status_code == 403
    assert rest.get(native.path + suffix, headers=auditor).status_code == 403
    assert rest.get(native.path + suffix).status_code == 401


def test_each_read_of_pixels_is_audited(platform: Platform, native: Stored) -> None:
    client = _client(platform)
    ids = (native.study, native.series, native.instance)
    client.retrieve_instance_frames(*ids, [1, 2])
    client.retrieve_instance_frames_rendered(*ids, [4])
    client.retrieve_bulkdata(f"{platform.gateway_url}{native.path}/bulkdata/7FE00010")
    instance = native.path.removeprefix("/dicomweb/")
    reads = {e.resource: e for e in audit_log(platform) if e.resource.startswith(instance)}
    for what in ("/frames/1,2", "/frames/4/rendered", "/bulkdata/7FE00010"):
        event = reads[instance + what]
        assert event.patient_pseudonym.startswith("ANON-")
        assert event.outcome == audit_pb.OUTCOME_SUCCESS


# --- STOW-RS of DICOM JSON with bulk data ------------------------------------------------


def _json_body(
    dataset: pydicom.Dataset, pixel_parts: list[tuple[str, bytes]], *, boundary: str = "j50n"
) -> tuple[str, bytes]:
    """A STOW-RS body of one dataset as DICOM JSON, its Pixel Data (and other bulk data)
    in parts named by Content-Location."""
    bulk: dict[str, bytes] = {}

    def uri(element: pydicom.DataElement) -> str:
        location = f"http://client.example/bulk/{element.tag:08X}"
        bulk[location] = element.value
        return location

    item = dataset.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=uri)
    parts = [("application/dicom+json", "", json.dumps([item]).encode())]
    pixel_location = item.get("7FE00010", {}).get("BulkDataURI", "")
    parts += [(kind, pixel_location, data) for kind, data in pixel_parts]
    parts += [
        ("application/octet-stream", location, data)
        for location, data in bulk.items()
        if location != pixel_location
    ]
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {kind}\r\n".encode()
        + (f"Content-Location: {location}\r\n".encode() if location else b"")
        + b"\r\n"
        + data
        + b"\r\n"
        for kind, location, data in parts
    )
    content_type = f'multipart/related; type="application/dicom+json"; boundary={boundary}'
    return content_type, body + f"--{boundary}--\r\n".encode()


def _stow_json(
    platform: Platform, rest: httpx.Client, content_type: str, body: bytes
) -> httpx.Response:
    headers = {**bearer(platform, "dr-web", "clinician"), "Content-Type": content_type}
    return rest.post("/dicomweb/studies", content=body, headers=headers)


@pytest.mark.parametrize("name", [MULTIFRAME, JPEG_LS])
def test_stow_of_json_and_bulk_data_stores_the_same_pixels_as_a_file(
    platform: Platform, rest: httpx.Client, name: str
) -> None:
    as_file = fresh_instance(name)
    dataset = pydicom.dcmread(io.BytesIO(fresh_instance(name)))  # another instance, same pixels
    syntax = dataset.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        kind = f"image/jls; transfer-syntax={syntax}"
        frames = generate_frames(dataset.PixelData, number_of_frames=10)
        pixel_parts = [(kind, frame) for frame in frames]
    else:
        pixel_parts = [("application/octet-stream", dataset.PixelData)]
    response = _stow_json(platform, rest, *_json_body(dataset, pixel_parts))
    assert response.status_code == 200, response.text
    (item,) = pydicom.Dataset.from_json(response.json()).ReferencedSOPSequence
    client = _client(platform, role="clinician")
    (file_item,) = client.store_instances(
        [pydicom.dcmread(io.BytesIO(as_file))]
    ).ReferencedSOPSequence

    def retrieved(reference: pydicom.Dataset) -> pydicom.Dataset:
        _, study, _, series, _, instance = str(reference.RetrieveURL).rsplit("/", 5)
        return client.retrieve_instance(
            study, series, instance, media_types=(("application/dicom", "*"),)
        )

    from_json, from_file = retrieved(item), retrieved(file_item)
    assert from_json.PatientIdentityRemoved == "YES"
    assert str(from_json.PatientID).startswith("ANON-")
    assert str(from_json.StudyInstanceUID) == study_of(platform, _part10(dataset))
    assert from_json.file_meta.TransferSyntaxUID == syntax
    if not syntax.is_encapsulated:
        assert from_json.PixelData == from_file.PixelData
    assert numpy.array_equal(from_json.pixel_array, from_file.pixel_array)
    assert numpy.array_equal(
        from_json.pixel_array, pydicom.dcmread(io.BytesIO(as_file)).pixel_array
    )


def _part10(dataset: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _refused_only(response: httpx.Response) -> str:
    assert response.status_code == 409, response.text
    answer = pydicom.Dataset.from_json(response.json())
    assert "ReferencedSOPSequence" not in answer
    (failed,) = answer.FailedSOPSequence
    assert failed.FailureReason == 0xC000
    return str(failed[0x00000902].value)


def test_stow_json_with_a_missing_bulk_part_stores_nothing(
    platform: Platform, rest: httpx.Client
) -> None:
    dataset = pydicom.dcmread(io.BytesIO(fresh_instance(MULTIFRAME)))
    content_type, body = _json_body(dataset, [])  # no Pixel Data part
    assert _refused_only(_stow_json(platform, rest, content_type, body)).startswith(
        "MISSING_BULK_DATA"
    )
    study = study_of(platform, _part10(dataset))
    headers = bearer(platform, "dr-web", "clinician")
    assert rest.get(f"/v1/studies/{study}", headers=headers).status_code == 404


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (b"[{]", "INVALID_DICOM_JSON"),
        (b'{"00080018": {"vr": "UI"}}', "INVALID_DICOM_JSON"),
        (b'[{"00280010": {"vr": "US", "Value": {"not": "a list"}}}]', "INVALID_DICOM_JSON"),
        (b'[{"00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}}]', "MISSING_"),
    ],
)
def test_stow_of_bad_dicom_json_is_refused_with_its_reason(
    platform: Platform, rest: httpx.Client, metadata: bytes, reason: str
) -> None:
    body = b"--j\r\nContent-Type: application/dicom+json\r\n\r\n" + metadata + b"\r\n--j--\r\n"
    content_type = 'multipart/related; type="application/dicom+json"; boundary=j'
    assert _refused_only(_stow_json(platform, rest, content_type, body)).startswith(reason)


def test_stow_json_needs_the_same_role_as_stow(platform: Platform, native: Stored) -> None:
    content_type, body = _json_body(pydicom.dcmread(io.BytesIO(native.sent)), [])
    response = requests.post(
        f"{platform.gateway_url}/dicomweb/studies",
        data=body,
        headers={**bearer(platform, "someone", "researcher"), "Content-Type": content_type},
        timeout=30,
    )
    assert response.status_code == 403
