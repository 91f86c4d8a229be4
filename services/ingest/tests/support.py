"""What the ingest tests share besides fixtures (those are in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path

import asyncpg
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from medimg_core.audit import Access
from medimg_ingest import deid
from medimg_ingest.identities import IdentityVault
from medimg_ingest.pipeline import Pipeline

DEID_KEY = b"k" * 32
POLICY = deid.Policy(retain_modified_dates=True, clean_descriptors=True)
#: Every option the engine supports.
ALL_OPTIONS = deid.Policy(
    retain_modified_dates=True,
    retain_patient_characteristics=True,
    retain_device_identity=True,
    retain_safe_private=True,
    clean_descriptors=True,
)
#: Files in the corpora that are not DICOM datasets (pydicom keeps its dumps, JSON, ICC
#: profiles and compressed copies beside them).
NOT_DICOM_SUFFIXES = {".json", ".txt", ".gz", ".bz2", ".zip", ".icc", ".dump", ".xml", ".py"}
VAULT = IdentityVault(b"v" * 32)


def dicom_file(name: str) -> bytes:
    """One of the real DICOM files that ship with pydicom."""
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(str(path)).read_bytes()


class Recorded:
    """The audit hook: what the pipeline reported, and what the index held at that moment."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.accesses: list[Access] = []
        self.indexed_before: list[int] = []

    async def __call__(self, accesses: Sequence[Access]) -> None:
        self.indexed_before.append(await self.pool.fetchval("SELECT count(*) FROM instances"))
        self.accesses.extend(accesses)


MakePipeline = Callable[..., tuple[Pipeline, "Recorded"]]


def series(count: int, syntax: UID = ExplicitVRLittleEndian) -> list[Dataset]:
    """`count` instances of one new CT series, from pydicom's CT_small."""
    study, series_uid = generate_uid(), generate_uid()
    instances: list[Dataset] = []
    for n in range(count):
        dataset = pydicom.dcmread(BytesIO(dicom_file("CT_small.dcm")))
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.InstanceNumber = n + 1
        dataset.file_meta.TransferSyntaxUID = syntax
        out = BytesIO()
        dataset.save_as(out, enforce_file_format=True)  # encoded as `syntax` says
        instances.append(pydicom.dcmread(BytesIO(out.getvalue())))
    return instances
