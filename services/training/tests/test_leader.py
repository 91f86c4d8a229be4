"""Training at several replicas: two training services as the app builds them, on one
database, one Redis and one object directory (the shared volume). One leads (schedules,
launches, watches, recovers); both serve every RPC."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import prometheus_client
import pytest
import redis.asyncio as aioredis

from medimg.training.v1 import training_service_pb2 as pb
from medimg.training.v1 import training_service_pb2_grpc as pb_grpc
from medimg_core.server import Server
from medimg_training import jobs, progress
from medimg_training.app import build
from medimg_training.datasets import Dataset
from medimg_training.jobs import State
from medimg_training.leader import LOCK_KEY, Leadership
from medimg_training.settings import TrainingSettings
from services.training.tests.test_runner import ended, stepping, wait_for
from services.training.tests.test_training_servicer import job_request, user

pytestmark = pytest.mark.slow

#: Seconds between tries for the lease, in these tests.
RETRY = 1.0
ENGINEER = user("max", "ml-engineer")


@dataclass
class Replica:
    server: Server
    stub: pb_grpc.TrainingServiceAsyncStub


StartReplica = Callable[[], Awaitable[Replica]]


@pytest.fixture
async def start_replica(settings: TrainingSettings) -> AsyncIterator[StartReplica]:
    settings = settings.model_copy(
        update={
            "grace_seconds": 1,
            "leader_retry_seconds": RETRY,
            "max_running_jobs": 2,
            # Far beyond any wait below: a job starts at once only if NOTIFY woke the leader.
            "schedule_poll_seconds": 120,
        }
    )
    async with AsyncExitStack() as stack:

        async def start() -> Replica:
            resources = await stack.enter_async_context(AsyncExitStack())
            server = Server(settings, await build(settings, resources))
            port = await server.start()
            await server.ready()
            resources.push_async_callback(server.grpc.stop, None)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            resources.push_async_callback(channel.close, None)
            return Replica(server, pb_grpc.TrainingServiceStub(channel))

        yield start


async def holder(pool: asyncpg.Pool) -> int | None:
    """The backend that holds the lease, as PostgreSQL sees it."""
    pid: int | None = await pool.fetchval(
        """SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
           AND ((classid::bigint << 32) | objid::bigint) = $1""",
        LOCK_KEY,
    )
    return pid


def worker_groups(job_dir: Path) -> set[int]:
    """Process groups of the processes that run this job's worker.json."""
    config = str(job_dir / "worker.json")
    groups = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if config in (entry / "cmdline").read_text().replace("\0", " "):
                groups.add(os.getpgid(int(entry.name)))
        except (OSError, ProcessLookupError):
            continue
    return groups


def group_exists(group: int) -> bool:
    """Whether any process (a zombie not yet reaped included) is left in the group."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


async def test_one_replica_launches_and_a_job_created_at_the_other_starts_at_once(
    pool: asyncpg.Pool,
    dataset: Dataset,
    settings: TrainingSettings,
    start_replica: StartReplica,
    events: aioredis.Redis,
) -> None:
    first = await start_replica()
    leader_pid = await holder(pool)
    second = await start_replica()
    assert leader_pid is not None and await holder(pool) == leader_pid, "one lease, kept"

    made = await second.stub.CreateTrainingJob(
        job_request(dataset, epochs=1000), metadata=ENGINEER, timeout=30
    )
    job_id = jobs.parse_name(made.name)
    created = asyncio.get_running_loop().time()
    running = await wait_for(pool, job_id, lambda j: j.state is State.RUNNING, seconds=30)
    # Woken through NOTIFY, not at the (120 s) poll.
    assert asyncio.get_running_loop().time() - created < 20
    running = await wait_for(pool, job_id, stepping)
    await asyncio.sleep(2 * RETRY)  # the other replica tried for the lease meanwhile
    assert (await jobs.get(pool, job_id)).attempts == 1
    assert worker_groups(settings.object_dir / "jobs" / job_id) == {running.worker_pid}

    # WatchTrainingJob at the replica that does not lead reads the same progress.
    async for report in second.stub.WatchTrainingJob(
        pb.WatchTrainingJobRequest(name=made.name), metadata=ENGINEER, timeout=30
    ):
        assert report.state == pb.TrainingJob.STATE_RUNNING and report.step >= 1
        break

    # Cancelled through the replica that does not lead: the leader stops its workers.
    started = asyncio.get_running_loop().time()
    cancelled = await second.stub.CancelTrainingJob(
        pb.CancelTrainingJobRequest(name=made.name), metadata=ENGINEER, timeout=30
    )
    assert cancelled.state == pb.TrainingJob.STATE_CANCELLED
    assert running.worker_pid is not None
    while worker_groups(settings.object_dir / "jobs" / job_id) or group_exists(running.worker_pid):
        assert asyncio.get_running_loop().time() - started < 10, "the workers still run"
        await asyncio.sleep(0.1)
    assert (await jobs.get(pool, job_id)).state is State.CANCELLED
    # Both replicas saw the job end (the one that took the cancel, the leader whose workers
    # then stopped); its stream has one "cancelled" entry all the same.
    await asyncio.sleep(4 * settings.poll_seconds)
    entries: Any = await events.xrange(progress.stream(job_id))
    assert sum(fields.get("state") == "cancelled" for _, fields in entries) == 1, entries
    del first


async def test_a_replica_takes_over_when_the_leaders_lease_connection_drops(
    pool: asyncpg.Pool, dataset: Dataset, settings: TrainingSettings, start_replica: StartReplica
) -> None:
    first = await start_replica()
    second = await start_replica()
    kept = await first.stub.CreateTrainingJob(
        job_request(
            dataset, epochs=1000, max_steps=200, checkpoint_every_steps=2, resume_on_restart=True
        ),
        metadata=ENGINEER,
        timeout=30,
    )
    lost = await first.stub.CreateTrainingJob(
        job_request(dataset, epochs=1000), metadata=ENGINEER, timeout=30
    )
    kept_id, lost_id = jobs.parse_name(kept.name), jobs.parse_name(lost.name)
    await wait_for(pool, kept_id, lambda j: j.progress.get("step", 0) >= 3)
    was = await wait_for(pool, lost_id, stepping)
    checkpoints = settings.object_dir / "jobs" / kept_id / "checkpoints"
    assert (checkpoints / "latest.json").is_file()

    # The leader's session ends (as when its node is cut off from the database).
    leader_pid = await holder(pool)
    assert leader_pid is not None
    assert await pool.fetchval("SELECT pg_terminate_backend($1)", leader_pid)

    # It stops its own workers at once; the other replica leads and recovers the jobs.
    failed = await wait_for(pool, lost_id, ended, seconds=5 * RETRY + 10)
    assert (failed.state, failed.error_reason) == (State.FAILED, "WORKER_LOST")
    assert was.worker_pid is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(was.worker_pid, 0)
    new_pid = await holder(pool)
    assert new_pid is not None and new_pid != leader_pid
    done = await wait_for(pool, kept_id, ended)
    assert done.state is State.SUCCEEDED, done.error_message
    assert done.attempts == 2 and done.resume
    assert done.progress["step"] == 200
    # The first replica came back as a follower: the lease stayed where it went.
    assert await holder(pool) == new_pid
    del first, second


def leading() -> float | None:
    return prometheus_client.REGISTRY.get_sample_value("medimg_training_leader")


async def test_the_lease_is_a_metric_and_ends_with_the_replica(
    settings: TrainingSettings, pool: asyncpg.Pool
) -> None:
    gained: list[str] = []

    async def gain() -> None:
        gained.append("gain")

    async def lose() -> None:
        gained.append("loss")

    def lease_() -> Leadership:
        return Leadership(
            settings.database_url,
            on_gain=gain,
            on_loss=lose,
            on_wake=gained.append,
            retry_seconds=RETRY,
        )

    lease, other = lease_(), lease_()
    await lease.start()
    await other.start()
    try:
        assert (lease.leading, other.leading) == (True, False)
        assert leading() == 1
        assert await holder(pool) == lease.backend_pid
        await pool.execute("SELECT pg_notify('medimg_training_jobs', 'abc')")
        await asyncio.sleep(0.5)
        assert gained == ["gain", "abc"], "only the leader is woken"
        await lease.close()
        assert gained[-1] == "loss" and not lease.leading
        deadline = asyncio.get_running_loop().time() + 3 * RETRY
        while not other.leading:
            assert asyncio.get_running_loop().time() < deadline, "no one took over"
            await asyncio.sleep(0.1)
        assert await holder(pool) == other.backend_pid
    finally:
        await lease.close()
        await other.close()
    assert leading() == 0
