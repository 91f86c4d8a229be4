"""STOW-RS of DICOM JSON with bulk data (PS3.18 10.5.1.2): each dataset of the metadata parts,
with the bulk data parts its BulkDataURIs name (by Content-Location), assembled into the Part
10 file the pipeline takes, the same as a file sent as application/dicom.

The transfer syntax comes from the media type of the Pixel Data part(s):
application/octet-stream (native, Explicit VR Little Endian), or a compressed media type
(image/jpeg, image/jls, image/jp2, ...; its `transfer-syntax` parameter, else the default
syntax of that type), one part per frame. A dataset that cannot be assembled gets a refusal
of its own; its neighbours go on. Refusals name tags and part numbers, never values.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from medimg_ingest.dicomweb import DICOM_JSON, Part, media_type
from medimg_ingest.pipeline import Outcome, Result
from medimg_ingest.wado import MEDIA_TYPES, OCTET_STREAM

#: The syntax a compressed media type means without a transfer-syntax parameter (PS3.18
#: Table 8.7.3-2, the first of each).
_DEFAULT_SYNTAXES = {
    "image/jpeg": JPEGBaseline8Bit,
    "image/jls": JPEGLSLossless,
    "image/x-jls": JPEGLSLossless,
    "image/jp2": JPEG2000Lossless,
    "image/jpx": JPEG2000MCLossless,
    "image/jphc": HTJ2KLossless,
    "image/dicom-rle": RLELossless,
    "image/x-dicom-rle": RLELossless,
}
_PIXEL_DATA = "7FE00010"


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def instances(parts: Sequence[Part]) -> list[bytes | Result]:
    """A Part 10 file for each dataset of the metadata parts, or the refusal of that dataset
    (or of a whole metadata part that is not a DICOM JSON array)."""
    bulk: dict[str, list[Part]] = {}
    for part in parts:
        if media_type(part.content_type)[0] != DICOM_JSON and part.location:
            bulk.setdefault(part.location, []).append(part)
    answer: list[bytes | Result] = []
    metadata = [
        (number, p)
        for number, p in enumerate(parts, start=1)
        if media_type(p.content_type)[0] == DICOM_JSON
    ]
    if not metadata:
        return [_refusal("INVALID_DICOM_JSON", f"the body has no {DICOM_JSON} part to store")]
    for number, part in metadata:
        try:
            datasets = json.loads(part.data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            answer.append(
                _refusal(
                    "INVALID_DICOM_JSON",
                    f"part {number} is not JSON (line {getattr(error, 'lineno', 1)})",
                )
            )
            continue
        if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
            answer.append(
                _refusal("INVALID_DICOM_JSON", f"part {number} is not an array of JSON objects")
            )
            continue
        if not datasets:
            answer.append(_refusal("INVALID_DICOM_JSON", f"part {number} holds no dataset"))
        for position, item in enumerate(datasets, start=1):
            try:
                answer.append(_part10(item, bulk))
            except _Refused as refused:
                answer.append(
                    _refusal(refused.reason, f"dataset {position} of part {number}: {refused}")
                )
    return answer


def _refusal(reason: str, message: str) -> Result:
    return Result(Outcome.REJECTED, reason=reason, message=message)


def _part10(item: dict[str, Any], bulk: dict[str, list[Part]]) -> bytes:
    syntaxes: set[UID] = set()

    def value_of(tag: str, vr: str, uri: str) -> bytes:
        parts = bulk.get(uri)
        if not parts:
            raise _Refused(
                "MISSING_BULK_DATA",
                f"the BulkDataURI of ({tag[:4]},{tag[4:]}) names no part of the body "
                "(by its Content-Location)",
            )
        syntax = _syntax_of(parts, tag)
        if tag != _PIXEL_DATA and syntax != ExplicitVRLittleEndian:
            raise _Refused(
                "INVALID_BULK_DATA",
                f"({tag[:4]},{tag[4:]}) is sent compressed: only pixel data may be",
            )
        syntaxes.add(syntax)
        if syntax.is_encapsulated:
            return encapsulate([p.data for p in parts])
        return b"".join(p.data for p in parts)

    # File meta is rebuilt here, as the pipeline rebuilds it, whatever the client sent.
    attributes = {k: v for k, v in item.items() if not k.upper().startswith("0002")}
    try:
        dataset = pydicom.Dataset.from_json(attributes, bulk_data_uri_handler=value_of)
    except _Refused:
        raise
    except Exception as error:  # pydicom refuses bad JSON in many ways
        raise _Refused(
            "INVALID_DICOM_JSON", f"{_culprit(attributes)} is not valid DICOM JSON"
        ) from error
    if len(syntaxes) > 1:
        raise _Refused("INVALID_BULK_DATA", "its bulk data parts disagree on the transfer syntax")
    syntax = syntaxes.pop() if syntaxes else ExplicitVRLittleEndian
    if syntax.is_encapsulated and _PIXEL_DATA in attributes:
        dataset["PixelData"].VR = "OB"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    for meta, keyword in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        if keyword in dataset:  # else the pipeline refuses it, with its own reason
            setattr(dataset.file_meta, meta, dataset[keyword].value)
    dataset.preamble = b"\0" * 128
    out = io.BytesIO()
    try:
        pydicom.dcmwrite(out, dataset, enforce_file_format=False)
    except Exception as error:  # values pydicom cannot encode
        raise _Refused(
            "INVALID_DICOM_JSON", "its values cannot be encoded as DICOM (check VRs and values)"
        ) from error
    return out.getvalue()


def _syntax_of(parts: Sequence[Part], tag: str) -> UID:
    syntaxes: set[UID] = set()
    for part in parts:
        kind, params = media_type(part.content_type)
        named = params.get("transfer-syntax")
        if kind == OCTET_STREAM:
            if named not in (None, ExplicitVRLittleEndian):
                raise _Refused(
                    "INVALID_BULK_DATA",
                    f"({tag[:4]},{tag[4:]}) is {OCTET_STREAM}, which is uncompressed, not {named}",
                )
            syntaxes.add(ExplicitVRLittleEndian)
        elif kind in _DEFAULT_SYNTAXES:
            syntax = UID(named) if named else _DEFAULT_SYNTAXES[kind]
            if MEDIA_TYPES.get(syntax) != _DEFAULT_SYNTAXES_MEDIA.get(kind):
                raise _Refused(
                    "INVALID_BULK_DATA",
                    f"({tag[:4]},{tag[4:]}) is {kind}, which cannot hold transfer syntax {syntax}",
                )
            syntaxes.add(syntax)
        else:
            raise _Refused(
                "UNSUPPORTED_MEDIA_TYPE",
                f"({tag[:4]},{tag[4:]}) is sent as {kind or 'untyped'}: bulk data is "
                f"{OCTET_STREAM} or, for pixel data, one of "
                f"{', '.join(sorted(set(MEDIA_TYPES.values())))}",
            )
    if len(syntaxes) != 1:
        raise _Refused(
            "INVALID_BULK_DATA",
            f"the parts of ({tag[:4]},{tag[4:]}) disagree on the transfer syntax",
        )
    return syntaxes.pop()


#: The canonical media type of each accepted name.
_DEFAULT_SYNTAXES_MEDIA = {kind: MEDIA_TYPES[syntax] for kind, syntax in _DEFAULT_SYNTAXES.items()}


def _no_bulk_data(tag: str, vr: str, uri: str) -> bytes:
    return b""


def _culprit(attributes: dict[str, Any]) -> str:
    """The first attribute that does not convert on its own, for a refusal to name."""
    for key, value in attributes.items():
        try:
            pydicom.Dataset.from_json({key: value}, bulk_data_uri_handler=_no_bulk_data)
        except Exception:  # noqa: BLE001 - looking for the one that fails
            if len(key) == 8:
                return f"attribute ({key[:4]},{key[4:]})"
            return "an attribute key"
    return "the dataset"
