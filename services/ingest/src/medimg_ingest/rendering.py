"""WADO-RS rendered (PS3.18 8.3.5, 10.4.1.1.3): one frame of a stored instance as a picture a
browser shows, image/png or image/jpeg.

Greyscale goes through the grayscale pipeline of PS3.3 C.11: the Modality LUT (rescale or
LUT), then the VOI (a window from the query, else the frame's or the instance's VOI LUT or
window, else the frame's own range) onto 8 bits, inverted for MONOCHROME1. Colour is shown
as RGB, palette colour through its palette. pydicom does the LUT work, Pillow the encoding.
Knows nothing of gRPC.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy
import numpy.typing
import pydicom
from PIL import Image
from pydicom.pixels.processing import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
)

from medimg_core.errors import InvalidArgument, NotFound
from medimg_ingest import pixels
from medimg_ingest.dicomweb import NotAcceptable
from medimg_ingest.wado import accepted_ranges

PNG = "image/png"
JPEG = "image/jpeg"
_FORMATS = {PNG: "PNG", JPEG: "JPEG"}
#: PS3.18 names of the VOI LUT functions, and DICOM's.
_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}
#: The query parameters rendering reads.
PARAMETERS = frozenset({"window", "viewport", "quality"})
#: The largest viewport side: a rendered frame is for a screen.
MAX_VIEWPORT = 8192

Array = numpy.typing.NDArray[Any]


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class Options:
    """How to render: the media type, an explicit window, a viewport to fit, JPEG quality."""

    media_type: str = PNG
    window: Window | None = None
    viewport: tuple[int, int] | None = None
    quality: int = 90


def options(accept: str, params: Mapping[str, Sequence[str]]) -> Options:
    """The rendering that the Accept header and the query parameters ask for, checked."""
    unknown = sorted(set(params) - PARAMETERS)
    if unknown:
        raise InvalidArgument(
            "UNSUPPORTED_QUERY_PARAMETER",
            f"{unknown[0]} is not a rendering parameter; those are {', '.join(sorted(PARAMETERS))}",
        )
    window = _window(_one(params, "window")) if "window" in params else None
    viewport = _viewport(_one(params, "viewport")) if "viewport" in params else None
    quality = 90
    if "quality" in params:
        text = _one(params, "quality")
        if not text.isdigit() or not 1 <= int(text) <= 100:
            raise InvalidArgument("INVALID_QUERY_VALUE", "quality is an integer from 1 to 100")
        quality = int(text)
    return Options(_media_type(accept), window, viewport, quality)


def _one(params: Mapping[str, Sequence[str]], name: str) -> str:
    values = params[name]
    if len(values) != 1:
        raise InvalidArgument("INVALID_QUERY_VALUE", f"{name} is given more than once")
    return values[0]


def _media_type(accept: str) -> str:
    for kind, _ in accepted_ranges(accept):
        if kind in _FORMATS:
            return kind
        if kind in ("*/*", "image/*"):
            return PNG
    raise NotAcceptable(f"rendered frames are served as {PNG} or {JPEG}; Accept allows neither")


def _window(text: str) -> Window:
    fields = [f.strip() for f in text.split(",")]
    try:
        if len(fields) not in (2, 3):
            raise ValueError
        center, width = float(fields[0]), float(fields[1])
        function = _FUNCTIONS[fields[2].lower()] if len(fields) == 3 else "LINEAR"
    except (ValueError, KeyError):
        raise InvalidArgument(
            "INVALID_WINDOW",
            "window is center,width[,function] with numbers and a function of "
            f"{', '.join(_FUNCTIONS)} (e.g. window=40,400,linear)",
        ) from None
    too_narrow = width < 1 if function == "LINEAR" else width <= 0
    if not numpy.isfinite([center, width]).all() or too_narrow:
        raise InvalidArgument(
            "INVALID_WINDOW",
            "the window width must be at least 1 for linear, above 0 for the others",
        )
    return Window(center, width, function)


def _viewport(text: str) -> tuple[int, int]:
    fields = [f.strip() for f in text.split(",")]
    if len(fields) != 2 or not all(f.isdigit() and 0 < int(f) <= MAX_VIEWPORT for f in fields):
        raise InvalidArgument(
            "INVALID_VIEWPORT",
            f"viewport is width,height in pixels, each from 1 to {MAX_VIEWPORT} (e.g. 256,256)",
        )
    return int(fields[0]), int(fields[1])


def render(data: bytes, frame: int, how: Options) -> bytes:
    """Frame `frame` (1-based) of a stored instance, encoded as `how` says."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    if pixels.pixel_keyword(dataset) is None:
        raise InvalidArgument("NO_PIXEL_DATA", "the instance has no pixel data to render")
    count = pixels.frame_count(dataset)
    if frame > count:
        raise NotFound(
            "FRAME_NOT_FOUND",
            f"frame {frame} is beyond the last frame of the instance, {count}",
            frames=count,
        )
    decoded = pixels.decoded_frames(dataset)  # colour as RGB
    for _ in range(frame - 1):
        next(decoded)
    image = _image(next(decoded), dataset, frame - 1, how.window)
    if how.viewport is not None:
        scale = min(how.viewport[0] / image.width, how.viewport[1] / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if how.media_type == JPEG:
        image.save(out, "JPEG", quality=how.quality)
    else:
        image.save(out, "PNG")
    return out.getvalue()


def _image(
    frame: Array, dataset: pydicom.Dataset, index: int, window: Window | None
) -> Image.Image:
    interpretation = str(dataset.PhotometricInterpretation)
    if interpretation in ("MONOCHROME1", "MONOCHROME2") and frame.ndim == 2:
        grey = _grey(frame, dataset, index, window)
        if interpretation == "MONOCHROME1":
            grey = 1.0 - grey
        return Image.fromarray(_eight_bits(grey), "L")
    if interpretation == "PALETTE COLOR":
        rgb = apply_color_lut(frame, dataset)
        top = 255 if rgb.dtype == numpy.uint8 else 65535
        return Image.fromarray(_eight_bits(rgb / top), "RGB")
    if frame.ndim == 3 and frame.shape[2] == 3:
        top = 2 ** int(dataset.get("BitsStored", 8)) - 1
        return Image.fromarray(_eight_bits(frame / top), "RGB")
    raise InvalidArgument(
        "UNRENDERABLE",
        f"frames of Photometric Interpretation {interpretation} are not rendered here",
    )


def _grey(frame: Array, dataset: pydicom.Dataset, index: int, window: Window | None) -> Array:
    """A greyscale frame through the Modality LUT and the VOI, as values in [0, 1]."""
    values = apply_modality_lut(
        frame, _frame_attributes(dataset, index, "PixelValueTransformation")
    )
    voi = _frame_attributes(dataset, index, "FrameVOILUT")
    if window is not None:
        return _windowed(values, window)
    if voi.get("VOILUTSequence"):
        # A VOI LUT maps stored values: scale its output by what its entries span.
        item = voi.VOILUTSequence[0]
        entries, first = int(item.LUTDescriptor[0] or 65536), int(item.LUTDescriptor[1])
        lut = apply_voi(numpy.arange(first, first + entries), voi).astype("float64")
        low, high = float(lut.min()), float(lut.max())
        out = apply_voi(numpy.rint(values).astype("int64"), voi).astype("float64")
        return (out - low) / (high - low) if high > low else numpy.zeros_like(out)
    if voi.get("WindowCenter") is not None and voi.get("WindowWidth") is not None:
        center, width = _first(voi.WindowCenter), _first(voi.WindowWidth)
        function = str(voi.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        try:
            return _windowed(values, Window(center, width, function))
        except ValueError:
            pass  # a window the instance gives but that cannot apply: use the range
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else numpy.zeros(values.shape)


def _windowed(values: Array, window: Window) -> Array:
    # An 8-bit unsigned output, without rescale: pydicom then windows onto [0, 255].
    view = pydicom.Dataset()
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored = 8
    view.PixelRepresentation = 0
    view.WindowCenter = window.center
    view.WindowWidth = window.width
    view.VOILUTFunction = window.function
    return numpy.asarray(apply_windowing(values, view), dtype="float64") / 255.0


def _frame_attributes(dataset: pydicom.Dataset, index: int, group: str) -> pydicom.Dataset:
    """The attributes of one functional group (PixelValueTransformation, FrameVOILUT) that
    apply to frame `index`: its per-frame item, else the shared one, else the top level."""
    keyword = f"{group}Sequence"
    for holder in (
        _item(dataset.get("PerFrameFunctionalGroupsSequence"), index),
        _item(dataset.get("SharedFunctionalGroupsSequence"), 0),
    ):
        found = _item(holder.get(keyword) if holder is not None else None, 0)
        if found is not None:
            return found
    return dataset


def _item(sequence: Any, index: int) -> pydicom.Dataset | None:
    if sequence is None or index >= len(sequence):
        return None
    item: pydicom.Dataset = sequence[index]
    return item


def _first(value: Any) -> float:
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _eight_bits(unit: Array) -> Array:
    return numpy.clip(numpy.rint(unit * 255.0), 0, 255).astype(numpy.uint8)
