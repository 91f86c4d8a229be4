"""The log's Merkle tree and checkpoints, on a real PostgreSQL with the real migration."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from importlib.resources import files

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import timestamp_pb2

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg_audit import checkpoints, log
from medimg_core import db
from medimg_core.errors import InvalidArgument, NotFound

INGEST = "spiffe://medimg.local/ns/medimg/sa/ingest"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    owner = await db.connect(database_url, max_size=1)
    await db.migrate(owner, files("medimg_audit.migrations"))
    await owner.close()
    pool = await db.connect(database_url, role="medimg_audit_writer")
    yield pool
    await pool.close()


def event(n: int = 0, **fields: object) -> pb.AuditEvent:
    when = timestamp_pb2.Timestamp()
    when.FromDatetime(datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=n))
    values: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "event_time": when,
        "actor": pb.Actor(workload=INGEST, user="dr-who", roles=["clinician"]),
        "action": pb.ACTION_READ,
        "outcome": pb.OUTCOME_SUCCESS,
        "resource": f"studies/1.2.{n}",
        "service": "ingest",
    }
    values.update(fields)
    return pb.AuditEvent(**values)  # type: ignore[arg-type]


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 MTH over leaf hashes, written literally."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


async def everything(pool: asyncpg.Pool) -> list[pb.AuditEvent]:
    events, _ = await log.list_events(pool, after=None, limit=1000)
    return events


async def test_leaves_cover_the_canonical_bytes_and_roots_match_the_rfc(
    pool: asyncpg.Pool,
) -> None:
    for size in (1, 2, 3, 5):  # uneven batches: 11 events
        await log.append(pool, [event(n) for n in range(size)], "ingest")
    events = await everything(pool)
    assert [e.log_index for e in events] == list(range(11))
    for e in events:
        assert e.leaf_hash == hashlib.sha256(b"\x00" + e.canonical).digest()
        document = json.loads(e.canonical)
        assert document["log_index"] == e.log_index
        assert document["event_id"] == e.event_id
        assert document["resource"] == e.resource
        assert document["action"] == "ACTION_READ"
        assert document["event_time"].endswith("Z")
    leaves = [e.leaf_hash for e in events]
    for size in range(1, 12):
        assert await log.root(pool, size) == mth(leaves[:size])


async def test_proofs_verify_against_the_roots(pool: asyncpg.Pool) -> None:
    await log.append(pool, [event(n) for n in range(13)], "ingest")
    leaves = [e.leaf_hash for e in await everything(pool)]
    for size in (1, 7, 8, 13):
        root = await log.root(pool, size)
        for index in range(size):
            proof = await log.inclusion_proof(pool, index, size)
            assert _inclusion_root(index, size, leaves[index], proof) == root
    with pytest.raises(InvalidArgument) as too_big:
        await log.inclusion_proof(pool, 0, 14)
    assert too_big.value.reason == "INVALID_TREE_SIZE"
    with pytest.raises(InvalidArgument) as outside:
        await log.inclusion_proof(pool, 7, 7)
    assert outside.value.reason == "LEAF_NOT_IN_TREE"
    assert len(await log.consistency_proof(pool, 5, 13)) > 0
    assert await log.consistency_proof(pool, 13, 13) == []


def _inclusion_root(index: int, size: int, leaf: bytes, proof: list[bytes]) -> bytes:
    # RFC 9162 2.1.3.2, here only to check the server's output; the real verifier lives in
    # medimg_cli.verify and shares nothing with the service.
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        assert sn != 0
        if fn % 2 == 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while fn % 2 == 0 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0
    return r


async def test_checkpoints_are_signed_kept_and_made_only_when_the_log_grew(
    pool: asyncpg.Pool,
) -> None:
    key = Ed25519PrivateKey.generate()
    signer = checkpoints.Signer(key, "medimg.local/audit")
    with pytest.raises(NotFound):
        await checkpoints.get(pool, None)
    await log.append(pool, [event(n) for n in range(3)], "ingest")
    first = await checkpoints.create(pool, signer)
    assert first.tree_size == 3
    assert await checkpoints.create(pool, signer) == first  # the log did not grow
    await log.append(pool, [event(n) for n in range(4)], "ingest")
    second = await checkpoints.create(pool, signer)
    assert second.tree_size == 7
    key.public_key().verify(second.signature, second.body)
    origin, size, root, stamp = second.body.decode().split("\n")[:4]
    assert (origin, int(size)) == ("medimg.local/audit", 7)
    assert base64.b64decode(root) == second.root_hash == await log.root(pool, 7)
    assert stamp.startswith("time ") and stamp.endswith("Z")
    listed, more = await checkpoints.list_checkpoints(pool, after=None, limit=10)
    assert [c.tree_size for c in listed] == [3, 7] and more is None
    assert (await checkpoints.get(pool, None)).tree_size == 7


async def test_the_service_role_cannot_update_or_delete(pool: asyncpg.Pool) -> None:
    await log.append(pool, [event(), event(1)], "ingest")
    for table in ("audit_events", "checkpoints"):
        for statement in (f"UPDATE {table} SET {_column(table)}", f"DELETE FROM {table}"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await pool.execute(statement)


def _column(table: str) -> str:
    return {
        "audit_events": "resource = 'x'",
        "checkpoints": "key_id = 'x'",
    }[table]


async def test_the_owner_cannot_update_or_delete_either(
    database_url: str, pool: asyncpg.Pool
) -> None:
    await log.append(pool, [event(), event(1)], "ingest")  # two leaves: one stored node
    await checkpoints.create(pool, checkpoints.Signer(Ed25519PrivateKey.generate(), "k"))
    owner = await asyncpg.connect(database_url)
    try:
        for table in ("audit_events", "checkpoints"):
            for statement in (f"UPDATE {table} SET {_column(table)}", f"DELETE FROM {table}"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                    await owner.execute(statement)
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await owner.execute(f"TRUNCATE {table}")
    finally:
        await owner.close()


async def test_filters_select_what_they_name(pool: asyncpg.Pool) -> None:
    await log.append(
        pool,
        [
            event(0, resource="studies/1.2.3"),
            event(1, resource="studies/1.2.3/series/4/instances/5", patient_pseudonym="p-1"),
            event(2, resource="studies/1.2.33", action=pb.ACTION_CREATE),
            event(
                3,
                resource="models/m",
                actor=pb.Actor(workload=INGEST),
                outcome=pb.OUTCOME_PERMISSION_DENIED,
            ),
        ],
        "ingest",
    )

    async def indexes(**filters: object) -> list[int]:
        found, _ = await log.list_events(pool, log.Filters(**filters), after=None, limit=100)  # type: ignore[arg-type]
        return [e.log_index for e in found]

    assert await indexes(resource="studies/1.2.3") == [0, 1]
    assert await indexes(resource="studies/1.2.3/") == [0, 1]
    assert await indexes(patient_pseudonym="p-1") == [1]
    assert await indexes(action=pb.ACTION_CREATE) == [2]
    assert await indexes(outcome=pb.OUTCOME_PERMISSION_DENIED) == [3]
    assert await indexes(actor_user="dr-who") == [0, 1, 2]
    start = datetime(2026, 11, 1, 0, 1, tzinfo=UTC)
    assert await indexes(start_time=start, end_time=start + timedelta(minutes=2)) == [1, 2]
    assert await indexes(resource="studies/1_2%") == []  # LIKE wildcards are literal


async def test_oversize_events_are_refused_and_nothing_is_appended(pool: asyncpg.Pool) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await log.append(pool, [event(), event(resource="x" * 5000)], "ingest")
    assert caught.value.reason == "EVENT_TOO_LARGE"
    assert caught.value.metadata["index"] == "1"
    assert await log.tree_size(pool) == 0


@pytest.mark.parametrize(
    "text", ["plain", 'quote " and \\ backslash', "ünïcødé ✓ 患者", "control \x01\n\t", ""]
)
def test_canonical_bytes_are_json_dumps_with_sorted_keys(text: str) -> None:
    e = event(
        resource=f"studies/{text}",
        patient_pseudonym=text,
        break_glass_reason=text,
        actor=pb.Actor(workload=INGEST, user=text, roles=["researcher", "admin", text]),
    )
    data = log.canonical(
        log.prepare([e], "ingest")[0], log_index=7, record_time="2026-11-02T00:00:00.000001Z"
    )
    document = json.loads(data)
    reference = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert data == reference.encode()
    assert document["actor"]["roles"] == sorted(["researcher", "admin", text])
    assert document["patient_pseudonym"] == text


async def test_the_log_refuses_to_sign_over_a_changed_past(
    database_url: str, pool: asyncpg.Pool
) -> None:
    signer = checkpoints.Signer(Ed25519PrivateKey.generate(), "medimg.local/audit")
    await log.append(pool, [event(n) for n in range(3)], "ingest")
    await checkpoints.create(pool, signer)
    owner = await asyncpg.connect(database_url)
    try:
        async with owner.transaction():
            await owner.execute("ALTER TABLE audit_events DISABLE TRIGGER USER")
            await owner.execute(
                "UPDATE audit_events SET leaf_hash = $1 WHERE log_index = 2", b"\x07" * 32
            )
            await owner.execute("ALTER TABLE audit_events ENABLE TRIGGER USER")
    finally:
        await owner.close()
    await log.append(pool, [event(9)], "ingest")
    with pytest.raises(checkpoints.LogTampered) as caught:
        await checkpoints.create(pool, signer)
    assert caught.value.reason == "LOG_REWRITTEN"
    stranger = checkpoints.Signer(Ed25519PrivateKey.generate(), "medimg.local/audit")
    with pytest.raises(checkpoints.LogTampered) as foreign:
        await checkpoints.create(pool, stranger)
    assert foreign.value.reason == "CHECKPOINT_NOT_OURS"
    assert (await checkpoints.get(pool, None)).tree_size == 3  # nothing new was signed
