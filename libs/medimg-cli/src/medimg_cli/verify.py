"""`medimg audit verify`: checks the audit log from its signed checkpoints, proofs and events."""

# This module is the independent half of the audit log's tamper evidence. It shares no
# code with the audit service (nothing from medimg_audit is imported): the Merkle tree
# hash, the proof verifiers (RFC 9162 sections 2.1.3.2 and 2.1.4.2, step by step) and the
# checkpoint parser are written here again from the RFC and the C2SP checkpoint format,
# so that one bug cannot sit on both sides of the check.

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import datetime as dt
import functools
import hashlib
import hmac
import itertools
import json
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.timestamp_pb2 import Timestamp

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_cli.platform import read_status

__all__ = [
    "CHECKS",
    "EMPTY_ROOT",
    "HASH_SIZE",
    "ORIGIN",
    "CompactRange",
    "Finding",
    "NoteError",
    "ParsedCheckpoint",
    "ProofError",
    "Report",
    "VerifyError",
    "add_arguments",
    "canonical_bytes",
    "command",
    "key_id",
    "leaf_hash",
    "load_public_key",
    "merkle_root",
    "node_hash",
    "parse_checkpoint",
    "read_remembered",
    "root_from_inclusion_proof",
    "served_fields",
    "verify",
    "verify_consistency",
    "verify_inclusion",
    "write_remembered",
]

# --- RFC 9162 section 2.1.1: the Merkle tree hash --------------------------------------

HASH_SIZE = 32
#: MTH({}) = HASH(): the root of the empty tree.
EMPTY_ROOT = hashlib.sha256(b"").digest()
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The hash of an interior node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


class CompactRange:
    """The Merkle tree head of a growing list of leaf hashes, in O(log n) memory.

    It keeps the roots of the perfect subtrees the leaves so far split into (one per set
    bit of the size, largest first), so the root of every prefix is available at the
    moment the prefix is complete, and no leaf is kept once it has been folded in.
    """

    def __init__(self) -> None:
        # (number of leaves, hash) of each perfect subtree, sizes strictly decreasing.
        self._peaks: list[tuple[int, bytes]] = []
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf: bytes) -> None:
        """Adds the next leaf hash (not the leaf data)."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash has {HASH_SIZE} bytes, not {len(leaf)}")
        size, value = 1, leaf
        # Two perfect subtrees of one size are siblings: merge them, as carries in binary.
        while self._peaks and self._peaks[-1][0] == size:
            _, left = self._peaks.pop()
            size, value = size * 2, node_hash(left, value)
        self._peaks.append((size, value))
        self._size += 1

    def root(self) -> bytes:
        """MTH of the leaves so far (RFC 9162 2.1.1)."""
        if not self._peaks:
            return EMPTY_ROOT
        # MTH(D[n]) = HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n])) with k the largest power of
        # two below n: the largest peak is the left child, the rest folds up the right.
        value = self._peaks[-1][1]
        for _, left in reversed(self._peaks[:-1]):
            value = node_hash(left, value)
        return value


def merkle_root(leaf_hashes: Iterable[bytes]) -> bytes:
    """MTH of a list of leaf hashes, streamed."""
    tree = CompactRange()
    for leaf in leaf_hashes:
        tree.append(leaf)
    return tree.root()


# --- RFC 9162 sections 2.1.3.2 and 2.1.4.2: proof verification -------------------------


class ProofError(ValueError):
    """A Merkle proof that does not prove what it claims."""


def _check_hash(what: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} has {len(value)} bytes, not {HASH_SIZE}")


def root_from_inclusion_proof(
    leaf_index: int, tree_size: int, leaf: bytes, proof: Sequence[bytes]
) -> bytes:
    """The root that an inclusion proof of `leaf` at `leaf_index` leads to (RFC 9162 2.1.3.2)."""
    if leaf_index < 0 or tree_size < 0:
        raise ProofError("negative leaf index or tree size")
    _check_hash("the leaf hash", leaf)
    for position, value in enumerate(proof):
        _check_hash(f"proof hash {position}", value)
    # 1. leaf_index must lie inside the tree.
    if leaf_index >= tree_size:
        raise ProofError(f"leaf index {leaf_index} is not below tree size {tree_size}")
    # 2. fn is the leaf's index, sn the index of the last leaf.
    fn, sn = leaf_index, tree_size - 1
    # 3. r starts as the leaf hash.
    r = leaf
    # 4. Fold in each proof hash.
    for p in proof:
        # 4a. A proof longer than the path to the root.
        if sn == 0:
            raise ProofError("the proof has more hashes than the path to the root")
        # 4b. fn is a right child, or the last node of its level with no right sibling.
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # 4b.ii. Climb past the levels where this node has no sibling.
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        # 4c. One level up.
        fn >>= 1
        sn >>= 1
    # 5. The proof must have reached the root.
    if sn != 0:
        raise ProofError("the proof has fewer hashes than the path to the root")
    return r


def verify_inclusion(
    leaf: bytes, leaf_index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raises ProofError unless `proof` shows `leaf` at `leaf_index` of the tree `root`."""
    _check_hash("the root hash", root)
    computed = root_from_inclusion_proof(leaf_index, tree_size, leaf, proof)
    if not hmac.compare_digest(computed, root):
        raise ProofError("the proof leads to another root")


def verify_consistency(
    first_size: int,
    second_size: int,
    first_root: bytes,
    second_root: bytes,
    proof: Sequence[bytes],
) -> None:
    """Raises ProofError unless `proof` shows the tree `first_root` of `first_size` leaves
    is a prefix of the tree `second_root` of `second_size` (RFC 9162 2.1.4.2)."""
    if first_size < 0 or second_size < 0:
        raise ProofError("negative tree size")
    if first_size > second_size:
        raise ProofError(f"first size {first_size} is larger than second size {second_size}")
    for position, value in enumerate(proof):
        _check_hash(f"proof hash {position}", value)
    # The RFC's algorithm is for 0 < first < second; the two edge cases need no hashes.
    if first_size == second_size:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if not hmac.compare_digest(first_root, second_root):
            raise ProofError(f"two different roots for one tree size {first_size}")
        return
    if first_size == 0:
        # The empty tree is a prefix of every tree; there is nothing to prove.
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        return
    _check_hash("the first root hash", first_root)
    _check_hash("the second root hash", second_root)
    fr, sr = _roots_from_consistency_proof(first_size, second_size, first_root, proof)
    if not hmac.compare_digest(fr, first_root):
        raise ProofError("the proof does not lead to the first root")
    if not hmac.compare_digest(sr, second_root):
        raise ProofError("the proof does not lead to the second root")


def _roots_from_consistency_proof(
    first: int, second: int, first_hash: bytes, consistency_path: Sequence[bytes]
) -> tuple[bytes, bytes]:
    """Steps 1 to 7 of RFC 9162 2.1.4.2, for 0 < first < second: the roots (fr, sr)."""
    # 1. An empty proof proves nothing.
    if not consistency_path:
        raise ProofError("the proof is empty")
    path = list(consistency_path)
    # 2. When the first tree is perfect, its root is a node of the second: it starts the path.
    if first & (first - 1) == 0:
        path.insert(0, first_hash)
    # 3.
    fn, sn = first - 1, second - 1
    # 4. Skip the levels where the first tree's last node is a right child.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        # 6a.
        if sn == 0:
            raise ProofError("the proof has more hashes than the trees need")
        # 6b.
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        # 6c.
        fn >>= 1
        sn >>= 1
    # 7. (The comparison of fr and sr with the roots is the caller's.)
    if sn != 0:
        raise ProofError("the proof has fewer hashes than the trees need")
    return fr, sr


# --- Checkpoints: C2SP tlog-checkpoint note bodies, signed with Ed25519 ------------------

#: The origin line of medimg's audit log.
ORIGIN = "medimg.local/audit"


class NoteError(ValueError):
    """A checkpoint body that is not a well-formed checkpoint note."""


@dataclass(frozen=True)
class ParsedCheckpoint:
    """What a checkpoint's signed body says, and nothing the server says beside it."""

    origin: str
    tree_size: int
    root_hash: bytes
    time: dt.datetime
    body: bytes


def parse_checkpoint(body: bytes) -> ParsedCheckpoint:
    """Parses b"<origin>\\n<size>\\n<base64 root>\\ntime <RFC 3339>\\n" strictly."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise NoteError("the body is not UTF-8") from error
    if not text.endswith("\n"):
        raise NoteError("the body does not end in a newline")
    lines = text[:-1].split("\n")
    if len(lines) != 4:
        raise NoteError(f"the body has {len(lines)} lines, not 4")
    origin, size_line, root_line, time_line = lines
    if not origin:
        raise NoteError("the origin line is empty")
    # Decimal without sign, spaces or leading zeros, so that one size has one encoding.
    if not size_line.isascii() or not size_line.isdigit() or size_line != str(int(size_line)):
        raise NoteError(f"the tree size {size_line!r} is not a decimal number")
    try:
        root = base64.b64decode(root_line.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as error:
        raise NoteError(f"the root hash {root_line!r} is not standard base64") from error
    if len(root) != HASH_SIZE or base64.b64encode(root).decode() != root_line:
        raise NoteError(f"the root hash {root_line!r} is not {HASH_SIZE} bytes in base64")
    if not time_line.startswith("time "):
        raise NoteError(f"the fourth line {time_line!r} is not a `time` line")
    try:
        when = dt.datetime.fromisoformat(time_line.removeprefix("time "))
    except ValueError as error:
        raise NoteError(f"the time {time_line!r} is not RFC 3339") from error
    if when.tzinfo is None:
        raise NoteError(f"the time {time_line!r} has no offset")
    return ParsedCheckpoint(origin, int(size_line), root, when, body)


def key_id(public_key: Ed25519PublicKey) -> str:
    """The log's key id: hex SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The trusted Ed25519 public key, from a SubjectPublicKeyInfo PEM file."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def _signed_by(public_key: Ed25519PublicKey, body: bytes, signature: bytes) -> bool:
    try:
        public_key.verify(signature, body)
    except InvalidSignature:
        return False
    return True


# --- The report --------------------------------------------------------------------------

#: The checks, in the order they run; a Finding names one of them.
CHECKS = {
    "signature": "1. every checkpoint is signed by the trusted key its key id names",
    "checkpoint": "1. every checkpoint is well formed and its fields match its body",
    "consistency": "2. each checkpoint extends the one before",
    "remembered": "2. the latest checkpoint extends the remembered one",
    "sequence": "3. events are numbered 0..N-1 without gaps or repeats",
    "event": "4. every event hashes to its leaf hash and matches its canonical form",
    "root": "5. the events' Merkle root equals every checkpoint's root",
    "inclusion": "6. sampled inclusion proofs verify against the latest checkpoint",
}


@dataclass(frozen=True)
class Finding:
    """One failed check: which, where, and what was wrong."""

    check: str
    message: str
    log_index: int | None = None
    tree_size: int | None = None

    def __str__(self) -> str:
        return f"[{self.check}] {self.message}"


@dataclass
class Report:
    """The outcome of one verification."""

    #: The ids of the trusted keys (one per signing key the log had, across rotations).
    key_ids: tuple[str, ...]
    findings: list[Finding] = field(default_factory=list)
    #: How many of the listed checkpoints each trusted key id verified.
    signed_by: Counter[str] = field(default_factory=Counter)
    checkpoints: int = 0
    tree_size: int = 0
    root_hash: bytes = b""
    events: int = 0
    roots_compared: int = 0
    consistency_proofs: int = 0
    inclusion_proofs: int = 0
    #: Things not checked, and why (not failures in themselves: a failure explains them).
    notes: list[str] = field(default_factory=list)
    #: The checkpoint `--remember` stores on success.
    head: pb.Checkpoint | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def fail(
        self, check: str, message: str, *, log_index: int | None = None, size: int | None = None
    ) -> None:
        assert check in CHECKS, check
        self.findings.append(Finding(check, message, log_index, size))

    def failed(self, check: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.check == check]

    def summary(self) -> str:
        if self.ok:
            keys = ", ".join(
                f"{count} by key {key[:16]}…" for key, count in sorted(self.signed_by.items())
            )
            return (
                f"audit log verified: {self.checkpoints} checkpoints signed ({keys}), "
                f"latest size {self.tree_size} root "
                f"{self.root_hash.hex()[:16]}…; {self.events} events re-hashed, "
                f"{self.roots_compared} roots recomputed, {self.consistency_proofs} "
                f"consistency and {self.inclusion_proofs} inclusion proofs verified"
            )
        lines = [f"audit log verification FAILED: {len(self.findings)} problems"]
        lines += [f"  {finding}" for finding in self.findings]
        lines += [f"  (not checked: {note})" for note in self.notes]
        return "\n".join(lines)


class VerifyError(Exception):
    """The verification could not run (the log did not answer), as opposed to failing."""


# --- The verification against a running log ---------------------------------------------


@dataclass(frozen=True)
class _Trusted:
    """A checkpoint whose body parsed and whose signature verified under a trusted key."""

    label: str
    note: ParsedCheckpoint
    message: pb.Checkpoint

    @property
    def size(self) -> int:
        return self.note.tree_size

    @property
    def root(self) -> bytes:
        return self.note.root_hash


async def verify(
    stub: pb_grpc.AuditServiceAsyncStub,
    public_keys: Ed25519PublicKey | Iterable[Ed25519PublicKey],
    *,
    remembered: pb.Checkpoint | None = None,
    samples: int = 6,
    seed: int | None = None,
    call_timeout: float = 30.0,
    origin: str = ORIGIN,
) -> Report:
    """Verifies the whole log behind `stub`, trusting nothing it serves.

    `public_keys` are the log's trusted keys: after a rotation of its signing key, the old
    public key and the new one. Each checkpoint must verify under the key its key id names.
    `remembered` is a checkpoint kept from an earlier run (trust on first use): the log's
    latest checkpoint must extend it. `call_timeout` is the deadline of each call. Raises
    VerifyError when the log cannot be read at all; every other problem is a Finding of
    the returned Report.
    """
    if isinstance(public_keys, Ed25519PublicKey):
        public_keys = [public_keys]
    verifier = _Verifier(stub, public_keys, origin, call_timeout)
    await verifier.run(remembered, samples, seed)
    return verifier.report


class _Verifier:
    """One run of the checks; the report collects every failure."""

    def __init__(
        self,
        stub: pb_grpc.AuditServiceAsyncStub,
        public_keys: Iterable[Ed25519PublicKey],
        origin: str,
        call_timeout: float,
    ) -> None:
        self.stub = stub
        self.keys = {key_id(key): key for key in public_keys}
        if not self.keys:
            raise ValueError("no trusted public key")
        self.origin = origin
        self.call_timeout = call_timeout
        self.report = Report(key_ids=tuple(self.keys))

    async def run(self, remembered: pb.Checkpoint | None, samples: int, seed: int | None) -> None:
        report = self.report
        latest = await self._latest()
        # Listed after the latest was fetched, so one signed in between is listed too.
        listed = [message async for message in self._checkpoints()]
        report.checkpoints = len(listed)
        if not listed:
            report.fail("checkpoint", "the log has no signed checkpoint to verify against")
            return
        if latest is None:
            report.fail("checkpoint", "the log lists checkpoints but has no checkpoints/latest")
        elif all(message.body != latest.body for message in listed):
            report.fail("checkpoint", "checkpoints/latest is not among the listed checkpoints")

        # 1. Signatures, and the served fields against the signed bodies.
        trusted = [c for message in listed if (c := self._trust(message)) is not None]
        if not trusted:
            return
        # 2. Each checkpoint extends the one before it, as the log proves on demand.
        for before, after in itertools.pairwise(trusted):
            await self._consistency("consistency", before, after)
        head = max(trusted, key=lambda checkpoint: checkpoint.size)
        report.tree_size, report.root_hash, report.head = head.size, head.root, head.message
        roots = [(checkpoint.size, checkpoint.label, checkpoint.root) for checkpoint in trusted]
        if remembered is not None:
            kept = self._trust(remembered, remembered=True)
            if kept is not None:
                await self._consistency("remembered", kept, head)
                roots.append((kept.size, kept.label, kept.root))

        # 3., 4., 5. One pass over the events, oldest first.
        chosen = _sample(head.size, samples, seed)
        leaves = await self._events(head.size, sorted(roots), chosen)

        # 6. Inclusion proofs of a sample of events in the latest checkpoint.
        for index in sorted(leaves):
            await self._inclusion(index, leaves[index], head)

    async def _latest(self) -> pb.Checkpoint | None:
        try:
            return await self.stub.GetCheckpoint(
                pb.GetCheckpointRequest(name="checkpoints/latest"), timeout=self.call_timeout
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise VerifyError(f"GetCheckpoint(checkpoints/latest) failed: {_rpc(error)}") from error

    async def _checkpoints(self) -> AsyncIterator[pb.Checkpoint]:
        token = ""
        while True:
            try:
                page = await self.stub.ListCheckpoints(
                    pb.ListCheckpointsRequest(page_size=1000, page_token=token),
                    timeout=self.call_timeout,
                )
            except grpc.aio.AioRpcError as error:
                raise VerifyError(f"ListCheckpoints failed: {_rpc(error)}") from error
            for message in page.checkpoints:
                yield message
            token = page.next_page_token
            if not token:
                return

    def _trust(self, message: pb.Checkpoint, *, remembered: bool = False) -> _Trusted | None:
        """Check 1 for one checkpoint: its body parses and is signed by the trusted key."""
        check = "remembered" if remembered else "signature"
        try:
            note = parse_checkpoint(message.body)
        except NoteError as error:
            name = "the remembered checkpoint" if remembered else f"checkpoint {message.name!r}"
            self.report.fail("remembered" if remembered else "checkpoint", f"{name}: {error}")
            return None
        label = f"{'remembered ' if remembered else ''}checkpoint {note.tree_size}"
        signer = self._signer(message)
        if signer is None:
            if message.key_id not in self.keys:
                text = f"{label} signed by unknown key {message.key_id or '(none)'}"
            else:
                text = f"{label}: its signature does not verify under the trusted key"
            self.report.fail(check, text, size=note.tree_size)
            return None
        if note.origin != self.origin:
            self.report.fail(
                check,
                f"{label} is of another log: origin {note.origin!r}, not {self.origin!r}",
                size=note.tree_size,
            )
            return None
        if not remembered:
            self.report.signed_by[signer] += 1
            self._compare_fields(label, note, message, signer)
        return _Trusted(label, note, message)

    def _signer(self, message: pb.Checkpoint) -> str | None:
        """The id of the trusted key the checkpoint's signature verifies under: the one its
        key id names, else (a served key id that lies; `_compare_fields` reports it) any."""
        named = self.keys.get(message.key_id)
        if named is not None:
            return message.key_id if _signed_by(named, message.body, message.signature) else None
        for kid, key in self.keys.items():
            if _signed_by(key, message.body, message.signature):
                return kid
        return None

    def _compare_fields(
        self, label: str, note: ParsedCheckpoint, message: pb.Checkpoint, signer: str
    ) -> None:
        # The served fields are not trusted, but a log that serves fields its signed body
        # contradicts is broken or lying, so say so.
        served: dict[str, tuple[object, object]] = {
            "name": (message.name, f"checkpoints/{note.tree_size}"),
            "tree_size": (message.tree_size, note.tree_size),
            "root_hash": (message.root_hash, note.root_hash),
            "key_id": (message.key_id, signer),
        }
        if message.HasField("sign_time"):
            served["sign_time"] = (message.sign_time.ToDatetime(dt.UTC), note.time)
        for name, (value, signed) in served.items():
            if value != signed:
                self.report.fail(
                    "checkpoint",
                    f"{label}: field {name} differs from its signed body",
                    size=note.tree_size,
                )

    async def _consistency(self, check: str, before: _Trusted, after: _Trusted) -> None:
        """Check 2: the log proves that `after` extends `before`."""
        if after.size < before.size:
            self.report.fail(
                check,
                f"{after.label} comes after {before.label}: the log shrank",
                size=after.size,
            )
            return
        proof: list[bytes] = []
        # Equal sizes need equal roots and no hashes; the empty tree is a prefix of every
        # tree (and the log's API serves no proofs from size 0).
        if before.size not in (0, after.size):
            request = pb.GetConsistencyProofRequest(first_size=before.size, second_size=after.size)
            try:
                answer = await self.stub.GetConsistencyProof(request, timeout=self.call_timeout)
            except grpc.aio.AioRpcError as error:
                self.report.fail(
                    check,
                    f"{after.label}: the log gave no consistency proof from {before.label}: "
                    f"{_rpc(error)}",
                    size=after.size,
                )
                return
            if (answer.first_size, answer.second_size) != (before.size, after.size):
                self.report.fail(
                    check,
                    f"{after.label}: asked for a consistency proof from {before.size}, the log "
                    f"answered one from {answer.first_size} to {answer.second_size}",
                    size=after.size,
                )
                return
            proof = list(answer.hashes)
            self.report.consistency_proofs += 1
        try:
            verify_consistency(before.size, after.size, before.root, after.root, proof)
        except ProofError as error:
            self.report.fail(
                check,
                f"{after.label} is not consistent with {before.label}: {error}",
                size=after.size,
            )

    async def _list_events(self) -> AsyncIterator[pb.AuditEvent]:
        # The next page is asked for as soon as a page arrives, so the log serves it
        # while this one is checked.
        pending = asyncio.ensure_future(self._page(""))
        try:
            while True:
                page = await pending
                if page.next_page_token:
                    pending = asyncio.ensure_future(self._page(page.next_page_token))
                for event in page.audit_events:
                    yield event
                if not page.next_page_token:
                    return
        finally:
            pending.cancel()

    async def _page(self, token: str) -> pb.ListAuditEventsResponse:
        try:
            page: pb.ListAuditEventsResponse = await self.stub.ListAuditEvents(
                pb.ListAuditEventsRequest(page_size=PAGE_SIZE, page_token=token),
                timeout=self.call_timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise VerifyError(f"ListAuditEvents failed: {_rpc(error)}") from error
        return page

    async def _events(
        self, head_size: int, roots: list[tuple[int, str, bytes]], chosen: set[int]
    ) -> dict[int, bytes]:
        """Checks 3, 4 and 5 in one streaming pass over the events.

        `roots` are (size, label, root) of the trusted checkpoints, by size. Returns the
        recomputed leaf hashes of the `chosen` events, for their inclusion proofs.
        """
        tree = _RootChecker(self.report, roots)
        next_index = 0
        broken = ""  # why the events' tree cannot be built any further
        kept: dict[int, bytes] = {}
        async for event in self._list_events():
            index = event.log_index
            if index < next_index:
                self.report.fail(
                    "sequence", f"event {index} repeated or out of order", log_index=index
                )
                continue
            if index > next_index:
                gap = f"event {next_index}"
                if index > next_index + 1:
                    gap = f"events {next_index} to {index - 1}"
                self.report.fail("sequence", f"{gap} missing", log_index=next_index)
                broken = broken or f"{gap} missing"
            next_index = index + 1
            self.report.events += 1
            leaf = leaf_hash(event.canonical)
            _check_event(self.report, event, leaf)
            if index in chosen:
                kept[index] = leaf
            if not broken:
                tree.append(leaf)
        if next_index < head_size:
            self.report.fail(
                "sequence",
                f"log has {next_index} events, checkpoint says {head_size}",
                size=head_size,
            )
            broken = broken or "the log is shorter than its checkpoints"
        if tree.pending:
            sizes = ", ".join(str(size) for size, _, _ in tree.pending)
            self.report.notes.append(f"the roots of checkpoints {sizes}, since {broken}")
        return kept

    async def _inclusion(self, index: int, leaf: bytes, head: _Trusted) -> None:
        """Check 6 for one event: the log proves it is in the latest checkpoint."""
        request = pb.GetInclusionProofRequest(name=f"auditEvents/{index}", tree_size=head.size)
        try:
            answer = await self.stub.GetInclusionProof(request, timeout=self.call_timeout)
        except grpc.aio.AioRpcError as error:
            problem = f"the log gave no inclusion proof in {head.label}: {_rpc(error)}"
        else:
            if (answer.leaf_index, answer.tree_size) != (index, head.size):
                problem = (
                    f"asked for its proof in {head.label}, the log answered one for event "
                    f"{answer.leaf_index} in a tree of {answer.tree_size}"
                )
            else:
                try:
                    verify_inclusion(leaf, index, head.size, list(answer.hashes), head.root)
                except ProofError as error:
                    problem = f"its inclusion proof in {head.label} does not verify: {error}"
                else:
                    self.report.inclusion_proofs += 1
                    return
        self.report.fail("inclusion", f"event {index}: {problem}", log_index=index, size=head.size)


class _RootChecker:
    """Check 5: the tree of the events so far against each checkpoint, at its size."""

    def __init__(self, report: Report, roots: list[tuple[int, str, bytes]]) -> None:
        self.report = report
        self.pending = list(roots)  # by size
        self.tree = CompactRange()
        self.matched = 0  # the largest checkpoint size the events reproduce
        self._compare()  # checkpoints of the empty log

    def append(self, leaf: bytes) -> None:
        self.tree.append(leaf)
        self._compare()

    def _compare(self) -> None:
        while self.pending and self.pending[0][0] == self.tree.size:
            size, label, root = self.pending.pop(0)
            self.report.roots_compared += 1
            if hmac.compare_digest(self.tree.root(), root):
                self.matched = max(self.matched, size)
                continue
            where = f"; checkpoint {self.matched} still matches" if self.matched else ""
            self.report.fail(
                "root",
                f"events up to {size - 1} do not match {label}: the log was rewritten{where}",
                size=size,
            )


def _sample(size: int, count: int, seed: int | None) -> set[int]:
    """The events whose inclusion is checked: the first, the last and `count` at random."""
    if size == 0:
        return set()
    picked = {0, size - 1}
    picked.update(random.Random(seed).sample(range(size), min(count, size)))
    return picked


def _check_event(report: Report, event: pb.AuditEvent, leaf: bytes) -> None:
    """Check 4: the stored leaf hash and the served fields against the canonical bytes."""
    index = event.log_index
    if event.name != f"auditEvents/{index}":
        report.fail("event", f"event {index}: its name is {event.name!r}", log_index=index)
    if not hmac.compare_digest(leaf, event.leaf_hash):
        report.fail(
            "event",
            f"event {index}: its leaf hash is not SHA-256(0x00 || canonical)",
            log_index=index,
        )
    if canonical_bytes(served_fields(event)) == event.canonical:
        return  # the served fields are exactly what was hashed, in canonical form
    try:
        recorded = json.loads(event.canonical.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        report.fail(
            "event", f"event {index}: its canonical form is not a JSON object", log_index=index
        )
        return
    if canonical_bytes(recorded) != event.canonical:
        report.fail(
            "event",
            f"event {index}: its canonical bytes are not in canonical form",
            log_index=index,
        )
    for name in _differences(recorded, served_fields(event)):
        report.fail(
            "event",
            f"event {index}: field {name} differs from its recorded canonical form",
            log_index=index,
        )


#: Events asked for per page (the log serves at most 10,000).
PAGE_SIZE = 10_000

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_bytes(value: Any) -> bytes:
    """UTF-8 JSON with sorted keys and no spaces: the form the leaf hash covers."""
    return _CANONICAL.encode(value).encode()


def served_fields(event: pb.AuditEvent) -> dict[str, Any]:
    """What the canonical form of `event` holds, rebuilt from the fields the log served."""
    return {
        "action": _enum_name(pb.Action, event.action),
        "actor": {
            "roles": sorted(event.actor.roles),
            "user": event.actor.user,
            "workload": event.actor.workload,
        },
        "break_glass_reason": event.break_glass_reason,
        "event_id": event.event_id,
        "event_time": _rfc3339(event.event_time),
        "log_index": event.log_index,
        "method": event.method,
        "outcome": _enum_name(pb.Outcome, event.outcome),
        "patient_pseudonym": event.patient_pseudonym,
        "record_time": _rfc3339(event.record_time),
        "resource": event.resource,
        "service": event.service,
        "trace_id": event.trace_id,
    }


def _differences(recorded: dict[str, Any], served: dict[str, Any], prefix: str = "") -> list[str]:
    """The (dotted) names of the fields that differ, are missing or are extra."""
    names = []
    for name in sorted(set(recorded) | set(served)):
        mine, theirs = recorded.get(name), served.get(name)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            names += _differences(mine, theirs, f"{prefix}{name}.")
        # The types too: True == 1 == 1.0 in Python, but not in the hashed bytes.
        elif (
            name not in recorded
            or name not in served
            or type(mine) is not type(theirs)
            or mine != theirs
        ):
            names.append(prefix + name)
    return names


def _enum_name(enum: Any, value: int) -> str:
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def _rfc3339(value: Timestamp) -> str:
    """UTC with exactly six fractional digits and a Z, e.g. 2026-11-23T11:02:03.123456Z."""
    return _rfc3339_of(value.seconds, value.nanos // 1000)


@functools.lru_cache(maxsize=4096)  # the events of one append share their record_time
def _rfc3339_of(seconds: int, microseconds: int) -> str:
    when = dt.datetime(1970, 1, 1) + dt.timedelta(seconds=seconds, microseconds=microseconds)
    return when.isoformat(timespec="microseconds") + "Z"


def _rpc(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {error.details()}"


# --- Remembered checkpoints (trust on first use) -----------------------------------------


def read_remembered(path: Path) -> pb.Checkpoint | None:
    """The checkpoint an earlier run kept in `path`, or None on first use."""
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    return pb.Checkpoint(
        name=str(kept.get("name", "")),
        body=base64.b64decode(kept["body"]),
        signature=base64.b64decode(kept["signature"]),
        key_id=str(kept.get("key_id", "")),
    )


def write_remembered(path: Path, checkpoint: pb.Checkpoint) -> None:
    """Keeps `checkpoint` (its signed body and signature: all a later run trusts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    note = checkpoint.body.decode()
    data = {
        "name": checkpoint.name,
        "note": note,
        "body": base64.b64encode(checkpoint.body).decode(),
        "signature": base64.b64encode(checkpoint.signature).decode(),
        "key_id": checkpoint.key_id,
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)


# --- The command ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `medimg audit verify`."""
    parser.add_argument(
        "--public-key",
        type=Path,
        action="append",
        dest="public_keys",
        help="a trusted Ed25519 public key of the log, PEM; repeat it for every signing key "
        "the log had across rotations (default <state>/pki/audit-log-pub.pem)",
    )
    parser.add_argument(
        "--remember",
        type=Path,
        help="a file keeping the last verified checkpoint: trusted on first use, then the "
        "log must extend it; updated on success",
    )
    parser.add_argument("--target", help="host:port of the audit service's sidecar (mTLS)")
    parser.add_argument("--ca", type=Path, help="CA certificate (PEM), with --target")
    parser.add_argument("--cert", type=Path, help="client certificate (PEM), with --target")
    parser.add_argument("--key", type=Path, help="client private key (PEM), with --target")
    parser.add_argument("--samples", type=int, default=6, help="random inclusion proofs")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random sample")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")


def command(args: argparse.Namespace, state: Path) -> int:
    """Runs `medimg audit verify`: 0 verified, 1 verification failed, 2 could not verify."""
    try:
        target, credentials = _connection(args, state)
        paths = args.public_keys or [state / "pki" / "audit-log-pub.pem"]
        public_keys = [load_public_key(path) for path in paths]
        remembered = read_remembered(args.remember) if args.remember else None
    except (OSError, ValueError, KeyError) as error:
        print(f"medimg audit verify: {error}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_run(target, credentials, public_keys, remembered, args))
    except VerifyError as error:
        print(f"medimg audit verify: cannot verify: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    if not report.ok:
        return 1
    if args.remember and report.head is not None:
        write_remembered(args.remember, report.head)
    return 0


async def _run(
    target: str,
    credentials: grpc.ChannelCredentials,
    public_keys: Sequence[Ed25519PublicKey],
    remembered: pb.Checkpoint | None,
    args: argparse.Namespace,
) -> Report:
    async with grpc.aio.secure_channel(target, credentials) as channel:
        return await verify(
            pb_grpc.AuditServiceStub(channel),
            public_keys,
            remembered=remembered,
            samples=args.samples,
            seed=args.seed,
            call_timeout=args.timeout,
        )


def _connection(args: argparse.Namespace, state: Path) -> tuple[str, grpc.ChannelCredentials]:
    """The audit sidecar and the mTLS identity: from --target, or from `medimg up`'s status."""
    if args.target:
        if not (args.ca and args.cert and args.key):
            raise ValueError("--target needs --ca, --cert and --key")
        target, ca, cert, key = args.target, Path(args.ca), Path(args.cert), Path(args.key)
    else:
        status = read_status(state)
        if status is None:
            raise ValueError(f"medimg is not running from {state}: start it, or pass --target")
        target = status["services"]["audit"]["sidecar"]
        ca, cert, key = Path(status["ca"]), Path(status["ops_cert"]), Path(status["ops_key"])
    return target, grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
