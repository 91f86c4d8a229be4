"""Runs training jobs as local worker processes and keeps their state machine true.

Each job runs in its own process group (`start_new_session`): `python -m
medimg_training.worker` for one process, `torchrun --standalone` for several, so a cancel
reaches every worker with one `killpg`. Files of a job lie under `<object_dir>/jobs/<job>/`:
`worker.json` (the worker's config), `worker.log`, `checkpoints/`, `error-rank<N>.json`,
`result.json` and `bundle/` (until registered). A monitor task per job drains the job's
progress stream into its row and, when the workers end, decides the outcome:
`result.json` → the bundle is registered and the job SUCCEEDED; else FAILED with
WORKER_FAILED and the workers' last error (or exit status).

At start-up, jobs left RUNNING are looked at: live workers (the service crashed) are
adopted and watched; finished workers' results are registered; workers that are gone
fail the job (WORKER_LOST), unless its spec asks to resume from the last checkpoint. At a
graceful shutdown the workers are stopped and the jobs stay RUNNING for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from medimg_core.bundles import bundle_digest
from medimg_training import datasets, jobs, progress, registry, specs
from medimg_training.jobs import Job, State
from medimg_training.settings import TrainingSettings

log = logging.getLogger(__name__)

#: Called when a job ends (for audit and metrics): the job as it ended.
OnEnd = Callable[[Job], Awaitable[None]]


class _Workers:
    """A job's worker process group: our child, or one adopted after a restart."""

    def __init__(self, pid: int, process: asyncio.subprocess.Process | None) -> None:
        self.pid = pid
        self.process = process

    def exit_status(self) -> int | None:
        """None while running; the exit code (negative: signal), or 0 if unknown (adopted)."""
        if self.process is not None:
            return self.process.returncode
        return None if _alive(self.pid) else 0

    def signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, number)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purposes.
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return status != "Z"
    return True


def _runs_job(pid: int, config: Path) -> bool:
    """Whether `pid` is still this job's worker, not a stranger that got its pid."""
    try:
        return str(config) in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return False


def code_version(version: str) -> str:
    """The package version plus the git commit of the checkout, when there is one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+git.{commit}" if commit else version


class Runner:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        events: aioredis.Redis,
        settings: TrainingSettings,
        executor: Executor,
        code_version: str,
        on_end: OnEnd | None = None,
    ) -> None:
        self._pool = pool
        self._events = events
        self._settings = settings
        self._executor = executor
        self.code_version = code_version
        self._on_end = on_end
        self._wake = asyncio.Event()
        self._workers: dict[str, _Workers] = {}
        self._monitors: dict[str, asyncio.Task[None]] = {}
        self._scheduler: asyncio.Task[None] | None = None
        self.jobs_root = settings.object_dir / "jobs"
        self.models_root = settings.object_dir / "models"

    # Life of the runner -------------------------------------------------------------

    async def start(self) -> None:
        await self.recover()
        self._scheduler = asyncio.create_task(self._schedule_forever())

    async def close(self) -> None:
        """Stops scheduling and the workers (SIGTERM, then SIGKILL past the cancel grace);
        their jobs stay RUNNING. A second call finds nothing left to stop."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        for task in list(self._monitors.values()):
            task.cancel()
        for job_id, workers in list(self._workers.items()):
            log.info("stopping workers at shutdown", extra={"fields": {"job": job_id}})
            await self._stop(workers)
        for task in list(self._monitors.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        self._wake.set()

    async def recover(self) -> None:
        for job in await jobs.in_state(self._pool, State.RUNNING):
            config = self.job_dir(job.job_id) / "worker.json"
            pid = job.worker_pid
            if (
                pid is not None
                and job.worker_host == socket.gethostname()
                and _alive(pid)
                and _runs_job(pid, config)
            ):
                log.info("adopting live workers", extra={"fields": {"job": job.job_id}})
                self._watch(job.job_id, _Workers(pid, None))
            elif (self.job_dir(job.job_id) / "result.json").is_file():
                await self._finish(job.job_id, _Workers(pid or 0, None))
            elif job.spec.get("resume_on_restart"):
                log.info("resuming after restart", extra={"fields": {"job": job.job_id}})
                await jobs.mark_resume(self._pool, job.job_id)
                await self._launch(await jobs.get(self._pool, job.job_id))
            else:
                await self._end_failed(
                    job.job_id,
                    "WORKER_LOST",
                    "the training service restarted and the job's workers were gone",
                )

    # Scheduling ---------------------------------------------------------------------

    async def _schedule_forever(self) -> None:
        while True:
            try:
                await self._schedule()
            except Exception:
                log.exception("scheduling failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=5)
            self._wake.clear()

    async def _schedule(self) -> None:
        running = len(await jobs.in_state(self._pool, State.RUNNING))
        for job in await jobs.in_state(self._pool, State.QUEUED):
            if running >= self._settings.max_running_jobs:
                return
            await self._launch(job)
            running += 1

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_root / job_id

    async def _launch(self, job: Job) -> None:
        directory = self.job_dir(job.job_id)
        try:
            config = await self._config(job)
        except Exception as error:  # noqa: BLE001 - e.g. the dataset vanished: refuse this job only
            await self._end_failed(job.job_id, "LAUNCH_FAILED", str(error))
            return
        directory.mkdir(parents=True, exist_ok=True)
        for stale in [*directory.glob("error-rank*.json"), directory / "result.json"]:
            stale.unlink(missing_ok=True)
        path = directory / "worker.json"
        path.write_text(json.dumps(config))
        processes = int(job.spec["resources"]["processes"])
        python = self._settings.worker_python or sys.executable
        module = ["-m", "medimg_training.worker", str(path)]
        command = (
            [python, *module]
            if processes == 1
            else [python, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc-per-node={processes}", *module]
        )  # fmt: skip
        with (directory / "worker.log").open("ab") as output:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        workers = _Workers(process.pid, process)
        started = await jobs.start(self._pool, job.job_id, process.pid, socket.gethostname())
        if started is None:  # cancelled meanwhile
            await self._stop(workers)
            return
        log.info(
            "workers started",
            extra={"fields": {"job": job.job_id, "pid": process.pid, "processes": processes}},
        )
        self._watch(job.job_id, workers)

    async def _config(self, job: Job) -> dict[str, Any]:
        dataset = await datasets.get(self._pool, job.spec["dataset"])
        classes = list(dataset.class_names)
        segmenting = dataset.task is datasets.Task.SEGMENTATION
        return {
            "job_id": job.job_id,
            "spec": job.spec,
            "dataset": dataset.name,
            "task": str(dataset.task),
            "class_names": classes,
            # Series names, labels and splits only: the workers need no pseudonym.
            "items": [
                {"series": i.series, "split": str(i.split)}
                | (
                    {"label_series": i.label_series}
                    if segmenting
                    else {"label_index": classes.index(i.label)}
                )
                for i in dataset.items
            ],
            "network_arguments": specs.network_arguments(job.spec, dataset),
            "ingest_target": self._settings.ingest_target,
            "max_message_bytes": self._settings.max_message_bytes,
            "fetch_deadline_seconds": 120.0,
            "redis_url": self._settings.redis_url,
            "job_dir": str(self.job_dir(job.job_id)),
            "cache_dir": str(self._settings.cache),
            "resume": job.resume,
            "code_version": self.code_version,
            "creator": job.creator,
        }

    # Watching -----------------------------------------------------------------------

    def _watch(self, job_id: str, workers: _Workers) -> None:
        self._workers[job_id] = workers
        self._monitors[job_id] = asyncio.create_task(self._monitor(job_id, workers))

    async def _monitor(self, job_id: str, workers: _Workers) -> None:
        last = "0-0"
        try:
            while True:
                if workers.process is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            workers.process.wait(), timeout=self._settings.poll_seconds
                        )
                else:
                    await asyncio.sleep(self._settings.poll_seconds)
                last = await self._drain_progress(job_id, last)
                if workers.exit_status() is not None:
                    break
            await self._finish(job_id, workers)
        finally:
            self._workers.pop(job_id, None)
            self._monitors.pop(job_id, None)
            self.wake()

    async def _drain_progress(self, job_id: str, last: str) -> str:
        entries: Any = await self._events.xrange(
            progress.stream(job_id), min=f"({last}", count=1000
        )
        if entries:
            last = entries[-1][0]
            latest = progress.decode(entries[-1][1])
            await jobs.set_progress(self._pool, job_id, latest)
        return str(last)

    async def _finish(self, job_id: str, workers: _Workers) -> None:
        job = await jobs.get(self._pool, job_id)
        if job.state is not State.RUNNING:  # cancelled (or ended by another replica)
            await self._announce(job)
            return
        directory = self.job_dir(job_id)
        result = directory / "result.json"
        if result.is_file():
            await self._drain_progress(job_id, "0-0")
            metrics = json.loads(result.read_text())["metrics"]
            try:
                bundle = directory / "bundle"
                loop = asyncio.get_running_loop()
                digest = await loop.run_in_executor(self._executor, bundle_digest, bundle)
                name = await registry.register(
                    self._pool,
                    job,
                    bundle,
                    self.models_root,
                    metrics=metrics,
                    code_version=self.code_version,
                    sha256=digest,
                )
            except Exception as error:
                log.exception("registration failed", extra={"fields": {"job": job_id}})
                await self._end_failed(job_id, "REGISTRATION_FAILED", str(error))
                return
            ended = await jobs.succeed(self._pool, job_id, name)
            if ended is not None:
                await self._announce(ended)
            return
        await self._end_failed(job_id, "WORKER_FAILED", self._last_error(directory, workers))

    def _last_error(self, directory: Path, workers: _Workers) -> str:
        errors = sorted(directory.glob("error-rank*.json"))
        if errors:
            error = json.loads(errors[0].read_text())
            return f"{errors[0].stem.removeprefix('error-')}: {error['type']}: {error['message']}"
        status = workers.exit_status()
        if status is not None and status < 0:
            return f"the workers were killed by signal {signal.Signals(-status).name}"
        if status:
            return f"the workers exited with status {status}"
        return "the workers ended without a result"

    async def _end_failed(self, job_id: str, reason: str, message: str) -> None:
        job = await jobs.fail(self._pool, job_id, reason, message)
        if job is not None:
            log.warning("job failed", extra={"fields": {"job": job_id, "reason": reason}})
            await self._announce(job)

    async def _announce(self, job: Job) -> None:
        """The last entry of the job's progress stream: its final state."""
        await self._events.xadd(
            progress.stream(job.job_id),
            progress.encode({**job.progress, "state": str(job.state)}),  # type: ignore[arg-type]
            maxlen=progress.MAX_ENTRIES,
            approximate=True,
        )
        if self._on_end is not None:
            await self._on_end(job)

    # Stopping -----------------------------------------------------------------------

    async def cancel(self, job_id: str) -> None:
        """Stops the workers of a job already marked CANCELLED."""
        workers = self._workers.get(job_id)
        if workers is None:
            job = await jobs.get(self._pool, job_id)
            await self._announce(job)
            return
        await self._stop(workers)

    async def _stop(self, workers: _Workers) -> None:
        workers.signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.cancel_grace_seconds
        while workers.exit_status() is None and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        # The leader may be gone while its children linger: the group gets SIGKILL anyway.
        workers.signal(signal.SIGKILL)
        if workers.process is not None:
            await workers.process.wait()
