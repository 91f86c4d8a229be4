"""Reads and validates one DICOM Part 10 file: what the index needs, or exactly why not."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

import pydicom
import pydicom.config
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medimg_core.errors import InvalidArgument

# Ingest validates what it needs itself. pydicom's own reading checks would log the
# offending values (possibly PHI) and, under warnings-as-errors, fail good files.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

#: (keyword, reason when missing or malformed) of the UIDs every stored instance needs.
_REQUIRED_UIDS = (
    ("SOPClassUID", "MISSING_SOP_CLASS_UID"),
    ("SOPInstanceUID", "MISSING_SOP_INSTANCE_UID"),
    ("StudyInstanceUID", "MISSING_STUDY_INSTANCE_UID"),
    ("SeriesInstanceUID", "MISSING_SERIES_INSTANCE_UID"),
)


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    transfer_syntax: str


def read_header(data: bytes, index: int) -> InstanceHeader:
    """Parses the file (pixel data not decoded) or raises InvalidArgument naming the problem.

    `index` is the file's position in the upload, reported back in the error.
    """
    if not data:
        raise InvalidArgument("EMPTY_FILE", f"file {index} is empty", index=index)
    try:
        # Large values stay raw (unread), so the check below sees their declared lengths.
        dataset = pydicom.dcmread(BytesIO(data), defer_size=1024)
    except InvalidDicomError as error:
        raise InvalidArgument(
            "NOT_DICOM",
            f"file {index} is not a DICOM Part 10 file (no 'DICM' preamble)",
            index=index,
        ) from error
    except Exception as error:
        raise InvalidArgument(
            "MALFORMED_DICOM",
            f"file {index} could not be parsed as DICOM (truncated or damaged)",
            index=index,
        ) from error
    if not len(dataset):
        raise InvalidArgument(
            "MALFORMED_DICOM", f"file {index} has a header but no data elements", index=index
        )
    _refuse_truncated(dataset, len(data), index)
    uids = {}
    for keyword, reason in _REQUIRED_UIDS:
        value = str(dataset.get(keyword, "") or "")
        if not value or not UID(value).is_valid:
            raise InvalidArgument(
                reason, f"file {index} has no valid {keyword}", index=index, keyword=keyword
            )
        uids[keyword] = value
    transfer_syntax = str(dataset.file_meta.get("TransferSyntaxUID", "") or "")
    if not transfer_syntax:
        raise InvalidArgument(
            "MISSING_TRANSFER_SYNTAX", f"file {index} has no Transfer Syntax UID", index=index
        )
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        modality=str(dataset.get("Modality", "") or "OT"),
        transfer_syntax=transfer_syntax,
    )


def _refuse_truncated(dataset: pydicom.Dataset, size: int, index: int) -> None:
    """pydicom reads a cut file without complaint: its last element then claims more bytes
    than the file has left, or a partial element header is dropped, leaving bytes after it."""
    last = dataset.get_item(list(dataset.keys())[-1], keep_deferred=True)
    start, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if start is None or length is None or length == 0xFFFFFFFF:
        return  # a sequence or encapsulated data of undefined length: parsed to its end
    if start + length > size:
        raise InvalidArgument(
            "TRUNCATED_FILE",
            f"file {index} ends {start + length - size} bytes before its last element does",
            index=index,
        )
    if start + length < size:
        raise InvalidArgument(
            "TRUNCATED_FILE",
            f"file {index} ends inside an element header ({size - start - length} bytes left)",
            index=index,
        )
