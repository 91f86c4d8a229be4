"""Runs training jobs' workers through a launcher and keeps the jobs' state machine true.

Where the workers run (local processes, a Kubernetes Job) is the launcher's business (see
`launchers`). Files of a job lie under `<object_dir>/jobs/<job>/`, which every worker
sees at the same path: `worker.json` (the worker's config), `worker.log` (local
launcher), `checkpoints/`, `error-rank<N>.json`, `result.json` and `bundle/` (until
registered). A monitor task per job drains the job's progress stream into its row and,
when the workers end, decides the outcome: `result.json` → the bundle is registered and
the job SUCCEEDED; else FAILED with WORKER_FAILED and the workers' last error (or how the
launcher saw them end), or WORKER_LOST if their workload vanished.

Only the replica that holds the scheduler's lease (see `leader`) runs a Runner: it starts
when the replica gains the lease and closes when it loses it. The other replicas write
QUEUED and CANCELLED into PostgreSQL and NOTIFY the leader; its monitors also look at each
job's state at every poll, so a job cancelled anywhere has its workers stopped within
seconds. A job's `max_runtime` bounds each start of its workers: Kubernetes enforces it
(`activeDeadlineSeconds`), the monitor does for local workers; either way the job fails
DEADLINE_EXCEEDED.

At start-up (or when leadership changes hands), jobs left RUNNING are looked at: workers
the launcher still finds (the service crashed, or they outlive it) are adopted and
watched; finished workers' results are registered; workers that are gone fail the job
(WORKER_LOST), unless its spec asks to resume from the last checkpoint. Workers the
launcher still finds of a job cancelled in the last day (while no replica led) are stopped.
At a graceful shutdown, or when the lease is lost, local workers are stopped (Kubernetes
Jobs run on, to be adopted) and the jobs stay RUNNING for the next leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import signal
import subprocess
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from medimg_core.bundles import bundle_digest
from medimg_training import datasets, jobs, launchers, progress, registry, specs
from medimg_training.bundle_store import open_bundle_store
from medimg_training.jobs import Job, State
from medimg_training.launchers import Exit, Launch, Launcher, Workers
from medimg_training.settings import TrainingSettings

log = logging.getLogger(__name__)

#: How far back a new leader looks for cancelled jobs whose workers may still run: far longer
#: than a replica goes without a leader.
STRAY_WORKERS_WINDOW = timedelta(days=1)

#: Called when a job ends (for audit and metrics): the job as it ended.
OnEnd = Callable[[Job], Awaitable[None]]


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


def launch_request(job: Job, config: Path) -> Launch:
    """What the launcher needs of a job whose `worker.json` is `config`."""
    resources = job.spec["resources"]
    runtime = specs.max_runtime(job.spec)
    return Launch(
        job_id=job.job_id,
        config=config,
        processes=int(resources["processes"]),
        gpus=int(resources["gpus"]),
        deadline_seconds=None if runtime is None else math.ceil(runtime.total_seconds()),
    )


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
        launcher: Launcher | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._pool = pool
        self._events = events
        self._settings = settings
        self._executor = executor
        self.code_version = code_version
        self._on_end = on_end
        self._wake = asyncio.Event()
        self._workers: dict[str, Workers] = {}
        self._monitors: dict[str, asyncio.Task[None]] = {}
        self._scheduler: asyncio.Task[None] | None = None
        self.jobs_root = settings.object_dir / "jobs"
        self.bundles = open_bundle_store(settings)
        self._launcher = launcher or launchers.LocalLauncher(settings, self.jobs_root)
        self._tracer = tracer or trace.get_tracer(__name__)

    # Life of the runner -------------------------------------------------------------

    async def start(self) -> None:
        """Recovers the jobs left RUNNING, then schedules; again after a `close`."""
        await self.recover()
        self._scheduler = asyncio.create_task(self._schedule_forever())

    async def close(self) -> None:
        """Stops scheduling and the workers (SIGTERM, then SIGKILL past the cancel grace)
        unless they outlive the service; their jobs stay RUNNING. A second call finds
        nothing left to stop."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        for task in list(self._monitors.values()):
            task.cancel()
        if not self._launcher.detached:
            for job_id, workers in list(self._workers.items()):
                log.info("stopping workers at shutdown", extra={"fields": {"job": job_id}})
                await workers.stop()
        for task in list(self._monitors.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        self._wake.set()

    async def recover(self) -> None:
        for job in await jobs.in_state(self._pool, State.RUNNING):
            workers = await self._launcher.recover(job)
            if workers is not None:
                log.info("adopting the workers", extra={"fields": {"job": job.job_id}})
                self._watch(job.job_id, workers)
            elif (self.job_dir(job.job_id) / "result.json").is_file():
                await self._finish(job.job_id, None)
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
        # Cancelled while no replica led (or while the leader fell mid-stop): nobody has
        # stopped their workers, which would otherwise run on to their end.
        for job in await jobs.cancelled_after_start(self._pool, STRAY_WORKERS_WINDOW):
            workers = await self._launcher.recover(job)
            if workers is not None:
                log.info("stopping a cancelled job's workers",
                         extra={"fields": {"job": job.job_id}})  # fmt: skip
                await workers.stop()

    # Scheduling ---------------------------------------------------------------------

    async def _schedule_forever(self) -> None:
        while True:
            try:
                await self._schedule()
            except Exception:
                log.exception("scheduling failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), timeout=self._settings.schedule_poll_seconds
                )
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
        # The workers' spans join this one's trace (TRACEPARENT in their environment).
        with self._tracer.start_as_current_span(
            "training.launch", attributes={"medimg.training.job": job.job_id}
        ) as span:
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            request = dataclasses.replace(
                launch_request(job, path), traceparent=carrier.get("traceparent", "")
            )
            span.set_attribute("medimg.training.processes", request.processes)
            try:
                workers = await self._launcher.launch(request)
            except Exception as error:  # e.g. the API server refused the Job
                log.exception("launch failed", extra={"fields": {"job": job.job_id}})
                span.set_status(trace.StatusCode.ERROR, type(error).__name__)
                await self._end_failed(
                    job.job_id, "LAUNCH_FAILED", f"cannot start the workers: {error}"
                )
                return
        started = await jobs.start(self._pool, job.job_id, workers.pid, workers.host)
        if started is None:  # cancelled meanwhile
            await workers.stop()
            return
        log.info(
            "workers started",
            extra={
                "fields": {"job": job.job_id, "host": workers.host, "pid": workers.pid,
                           "processes": request.processes}
            },
        )  # fmt: skip
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
            # No Redis URL (it may hold a password): workers read MEDIMG_TRAINING_REDIS_URL.
            "job_dir": str(self.job_dir(job.job_id)),
            "cache_dir": str(self._settings.cache),
            "resume": job.resume,
            "code_version": self.code_version,
            "creator": job.creator,
        }

    # Watching -----------------------------------------------------------------------

    def _watch(self, job_id: str, workers: Workers) -> None:
        self._workers[job_id] = workers
        self._monitors[job_id] = asyncio.create_task(self._monitor(job_id, workers))

    async def _monitor(self, job_id: str, workers: Workers) -> None:
        last = "0-0"
        try:
            deadline = self._deadline(await jobs.get(self._pool, job_id))
            stopping = False
            while True:
                ended = await workers.wait(self._settings.poll_seconds)
                last = await self._drain_progress(job_id, last)
                if ended is not None:
                    break
                if stopping:
                    continue
                if await jobs.state_of(self._pool, job_id) is not State.RUNNING:
                    # Cancelled through another replica (or ended by one): stop them here.
                    log.info("stopping an ended job's workers", extra={"fields": {"job": job_id}})
                    stopping = True
                    await workers.stop()
                elif deadline is not None and datetime.now(UTC) >= deadline:
                    log.warning("past its max_runtime", extra={"fields": {"job": job_id}})
                    await workers.stop()
                    ended = Exit(-signal.SIGTERM, deadline=True)
                    break
            await self._finish(job_id, ended)
        finally:
            self._workers.pop(job_id, None)
            self._monitors.pop(job_id, None)
            self.wake()

    def _deadline(self, job: Job) -> datetime | None:
        """When local workers are stopped (Kubernetes stops a Job's workers itself)."""
        runtime = specs.max_runtime(job.spec)
        if runtime is None or job.start_time is None or self._launcher.detached:
            return None
        return job.start_time + runtime

    async def _drain_progress(self, job_id: str, last: str) -> str:
        entries: Any = await self._events.xrange(
            progress.stream(job_id), min=f"({last}", count=1000
        )
        if entries:
            last = entries[-1][0]
            latest = progress.decode(entries[-1][1])
            await jobs.set_progress(self._pool, job_id, latest)
        return str(last)

    async def _finish(self, job_id: str, how: Exit | None) -> None:
        """Decides a RUNNING job's outcome once its workers ended (`how`, when known)."""
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
                    self.bundles,
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
        if how is not None and how.deadline:
            runtime = specs.max_runtime(job.spec) or timedelta()
            await self._end_failed(
                job_id,
                "DEADLINE_EXCEEDED",
                f"the workers ran longer than the job's max_runtime ({runtime}) and were "
                f"stopped; checkpoints are kept: ResumeTrainingJob goes on from the last one "
                f"({how.describe()})",
            )
            return
        last = self._last_error(directory)
        if last is None and how is not None and how.lost:
            await self._end_failed(job_id, "WORKER_LOST", how.describe())
            return
        await self._end_failed(job_id, "WORKER_FAILED", last or (how or Exit(0)).describe())

    def _last_error(self, directory: Path) -> str | None:
        errors = sorted(directory.glob("error-rank*.json"))
        if not errors:
            return None
        error = json.loads(errors[0].read_text())
        return f"{errors[0].stem.removeprefix('error-')}: {error['type']}: {error['message']}"

    async def _end_failed(self, job_id: str, reason: str, message: str) -> None:
        job = await jobs.fail(self._pool, job_id, reason, message)
        if job is not None:
            log.warning("job failed", extra={"fields": {"job": job_id, "reason": reason}})
            await self._announce(job)

    async def _announce(self, job: Job) -> None:
        """The end entry of the job's progress stream: its final state, once per ending."""
        if job.state not in jobs.TERMINAL:  # resumed meanwhile: this end is not the last
            return
        entry = {**job.progress, "state": str(job.state)}
        ending = job.end_time.isoformat() if job.end_time else ""
        appended = await progress.announce_end(self._events, job.job_id, ending, entry)
        if appended and self._on_end is not None:
            await self._on_end(job)

    # Stopping -----------------------------------------------------------------------

    async def cancel(self, job_id: str) -> None:
        """Stops the workers of a job already marked CANCELLED."""
        workers = self._workers.get(job_id)
        if workers is None:
            job = await jobs.get(self._pool, job_id)
            await self._announce(job)
            return
        await workers.stop()
