"""The training scheduler's lease: one replica at a time schedules, launches, monitors and
recovers jobs (the runner); every replica serves every RPC.

The lease is a PostgreSQL session advisory lock, held on a connection of its own: a pooled
connection goes back to the pool, and its lock with it to whoever takes it next. The
server frees the lock when that session ends, so a replica that dies, or is cut off from
the database, loses the lease, and another takes it at its next try (every
`retry_seconds`). The holder notices a closed connection at once and checks an open one
as often; once it is gone, it stops leading there and then (`on_loss`: the runner's
`close`, which stops local workers, the replica's own children, and leaves a detached
launcher's workers to the next leader to adopt). A leader cut off without a word and its
successor may overlap for a few `retry_seconds`: each job's transitions are conditional
UPDATEs (see `jobs`), so one of them wins each start and each end. A replica that takes
the lease over from a running one waits `settle_seconds` before it leads: long enough for
the old leader to notice and stop its local workers, which the new one would otherwise
adopt or start again beside them.

The same connection LISTENs on `CHANNEL`: a replica that queued, resumed or cancelled a job
NOTIFYs it (`announce`), so the leader acts now rather than at its next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg
import prometheus_client

log = logging.getLogger(__name__)

#: The advisory lock of the lease ("medtrlea"), apart from the migrations' lock.
LOCK_KEY = 0x6D65_6474_726C_6561
#: The NOTIFY channel of job changes; the payload is the job id.
CHANNEL = "medimg_training_jobs"

LEADER = prometheus_client.Gauge(
    "medimg_training_leader",
    "1 while this replica holds the training scheduler's lease (it schedules, launches, "
    "monitors and recovers jobs), else 0.",
)

Hook = Callable[[], Awaitable[None]]


async def announce(pool: asyncpg.Pool, job_id: str) -> None:
    """Wakes the leader, wherever it runs, to look at the job (queued, resumed, cancelled)."""
    await pool.execute("SELECT pg_notify($1, $2)", CHANNEL, job_id)


class Leadership:
    def __init__(
        self,
        database_url: str,
        *,
        on_gain: Hook,
        on_loss: Hook,
        on_wake: Callable[[str], None],
        retry_seconds: float,
        settle_seconds: float = 0.0,
    ) -> None:
        self._url = database_url
        self._on_gain = on_gain
        self._on_loss = on_loss
        self._on_wake = on_wake
        self._retry = retry_seconds
        self._settle = settle_seconds
        self._connection: asyncpg.Connection | None = None
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.leading = False

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend that holds (or tries for) the lease."""
        return None if self._connection is None else self._connection.get_server_pid()

    async def start(self) -> None:
        """Tries for the lease once (a lone replica leads before it serves), then keeps
        trying, or watching the lease it holds, in the background."""
        await self._try(settle=False)
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stops leading (the runner first, then the lease: no successor starts while this
        replica's workers still run) and trying."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.leading:
            await self._lose("the replica is shutting down")
        await self._drop()

    async def _run(self) -> None:
        while True:
            if self.leading:
                await self._lose(await self._held())
            await asyncio.sleep(self._retry)
            await self._try(settle=True)

    async def _try(self, *, settle: bool) -> None:
        try:
            if self._connection is None:
                self._connection = await asyncpg.connect(self._url, timeout=self._retry * 3)
                self._closed.clear()
                self._connection.add_termination_listener(self._terminated)
                await self._connection.add_listener(CHANNEL, self._notified)
            won = await self._connection.fetchval(
                "SELECT pg_try_advisory_lock($1)", LOCK_KEY, timeout=self._retry * 3
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("cannot try for the lease", extra={"fields": {"error": repr(error)}})
            await self._drop()
            return
        if not won:
            return
        if settle and self._settle:
            log.info("took the lease over; settling", extra={"fields": {"s": self._settle}})
            await asyncio.sleep(self._settle)
            if self._closed.is_set():
                await self._drop()
                return
        self.leading = True
        LEADER.set(1)
        log.info("leading: this replica schedules and watches the training jobs")
        try:
            await self._on_gain()
        except Exception:  # e.g. recovery failed: let a healthier replica lead
            log.exception("cannot start leading; giving the lease back")
            await self._lose("starting to lead failed")

    async def _held(self) -> str:
        """Returns, with why, once the lease's connection is gone."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout=self._retry)
            connection = self._connection
            if self._closed.is_set() or connection is None or connection.is_closed():
                return "the lease's database connection closed"
            try:
                await connection.fetchval("SELECT 1", timeout=self._retry * 3)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                return f"the lease's database connection failed: {error!r}"

    async def _lose(self, why: str) -> None:
        self.leading = False
        LEADER.set(0)
        log.warning("no longer leading", extra={"fields": {"why": why}})
        try:
            await self._on_loss()
        except Exception:
            log.exception("stopping the scheduler failed")
        await self._drop()  # the lock goes with the session

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None or connection.is_closed():
            return
        try:
            await connection.close(timeout=self._retry)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            connection.terminate()

    def _terminated(self, connection: object) -> None:
        if connection is self._connection:  # not one dropped before
            self._closed.set()

    def _notified(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        if self.leading:
            self._on_wake(payload)
