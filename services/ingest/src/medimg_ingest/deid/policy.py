"""What a de-identification policy may choose: the five supported options of PS3.15 Annex E
on top of the Basic Application Level Confidentiality Profile, and the quarantine waiver."""

from __future__ import annotations

from dataclasses import dataclass

from medimg_ingest.deid.table import OptionColumn


@dataclass(frozen=True)
class Policy:
    retain_modified_dates: bool = False
    """Retain Longitudinal Temporal Information with Modified Dates: dates shift by a keyed
    per-patient offset instead of being removed."""
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_safe_private: bool = False
    clean_descriptors: bool = False
    allow_burned_in: bool = False
    """Accept instances that may show identifying text in their pixels (no quarantine)."""

    def option_columns(self) -> frozenset[OptionColumn]:
        """The Table E.1-1 columns this policy turns on."""
        chosen = {
            OptionColumn.MODIFIED_DATES: self.retain_modified_dates,
            OptionColumn.PATIENT_CHARACTERISTICS: self.retain_patient_characteristics,
            OptionColumn.DEVICE_IDENTITY: self.retain_device_identity,
            OptionColumn.SAFE_PRIVATE: self.retain_safe_private,
            OptionColumn.CLEAN_DESCRIPTORS: self.clean_descriptors,
        }
        return frozenset(column for column, on in chosen.items() if on)
