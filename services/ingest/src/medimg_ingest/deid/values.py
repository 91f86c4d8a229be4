"""Replacement values by VR: dummies (action D), empties (Z), shifted dates and cleaned text (C).

Dates are DICOM strings (DA "YYYYMMDD", DT "YYYYMMDDHHMMSS.FFFFFF&ZZXX" with optional trailing
parts); a date that cannot be parsed is emptied rather than kept, since keeping it would leak it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date, timedelta
from typing import Any

DUMMY_TEXT = "ANONYMIZED"

#: Value representations whose values are free text or names: what D replaces with DUMMY_TEXT
#: and what C cleans.
TEXT_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
DATE_VRS = frozenset({"DA", "DT"})

_DUMMY_BY_VR: dict[str, Any] = {
    "AE": DUMMY_TEXT,
    "AS": "000D",
    "CS": DUMMY_TEXT,
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    **dict.fromkeys(TEXT_VRS, DUMMY_TEXT),
    **dict.fromkeys(NUMBER_VRS, 0),
    # Two bytes, not one: binary values have even length.
    **dict.fromkeys(BINARY_VRS, b"\0\0"),
}


def dummy(vr: str) -> Any:
    """A non-empty value of `vr` that says nothing about the original (None: no dummy exists,
    e.g. for AT; the caller then empties the element)."""
    return _DUMMY_BY_VR.get(vr)


def empty(vr: str) -> Any:
    return "" if vr in TEXT_VRS or vr in {"AE", "AS", "CS", "DA", "DT", "TM", "DS", "IS"} else None


def _shift_day(year: int, month: int, day: int, offset_days: int) -> date:
    return date(year, month, day) + timedelta(days=offset_days)


def shift_date(value: str, offset_days: int) -> str:
    """Shifts one DA value; also accepts the old ACR-NEMA "YYYY.MM.DD" form."""
    digits = value.strip().replace(".", "")
    if len(digits) != 8 or not digits.isdigit():
        return ""
    try:
        shifted = _shift_day(int(digits[:4]), int(digits[4:6]), int(digits[6:]), offset_days)
    except ValueError:
        return ""
    return f"{shifted.year:04d}{shifted.month:02d}{shifted.day:02d}"


_DATETIME = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{0,6}(?:\.\d{1,6})?(?:[+-]\d{4})?)")


def shift_datetime(value: str, offset_days: int) -> str:
    """Shifts the date part of one DT value and keeps its precision, time and UTC offset:
    a whole-day shift leaves the time of day as it was."""
    match = _DATETIME.fullmatch(value.strip())
    if not match:
        return ""
    year, month, day, rest = match.groups()
    try:
        shifted = _shift_day(int(year), int(month or 1), int(day or 1), offset_days)
    except ValueError:
        return ""
    text = f"{shifted.year:04d}"
    if month:
        text += f"{shifted.month:02d}"
    if day:
        text += f"{shifted.day:02d}"
    return text + rest


def shift_dates(vr: str, value: Any, offset_days: int) -> Any:
    """Shifts every value of a DA or DT element (single or multi-valued)."""
    shift = shift_date if vr == "DA" else shift_datetime
    if isinstance(value, str):
        return shift(value, offset_days) if value else value
    if value is None:
        return None
    return [shift(str(item), offset_days) if item else "" for item in value]


_DATE_LIKE = re.compile(r"\b(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})\b")
_LONG_NUMBER = re.compile(r"\d{6,}")
_SPACES = re.compile(r"\s{2,}")


class TextCleaner:
    """Removes identifying fragments from free text (the C action on descriptors).

    What counts as identifying: every value of the instance's own identifying attributes
    (patient and staff names and their components, IDs, accession number, institution,
    addresses, birth date), anything shaped like a date, and runs of six or more digits
    (record numbers). The rest of the text, typically a protocol or body-part description,
    is what the Clean Descriptors option exists to keep.
    """

    def __init__(self, identifiers: Iterable[str]) -> None:
        fragments = sorted(
            {fragment.strip() for fragment in identifiers if len(fragment.strip()) >= 2},
            key=len,
            reverse=True,
        )
        self._identifiers = (
            re.compile(
                "|".join(rf"(?<!\w){re.escape(fragment)}(?!\w)" for fragment in fragments),
                re.IGNORECASE,
            )
            if fragments
            else None
        )

    def clean(self, text: str) -> str:
        if self._identifiers is not None:
            text = self._identifiers.sub(" ", text)
        text = _LONG_NUMBER.sub(" ", _DATE_LIKE.sub(" ", text))
        return _SPACES.sub(" ", text).strip(" -_,;:/^")

    def clean_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.clean(value)
        if value is None:
            return None
        return [self.clean(str(item)) for item in value]
