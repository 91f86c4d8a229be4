"""Reads and validates one DICOM Part 10 file: what the index needs, or exactly why not."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from io import BytesIO

import pydicom
import pydicom.config
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
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
    """What the index keeps of an instance: its UIDs and the attributes queries match on."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    transfer_syntax: str
    patient_id: str = ""
    study_date: date | None = None
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None


def read_header(data: bytes, index: int) -> InstanceHeader:
    """Parses and validates the file (see `read_instance`) and returns its header."""
    return header_of(read_instance(data, index))


def read_instance(data: bytes, index: int) -> pydicom.Dataset:
    """Parses the file (pixel data not decoded) or raises InvalidArgument naming the problem.

    `index` is the file's position in the upload, reported back in the error.
    """
    if not data:
        raise InvalidArgument("EMPTY_FILE", f"file {index} is empty", index=index)
    try:
        dataset = pydicom.dcmread(BytesIO(data))
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
    for keyword, reason in _REQUIRED_UIDS:
        value = str(dataset.get(keyword, "") or "")
        if not value or not UID(value).is_valid:
            raise InvalidArgument(
                reason, f"file {index} has no valid {keyword}", index=index, keyword=keyword
            )
    if not str(dataset.file_meta.get("TransferSyntaxUID", "") or ""):
        raise InvalidArgument(
            "MISSING_TRANSFER_SYNTAX", f"file {index} has no Transfer Syntax UID", index=index
        )
    return dataset


def header_of(dataset: pydicom.Dataset) -> InstanceHeader:
    """The header of a validated instance. Values that do not parse are left out, not refused:
    queries then do not match on them, and the instance itself is kept as it came."""
    return InstanceHeader(
        sop_class_uid=_text(dataset, "SOPClassUID"),
        sop_instance_uid=_text(dataset, "SOPInstanceUID"),
        study_uid=_text(dataset, "StudyInstanceUID"),
        series_uid=_text(dataset, "SeriesInstanceUID"),
        modality=_text(dataset, "Modality") or "OT",
        transfer_syntax=str(dataset.file_meta.get("TransferSyntaxUID", "") or ""),
        patient_id=_text(dataset, "PatientID"),
        study_date=_date(_text(dataset, "StudyDate")),
        study_time=_text(dataset, "StudyTime"),
        accession_number=_text(dataset, "AccessionNumber"),
        study_id=_text(dataset, "StudyID"),
        study_description=_text(dataset, "StudyDescription"),
        series_number=_integer(dataset, "SeriesNumber"),
        series_description=_text(dataset, "SeriesDescription"),
        body_part_examined=_text(dataset, "BodyPartExamined"),
        instance_number=_integer(dataset, "InstanceNumber"),
        rows=_integer(dataset, "Rows"),
        columns=_integer(dataset, "Columns"),
        number_of_frames=_integer(dataset, "NumberOfFrames"),
    )


def _text(dataset: pydicom.Dataset, keyword: str) -> str:
    try:
        value = dataset.get(keyword)
    except Exception:  # noqa: BLE001 - a value its VR cannot hold: as if absent
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:1024]


def _integer(dataset: pydicom.Dataset, keyword: str) -> int | None:
    text = _text(dataset, keyword).split("\\")[0]
    try:
        number = int(float(text))
    except ValueError:
        return None
    return number if -(2**31) <= number < 2**31 else None


def _date(text: str) -> date | None:
    try:
        return datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


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
