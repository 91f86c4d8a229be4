"""read_header on real DICOM files from pydicom's test data, and on damaged ones."""

from __future__ import annotations

import warnings
from datetime import date
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medimg_core.errors import InvalidArgument
from medimg_ingest.dicom import InstanceHeader, read_header


def dicom_file(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(str(path)).read_bytes()


def reason_of(data: bytes, index: int = 0) -> str:
    """The reason read_header refuses `data`, as in production: pydicom's warnings stay warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read_header(data, index)
        except InvalidArgument as error:
            assert error.metadata["index"] == str(index)
            assert error.code.name == "INVALID_ARGUMENT"
            return error.reason
    return "ACCEPTED"


def part10(*, drop: tuple[str, ...] = (), **values: str) -> bytes:
    """A small Part 10 file written by pydicom, with elements dropped or replaced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values are the point of some tests
        dataset = Dataset()
        dataset.SOPClassUID = CTImageStorage
        dataset.SOPInstanceUID = generate_uid()
        dataset.StudyInstanceUID = generate_uid()
        dataset.SeriesInstanceUID = generate_uid()
        dataset.Modality = "CT"
        dataset.PatientName = "Doe^Jane"
        for keyword, value in values.items():
            setattr(dataset, keyword, value)
        for keyword in drop:
            delattr(dataset, keyword)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.file_meta = meta
        dataset.preamble = b"\0" * 128
        out = BytesIO()
        pydicom.dcmwrite(out, dataset, enforce_file_format=False)
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "modality", "transfer_syntax"),
    [
        ("CT_small.dcm", "CT", "1.2.840.10008.1.2.1"),
        ("MR_small.dcm", "MR", "1.2.840.10008.1.2.1"),
        ("rtplan.dcm", "RTPLAN", "1.2.840.10008.1.2"),
        ("JPEG2000.dcm", "NM", "1.2.840.10008.1.2.4.91"),
        ("SC_rgb_rle.dcm", "OT", "1.2.840.10008.1.2.5"),
        ("waveform_ecg.dcm", "ECG", "1.2.840.10008.1.2.1"),
    ],
)
def test_real_files(name: str, modality: str, transfer_syntax: str) -> None:
    data = dicom_file(name)
    expected = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    header = read_header(data, 0)
    uids = InstanceHeader(
        sop_class_uid=str(expected.SOPClassUID),
        sop_instance_uid=str(expected.SOPInstanceUID),
        study_uid=str(expected.StudyInstanceUID),
        series_uid=str(expected.SeriesInstanceUID),
        modality=modality,
        transfer_syntax=transfer_syntax,
    )
    assert [getattr(header, f) for f in _UID_FIELDS] == [getattr(uids, f) for f in _UID_FIELDS]
    assert header.rows == expected.get("Rows")
    assert header.columns == expected.get("Columns")


_UID_FIELDS = (
    "sop_class_uid",
    "sop_instance_uid",
    "study_uid",
    "series_uid",
    "modality",
    "transfer_syntax",
)


def test_the_header_carries_what_queries_match() -> None:
    data = dicom_file("CT_small.dcm")
    expected = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    header = read_header(data, 0)
    assert header.patient_id == expected.PatientID
    assert header.study_date == date(
        int(expected.StudyDate[:4]), int(expected.StudyDate[4:6]), int(expected.StudyDate[6:8])
    )
    assert header.series_number == int(expected.SeriesNumber)
    assert header.instance_number == int(expected.InstanceNumber)
    assert (header.rows, header.columns) == (128, 128)
    # A value that does not parse is left out, not refused.
    assert read_header(part10(StudyDate="20261399"), 0).study_date is None


def test_ct_small_uids() -> None:
    header = read_header(dicom_file("CT_small.dcm"), 0)
    assert header.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    assert header.sop_instance_uid == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert header.study_uid == "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
    assert header.series_uid == "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"


def test_a_written_file_is_read_back() -> None:
    header = read_header(part10(), 0)
    assert header.modality == "CT"
    assert header.sop_class_uid == CTImageStorage


def test_missing_modality_is_ot() -> None:
    assert read_header(part10(drop=("Modality",)), 0).modality == "OT"


def test_empty_file() -> None:
    assert reason_of(b"", 4) == "EMPTY_FILE"


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is not DICOM at all",
        b"\0" * 132,
        b"\0" * 128 + b"DICX" + b"\0" * 64,
        b"%PDF-1.7\n" + b"x" * 500,
    ],
)
def test_not_dicom(data: bytes) -> None:
    assert reason_of(data, 2) == "NOT_DICOM"


@pytest.mark.parametrize("name", ["ExplVR_BigEndNoMeta.dcm", "no_meta.dcm"])
def test_a_dataset_without_the_part10_header_is_not_dicom(name: str) -> None:
    assert reason_of(dicom_file(name)) == "NOT_DICOM"


@pytest.mark.parametrize("size", [200, 132, 140, 300])
def test_a_real_file_cut_in_its_header(size: int) -> None:
    assert reason_of(dicom_file("CT_small.dcm")[:size], 1) in ("MALFORMED_DICOM", "NOT_DICOM")


def test_a_real_file_cut_inside_a_value() -> None:
    assert reason_of(dicom_file("CT_small.dcm")[:1000]) == "TRUNCATED_FILE"
    assert reason_of(dicom_file("rtplan.dcm")[:2000]) == "TRUNCATED_FILE"


@pytest.mark.parametrize("size", [7000, 20000, 39000])
def test_a_real_file_cut_inside_its_pixel_data(size: int) -> None:
    assert reason_of(dicom_file("CT_small.dcm")[:size]) == "TRUNCATED_FILE"


def test_a_real_file_cut_inside_an_element_header() -> None:
    data = dicom_file("CT_small.dcm")
    assert reason_of(data[: len(data) - 126 - 6]) == "TRUNCATED_FILE"


def test_missing_sop_instance_uid() -> None:
    with pytest.raises(InvalidArgument) as caught:
        read_header(part10(drop=("SOPInstanceUID",)), 5)
    assert caught.value.reason == "MISSING_SOP_INSTANCE_UID"
    assert caught.value.metadata == {"index": "5", "keyword": "SOPInstanceUID"}


@pytest.mark.parametrize(
    ("keyword", "reason"),
    [
        ("SOPClassUID", "MISSING_SOP_CLASS_UID"),
        ("StudyInstanceUID", "MISSING_STUDY_INSTANCE_UID"),
        ("SeriesInstanceUID", "MISSING_SERIES_INSTANCE_UID"),
    ],
)
def test_missing_uids(keyword: str, reason: str) -> None:
    assert reason_of(part10(drop=(keyword,))) == reason


def test_an_invalid_uid_is_refused() -> None:
    assert reason_of(part10(SeriesInstanceUID="1.2.abc")) == "MISSING_SERIES_INSTANCE_UID"
    assert reason_of(part10(SOPInstanceUID="1." + "2" * 70)) == "MISSING_SOP_INSTANCE_UID"


def test_the_error_does_not_quote_the_file() -> None:
    with pytest.raises(InvalidArgument) as caught:
        read_header(part10(drop=("StudyInstanceUID",)), 0)
    assert "Doe" not in caught.value.message
    assert "Doe" not in str(caught.value.metadata)
