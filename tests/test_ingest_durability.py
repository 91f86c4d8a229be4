"""Durability: ingest killed with SIGKILL at random points of a long upload loses no
acknowledged instance and, once restarted, leaves no orphan row or object."""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import sys
import time
from pathlib import Path

import asyncpg
import grpc
import pydicom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli import demo
from medimg_cli.platform import Platform, with_database
from medimg_cli.testing import free_port_offset
from medimg_ingest.deid.keyed import replacement_uid
from tests.helpers import fresh_instance

pytestmark = pytest.mark.slow

STORED = {ingest_pb.InstanceResult.OUTCOME_STORED, ingest_pb.InstanceResult.OUTCOME_DUPLICATE}


class Ingest:
    """An ingest process of its own (own port and object store, the platform's database)."""

    def __init__(self, platform: Platform, objects: Path, port: int) -> None:
        self.platform, self.objects, self.port = platform, objects, port
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, **settings: str) -> None:
        env = self.platform.service_env(
            "ingest", PORT=str(self.port), METRICS_PORT="0", DIMSE_PORT="0",
            OBJECT_DIR=str(self.objects), **settings,
        )  # fmt: skip
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "medimg_ingest", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while True:
                try:
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                assert self.process.returncode is None, "ingest exited at start-up"
                assert time.monotonic() < deadline, "ingest did not start"
                await asyncio.sleep(0.1)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await self.process.wait()


async def upload_until_killed(
    port: int, platform: Platform, files: list[bytes], acknowledged: dict[str, bytes]
) -> None:
    """Uploads the files one per stream, four at a time, until the calls fail."""
    caller = (("x-forwarded-client-cert", f"URI={platform.mesh.spiffe('ops')}"),)
    todo = iter(files)

    async def sender(stub: ingest_grpc.IngestServiceAsyncStub) -> None:
        for data in todo:
            try:
                answer = await stub.UploadInstances(
                    demo.chunks(data, size=64 * 1024), metadata=caller, timeout=30
                )
            except grpc.aio.AioRpcError:
                return  # killed: this one was never acknowledged
            [result] = answer.results
            assert result.outcome in STORED, result
            acknowledged[result.instance] = data

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        await asyncio.gather(*(sender(stub) for _ in range(4)))


def instance_of(platform: Platform, data: bytes) -> str:
    assert platform.pki is not None
    key = platform.pki.deid_key.read_bytes()
    original = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    uids = [
        replacement_uid(key, str(original.get(k)))
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    ]
    return "studies/{}/series/{}/instances/{}".format(*uids)


async def test_sigkill_during_uploads_loses_nothing_acknowledged_and_leaves_no_orphan(
    platform: Platform, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    objects = tmp_path / "objects"
    port = 7101 + free_port_offset(platform.mesh, start=platform.port_offset + 2000)
    ingest = Ingest(platform, objects, port)
    files = [fresh_instance("CT_small.dcm") for _ in range(400)]
    acknowledged: dict[str, bytes] = {}
    try:
        for cycle in range(3):
            await ingest.start()
            batch = files[cycle * 130 : (cycle + 1) * 130]
            uploads = asyncio.create_task(upload_until_killed(port, platform, batch, acknowledged))
            await asyncio.sleep(rng.uniform(0.2, 1.5))  # a random point of the upload
            await ingest.kill()
            await uploads
        # Restarted with no grace, its sweep removes what the kills left between store
        # and index (no upload is in flight now).
        await ingest.start(ORPHAN_GRACE_SECONDS="0")
        deadline = time.monotonic() + 30
        while await orphans(platform, objects) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # the sweep runs at start-up, in another process
    finally:
        await ingest.stop()
    assert acknowledged, f"nothing was acknowledged before the kills (seed {seed})"

    conn = await asyncpg.connect(with_database(platform.server_database_url, "medimg_ingest"))
    try:
        rows = await conn.fetch(
            "SELECT sop_instance_uid, object_key, sha256 FROM instances "
            "WHERE sop_instance_uid = ANY($1::text[])",
            [instance_of(platform, data).rsplit("/", 1)[1] for data in files],
        )
    finally:
        await conn.close()
    indexed = {row["sop_instance_uid"]: row for row in rows}
    for name in acknowledged:  # every acknowledged instance is there, whole
        assert name.rsplit("/", 1)[1] in indexed, f"acknowledged {name} lost (seed {seed})"
    for row in rows:  # no row without its object, or with other bytes
        path = objects / row["object_key"]
        assert path.is_file(), f"index row without object (seed {seed})"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]
    left = await orphans(platform, objects)
    assert left == [], f"orphans after restart (seed {seed}): {left}"


async def orphans(platform: Platform, objects: Path) -> list[Path]:
    """Files in the object store that no index row points at."""
    conn = await asyncpg.connect(with_database(platform.server_database_url, "medimg_ingest"))
    try:
        referenced = set(await conn.fetchval("SELECT array_agg(object_key) FROM instances") or [])
    finally:
        await conn.close()
    files = [p for p in objects.rglob("*") if p.is_file()]  # noqa: ASYNC240 - a test
    return [p for p in files if str(p.relative_to(objects)) not in referenced]
