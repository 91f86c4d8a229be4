"""The way back from a patient pseudonym to the patient, sealed with AES-256-GCM.

Ingest keeps the link so that an authorised person can re-identify a patient (a finding
that must reach the patient's clinician); nothing else reads it. Each sealed value binds
its pseudonym as associated data, so a value copied onto another pseudonym's row does not
open. The key id (a hash prefix of the key) says which key sealed a row, so that after a
rotation the vault opens a row with the key that sealed it (the previous keys stay loaded
until `medimg_ingest.rekey` has moved every row to the current key).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medimg_core.errors import DataLoss, FailedPrecondition

_NONCE_BYTES = 12


class UnknownIdentityKey(FailedPrecondition, ValueError):
    """A row names a key id that none of the loaded keys has."""


class BrokenSeal(DataLoss, ValueError):
    """A sealed value that does not open: another pseudonym's, altered, or another key's."""


def identity_key_id(key: bytes) -> str:
    """The id stored beside each row the key sealed: a hash prefix, never the key."""
    return hashlib.sha256(b"medimg identity key\0" + key).hexdigest()[:16]


class IdentityVault:
    """Seals with the current key; opens with the current key or any previous one."""

    def __init__(self, key: bytes, previous: Sequence[bytes] = ()) -> None:
        self.key_id = identity_key_id(_checked(key))
        self._keys = {self.key_id: AESGCM(key)}
        for old in previous:
            self._keys.setdefault(identity_key_id(_checked(old)), AESGCM(old))

    @classmethod
    def from_file(cls, path: Path, previous: Sequence[Path] = ()) -> IdentityVault:
        return cls(path.read_bytes(), [p.read_bytes() for p in previous])

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of the keys this vault opens with, the current one first."""
        return tuple(self._keys)

    def seal(self, pseudonym: str, patient_id: str) -> bytes:
        """The nonce and ciphertext of the patient's identity, bound to `pseudonym`, under
        the current key (`key_id`)."""
        nonce = os.urandom(_NONCE_BYTES)
        plain = json.dumps({"patient_id": patient_id}, sort_keys=True).encode()
        return nonce + self._keys[self.key_id].encrypt(nonce, plain, pseudonym.encode())

    def open(self, pseudonym: str, sealed: bytes, key_id: str) -> str:
        """The Patient ID sealed for `pseudonym` by the key `key_id` (the row's).

        Raises UnknownIdentityKey if no loaded key has `key_id`, and BrokenSeal if the value
        was not sealed for `pseudonym` with that key, or was altered. Neither message holds
        the Patient ID.
        """
        aead = self._keys.get(key_id)
        if aead is None:
            raise UnknownIdentityKey(
                "IDENTITY_KEY_UNKNOWN",
                f"the identity was sealed with key id {key_id}, which is not loaded "
                f"(loaded: {', '.join(self._keys)}); add that key's file to "
                "MEDIMG_INGEST_PREVIOUS_IDENTITY_KEY_FILES",
                key_id=key_id,
            )
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        try:
            plain = aead.decrypt(nonce, ciphertext, pseudonym.encode())
        except InvalidTag:
            raise BrokenSeal(
                "IDENTITY_SEAL_BROKEN",
                f"the sealed identity does not open with key id {key_id} (altered, or sealed "
                "for another pseudonym)",
                key_id=key_id,
            ) from None
        patient_id: str = json.loads(plain)["patient_id"]
        return patient_id


def _checked(key: bytes) -> bytes:
    if len(key) != 32:
        raise ValueError("an identity key must be 32 bytes (AES-256)")
    return key
