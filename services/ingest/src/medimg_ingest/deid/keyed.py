"""Keyed, deterministic replacements: the same input and key give the same output in every
process, so references between instances stay consistent without any shared state; without
the key the outputs reveal nothing about the inputs (HMAC-SHA256)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import NewType

#: A keyed stand-in for a Patient ID. Carries no PHI; the caller may index and log it.
Pseudonym = NewType("Pseudonym", str)

MIN_KEY_BYTES = 32
PSEUDONYM_PREFIX = "ANON-"
#: Modified dates move back by a whole number of days in this range (inclusive): at least a
#: year, so a shifted date never looks like a plausible real one of the same visit.
DATE_OFFSET_RANGE_DAYS = (-3650, -365)


def check_key(key: bytes) -> None:
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the de-identification key must be at least {MIN_KEY_BYTES} bytes")


def _digest(key: bytes, purpose: str, value: str) -> bytes:
    # The purpose prefix separates the derivations: a UID and a Patient ID with the same text
    # still map to unrelated outputs.
    return hmac.new(key, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()


def replacement_uid(key: bytes, uid: str) -> str:
    """A valid UID under the 2.25 (UUID-derived integer) arc: at most 44 characters, digits
    and dots, no leading zero in any component."""
    return "2.25." + str(int.from_bytes(_digest(key, "uid", uid)[:16], "big"))


def pseudonym(key: bytes, patient_id: str) -> Pseudonym:
    code = base64.b32encode(_digest(key, "patient", patient_id)[:10]).decode("ascii")
    return Pseudonym(PSEUDONYM_PREFIX + code)


def date_offset_days(key: bytes, patient_id: str) -> int:
    """The per-patient shift of the Modified Dates option, within DATE_OFFSET_RANGE_DAYS."""
    low, high = DATE_OFFSET_RANGE_DAYS
    draw = int.from_bytes(_digest(key, "date-offset", patient_id)[:8], "big")
    return low + draw % (high - low + 1)


def application_entity(key: bytes, title: str) -> str:
    """A 16-character AE title standing for `title`: the same device keeps one name."""
    return "AE" + _digest(key, "ae", title).hex()[:14].upper()
