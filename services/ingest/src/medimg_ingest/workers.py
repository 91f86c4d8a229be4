"""Processes for the CPU-bound part of ingesting (parse, validate, de-identify, encode).

Python runs one thread at a time per process, so the pipeline's worker threads share one
core however many the pod has. `Workers` runs that part in a pool of processes of its own
instead, and replaces the pool when a process dies (a decoder that crashes on a hostile
file takes one worker, not the service): the calls it was serving fail UNAVAILABLE, and
the next ones get a fresh pool.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar, TypeVarTuple, Unpack

from medimg_core.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Args = TypeVarTuple("Args")


class Workers:
    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError("a pool needs at least one process")
        self.processes = processes
        #: Calls that ran to their end in a worker.
        self.completed = 0
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # Spawned, not forked: a fork would copy the event loop, gRPC's threads and open
        # connections into the child.
        return ProcessPoolExecutor(self.processes, multiprocessing.get_context("spawn"))

    async def run(self, function: Callable[[Unpack[Args]], T], *args: *Args) -> T:
        """`function(*args)` in a worker process (a module-level function, picklable
        arguments and result)."""
        pool = self._pool
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(pool, function, *args)
        except BrokenProcessPool as error:
            if pool is self._pool:  # the first call to see it replaces the pool
                log.error("an ingest worker process died; starting a new pool")
                self._pool = self._new_pool()
                pool.shutdown(wait=False, cancel_futures=True)
            raise Unavailable(
                "INGEST_WORKER_LOST",
                "an ingest worker process ended while preparing this upload: send it again",
            ) from error
        self.completed += 1
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
