"""Signed checkpoints: the log's size and root hash at a moment, signed with Ed25519.

The signed bytes follow the C2SP tlog-checkpoint note body (origin, size, base64 root,
then an extension line with the time), so a verifier parses exactly what was signed.
Every checkpoint is kept; a checkpoint is only made when the log has grown.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg_audit import log
from medimg_core import timestamps
from medimg_core.errors import FailedPrecondition, NotFound

logger = logging.getLogger(__name__)

_COLUMNS = "tree_size, root_hash, sign_time, body, signature, key_id"


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey
    origin: str
    #: The log's earlier public keys (before rotations of its signing key).
    previous: tuple[Ed25519PublicKey, ...] = ()

    @classmethod
    def from_file(cls, path: Path, origin: str, previous: Sequence[Path] = ()) -> Signer:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        earlier = []
        for old in previous:
            public = serialization.load_pem_public_key(old.read_bytes())
            if not isinstance(public, Ed25519PublicKey):
                raise ValueError(f"{old} is not an Ed25519 public key")
            earlier.append(public)
        return cls(key, origin, tuple(earlier))

    @property
    def key_id(self) -> str:
        return _key_id(self.key.public_key())

    def trusted(self, key_id: str) -> Ed25519PublicKey | None:
        """The log's key (current or earlier) with `key_id`."""
        keys = {_key_id(k): k for k in (self.key.public_key(), *self.previous)}
        return keys.get(key_id)

    def body(self, size: int, root: bytes, when: datetime) -> bytes:
        stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return f"{self.origin}\n{size}\n{base64.b64encode(root).decode()}\ntime {stamp}\n".encode()


def _key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


class LogTampered(FailedPrecondition):
    """The stored log no longer extends what the log signed: it will not sign again."""


async def create(pool: asyncpg.Pool, signer: Signer) -> pb.Checkpoint:
    """Signs the log as it is now; if it has not grown since the latest checkpoint, that one.

    Before signing, the log checks that it still extends its latest checkpoint: that
    checkpoint must carry its own signature, and the tree must have that root at that
    size. Otherwise someone changed the tables, and a new signature would vouch for it.
    """
    size = await log.tree_size(pool)
    latest = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM checkpoints ORDER BY tree_size DESC LIMIT 1"
    )
    if latest is not None:
        await _check_extends(pool, signer, latest, size)
        if latest["tree_size"] >= size:
            return _checkpoint(latest)
    root = await log.root(pool, size)
    # Whole microseconds, as PostgreSQL keeps them, so body and column say the same time.
    when = datetime.now(UTC)
    body = signer.body(size, root, when)
    await pool.execute(
        f"INSERT INTO checkpoints ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) "
        "ON CONFLICT (tree_size) DO NOTHING",
        size, root, when, body, signer.key.sign(body), signer.key_id,
    )  # fmt: skip
    return await get(pool, size)


async def _check_extends(
    pool: asyncpg.Pool, signer: Signer, latest: asyncpg.Record, size: int
) -> None:
    # After a rotation the latest checkpoint may carry an earlier key of this log.
    key = signer.trusted(latest["key_id"])
    try:
        if key is not None:
            key.verify(bytes(latest["signature"]), bytes(latest["body"]))
        signed = key is not None
    except InvalidSignature:
        signed = False
    if not signed:
        raise LogTampered(
            "CHECKPOINT_NOT_OURS",
            f"the latest checkpoint ({latest['tree_size']}) is not signed by this log's key "
            "or one of its previous keys",
        )
    old_size = latest["tree_size"]
    if size < old_size or (
        old_size and await log.root(pool, old_size) != bytes(latest["root_hash"])
    ):
        raise LogTampered(
            "LOG_REWRITTEN",
            f"the stored log no longer has the root of checkpoint {old_size}: refusing to sign",
        )


async def get(pool: asyncpg.Pool, size: int | None) -> pb.Checkpoint:
    """The checkpoint at `size`, or the latest one."""
    if size is None:
        row = await pool.fetchrow(
            f"SELECT {_COLUMNS} FROM checkpoints ORDER BY tree_size DESC LIMIT 1"
        )
    else:
        row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM checkpoints WHERE tree_size = $1", size)
    if row is None:
        what = "no checkpoint yet" if size is None else f"no checkpoint at size {size}"
        raise NotFound("CHECKPOINT_NOT_FOUND", what)
    return _checkpoint(row)


async def list_checkpoints(
    pool: asyncpg.Pool, *, after: int | None, limit: int
) -> tuple[list[pb.Checkpoint], int | None]:
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM checkpoints WHERE tree_size > $1 ORDER BY tree_size LIMIT $2",
        -1 if after is None else after,
        limit + 1,
    )
    found = [_checkpoint(row) for row in rows[:limit]]
    return found, (found[-1].tree_size if len(rows) > limit else None)


async def sign_periodically(pool: asyncpg.Pool, signer: Signer, interval: float) -> None:
    """Signs a checkpoint every `interval` seconds while the log grows; runs until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            await create(pool, signer)
        except Exception as error:  # noqa: BLE001 - keep signing once the cause is fixed
            logger.error("checkpoint not signed", extra={"fields": {"error": type(error).__name__}})


def _checkpoint(row: asyncpg.Record) -> pb.Checkpoint:
    return pb.Checkpoint(
        name=f"checkpoints/{row['tree_size']}",
        tree_size=row["tree_size"],
        root_hash=bytes(row["root_hash"]),
        sign_time=timestamps.to_proto(row["sign_time"]),
        body=bytes(row["body"]),
        signature=bytes(row["signature"]),
        key_id=row["key_id"],
    )
