"""WADO-RS frames and bulk data (PS3.18 8.7.3, 10.4): which representation an Accept header
allows, and the bytes of the frames or bulk data value of a stored instance in it.

Two representations are served, never a re-encoding: uncompressed (application/octet-stream,
Explicit VR Little Endian: native pixels as stored, compressed ones decoded, colour as RGB),
and the instance's own compressed frames in their media type (image/jls, ...). Knows nothing
of gRPC.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy
import numpy.typing
import pydicom
from pydicom.encaps import generate_frames
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from medimg_core.errors import InvalidArgument, NotFound
from medimg_ingest import dicomweb, pixels
from medimg_ingest.dicomweb import NotAcceptable

OCTET_STREAM = "application/octet-stream"

#: The media type of the frames of each compressed transfer syntax (PS3.18 Table 8.7.3-2).
MEDIA_TYPES: dict[str, str] = {
    JPEGBaseline8Bit: "image/jpeg",
    JPEGExtended12Bit: "image/jpeg",
    JPEGLossless: "image/jpeg",
    JPEGLosslessSV1: "image/jpeg",
    JPEGLSLossless: "image/jls",
    JPEGLSNearLossless: "image/jls",
    JPEG2000Lossless: "image/jp2",
    JPEG2000: "image/jp2",
    JPEG2000MCLossless: "image/jpx",
    JPEG2000MC: "image/jpx",
    HTJ2KLossless: "image/jphc",
    HTJ2KLosslessRPCL: "image/jphc",
    HTJ2K: "image/jphc",
    RLELossless: "image/dicom-rle",
}
#: Names clients still send for some of them.
_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}
#: The width of the values of each binary VR, for byte order.
_WIDTHS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


@dataclass(frozen=True)
class Representation:
    """How frames or bulk data go out: the media type of each part and its transfer syntax."""

    media_type: str
    transfer_syntax: UID

    @property
    def compressed(self) -> bool:
        return self.transfer_syntax.is_encapsulated

    @property
    def part_type(self) -> str:
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"

    def multipart_type(self, boundary: str) -> str:
        return (
            f'{dicomweb.MULTIPART}; type="{self.media_type}"; '
            f"transfer-syntax={self.transfer_syntax}; boundary={boundary}"
        )


UNCOMPRESSED = Representation(OCTET_STREAM, ExplicitVRLittleEndian)


def stored_representation(stored_syntax: str) -> Representation | None:
    """The instance's frames as stored, if they are compressed in a syntax with a media type."""
    syntax = UID(stored_syntax)
    if syntax in MEDIA_TYPES:
        return Representation(MEDIA_TYPES[syntax], syntax)
    return None


def negotiate(accept: str, stored_syntax: str) -> Representation:
    """The representation of frames or bulk data that `accept` allows, best first by q.
    Uncompressed when nothing is said; NotAcceptable when nothing it allows can be served."""
    stored = stored_representation(stored_syntax)
    for kind, params in accepted_ranges(accept):
        if kind == dicomweb.MULTIPART:
            inner = params.get("type", OCTET_STREAM).lower()
        elif kind == "*/*":
            inner = "*/*"
        else:
            continue  # a single-part answer is not served
        choice = _match(_ALIASES.get(inner, inner), params.get("transfer-syntax"), stored)
        if choice is not None:
            return choice
    servable = f'{dicomweb.MULTIPART}; type="{OCTET_STREAM}" (uncompressed)'
    if stored is not None:
        servable += (
            f' or {dicomweb.MULTIPART}; type="{stored.media_type}"; '
            f"transfer-syntax={stored.transfer_syntax} (as stored)"
        )
    raise NotAcceptable(f"this is served as {servable}; Accept allows neither")


def accepted_ranges(accept: str) -> list[tuple[str, dict[str, str]]]:
    """The media ranges of an Accept header, most preferred first, without those of q=0."""
    if not accept.strip():
        return [("*/*", {})]
    ranges: list[tuple[float, str, dict[str, str]]] = []
    for item in accept.split(","):
        if not item.strip():
            continue
        kind, params = dicomweb.media_type(item)
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 1.0
        if quality > 0:
            ranges.append((quality, kind, params))
    ranges.sort(key=lambda r: -r[0])  # stable: equal q keeps the client's order
    return [(kind, params) for _, kind, params in ranges]


def _match(inner: str, syntax: str | None, stored: Representation | None) -> Representation | None:
    if inner == OCTET_STREAM:
        return UNCOMPRESSED if syntax in (None, "*", ExplicitVRLittleEndian) else None
    if inner in ("*/*", "*"):
        if syntax in (None, ExplicitVRLittleEndian):
            return UNCOMPRESSED
        if syntax == "*":
            return stored or UNCOMPRESSED
        return stored if stored and syntax == stored.transfer_syntax else None
    if stored is None or syntax not in (None, "*", stored.transfer_syntax):
        return None
    return stored if inner in ("image/*", stored.media_type) else None


def frame_numbers(text: str) -> list[int]:
    """The frame numbers of a WADO-RS frame list (`1,3`): 1-based, in the order asked."""
    numbers: list[int] = []
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) < 1:
            raise InvalidArgument(
                "INVALID_FRAME_LIST",
                f"frames are numbers from 1, separated by commas (as in frames/1,3), "
                f"not {text[:64]!r}",
            )
        numbers.append(int(item))
    return numbers


def frames(data: bytes, numbers: Sequence[int], representation: Representation) -> list[bytes]:
    """The asked frames of a stored instance, in the order asked, in `representation`."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    count = _frame_count(dataset)
    beyond = [n for n in numbers if n > count]
    if beyond:
        raise NotFound(
            "FRAME_NOT_FOUND",
            f"frame {beyond[0]} is beyond the last frame of the instance, {count}",
            frames=count,
        )
    found = _frames(dataset, {n - 1 for n in numbers}, representation)
    return [found[n - 1] for n in numbers]


def bulk_data(data: bytes, path: str, accept: str) -> tuple[Representation, list[bytes]]:
    """The value of the attribute at `path` (as metadata's BulkDataURIs give it) and how it
    is represented. Top-level pixel data is served like frames: uncompressed in one part, or
    one part per stored compressed frame."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    element = _element_at(dataset, path)
    syntax = str(dataset.file_meta.TransferSyntaxUID)
    if "/" not in path.strip("/") and element.tag in dicomweb.PIXEL_TAGS:
        representation = negotiate(accept, syntax)
        count = _frame_count(dataset)
        found = _frames(dataset, set(range(count)), representation)
        parts = [found[i] for i in range(count)]
        return representation, parts if representation.compressed else [b"".join(parts)]
    representation = negotiate(accept, ExplicitVRLittleEndian)
    value = bytes(element.value or b"")
    width = _WIDTHS.get(element.VR, 1)
    if width > 1 and not dataset.file_meta.TransferSyntaxUID.is_little_endian:
        value = numpy.frombuffer(value, f">u{width}").astype(f"<u{width}").tobytes()
    return representation, [value]


def bulk_data_path(text: str) -> str:
    """A bulk data path, checked: tags (ggggeeee) with 1-based item numbers between them."""
    steps = text.strip("/").split("/")
    if (
        len(steps) % 2 == 0
        or not all(_is_tag(s) for s in steps[::2])
        or not all(s.isdigit() and int(s) >= 1 for s in steps[1::2])
    ):
        raise InvalidArgument(
            "INVALID_BULK_DATA_PATH",
            "a bulk data path is tags (ggggeeee) with item numbers from 1 between them, "
            f"as in 7FE00010 or 00880200/1/7FE00010, not {text[:80]!r}",
        )
    return "/".join(s.upper() for s in steps)


def _element_at(dataset: pydicom.Dataset, path: str) -> pydicom.DataElement:
    """The element a bulk data path names."""
    path = bulk_data_path(path)
    steps = path.split("/")
    current = dataset
    for position in range(0, len(steps), 2):
        tag = int(steps[position], 16)
        if tag not in current:
            raise NotFound("BULK_DATA_NOT_FOUND", f"the instance has no attribute at {path[:80]}")
        element = current[tag]
        if position + 1 == len(steps):
            if element.VR not in dicomweb.BINARY_VRS:
                raise InvalidArgument(
                    "NOT_BULK_DATA",
                    f"({steps[position][:4]},{steps[position][4:]}) is not a binary attribute: "
                    "read it in the metadata",
                )
            return element
        item = steps[position + 1]
        items = element.value if element.VR == "SQ" else []
        if not 1 <= int(item) <= len(items):
            raise NotFound("BULK_DATA_NOT_FOUND", f"the instance has no attribute at {path[:80]}")
        current = items[int(item) - 1]
    raise AssertionError("unreachable: the path has an odd number of steps")


def _is_tag(text: str) -> bool:
    return len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text)


def _frame_count(dataset: pydicom.Dataset) -> int:
    if pixels.pixel_keyword(dataset) is None:
        raise InvalidArgument("NO_PIXEL_DATA", "the instance has no pixel data, hence no frames")
    return pixels.frame_count(dataset)


def _frames(
    dataset: pydicom.Dataset, indices: set[int], representation: Representation
) -> dict[int, bytes]:
    """Frames by 0-based index, read (or decoded) only as far as the last one wanted."""
    syntax = dataset.file_meta.TransferSyntaxUID
    count = pixels.frame_count(dataset)
    if representation.compressed:
        offsets = None
        if "ExtendedOffsetTable" in dataset:
            offsets = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
        stream: Iterator[bytes] = generate_frames(
            dataset.PixelData, number_of_frames=count, extended_offsets=offsets
        )
        return _take(stream, indices)
    keyword = pixels.pixel_keyword(dataset)
    assert keyword is not None
    if not syntax.is_encapsulated and syntax.is_little_endian and dataset.BitsAllocated % 8 == 0:
        # As stored, byte for byte: native little-endian frames need no decoding.
        size = (
            int(dataset.Rows)
            * int(dataset.Columns)
            * int(dataset.SamplesPerPixel)
            * (int(dataset.BitsAllocated) // 8)
        )
        raw = dataset[keyword].value
        return {i: bytes(raw[i * size : (i + 1) * size]) for i in indices}
    # Compressed frames decode as pydicom decompresses them (YBR to RGB); native ones in the
    # other byte order or of 1 bit per pixel only change their encoding.
    decoded = pixels.decoded_frames(dataset, raw=not syntax.is_encapsulated)
    return {i: _uncompressed(f, dataset) for i, f in _take(decoded, indices).items()}


def _take(frames: Iterator[Any], indices: set[int]) -> dict[int, Any]:
    wanted: dict[int, Any] = {}
    last = max(indices)
    for index, frame in enumerate(frames):
        if index in indices:
            wanted[index] = frame
        if index >= last:
            break
    return wanted


def _uncompressed(frame: numpy.typing.NDArray[Any], dataset: pydicom.Dataset) -> bytes:
    if int(dataset.BitsAllocated) == 1:
        return numpy.packbits(frame.ravel(), bitorder="little").tobytes()
    return numpy.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<")).tobytes()
