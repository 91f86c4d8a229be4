"""Jobs on real worker processes: to SUCCEEDED with a registered bundle the inference
service loads, cancel, a killed worker, a restart of the service, resume from checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from medimg_core.bundles import bundle_digest
from medimg_inference.repository import ModelRepository
from medimg_training import jobs, launchers, progress, registry, specs
from medimg_training.datasets import Dataset
from medimg_training.jobs import Job, State
from medimg_training.launchers import Exit, Launch
from medimg_training.runner import Runner
from medimg_training.settings import TrainingSettings
from services.training.tests.support import stand_in_python, wait_for_line

pytestmark = pytest.mark.slow

MakeRunner = Callable[[], Runner]


@pytest.fixture
async def make_runner(
    pool: asyncpg.Pool,
    events: aioredis.Redis,
    settings: TrainingSettings,
    executor: ThreadPoolExecutor,
) -> AsyncIterator[MakeRunner]:
    made: list[Runner] = []

    def make() -> Runner:
        runner = Runner(
            pool=pool, events=events, settings=settings, executor=executor, code_version="test"
        )
        made.append(runner)
        return runner

    yield make
    for runner in made:
        await runner.close()


async def submit(pool: asyncpg.Pool, dataset: Dataset, **changes: Any) -> Job:
    raw: dict[str, Any] = {
        "network": {"name": "DenseNet", "arguments": {}},
        "image_size": [32, 32],
        "batch_size": 4,
        "epochs": 2,
        "seed": 7,
        **changes,
    }
    spec = specs.with_defaults(raw, dataset)
    specs.check(spec, dataset, max_processes=2, gpus=0)
    return await jobs.create(pool, spec, "max")


async def wait_for(
    pool: asyncpg.Pool, job_id: str, done: Callable[[Job], bool], seconds: float = 240
) -> Job:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        job = await jobs.get(pool, job_id)
        if done(job):
            return job
        assert asyncio.get_running_loop().time() < deadline, f"job still {job.state}: {job}"
        await asyncio.sleep(0.2)


def ended(job: Job) -> bool:
    return job.state in jobs.TERMINAL


def stepping(job: Job) -> bool:
    return job.state is State.RUNNING and job.progress.get("step", 0) >= 1


async def test_a_job_runs_to_a_registered_bundle(
    pool: asyncpg.Pool,
    events: aioredis.Redis,
    dataset: Dataset,
    settings: TrainingSettings,
    make_runner: MakeRunner,
) -> None:
    runner = make_runner()
    await runner.start()
    job = await submit(pool, dataset, checkpoint_every_steps=1)
    runner.wake()
    job = await wait_for(pool, job.job_id, ended)
    log = (settings.object_dir / "jobs" / job.job_id / "worker.log").read_text()
    assert job.state is State.SUCCEEDED, (job.error_message, log[-3000:])
    assert job.model_version == "registeredModels/ct-or-mr/versions/1"
    assert job.progress["step"] == job.progress["total_steps"] == 4  # 8 train items / 4, x2
    assert set(job.progress["metrics"]) >= {"accuracy"}

    # Progress reached the stream step by step, then the final state.
    entries: Any = await events.xrange(progress.stream(job.job_id))
    steps = [int(f["step"]) for _, f in entries if "loss" in f]
    assert steps == sorted(steps) and steps[-1] == 4
    assert entries[-1][1]["state"] == "succeeded"
    assert float(entries[-1][1]["eta_seconds"]) == 0

    version = await registry.get_version(pool, job.model_version)
    assert version.bundle == str(settings.object_dir / "models" / "ct-or-mr" / "1")
    assert version.sha256 == bundle_digest(Path(version.bundle))
    assert version.dataset == dataset.name
    assert version.creator == "max"
    assert version.code_version == "test"
    assert version.metrics == job.progress["metrics"]
    # The inference service's own reader accepts the bundle.
    config = ModelRepository(settings.object_dir / "models").config("ct-or-mr", 1)
    assert config.labels == ("CT", "MR")
    assert config.inputs[0].shape == (1, 32, 32)
    assert config.outputs[0].shape == (2,)
    assert len(list((settings.object_dir / "jobs" / job.job_id / "checkpoints").glob("*.pt"))) == 4


async def test_cancel_stops_the_workers_within_seconds(
    pool: asyncpg.Pool, dataset: Dataset, make_runner: MakeRunner
) -> None:
    runner = make_runner()
    await runner.start()
    job = await submit(pool, dataset, epochs=1000)
    runner.wake()
    running = await wait_for(pool, job.job_id, stepping)
    assert running.worker_pid is not None
    started = asyncio.get_running_loop().time()
    await jobs.cancel(pool, job.job_id)
    await runner.cancel(job.job_id)
    assert asyncio.get_running_loop().time() - started < 5
    with pytest.raises(ProcessLookupError):
        os.killpg(running.worker_pid, 0)
    assert (await jobs.get(pool, job.job_id)).state is State.CANCELLED


async def test_a_killed_worker_fails_the_job_with_the_reason(
    pool: asyncpg.Pool, dataset: Dataset, make_runner: MakeRunner
) -> None:
    runner = make_runner()
    await runner.start()
    job = await submit(pool, dataset, epochs=1000)
    runner.wake()
    running = await wait_for(pool, job.job_id, stepping)
    assert running.worker_pid is not None
    os.kill(running.worker_pid, signal.SIGKILL)
    failed = await wait_for(pool, job.job_id, ended, seconds=30)
    assert failed.state is State.FAILED
    assert failed.error_reason == "WORKER_FAILED"
    assert "SIGKILL" in failed.error_message


async def test_a_restart_fails_lost_jobs_or_resumes_them_from_the_checkpoint(
    pool: asyncpg.Pool,
    events: aioredis.Redis,
    dataset: Dataset,
    settings: TrainingSettings,
    make_runner: MakeRunner,
) -> None:
    first = make_runner()
    await first.start()
    lost = await submit(pool, dataset, epochs=1000)
    first.wake()
    await wait_for(pool, lost.job_id, stepping)
    await first.close()  # a graceful stop: workers stopped, the job left RUNNING
    assert (await jobs.get(pool, lost.job_id)).state is State.RUNNING

    second = make_runner()
    await second.start()
    failed = await jobs.get(pool, lost.job_id)
    assert (failed.state, failed.error_reason) == (State.FAILED, "WORKER_LOST")

    kept = await submit(
        pool, dataset, epochs=1000, max_steps=150, checkpoint_every_steps=2, resume_on_restart=True
    )
    second.wake()
    await wait_for(pool, kept.job_id, lambda j: j.progress.get("step", 0) >= 3)
    await second.close()
    checkpoints = settings.object_dir / "jobs" / kept.job_id / "checkpoints"
    assert (checkpoints / "latest.json").is_file()

    third = make_runner()
    await third.start()
    done = await wait_for(pool, kept.job_id, ended)
    assert done.state is State.SUCCEEDED, done.error_message
    assert done.attempts == 2
    assert done.resume
    assert done.progress["step"] == 150
    # The second attempt went on from the checkpoint: step 1 was reported once.
    entries: Any = await events.xrange(progress.stream(kept.job_id))
    assert [f["step"] for _, f in entries if "loss" in f].count("1") == 1


async def test_a_job_past_its_max_runtime_fails_and_its_workers_stop(
    pool: asyncpg.Pool, dataset: Dataset, settings: TrainingSettings, make_runner: MakeRunner
) -> None:
    runner = make_runner()
    await runner.start()
    job = await submit(pool, dataset, epochs=1000, max_runtime="8s")
    runner.wake()
    running = await wait_for(pool, job.job_id, stepping)
    assert running.worker_pid is not None
    # The workers reported progress to Redis, yet their config on the shared volume holds
    # no Redis URL (it may carry a password): it came through their environment.
    config = (settings.object_dir / "jobs" / job.job_id / "worker.json").read_text()
    assert settings.redis_url not in config
    assert "redis" not in config.lower()

    failed = await wait_for(pool, job.job_id, ended, seconds=30)
    assert (failed.state, failed.error_reason) == (State.FAILED, "DEADLINE_EXCEEDED")
    assert "max_runtime (0:00:08)" in failed.error_message
    assert failed.start_time is not None and failed.end_time is not None
    took = (failed.end_time - failed.start_time).total_seconds()
    assert 8 <= took < 8 + settings.cancel_grace_seconds + 10  # not the 1000 epochs
    with pytest.raises(ProcessLookupError):
        os.killpg(running.worker_pid, 0)


async def test_a_new_leader_stops_the_workers_of_a_job_cancelled_while_none_led(
    pool: asyncpg.Pool,
    dataset: Dataset,
    settings: TrainingSettings,
    make_runner: MakeRunner,
    tmp_path: Path,
) -> None:
    # Workers a crashed leader left running, launched as its launcher did (a stand-in
    # worker that just waits), then the job cancelled through a replica while none led.
    job = await submit(pool, dataset, epochs=1000)
    jobs_root = settings.object_dir / "jobs"
    config = jobs_root / job.job_id / "worker.json"
    config.parent.mkdir(parents=True)
    python = stand_in_python(tmp_path, "import time\nprint('ready', flush=True)\ntime.sleep(600)")
    crashed = launchers.LocalLauncher(settings.model_copy(update={"worker_python": str(python)}),
                                      jobs_root)  # fmt: skip
    left = await crashed.launch(Launch(job.job_id, config, processes=1))
    await wait_for_line(config.parent / "worker.log", "ready")
    try:
        await jobs.start(pool, job.job_id, left.pid, left.host)
        await jobs.cancel(pool, job.job_id)

        await make_runner().start()

        # Stopped by the new leader at its start (SIGTERM), not run on.
        assert await left.wait(0) == Exit(-signal.SIGTERM)
        assert (await jobs.get(pool, job.job_id)).state is State.CANCELLED
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(left.pid, signal.SIGKILL)


async def test_the_end_of_a_job_is_announced_once(events: aioredis.Redis) -> None:
    """Two replicas may both see a job end (the one that took a cancel, and the leader whose
    workers stopped, which may report in between): the stream gets one end entry; a resumed
    job's next end, another."""
    job_id = "announced-once"
    cancelled = {"step": 3, "state": "cancelled"}
    assert await progress.announce_end(events, job_id, "t1", cancelled)
    await events.xadd(progress.stream(job_id), {"step": "4"})  # a worker not stopped yet
    assert not await progress.announce_end(events, job_id, "t1", cancelled)
    await events.xadd(progress.stream(job_id), {"step": "5"})  # resumed
    assert await progress.announce_end(events, job_id, "t2", {"step": 6, "state": "succeeded"})

    entries: Any = await events.xrange(progress.stream(job_id))
    assert [fields.get("state") for _, fields in entries] == [
        "cancelled",
        None,
        None,
        "succeeded",
    ]
    assert progress.decode(entries[-1][1]) == {"step": 6, "state": "succeeded"}
