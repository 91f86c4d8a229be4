"""part10.encode writes what pydicom's dcmwrite writes, byte for byte, over the whole test
corpus of pydicom and pydicom-data: as read, de-identified (both as the pipeline stores them),
and in the encodings and shapes that take its other paths."""

from __future__ import annotations

import io
import struct
import time
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pydicom
import pydicom.config
import pytest
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from medimg_ingest import deid, dicom, part10
from medimg_ingest.pipeline import storage_form
from services.ingest.tests.support import ALL_OPTIONS, DEID_KEY, NOT_DICOM_SUFFIXES, dicom_file

#: What pydicom raises for a dataset it cannot write, as the pipeline expects them.
WRITE_ERRORS = (TypeError, ValueError, AttributeError, struct.error)

Prepare = Callable[[Dataset], Dataset]


def _corpus() -> list[tuple[str, bytes]]:
    """Every file of the two corpora that pydicom reads without complaint (as the pipeline
    reads them: `dicom.read_instance`)."""
    roots = [Path(DATA_ROOT) / "test_files", Path(str(resources.files("data_store") / "data"))]
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.suffix.lower() in NOT_DICOM_SUFFIXES:
                continue
            data = path.read_bytes()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    dicom.read_instance(data, 0)
            except Exception:  # noqa: BLE001 - not a file the pipeline would take
                continue
            found.append((f"{path.parent.name}/{path.name}", data))
    return found


CORPUS = _corpus()


def _pydicom(dataset: Dataset) -> bytes:
    out = io.BytesIO()
    pydicom.dcmwrite(out, dataset, enforce_file_format=True)
    return out.getvalue()


def _outcome(write: Callable[[Dataset], bytes], dataset: Dataset) -> bytes | str:
    """The bytes written, or the kind of error raised (as the pipeline tells them apart)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd values it writes anyway
            return write(dataset)
    except WRITE_ERRORS as error:
        return f"refused: {type(error).__name__}"


def _as_stored(policy: deid.Policy | None) -> Prepare:
    """What the pipeline writes: the instance de-identified by `policy` (None: as read, as a
    SEG made here is stored) in its storage form."""

    def prepare(dataset: Dataset) -> Dataset:
        if policy is not None:
            dataset = deid.deidentify(dataset, policy, DEID_KEY).dataset
        storage_form(dataset)
        return dataset

    return prepare


def _mismatches(prepare: Prepare) -> list[str]:
    """Corpus files whose encoding differs between pydicom and part10 (each written from a
    dataset of its own: writing converts elements of the dataset it writes)."""
    found = []
    for name, data in CORPUS:
        expected = _outcome(_pydicom, prepare(dicom.read_instance(data, 0)))
        actual = _outcome(part10.encode, prepare(dicom.read_instance(data, 0)))
        if actual != expected:
            found.append(name)
    return found


def test_the_corpus_is_large_and_has_both_encodings() -> None:
    assert len(CORPUS) >= 200
    encodings = {dicom.read_instance(data, 0).original_encoding for _, data in CORPUS}
    assert {(False, True), (True, True), (False, False)} <= encodings


@pytest.mark.parametrize(
    "policy", [deid.Policy(), ALL_OPTIONS, None], ids=["basic", "all-options", "as-read"]
)
def test_stored_bytes_are_what_pydicom_writes(policy: deid.Policy | None) -> None:
    assert _mismatches(_as_stored(policy)) == []


def test_files_are_written_in_their_own_encoding_as_pydicom_writes_them() -> None:
    # Big endian and deflated files take pydicom's own writer; the rest part10's.
    assert _mismatches(lambda dataset: dataset) == []


def test_elements_that_were_accessed_or_replaced_are_encoded_as_pydicom_encodes_them() -> None:
    def touched(dataset: Dataset) -> Dataset:
        for _ in dataset.iterall():  # converts every raw element, at every depth
            pass
        dataset.StudyDescription = "Thorax \u00e9tude"  # text in the character set
        dataset.ImageComments = "odd"  # padded
        dataset.SeriesNumber = 7  # IS: pydicom's number string
        dataset.InstanceNumber = "12"
        dataset.add_new(0x00091010, "LO", "private")  # no creator: kept as it is
        dataset.ReferencedImageSequence = Sequence([Dataset(), Dataset()])
        dataset.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
        dataset.ReferencedImageSequence[1].ReferencedFrameNumber = [1, 2]
        dataset["ReferencedImageSequence"].is_undefined_length = True
        dataset.ReferencedImageSequence[1].is_undefined_length_sequence_item = True
        dataset.FrameOfReferenceUID = ""
        return dataset

    assert _mismatches(lambda dataset: touched(_as_stored(deid.Policy())(dataset))) == []


def test_a_dataset_pydicom_refuses_is_refused_alike() -> None:
    dataset = dicom.read_instance(dicom_file("CT_small.dcm"), 0)
    storage_form(dataset)
    dataset.add_new(0x00000900, "US", 0)  # a command element in a data set
    with pytest.raises(ValueError, match="Command Set"):
        _pydicom(dataset)
    with pytest.raises(ValueError, match="Command Set"):
        part10.encode(dataset)


def test_the_file_reads_back_with_its_own_meta() -> None:
    dataset = _as_stored(deid.Policy())(dicom.read_instance(dicom_file("693_UNCI.dcm"), 0))
    back = pydicom.dcmread(io.BytesIO(part10.encode(dataset)))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID
    assert back.PixelData == dataset.PixelData


def test_a_512_ct_is_written_in_half_the_time_pydicom_takes() -> None:
    data = dicom_file("693_UNCI.dcm")
    prepare = _as_stored(deid.Policy())

    def cost(write: Callable[[Dataset], bytes]) -> float:
        datasets = [prepare(dicom.read_instance(data, 0)) for _ in range(20)]
        start = time.thread_time()
        for dataset in datasets:
            write(dataset)
        return time.thread_time() - start

    # The best of several tries: the machine is shared.
    ratios = sorted(cost(part10.encode) / cost(_pydicom) for _ in range(5))
    assert ratios[0] < 0.5, ratios
