"""Training jobs: their state machine, kept in PostgreSQL so that it outlives the service.

    QUEUED ──start──▶ RUNNING ──succeed──▶ SUCCEEDED
       │                 │ ──fail──────▶ FAILED ──resume──▶ QUEUED
       └──cancel──▶ CANCELLED ◀──cancel──┘         CANCELLED ──resume──▶ QUEUED

Every transition is one conditional UPDATE (`WHERE state IN (...)`), so two actors (a
cancel and a worker's end, two replicas) cannot both win: the loser sees None.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import asyncpg

from medimg_core.errors import FailedPrecondition, InvalidArgument, NotFound


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (State.QUEUED, State.RUNNING)
TERMINAL = (State.SUCCEEDED, State.FAILED, State.CANCELLED)
_NAME = re.compile(r"trainingJobs/([a-z0-9-]{1,63})")


@dataclass(frozen=True)
class Job:
    job_id: str
    spec: Mapping[str, Any]
    state: State
    creator: str
    create_time: datetime
    start_time: datetime | None
    end_time: datetime | None
    error_reason: str
    error_message: str
    progress: Mapping[str, Any]
    model_version: str
    attempts: int
    worker_pid: int | None
    worker_host: str
    resume: bool

    @property
    def name(self) -> str:
        return f"trainingJobs/{self.job_id}"


def parse_name(name: str) -> str:
    match = _NAME.fullmatch(name)
    if not match:
        raise InvalidArgument("INVALID_NAME", "a job name looks like trainingJobs/{training_job}")
    return match[1]


def _job(row: asyncpg.Record) -> Job:
    values = dict(row)
    values["spec"] = json.loads(values["spec"])
    values["progress"] = json.loads(values["progress"])
    values["state"] = State(values["state"])
    return Job(**values)


async def create(pool: asyncpg.Pool, spec: Mapping[str, Any], creator: str) -> Job:
    row = await pool.fetchrow(
        "INSERT INTO training_jobs (job_id, spec, state, creator) "
        "VALUES ($1, $2, 'queued', $3) RETURNING *",
        uuid.uuid4().hex[:16],
        json.dumps(spec),
        creator,
    )
    assert row is not None
    return _job(row)


async def get(pool: asyncpg.Pool, job_id: str) -> Job:
    row = await pool.fetchrow("SELECT * FROM training_jobs WHERE job_id = $1", job_id)
    if row is None:
        raise NotFound("TRAINING_JOB_NOT_FOUND", f"trainingJobs/{job_id} does not exist")
    return _job(row)


async def list_page(
    pool: asyncpg.Pool, *, after: tuple[datetime, str] | None, limit: int
) -> tuple[list[Job], bool]:
    rows = await pool.fetch(
        """SELECT * FROM training_jobs
           WHERE $1::timestamptz IS NULL OR (create_time, job_id) < ($1, $2)
           ORDER BY create_time DESC, job_id DESC LIMIT $3""",
        after[0] if after else None,
        after[1] if after else "",
        limit + 1,
    )
    return [_job(r) for r in rows[:limit]], len(rows) > limit


async def in_state(pool: asyncpg.Pool, *states: State) -> list[Job]:
    rows = await pool.fetch(
        "SELECT * FROM training_jobs WHERE state = ANY($1) ORDER BY create_time, job_id",
        [str(s) for s in states],
    )
    return [_job(r) for r in rows]


async def cancelled_after_start(pool: asyncpg.Pool, within: timedelta) -> list[Job]:
    """Jobs cancelled in the last `within` after their workers had started."""
    rows = await pool.fetch(
        "SELECT * FROM training_jobs WHERE state = 'cancelled' AND start_time IS NOT NULL "
        "AND end_time > now() - $1::interval ORDER BY end_time, job_id",
        within,
    )
    return [_job(r) for r in rows]


async def state_of(pool: asyncpg.Pool, job_id: str) -> State:
    """The job's state alone (what a monitor polls)."""
    state = await pool.fetchval("SELECT state FROM training_jobs WHERE job_id = $1", job_id)
    if state is None:
        raise NotFound("TRAINING_JOB_NOT_FOUND", f"trainingJobs/{job_id} does not exist")
    return State(state)


async def _transition(
    pool: asyncpg.Pool, job_id: str, allowed: tuple[State, ...], sets: str, *args: Any
) -> Job | None:
    row = await pool.fetchrow(
        f"UPDATE training_jobs SET {sets} WHERE job_id = $1 AND state = ANY($2) RETURNING *",
        job_id,
        [str(s) for s in allowed],
        *args,
    )
    return _job(row) if row else None


async def start(pool: asyncpg.Pool, job_id: str, pid: int, host: str) -> Job | None:
    """QUEUED → RUNNING (or RUNNING → RUNNING when workers are started again on resume)."""
    return await _transition(
        pool,
        job_id,
        (State.QUEUED, State.RUNNING),
        "state = 'running', start_time = now(), worker_pid = $3, worker_host = $4, "
        "attempts = attempts + 1",
        pid,
        host,
    )


async def set_progress(pool: asyncpg.Pool, job_id: str, progress: Mapping[str, Any]) -> None:
    await pool.execute(
        "UPDATE training_jobs SET progress = $2 WHERE job_id = $1 AND state = 'running'",
        job_id,
        json.dumps(progress),
    )


async def succeed(pool: asyncpg.Pool, job_id: str, model_version: str) -> Job | None:
    return await _transition(
        pool,
        job_id,
        (State.RUNNING,),
        "state = 'succeeded', end_time = now(), model_version = $3, worker_pid = NULL",
        model_version,
    )


async def fail(pool: asyncpg.Pool, job_id: str, reason: str, message: str) -> Job | None:
    return await _transition(
        pool,
        job_id,
        ACTIVE,
        "state = 'failed', end_time = now(), error_reason = $3, error_message = $4, "
        "worker_pid = NULL",
        reason,
        message[:4000],
    )


async def cancel(pool: asyncpg.Pool, job_id: str) -> Job:
    """Marks the job CANCELLED (the runner then stops its workers); FAILED_PRECONDITION if
    it already ended."""
    job = await _transition(pool, job_id, ACTIVE, "state = 'cancelled', end_time = now()")
    if job is None:
        current = await get(pool, job_id)
        raise FailedPrecondition(
            "JOB_ALREADY_ENDED", f"{current.name} already ended: {current.state}"
        )
    return job


async def resume(pool: asyncpg.Pool, job_id: str) -> Job:
    """FAILED or CANCELLED → QUEUED, to run again from the last checkpoint."""
    job = await _transition(
        pool,
        job_id,
        (State.FAILED, State.CANCELLED),
        "state = 'queued', end_time = NULL, error_reason = '', error_message = '', resume = true",
    )
    if job is None:
        current = await get(pool, job_id)
        raise FailedPrecondition(
            "JOB_NOT_RESUMABLE",
            f"{current.name} is {current.state}: only failed or cancelled jobs resume",
        )
    return job


async def mark_resume(pool: asyncpg.Pool, job_id: str) -> None:
    await pool.execute("UPDATE training_jobs SET resume = true WHERE job_id = $1", job_id)
