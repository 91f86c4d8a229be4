"""The way back from a patient pseudonym to the patient, sealed with AES-256-GCM.

Ingest keeps the link so that an authorised person can re-identify a patient (a finding
that must reach the patient's clinician); nothing else reads it. Each sealed value binds
its pseudonym as associated data, so a value copied onto another pseudonym's row does not
open. The key id (a hash prefix of the key) says which key sealed a row, for rotation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_NONCE_BYTES = 12


class IdentityVault:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the identity key must be 32 bytes (AES-256)")
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"medimg identity key\0" + key).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: Path) -> IdentityVault:
        return cls(path.read_bytes())

    def seal(self, pseudonym: str, patient_id: str) -> bytes:
        """The nonce and ciphertext of the patient's identity, bound to `pseudonym`."""
        nonce = os.urandom(_NONCE_BYTES)
        plain = json.dumps({"patient_id": patient_id}, sort_keys=True).encode()
        return nonce + self._aead.encrypt(nonce, plain, pseudonym.encode())

    def open(self, pseudonym: str, sealed: bytes) -> str:
        """The Patient ID sealed for `pseudonym`; ValueError if the value was not sealed for
        it with this key, or was altered."""
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        try:
            plain = self._aead.decrypt(nonce, ciphertext, pseudonym.encode())
        except InvalidTag:
            raise ValueError("the sealed identity does not open with this key") from None
        patient_id: str = json.loads(plain)["patient_id"]
        return patient_id
