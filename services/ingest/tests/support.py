"""What the ingest tests share besides fixtures (those are in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import asyncpg
from pydicom.data import get_testdata_file

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
