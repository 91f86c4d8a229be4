"""DICOM de-identification by the Basic Application Level Confidentiality Profile of DICOM
PS3.15 Annex E, with its table (Table E.1-1 of DICOM PS3.15 2025a) shipped as data in
`table_e1_1.csv`.

Supported options, chosen per `Policy`: Retain Longitudinal Temporal Information with Modified
Dates, Retain Patient Characteristics, Retain Device Identity, Retain Safe Private (the list in
`safe_private.csv`), and Clean Descriptors. Clean Pixel Data is not done: `needs_quarantine`
tells which instances need a person to look at their pixels first.

Plain domain code: no I/O beyond reading the package's own data files.
"""

from medimg_ingest.deid.engine import DeidResult, deidentify
from medimg_ingest.deid.keyed import Pseudonym
from medimg_ingest.deid.policy import Policy
from medimg_ingest.deid.quarantine import needs_quarantine

#: The edition of PS3.15 whose Table E.1-1 `table_e1_1.csv` transcribes.
TABLE_EDITION = "2025a"

__all__ = [
    "TABLE_EDITION",
    "DeidResult",
    "Policy",
    "Pseudonym",
    "deidentify",
    "needs_quarantine",
]
