"""Identity key rotation: the vault opens links sealed by previous keys, and the re-seal
moves every link to the current key, on the real PostgreSQL index."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import grpc
import pytest

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.audit.v1 import audit_service_pb2_grpc as audit_grpc
from medimg.ingest.v1 import ingest_service_pb2 as pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from medimg_core import redis as medimg_redis
from medimg_core.audit import Access
from medimg_core.server import Server
from medimg_ingest.app import build
from medimg_ingest.identities import BrokenSeal, IdentityVault, UnknownIdentityKey
from medimg_ingest.rekey import ResealStopped, links_by_key_id, reseal
from medimg_ingest.settings import IngestSettings
from services.ingest.tests.test_ingest_servicer import (
    CLINICIAN,
    DEID_KEY,
    Audit,
    dicom_file,
    pydicom_value,
    upload,
    user,
)

KEY_A, KEY_B, KEY_C = b"A" * 32, b"B" * 32, b"C" * 32
A, B, C = IdentityVault(KEY_A), IdentityVault(KEY_B), IdentityVault(KEY_C)
ADMIN = user("root", "admin")
WHY = "critical finding must reach the referring clinician"


def test_the_vault_seals_with_the_current_key_and_opens_with_any_listed_one() -> None:
    rotated = IdentityVault(KEY_B, [KEY_A])
    assert rotated.key_id == B.key_id and rotated.key_ids == (B.key_id, A.key_id)
    old = A.seal("ANON-1", "PAT-1")
    assert rotated.open("ANON-1", old, A.key_id) == "PAT-1"
    new = rotated.seal("ANON-2", "PAT-2")
    assert B.open("ANON-2", new, B.key_id) == "PAT-2"
    with pytest.raises(BrokenSeal):
        A.open("ANON-2", new, A.key_id)
    # The row's key id chooses the key: another loaded key is not tried.
    with pytest.raises(BrokenSeal, match=f"key id {B.key_id}"):
        rotated.open("ANON-1", old, B.key_id)
    with pytest.raises(UnknownIdentityKey, match=f"key id {C.key_id}, which is not loaded"):
        rotated.open("ANON-1", C.seal("ANON-1", "PAT-1"), C.key_id)
    with pytest.raises(ValueError, match="32 bytes"):
        IdentityVault(KEY_B, [b"short"])


async def seal_rows(pool: asyncpg.Pool, vault: IdentityVault, patients: dict[str, str]) -> None:
    await pool.executemany(
        "INSERT INTO identities (patient_pseudonym, key_id, sealed) VALUES ($1, $2, $3)",
        [(p, vault.key_id, vault.seal(p, patient)) for p, patient in patients.items()],
    )


async def rows(pool: asyncpg.Pool) -> dict[str, tuple[str, bytes]]:
    found = await pool.fetch("SELECT patient_pseudonym, key_id, sealed FROM identities")
    return {r["patient_pseudonym"]: (r["key_id"], bytes(r["sealed"])) for r in found}


class Recording:
    """The audit hook: every access reported, in order."""

    def __init__(self) -> None:
        self.accesses: list[Access] = []

    async def __call__(self, accesses: Sequence[Access]) -> None:
        self.accesses.extend(accesses)


async def test_reseal_moves_every_link_to_the_current_key_once(pool: asyncpg.Pool) -> None:
    old = {f"ANON-{n:02}": f"PATIENT-{n}" for n in range(7)}
    await seal_rows(pool, A, old)
    await seal_rows(pool, B, {"ANON-99": "PATIENT-99"})
    rotated = IdentityVault(KEY_B, [KEY_A])
    audited = Recording()

    done = await reseal(pool, rotated, report=audited, batch_size=3)

    assert (done.by_key_id, done.already_current, done.batches) == ({A.key_id: 7}, 1, 3)
    assert not any(patient in done.summary() for patient in old.values())
    assert await links_by_key_id(pool) == {B.key_id: 8}
    # Each re-sealed link was audited, by pseudonym; the one already on B was not touched.
    assert [a.patient_pseudonym for a in audited.accesses] == sorted(old)
    assert {a.resource for a in audited.accesses} == {f"patients/{p}" for p in old}
    # With A dropped, everything still opens under B alone, by each row's key id.
    stored = await rows(pool)
    for pseudonym, patient in {**old, "ANON-99": "PATIENT-99"}.items():
        key_id, sealed = stored[pseudonym]
        assert B.open(pseudonym, sealed, key_id) == patient

    again = await reseal(pool, rotated, report=audited, batch_size=3)
    assert (again.total, again.already_current, again.batches) == (0, 8, 0)
    assert await rows(pool) == stored  # not even re-encrypted
    assert len(audited.accesses) == 7


async def test_a_link_that_does_not_open_stops_the_run_with_its_batch_unwritten(
    pool: asyncpg.Pool,
) -> None:
    await seal_rows(pool, A, {"ANON-1": "PAT-1", "ANON-2": "PAT-2", "ANON-4": "PAT-4"})
    await seal_rows(pool, A, {"ANON-5": "PAT-5"})
    await seal_rows(pool, C, {"ANON-3": "SECRET-PATIENT-3"})  # C is not loaded
    before = await rows(pool)
    rotated = IdentityVault(KEY_B, [KEY_A])
    audited = Recording()

    with pytest.raises(ResealStopped) as stopped:
        await reseal(pool, rotated, report=audited, batch_size=2)

    message = str(stopped.value)
    assert f"patients/ANON-3 (sealed with key id {C.key_id})" in message
    assert "SECRET-PATIENT-3" not in message
    assert stopped.value.reason == "IDENTITY_KEY_UNKNOWN"
    assert stopped.value.done.total == 2  # the first batch, committed
    after = await rows(pool)
    assert [after[p][0] for p in ("ANON-1", "ANON-2")] == [B.key_id] * 2
    # ANON-3's batch (ANON-3, ANON-4) and everything after it: as they were.
    assert {p: after[p] for p in ("ANON-3", "ANON-4", "ANON-5")} == {
        p: before[p] for p in ("ANON-3", "ANON-4", "ANON-5")
    }
    assert [a.patient_pseudonym for a in audited.accesses] == ["ANON-1", "ANON-2"]

    # With C listed the run resumes where it stopped, and skips what moved already.
    done = await reseal(pool, IdentityVault(KEY_B, [KEY_A, KEY_C]), report=audited)
    assert (done.by_key_id, done.already_current) == ({A.key_id: 2, C.key_id: 1}, 2)
    assert await links_by_key_id(pool) == {B.key_id: 5}


async def test_an_altered_link_or_an_unrecorded_batch_writes_nothing(pool: asyncpg.Pool) -> None:
    await seal_rows(pool, A, {"ANON-1": "PAT-1"})
    # A value sealed for another pseudonym, copied onto this row, under a loaded key.
    await pool.execute(
        "INSERT INTO identities (patient_pseudonym, key_id, sealed) VALUES ($1, $2, $3)",
        "ANON-2",
        A.key_id,
        A.seal("ANON-1", "PAT-1"),
    )
    before = await rows(pool)
    rotated = IdentityVault(KEY_B, [KEY_A])
    with pytest.raises(ResealStopped, match="patients/ANON-2") as stopped:
        await reseal(pool, rotated, report=Recording())
    assert stopped.value.reason == "IDENTITY_SEAL_BROKEN" and "PAT-1" not in str(stopped.value)
    assert await rows(pool) == before

    async def audit_down(accesses: Sequence[Access]) -> None:
        raise RuntimeError("audit is down")

    await pool.execute("DELETE FROM identities WHERE patient_pseudonym = 'ANON-2'")
    with pytest.raises(RuntimeError, match="audit is down"):
        await reseal(pool, rotated, report=audit_down)
    assert await rows(pool) == {"ANON-1": before["ANON-1"]}


@contextlib.asynccontextmanager
async def audit_peer() -> AsyncIterator[tuple[Audit, str]]:
    audit = Audit()  # type: ignore[abstract]  # only AppendEvents is needed
    server = grpc.aio.server()
    audit_grpc.add_AuditServiceServicer_to_server(audit, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield audit, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def environment(
    database_url: str, redis: str, audit: str, tmp_path: Path, current: bytes, *previous: bytes
) -> dict[str, str]:
    """Ingest's settings as its Deployment gives them: files for the keys."""
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    (keys / "deid.bin").write_bytes(DEID_KEY)
    for key in (current, *previous):
        (keys / f"{IdentityVault(key).key_id}.bin").write_bytes(key)
    return {
        "MEDIMG_INGEST_PORT": "0",
        "MEDIMG_INGEST_DATABASE_URL": database_url,
        "MEDIMG_INGEST_REDIS_URL": redis,
        "MEDIMG_INGEST_OBJECT_DIR": str(tmp_path / "objects"),
        "MEDIMG_INGEST_AUDIT_TARGET": audit,
        "MEDIMG_INGEST_DEID_KEY_FILE": str(keys / "deid.bin"),
        "MEDIMG_INGEST_IDENTITY_KEY_FILE": str(keys / f"{IdentityVault(current).key_id}.bin"),
        "MEDIMG_INGEST_PREVIOUS_IDENTITY_KEY_FILES": json.dumps(
            [str(keys / f"{IdentityVault(key).key_id}.bin") for key in previous]
        ),
        "MEDIMG_INGEST_MAX_INSTANCE_BYTES": "100000",
        "MEDIMG_INGEST_GRACE_SECONDS": "1",
        "MEDIMG_INGEST_DIMSE_PORT": "0",
    }


@contextlib.asynccontextmanager
async def serving(env: dict[str, str]) -> AsyncIterator[pb_grpc.IngestServiceAsyncStub]:
    """Ingest as its app builds it from `env`, as `python -m medimg_ingest` would."""
    values = {name.removeprefix("MEDIMG_INGEST_").lower(): value for name, value in env.items()}
    previous = json.loads(values.pop("previous_identity_key_files"))
    settings = IngestSettings.model_validate({**values, "previous_identity_key_files": previous})
    async with AsyncExitStack() as resources:
        server = Server(settings, await build(settings, resources))
        port = await server.start()
        await server.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.IngestServiceStub(channel)
        await server.grpc.stop(None)


async def reidentify(stub: pb_grpc.IngestServiceAsyncStub, pseudonym: str) -> str:
    answer = await stub.ReidentifyPatient(
        pb.ReidentifyPatientRequest(name=f"patients/{pseudonym}", reason=WHY),
        metadata=ADMIN,
        timeout=5,
    )
    return str(answer.patient_id)


async def rekey_command(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "medimg_ingest.rekey", *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_rotation_end_to_end_through_the_service_and_the_command(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    redis = redis_url.rsplit("/", 1)[0] + "/5"
    client = medimg_redis.connect(redis)
    await client.flushdb()
    await client.aclose()
    patient = pydicom_value("CT_small.dcm", "PatientID")
    async with audit_peer() as (audit, target):
        on_a = environment(database_url, redis, target, tmp_path, KEY_A)
        async with serving(on_a) as ingest:
            response = await ingest.UploadInstances(
                upload(dicom_file("CT_small.dcm")), metadata=CLINICIAN, timeout=10
            )
            pseudonym = response.results[0].patient_pseudonym
            assert await reidentify(ingest, pseudonym) == patient

        # Rotated: B current, A previous. Links sealed with A still open.
        rotated = environment(database_url, redis, target, tmp_path, KEY_B, KEY_A)
        async with serving(rotated) as ingest:
            assert await reidentify(ingest, pseudonym) == patient
        code, out, _ = await rekey_command(rotated, "--check")
        assert code == 1 and f"key id {A.key_id}: 1 links (previous, loaded)" in out

        seen = len(audit.events)
        code, out, err = await rekey_command(rotated, "--batch-size", "10")
        assert code == 0, err
        assert f"re-sealed 1 identity links with key id {B.key_id}" in out
        assert patient not in out + err
        [event] = audit.events[seen:]
        assert (event.action, event.resource, event.service) == (
            audit_pb.ACTION_UPDATE,
            f"patients/{pseudonym}",
            "ingest",
        )
        assert (event.actor.workload, event.actor.user, event.method) == (
            "spiffe://medimg.local/ns/medimg/sa/ingest",
            "",
            "medimg_ingest.rekey",
        )
        code, out, _ = await rekey_command(rotated)
        assert code == 0 and "re-sealed 0 identity links" in out and "1 were on it already" in out

        # A dropped: everything still opens.
        on_b = environment(database_url, redis, target, tmp_path, KEY_B)
        code, out, _ = await rekey_command(on_b, "--check")
        assert code == 0 and f"key id {B.key_id}: 1 links (current)" in out
        async with serving(on_b) as ingest:
            assert await reidentify(ingest, pseudonym) == patient

        # A link of a key nobody listed stops the command, naming the pseudonym and key id.
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "INSERT INTO identities (patient_pseudonym, key_id, sealed) VALUES ($1, $2, $3)",
                "ANON-STRANGER", C.key_id, C.seal("ANON-STRANGER", "STRANGER-ID"),
            )  # fmt: skip
        finally:
            await conn.close()
        code, out, err = await rekey_command(on_b)
        assert code == 1
        assert f"patients/ANON-STRANGER (sealed with key id {C.key_id}) does not open" in err
        assert "STRANGER-ID" not in out + err
