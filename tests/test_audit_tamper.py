"""Tampering with the audit log in PostgreSQL as a superuser: `medimg audit verify` finds it."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf import timestamp_pb2

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_cli import verify as audit_verify
from medimg_cli.pki import create_signing_key
from medimg_cli.platform import Platform, Process, with_database
from tests.helpers import channel, fresh_instance, upload
from tests.test_audit_delivery import wait_until_serving

pytestmark = pytest.mark.slow

#: The audit service's tables; both are append-only, by trigger.
TABLES = ("audit_events", "checkpoints")


# --- The log under test --------------------------------------------------------------------


@pytest.fixture
async def audit(platform: Platform) -> AsyncIterator[pb_grpc.AuditServiceAsyncStub]:
    """The audit service through its sidecar, as the `ops` identity (what the CLI uses)."""
    async with grpc.aio.secure_channel(
        platform.sidecar("audit"), platform.credentials("ops")
    ) as ch:
        yield pb_grpc.AuditServiceStub(ch)


@pytest.fixture
def public_key(platform: Platform) -> Ed25519PublicKey:
    assert platform.pki is not None
    return audit_verify.load_public_key(platform.pki.audit_public_key)


def append(platform: Platform, count: int) -> None:
    """A batch of events from `training`, with users, roles and non-ASCII text."""
    events = [
        pb.AuditEvent(
            event_id=str(uuid.uuid4()),
            event_time=timestamp_pb2.Timestamp(seconds=1_790_000_000 + i, nanos=123_456_000),
            actor=pb.Actor(
                workload=platform.mesh.spiffe("training"),
                user=f"dr-ünal-{i}",
                roles=["researcher", "ml-engineer"],
            ),
            action=pb.ACTION_EXECUTE,
            outcome=pb.OUTCOME_SUCCESS,
            resource=f"trainingJobs/tamper-{i}",
            patient_pseudonym=f"pseudo-{i}",
            service="training",
            method="/medimg.training.v1.TrainingService/CreateTrainingJob",
            trace_id=f"{i:032x}",
        )
        for i in range(count)
    ]
    with channel(platform, "audit", "training") as ch:
        pb_grpc.AuditServiceStub(ch).AppendEvents(pb.AppendEventsRequest(events=events), timeout=10)


async def grow(platform: Platform, audit: pb_grpc.AuditServiceAsyncStub) -> list[int]:
    """Uploads and appended events, with a checkpoint after each step; the sizes signed."""
    sizes = []
    for step in range(3):
        upload(platform, fresh_instance())
        append(platform, 7 + step)
        checkpoint = await audit.CreateCheckpoint(pb.CreateCheckpointRequest(), timeout=10)
        sizes.append(checkpoint.tree_size)
    return sizes


def medimg_verify(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    """`medimg audit verify` as a user runs it, against the platform's state directory."""
    command = [sys.executable, "-m", "medimg_cli.cli", "--state", str(platform.state)]
    return subprocess.run(
        [*command, "audit", "verify", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def messages(report: audit_verify.Report, check: str) -> list[str]:
    return [finding.message for finding in report.failed(check)]


# --- Tampering, undone afterwards ----------------------------------------------------------


@asynccontextmanager
async def tampering(platform: Platform) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to the audit database; the three tables are snapshotted
    first and restored afterwards, whatever happened to them in between."""
    conn = await asyncpg.connect(with_database(platform.server_database_url, "medimg_audit"))
    try:
        async with conn.transaction():
            for table in TABLES:
                await conn.execute(f"CREATE TABLE tamper_snapshot_{table} AS TABLE {table}")
        yield conn
    finally:
        async with conn.transaction():
            for table in TABLES:
                await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
                await conn.execute(f"DELETE FROM {table}")
                await conn.execute(f"INSERT INTO {table} SELECT * FROM tamper_snapshot_{table}")
                await conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
                await conn.execute(f"DROP TABLE tamper_snapshot_{table}")
        await conn.close()


@asynccontextmanager
async def without_triggers(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """One transaction in which the append-only triggers are off (as only an owner or a
    superuser can do), on again at its end."""
    async with conn.transaction():
        for table in TABLES:
            await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
        yield
        for table in TABLES:
            await conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")


async def event_columns(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'audit_events' ORDER BY ordinal_position"
    )
    return [row["column_name"] for row in rows]


# --- An untouched log --------------------------------------------------------------------


async def test_an_untouched_log_verifies(
    platform: Platform,
    audit: pb_grpc.AuditServiceAsyncStub,
    public_key: Ed25519PublicKey,
    tmp_path: Path,
) -> None:
    sizes = await grow(platform, audit)
    report = await audit_verify.verify(audit, public_key, samples=10)
    assert report.ok, report.summary()
    assert report.tree_size >= sizes[-1]
    assert report.inclusion_proofs >= 2 and report.consistency_proofs >= 2

    remembered = tmp_path / "audit-checkpoint.json"
    first = medimg_verify(platform, "--remember", str(remembered))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "audit log verified" in first.stdout
    assert json.loads(remembered.read_text())["name"].startswith("checkpoints/")
    await grow(platform, audit)
    again = medimg_verify(platform, "--remember", str(remembered))  # must extend the first
    assert again.returncode == 0, again.stdout + again.stderr


async def test_another_trusted_key_refuses_every_checkpoint(
    platform: Platform, audit: pb_grpc.AuditServiceAsyncStub, tmp_path: Path
) -> None:
    await grow(platform, audit)
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    answer = medimg_verify(platform, "--public-key", str(stranger))
    assert answer.returncode == 1
    assert "signed by unknown key" in answer.stdout
    # Trusted beside the log's own key, a key that signed nothing changes nothing.
    assert platform.pki is not None
    own = audit_verify.key_id(audit_verify.load_public_key(platform.pki.audit_public_key))
    both = medimg_verify(
        platform, "--public-key", str(stranger), "--public-key", str(platform.pki.audit_public_key)
    )
    assert both.returncode == 0, both.stdout + both.stderr
    assert re.search(rf"\d+ checkpoints signed \(\d+ by key {own[:16]}…\)", both.stdout)


def restart_audit(platform: Platform, **settings: str) -> None:
    """Audit stopped, then started again with `settings` over its usual ones."""
    # Past the service's own drain (delay, then up to 10 s for calls in flight).
    assert platform.services["audit"].stop(grace=30) == 0
    process = Process(
        "audit",
        [sys.executable, "-m", "medimg_audit"],
        platform.service_env("audit", **settings),
        platform.log("audit"),
    )
    process.start()
    platform.services["audit"] = process
    wait_until_serving(platform, "audit")


async def test_checkpoints_across_a_signing_key_rotation_verify_with_both_keys(
    platform: Platform,
    audit: pb_grpc.AuditServiceAsyncStub,
    public_key: Ed25519PublicKey,
    tmp_path: Path,
) -> None:
    assert platform.pki is not None
    await grow(platform, audit)
    old_pem, old_id = platform.pki.audit_public_key, audit_verify.key_id(public_key)
    new_key, new_pem = tmp_path / "audit-log-key.2.pem", tmp_path / "audit-log-pub.2.pem"
    create_signing_key(new_key, new_pem)
    new_id = audit_verify.key_id(audit_verify.load_public_key(new_pem))
    # The log's tables as they were, then audit restarted on its usual key (it reads the
    # tree it appends to at start, so only once the tables are back).
    try:
        async with tampering(platform):
            restart_audit(
                platform,
                SIGNING_KEY_FILE=str(new_key),
                PREVIOUS_PUBLIC_KEY_FILES=json.dumps([str(old_pem)]),
            )
            upload(platform, fresh_instance())
            rotated = await audit.CreateCheckpoint(pb.CreateCheckpointRequest(), timeout=10)
            assert rotated.key_id == new_id
            both = medimg_verify(
                platform, "--public-key", str(old_pem), "--public-key", str(new_pem)
            )
            assert both.returncode == 0, both.stdout + both.stderr
            assert f"by key {old_id[:16]}…" in both.stdout
            assert f"1 by key {new_id[:16]}…" in both.stdout
            alone = medimg_verify(platform, "--public-key", str(new_pem))
            assert alone.returncode == 1
            assert f"signed by unknown key {old_id}" in alone.stdout
    finally:
        restart_audit(platform)


# --- The five tamperings ------------------------------------------------------------------


async def test_a_modified_event_is_named(
    platform: Platform, audit: pb_grpc.AuditServiceAsyncStub, public_key: Ed25519PublicKey
) -> None:
    sizes = await grow(platform, audit)
    target = sizes[-1] - 5
    async with tampering(platform) as conn:
        async with without_triggers(conn):
            await conn.execute(
                "UPDATE audit_events SET resource = 'studies/someone-else' WHERE log_index = $1",
                target,
            )
        report = await audit_verify.verify(audit, public_key)
        assert (
            f"event {target}: field resource differs from its recorded canonical form"
            in messages(report, "event")
        ), report.summary()
        answer = medimg_verify(platform)
        assert answer.returncode == 1
        assert f"event {target}: field resource differs" in answer.stdout


async def test_a_deleted_event_is_named(
    platform: Platform, audit: pb_grpc.AuditServiceAsyncStub, public_key: Ed25519PublicKey
) -> None:
    sizes = await grow(platform, audit)
    target = sizes[-1] - 6
    async with tampering(platform) as conn:
        async with without_triggers(conn):
            await conn.execute("DELETE FROM audit_events WHERE log_index = $1", target)
        report = await audit_verify.verify(audit, public_key)
        assert f"event {target} missing" in messages(report, "sequence"), report.summary()
        answer = medimg_verify(platform)
        assert answer.returncode == 1
        assert f"event {target} missing" in answer.stdout


async def test_swapped_events_are_found(
    platform: Platform, audit: pb_grpc.AuditServiceAsyncStub, public_key: Ed25519PublicKey
) -> None:
    sizes = await grow(platform, audit)
    # Two even indexes short of the end: their rows hold a leaf and complete no subtree,
    # so no later append reads them (the frontier's hashes sit in odd rows, or in the last
    # row), and audit still appends its own reads while verify lists the log. Swapped odd
    # rows can be frontier rows, depending on the log's size: appends are then refused
    # (TREE_INCOMPLETE, services/audit/tests/test_log.py) and verify could not list the log.
    first = (sizes[-1] - 8) // 2 * 2
    second = first + 4
    async with tampering(platform) as conn:
        columns = [c for c in await event_columns(conn) if c != "log_index"]
        listed = ", ".join(columns)
        async with without_triggers(conn):
            # Each row takes every column of the other but its place in the log. Deleted
            # and inserted rather than updated, since event_id is unique row by row.
            await conn.execute(
                "DELETE FROM audit_events WHERE log_index = ANY($1::bigint[])", [first, second]
            )
            await conn.execute(
                f"INSERT INTO audit_events (log_index, {listed}) "
                f"SELECT CASE log_index WHEN $1 THEN $2 ELSE $1 END, {listed} "
                "FROM tamper_snapshot_audit_events WHERE log_index = ANY($3::bigint[])",
                first,
                second,
                [first, second],
            )
        report = await audit_verify.verify(audit, public_key)
        found = messages(report, "event")
        assert f"event {first}: field log_index differs from its recorded canonical form" in found
        assert f"event {second}: field log_index differs from its recorded canonical form" in found
        rewritten = [m for m in messages(report, "root") if "the log was rewritten" in m]
        assert f"do not match checkpoint {sizes[-1]}" in " ".join(rewritten), report.summary()
        answer = medimg_verify(platform)
        assert answer.returncode == 1
        assert "the log was rewritten" in answer.stdout


async def test_a_truncated_tail_is_named(
    platform: Platform, audit: pb_grpc.AuditServiceAsyncStub, public_key: Ed25519PublicKey
) -> None:
    sizes = await grow(platform, audit)
    keep = sizes[-1] - 9
    async with tampering(platform) as conn:
        async with without_triggers(conn):
            # The tail's events, and with them the tree nodes they hold; the signed
            # checkpoints stay, since they cannot be forged.
            await conn.execute("DELETE FROM audit_events WHERE log_index >= $1", keep)
        report = await audit_verify.verify(audit, public_key)
        # The log appended the listing itself (at `keep`) before it served the events.
        shortened = re.compile(rf"log has (\d+) events, checkpoint says {report.tree_size}")
        counts = [
            int(m[1]) for text in messages(report, "sequence") if (m := shortened.match(text))
        ]
        assert report.tree_size >= sizes[-1]
        assert len(counts) == 1 and keep < counts[0] <= keep + 2, report.summary()
        answer = medimg_verify(platform)
        assert answer.returncode == 1
        assert re.search(r"log has \d+ events, checkpoint says \d+", answer.stdout), answer.stdout


async def test_a_rewritten_log_signed_with_another_key_is_refused(
    platform: Platform, audit: pb_grpc.AuditServiceAsyncStub, public_key: Ed25519PublicKey
) -> None:
    await grow(platform, audit)
    forger = Ed25519PrivateKey.generate()
    forged_id = hashlib.sha256(forger.public_key().public_bytes_raw()).hexdigest()
    async with tampering(platform) as conn:
        sizes = await rewrite(conn, forger)
        report = await audit_verify.verify(audit, public_key)
        refused = messages(report, "signature")
        for size in sizes:
            assert f"checkpoint {size} signed by unknown key {forged_id}" in refused
        # The forgery is complete: events, leaf hashes and the log's own proofs all agree
        # with it. Only the signatures give it away.
        assert messages(report, "event") == [], report.summary()
        answer = medimg_verify(platform)
        assert answer.returncode == 1
        assert f"signed by unknown key {forged_id}" in answer.stdout


async def test_a_rewritten_log_the_service_signs_again_breaks_a_remembered_checkpoint(
    platform: Platform,
    audit: pb_grpc.AuditServiceAsyncStub,
    public_key: Ed25519PublicKey,
    tmp_path: Path,
) -> None:
    await grow(platform, audit)
    remembered = tmp_path / "audit-checkpoint.json"
    assert medimg_verify(platform, "--remember", str(remembered)).returncode == 0
    kept = audit_verify.read_remembered(remembered)
    assert kept is not None
    kept_size = audit_verify.parse_checkpoint(kept.body).tree_size
    async with tampering(platform) as conn:
        # No forged signatures this time: the old checkpoints go, and the service itself
        # signs the rewritten log, since it signs whatever its tables hold.
        await rewrite(conn, None)
        signed = await audit.CreateCheckpoint(pb.CreateCheckpointRequest(), timeout=10)
        assert signed.tree_size > kept_size
        report = await audit_verify.verify(audit, public_key, remembered=kept)
        assert messages(report, "remembered")[0].startswith(
            f"checkpoint {signed.tree_size} is not consistent with remembered checkpoint "
            f"{kept_size}"
        ), report.summary()
        assert (
            f"events up to {kept_size - 1} do not match remembered checkpoint {kept_size}: "
            "the log was rewritten"
        ) in messages(report, "root")
        answer = medimg_verify(platform, "--remember", str(remembered))
        assert answer.returncode == 1
        assert "is not consistent with remembered checkpoint" in answer.stdout
    # A failed verification leaves the remembered checkpoint as it was.
    assert audit_verify.read_remembered(remembered) == kept


async def rewrite(conn: asyncpg.Connection, forger: Ed25519PrivateKey | None) -> list[int]:
    """Rewrites every event's resource, then recomputes the leaf hashes, the tree nodes and
    every checkpoint, signed with the forger's key (or drops the checkpoints, without one).
    Returns the sizes re-signed."""
    rows = await conn.fetch("SELECT log_index, canonical FROM audit_events ORDER BY log_index")
    assert [row["log_index"] for row in rows] == list(range(len(rows)))
    rows_signed = await conn.fetch("SELECT tree_size FROM checkpoints ORDER BY tree_size")
    sizes = [row["tree_size"] for row in rows_signed] if forger else []
    forged, leaves = [], []
    for row in rows:
        recorded = json.loads(bytes(row["canonical"]))
        recorded["resource"] = f"studies/forged-{row['log_index']}"
        canonical = json.dumps(
            recorded, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
        leaves.append(hashlib.sha256(b"\x00" + canonical).digest())
        forged.append((row["log_index"], recorded["resource"], canonical))
    subtrees = perfect_subtrees(leaves)
    updates = [
        (*event, leaf, held_by(event[0], subtrees))
        for event, leaf in zip(forged, leaves, strict=True)
    ]
    when = datetime.now(UTC)
    checkpoints = []
    for size in sizes:
        assert forger is not None
        forged_id = hashlib.sha256(forger.public_key().public_bytes_raw()).hexdigest()
        root = tree_hash(leaves[:size])
        body = (
            f"medimg.local/audit\n{size}\n{base64.b64encode(root).decode()}\n"
            f"time {when.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}\n"
        ).encode()
        checkpoints.append((size, root, when, body, forger.sign(body), forged_id))
    async with without_triggers(conn):
        await conn.executemany(
            "UPDATE audit_events SET resource = $2, canonical = $3, leaf_hash = $4, "
            "subtree_hashes = $5 WHERE log_index = $1",
            updates,
        )
        await conn.execute("DELETE FROM checkpoints")
        if checkpoints:
            await conn.executemany(
                "INSERT INTO checkpoints "
                "(tree_size, root_hash, sign_time, body, signature, key_id) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                checkpoints,
            )
    return sizes


def node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def tree_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH by the recursive definition of RFC 9162 2.1.1 (the test's own, not the verifier's)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    split = 1
    while split * 2 < len(leaves):
        split *= 2
    return node(tree_hash(leaves[:split]), tree_hash(leaves[split:]))


def perfect_subtrees(leaves: Sequence[bytes]) -> dict[tuple[int, int], bytes]:
    """{(level, idx): hash} of every perfect subtree of two or more leaves."""
    found: dict[tuple[int, int], bytes] = {}
    level, below = 0, list(leaves)
    while len(below) > 1:
        level += 1
        below = [node(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        found |= {(level, idx): value for idx, value in enumerate(below)}
    return found


def held_by(leaf: int, subtrees: dict[tuple[int, int], bytes]) -> bytes:
    """What the row of `leaf` stores as subtree_hashes: the subtrees it is the last leaf of."""
    held, level = b"", 1
    while (leaf + 1) % (1 << level) == 0:
        held += subtrees[(level, ((leaf + 1) >> level) - 1)]
        level += 1
    return held


async def test_the_log_verifies_again_once_restored(
    audit: pb_grpc.AuditServiceAsyncStub, public_key: Ed25519PublicKey
) -> None:
    # Every tampering above was undone: the tests after these find the log as it was.
    report = await audit_verify.verify(audit, public_key)
    assert report.ok, report.summary()
