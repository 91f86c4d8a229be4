"""Pixel data at the door: whether an instance's pixels decode here, and if not, exactly why.

Compressed transfer syntaxes decode through pydicom's pixel decoders with the pylibjpeg
plugins: libjpeg for JPEG and JPEG-LS, OpenJPEG for JPEG 2000 and HTJ2K, pylibjpeg-rle for
RLE. pydicom inflates Deflated Explicit VR Little Endian while reading the file, so its pixel
data arrive here native. Refusals never quote attribute values (they may be PHI): only
attribute keywords, transfer syntax UIDs, frame indices and byte counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from math import ceil
from typing import Any

import numpy
import numpy.typing
import pydicom
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders.base import Decoder, DecodeRunner, get_decoder
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import (
    UID,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from medimg_core.errors import InvalidArgument

#: The elements that hold pixel data; an instance has at most one of them.
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: The pydicom decoding plugin preferred wherever it is available: one decoder per syntax
#: gives the same pixels on every host, whatever else happens to be installed.
_PREFERRED_PLUGIN = "pylibjpeg"

#: Syntaxes whose decoder (libjpeg) fills in a cut-off codestream without complaint, so a
#: missing end-of-image marker is the only sign that a frame was truncated.
_SILENT_ON_TRUNCATION = frozenset(
    {
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
    }
)
_END_OF_IMAGE = b"\xff\xd9"
#: Bytes seen after the end-of-image marker in real files: DICOM's even-length NULL
#: padding and JPEG fill bytes.
_TRAILING_FILL = b"\x00\xff"

_ALWAYS_REQUIRED = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "PhotometricInterpretation",
)
#: Integer pixel data also needs these to be given a dtype (float pixel data does not).
_INTEGER_REQUIRED = ("BitsStored", "PixelRepresentation")


def pixel_keyword(dataset: pydicom.Dataset) -> str | None:
    """The keyword of the element holding the instance's pixel data, or None if it has none."""
    return next((keyword for keyword in PIXEL_KEYWORDS if keyword in dataset), None)


def frame_count(dataset: pydicom.Dataset) -> int:
    """NumberOfFrames, 1 when absent; refused when present but not a positive integer."""
    if "NumberOfFrames" not in dataset:
        return 1
    try:
        count = int(dataset.NumberOfFrames)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise _inconsistent("NumberOfFrames is not a positive integer", keyword="NumberOfFrames")
    return count


def check_decodable(dataset: pydicom.Dataset) -> None:
    """Refuses (InvalidArgument) an instance whose pixel data cannot be decoded here.

    Native pixel data are checked against Rows*Columns*frames*samples*bits/8 and the Image
    Pixel attributes validated, without decoding: once those agree, a native decode only
    reshapes the same bytes (on pydicom's corpus it refused nothing these checks let
    through) and costs as much as the rest of the checks together. Every compressed frame is
    decoded once and dropped, so the check costs one decode of the instance but holds one
    frame at a time. Instances without pixel data (SR, most RT objects) pass. Reasons:
    UNSUPPORTED_TRANSFER_SYNTAX, INCONSISTENT_PIXEL_DATA, UNDECODABLE_PIXEL_DATA.
    """
    keyword = pixel_keyword(dataset)
    if keyword is None:
        return
    syntax, decoder = _decoder_for(dataset)
    frames = _check_attributes(dataset, keyword, syntax)
    if not syntax.is_encapsulated:
        return
    for _ in _decode(dataset, syntax, decoder, frames, raw=True, view_only=True):
        pass


def decoded_frames(
    dataset: pydicom.Dataset, *, raw: bool = False, view_only: bool = False
) -> Iterator[numpy.typing.NDArray[Any]]:
    """Checks the pixel data as `check_decodable` does, then yields the frames in stored order.

    Each frame is (rows, columns) or, for several samples per pixel, (rows, columns,
    samples), in the stored dtype before any Modality LUT. Unless `raw`, YBR colour is
    converted to RGB. With `view_only`, native frames may be read-only views of the dataset.
    Refusals found while decoding are raised when the frame is reached.
    """
    keyword = pixel_keyword(dataset)
    if keyword is None:
        raise InvalidArgument("NO_PIXEL_DATA", "the instance has no pixel data")
    syntax, decoder = _decoder_for(dataset)
    frames = _check_attributes(dataset, keyword, syntax)
    return _decode(dataset, syntax, decoder, frames, raw=raw, view_only=view_only)


def _decoder_for(dataset: pydicom.Dataset) -> tuple[UID, Decoder]:
    file_meta = getattr(dataset, "file_meta", None)
    syntax = UID(str(file_meta.get("TransferSyntaxUID", "") or "") if file_meta else "")
    if not syntax:
        raise InvalidArgument(
            "UNSUPPORTED_TRANSFER_SYNTAX",
            "the instance has pixel data but no Transfer Syntax UID",
            transfer_syntax="",
        )
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise InvalidArgument(
            "UNSUPPORTED_TRANSFER_SYNTAX",
            f"no installed decoder handles pixel data in transfer syntax {_describe(syntax)}",
            transfer_syntax=str(syntax),
        )
    return syntax, decoder


def _check_attributes(dataset: pydicom.Dataset, keyword: str, syntax: UID) -> int:
    """Refuses Image Pixel attributes that are missing, invalid, or that disagree with the
    length of native pixel data; returns the number of frames."""
    required = _ALWAYS_REQUIRED + (_INTEGER_REQUIRED if keyword == "PixelData" else ())
    for name in required:
        if dataset.get(name) in (None, ""):
            raise _inconsistent(f"{name} is missing or empty", keyword=name)
    frames = frame_count(dataset)
    runner = DecodeRunner(syntax)
    try:
        runner.set_source(dataset)
        if not syntax.is_encapsulated:
            # Checked before pydicom's own validation, which only warns about excess bytes.
            expected = ceil(runner.frame_length(unit="bytes") * frames)
            actual = len(dataset[keyword].value)
            if actual not in (expected, expected + expected % 2):
                raise _inconsistent(
                    f"{keyword} holds {actual} bytes where Rows, Columns, frames, samples "
                    f"and BitsAllocated call for {expected}",
                    expected_bytes=expected,
                    actual_bytes=actual,
                )
        runner.validate()
    except (AttributeError, TypeError, ValueError, NotImplementedError) as error:
        raise _inconsistent(
            "the Image Pixel attributes are invalid or contradict each other"
        ) from error
    return frames


def _decode(
    dataset: pydicom.Dataset,
    syntax: UID,
    decoder: Decoder,
    frames: int,
    *,
    raw: bool,
    view_only: bool,
) -> Iterator[numpy.typing.NDArray[Any]]:
    plugin = _PREFERRED_PLUGIN if _PREFERRED_PLUGIN in decoder.available_plugins else ""
    pixels = iter_pixels(dataset, raw=raw, decoding_plugin=plugin, view_only=view_only)
    codestreams = (
        generate_frames(dataset.PixelData, number_of_frames=frames)
        if syntax in _SILENT_ON_TRUNCATION
        else None
    )
    for index in range(frames):
        try:
            if codestreams is not None:
                _check_end_of_image(next(codestreams), index, syntax)
            frame = next(pixels)
        except InvalidArgument:
            raise
        except Exception as error:  # any decoder failure: the instance's fault, not ours
            if syntax.is_encapsulated:
                raise _undecodable(index, syntax) from error
            raise _inconsistent(
                f"native frame {index} does not match its Image Pixel attributes", frame=index
            ) from error
        yield frame


def _check_end_of_image(codestream: bytes, index: int, syntax: UID) -> None:
    if not codestream.rstrip(_TRAILING_FILL).endswith(_END_OF_IMAGE):
        raise InvalidArgument(
            "UNDECODABLE_PIXEL_DATA",
            f"frame {index} ends without a JPEG end-of-image marker (truncated) in "
            f"transfer syntax {_describe(syntax)}",
            transfer_syntax=str(syntax),
            frame=index,
        )


def _undecodable(index: int, syntax: UID) -> InvalidArgument:
    return InvalidArgument(
        "UNDECODABLE_PIXEL_DATA",
        f"frame {index} could not be decoded as {_describe(syntax)} "
        "(corrupt or truncated, or not the size the Image Pixel attributes give)",
        transfer_syntax=str(syntax),
        frame=index,
    )


def _inconsistent(message: str, **metadata: str | int) -> InvalidArgument:
    return InvalidArgument("INCONSISTENT_PIXEL_DATA", message, **metadata)


def _describe(syntax: UID) -> str:
    return f"{syntax} ({syntax.name})" if syntax.name != str(syntax) else str(syntax)
