"""Dynamic batching of one model version's requests, as Triton's dynamic batcher does it.

A request is a dict of named numpy arrays, each with a leading batch axis (a request may
carry several rows). It is checked against the model's input TensorSpecs before it joins
the queue, so a malformed request fails alone and at once. Each instance of the model has
a worker task; one worker at a time gathers a batch: the oldest request, then later ones
whose arrays have the same per-row shapes, until `max_batch_size` rows or until the oldest
has waited `max_queue_delay_us`; a batch of a preferred size runs at once, without the
wait (the largest one the queue makes: a batch of exactly that many rows). The batch's
arrays are concatenated along axis 0, run in the instance's own thread (never on the event
loop), and split back by rows. If a batch of several requests fails, its requests run again
one by one, so that only the request that cannot run fails. Requests whose deadline (an
absolute `time.monotonic()` value) passes before their batch starts are answered
DEADLINE_EXCEEDED and never run.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import accumulate, pairwise

import numpy as np

from medimg_core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MedimgError,
    ResourceExhausted,
    Unavailable,
)
from medimg_inference.backends import Array, Backend, Batch
from medimg_inference.repository import BatchingConfig, TensorSpec

#: The longest execution error text passed on to a caller.
_MAX_ERROR_TEXT = 500


@dataclass
class ModelStatistics:
    """Counters of one model version since it loaded, with the meaning of Triton's
    ModelStatistics. Durations are cumulative nanoseconds. `success_ns`/`failure_ns` run from
    a request's arrival to its answer; `queue_ns` from arrival to the start of its batch;
    the compute durations are a batch's (concatenating the inputs, executing, splitting the
    outputs), counted once for each request in it, as Triton counts them.
    `inference_count` counts rows (batch items) answered, `execution_count` model
    executions; `executions_by_batch_size` maps rows per execution to executions.
    `last_inference_ms` is the Unix time in milliseconds of the last success (0: none).

    With the response cache on, a hit is a success (counted in `success_count` and
    `success_ns`, and in `cache_hit_count`/`cache_hit_ns`, the lookup's duration) that never
    queues nor runs, so it adds to no queue, compute, inference or execution counter; a miss
    adds to `cache_miss_count`, and the lookup and the insertion to `cache_miss_ns`, as
    Triton counts them."""

    success_count: int = 0
    success_ns: int = 0
    failure_count: int = 0
    failure_ns: int = 0
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    executions_by_batch_size: dict[int, int] = field(default_factory=dict)
    last_inference_ms: int = 0
    cache_hit_count: int = 0
    cache_hit_ns: int = 0
    cache_miss_count: int = 0
    cache_miss_ns: int = 0

    def snapshot(self) -> ModelStatistics:
        return replace(self, executions_by_batch_size=dict(self.executions_by_batch_size))

    def record_cache_hit(self, arrived_ns: int, lookup_ns: int) -> None:
        """A request answered from the response cache; `arrived_ns` is its time.monotonic_ns()."""
        self.success_count += 1
        self.success_ns += time.monotonic_ns() - arrived_ns
        self.cache_hit_count += 1
        self.cache_hit_ns += lookup_ns
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_cache_miss(self, lookup_ns: int) -> None:
        self.cache_miss_count += 1
        self.cache_miss_ns += lookup_ns

    def record_cache_insert(self, insert_ns: int) -> None:
        """The time a missed request's outputs took to go into the cache."""
        self.cache_miss_ns += insert_ns


@dataclass(eq=False)
class _Request:
    inputs: Batch
    rows: int
    # The per-row shape of each input: only requests that agree can share a batch.
    item_shapes: tuple[tuple[int, ...], ...]
    deadline: float | None
    future: asyncio.Future[dict[str, Array]]
    arrived_ns: int = field(default_factory=time.monotonic_ns)


@dataclass(frozen=True)
class _Timings:
    input_ns: int
    infer_ns: int
    output_ns: int


class DynamicBatcher:
    """Queues requests for one model version and runs them in batches on its backends, one
    worker task and one thread per backend. `start` it inside the event loop; `close`
    drains the queue, then closes the backends."""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        batching: BatchingConfig,
        backends: Sequence[Backend],
        *,
        name: str = "model",
    ) -> None:
        if not backends:
            raise ValueError("a batcher needs at least one backend")
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.batching = batching
        self.backends = tuple(backends)
        self.name = name
        self.statistics = ModelStatistics()
        self._pending: deque[_Request] = deque()
        self._arrived = asyncio.Event()
        # One worker gathers a batch at a time; the others wait their turn here.
        self._gathering = asyncio.Lock()
        self._accepting = True
        self._workers: list[asyncio.Task[None]] = []
        self._closed: asyncio.Future[None] | None = None
        self._executor = ThreadPoolExecutor(len(backends), thread_name_prefix=f"infer-{name}")

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._pending)

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(backend), name=f"batcher-{self.name}-{index}")
            for index, backend in enumerate(self.backends)
        ]

    async def infer(
        self,
        inputs: Mapping[str, Array],
        deadline: float | None = None,
        *,
        arrived_ns: int | None = None,
    ) -> dict[str, Array]:
        """The outputs for `inputs`, by output name, with the request's rows in axis 0.

        Raises INVALID_ARGUMENT for inputs that do not fit the model, RESOURCE_EXHAUSTED
        when `queue_limit` requests already wait, DEADLINE_EXCEEDED when `deadline` passes
        before the request runs, UNAVAILABLE once the batcher closes. `arrived_ns` (a
        time.monotonic_ns() value, default now) is when the request reached the server,
        where its durations start."""
        # No await before the request is queued: a caller that found this batcher in a
        # table cannot see it close in between.
        return await self.submit(inputs, deadline, arrived_ns=arrived_ns)

    def submit(
        self,
        inputs: Mapping[str, Array],
        deadline: float | None = None,
        *,
        arrived_ns: int | None = None,
    ) -> asyncio.Future[dict[str, Array]]:
        """Queues a request at once and returns the future of its outputs (see `infer`)."""
        if arrived_ns is None:
            arrived_ns = time.monotonic_ns()
        try:
            if not self._accepting:
                raise Unavailable("MODEL_UNLOADING", f"model {self.name} is being unloaded")
            rows, item_shapes = self._check(inputs)
            if deadline is not None and deadline <= time.monotonic():
                raise DeadlineExceeded(
                    "DEADLINE_EXCEEDED", "the request's deadline passed before it was queued"
                )
            if len(self._pending) >= self.batching.queue_limit:
                raise ResourceExhausted(
                    "QUEUE_FULL",
                    f"model {self.name} already has {len(self._pending)} requests waiting",
                    queue_limit=self.batching.queue_limit,
                )
        except MedimgError:
            self._count_failure(arrived_ns)
            raise
        loop = asyncio.get_running_loop()
        request = _Request(
            inputs=dict(inputs),
            rows=rows,
            item_shapes=item_shapes,
            deadline=deadline,
            future=loop.create_future(),
            arrived_ns=arrived_ns,
        )
        self._pending.append(request)
        if deadline is not None:
            # Answer at the deadline even while every instance is busy; the event loop's
            # clock is time.monotonic(), but convert rather than assume it.
            timer = loop.call_at(loop.time() + deadline - time.monotonic(), self._expire, request)
            request.future.add_done_callback(lambda _: timer.cancel())
        self._arrived.set()
        return request.future

    async def close(self) -> None:
        """Refuses new requests, answers the queued ones, then closes the backends. Later
        calls wait for the first one's work."""
        self._accepting = False
        self._arrived.set()
        if self._closed is None:
            self._closed = asyncio.ensure_future(self._drain_and_close())
        await self._closed

    async def _drain_and_close(self) -> None:
        await asyncio.gather(*self._workers)
        await asyncio.to_thread(self._executor.shutdown)
        for backend in self.backends:
            await asyncio.to_thread(backend.close)

    def _check(self, inputs: Mapping[str, Array]) -> tuple[int, tuple[tuple[int, ...], ...]]:
        declared = {spec.name for spec in self.inputs}
        if missing := sorted(declared - set(inputs)):
            raise InvalidArgument(
                "MISSING_INPUT", f"input {missing[0]!r} is missing", input=missing[0]
            )
        if unexpected := sorted(set(inputs) - declared):
            raise InvalidArgument(
                "UNEXPECTED_INPUT",
                f"model {self.name} has no input {unexpected[0]!r} "
                f"(its inputs: {', '.join(sorted(declared))})",
                input=unexpected[0],
            )
        rows: int | None = None
        for spec in self.inputs:
            array = inputs[spec.name]
            if not isinstance(array, np.ndarray):
                raise InvalidArgument(
                    "INVALID_INPUT", f"input {spec.name!r} is not an array", input=spec.name
                )
            if array.dtype != spec.dtype:
                raise InvalidArgument(
                    "INPUT_DTYPE_MISMATCH",
                    f"input {spec.name!r} is {array.dtype}, the model takes {spec.dtype}",
                    input=spec.name,
                )
            if array.ndim != len(spec.shape) + 1 or not spec.accepts(array.shape[1:]):
                raise InvalidArgument(
                    "INPUT_SHAPE_MISMATCH",
                    f"input {spec.name!r} has shape {list(array.shape)}, the model takes "
                    f"[batch, {', '.join(map(str, spec.shape))}] (-1: any size)",
                    input=spec.name,
                )
            if rows is not None and array.shape[0] != rows:
                raise InvalidArgument(
                    "BATCH_SIZE_MISMATCH",
                    f"input {spec.name!r} has {array.shape[0]} rows, other inputs {rows}",
                    input=spec.name,
                )
            rows = array.shape[0]
        assert rows is not None  # a model has at least one input
        if not 1 <= rows <= self.batching.max_batch_size:
            raise InvalidArgument(
                "INVALID_BATCH_SIZE",
                f"a request carries 1 to {self.batching.max_batch_size} rows, this one {rows}",
                max_batch_size=self.batching.max_batch_size,
            )
        return rows, tuple(inputs[spec.name].shape[1:] for spec in self.inputs)

    def _expire(self, request: _Request) -> None:
        if request in self._pending:
            self._pending.remove(request)
            self._fail(request, self._deadline_exceeded())

    @staticmethod
    def _deadline_exceeded() -> DeadlineExceeded:
        return DeadlineExceeded("DEADLINE_EXCEEDED", "the request's deadline passed in the queue")

    async def _work(self, backend: Backend) -> None:
        while (batch := await self._next_batch()) is not None:
            await self._run(backend, batch)

    async def _next_batch(self) -> list[_Request] | None:
        """The next batch to run, or None once the batcher is closed and drained."""
        async with self._gathering:
            while not self._pending:
                if not self._accepting:
                    return None
                self._arrived.clear()
                await self._arrived.wait()
            fill_by_ns = self._pending[0].arrived_ns + self.batching.max_queue_delay_us * 1000
            limit = 0
            while self._accepting and not (limit := self._rows_to_take_now()):
                remaining_s = (fill_by_ns - time.monotonic_ns()) / 1e9
                if remaining_s <= 0:
                    break
                self._arrived.clear()
                try:
                    async with asyncio.timeout(remaining_s):
                        await self._arrived.wait()
                except TimeoutError:
                    break
            return self._take(limit or self.batching.max_batch_size)

    def _rows_to_take_now(self) -> int:
        """max_batch_size once that many rows of the oldest request's shapes are queued;
        else the largest preferred batch size that the requests `_take` would pick add up
        to on the way; else 0: wait for more."""
        largest = self.batching.max_batch_size
        if not self._pending:
            return 0
        shapes = self._pending[0].item_shapes
        if sum(r.rows for r in self._pending if r.item_shapes == shapes) >= largest:
            return largest
        preferred, rows, first = 0, 0, None
        now = time.monotonic()
        for request in self._pending:
            if request.future.done() or (request.deadline is not None and request.deadline <= now):
                continue
            first = first or request
            if request.item_shapes == first.item_shapes and rows + request.rows <= largest:
                rows += request.rows
                if rows in self.batching.preferred_batch_sizes:
                    preferred = rows
        return preferred

    def _take(self, limit: int) -> list[_Request]:
        """Removes from the queue the oldest live request and the later ones that fit with
        it in `limit` rows; answers the expired ones it meets on the way. May return an
        empty batch."""
        now = time.monotonic()
        batch: list[_Request] = []
        rows = 0
        kept: deque[_Request] = deque()
        for request in self._pending:
            if request.future.done():  # cancelled: the caller gave up waiting
                self._count_failure(request.arrived_ns)
                continue
            if request.deadline is not None and request.deadline <= now:
                self._fail(request, self._deadline_exceeded())
            elif (
                not batch or request.item_shapes == batch[0].item_shapes
            ) and rows + request.rows <= limit:
                batch.append(request)
                rows += request.rows
            else:
                kept.append(request)
        self._pending = kept
        return batch

    async def _run(self, backend: Backend, batch: list[_Request]) -> None:
        if not batch:
            return
        started_ns = time.monotonic_ns()
        for request in batch:
            self.statistics.queue_ns += started_ns - request.arrived_ns
        await self._execute(backend, batch)

    async def _execute(self, backend: Backend, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        self.statistics.execution_count += 1
        rows = sum(request.rows for request in batch)
        by_size = self.statistics.executions_by_batch_size
        by_size[rows] = by_size.get(rows, 0) + 1
        try:
            results, timings = await loop.run_in_executor(
                self._executor, self._execute_blocking, backend, batch
            )
        except Exception as error:  # noqa: BLE001 - any model failure goes to its callers
            if len(batch) > 1 and not isinstance(error, FailedPrecondition):
                for request in batch:
                    await self._execute(backend, [request])
                return
            for request in batch:
                self._fail(request, _as_request_error(error))
            return
        for request, outputs in zip(batch, results, strict=True):
            self.statistics.compute_input_ns += timings.input_ns
            self.statistics.compute_infer_ns += timings.infer_ns
            self.statistics.compute_output_ns += timings.output_ns
            self._succeed(request, outputs)

    def _execute_blocking(
        self, backend: Backend, batch: list[_Request]
    ) -> tuple[list[dict[str, Array]], _Timings]:
        """Runs in the instance's thread: concatenate, execute, check, split."""
        started = time.perf_counter_ns()
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {
                spec.name: np.concatenate([request.inputs[spec.name] for request in batch])
                for spec in self.inputs
            }
        executing = time.perf_counter_ns()
        outputs = backend.execute(inputs)
        splitting = time.perf_counter_ns()
        rows = sum(request.rows for request in batch)
        self._check_outputs(outputs, rows)
        bounds = [0, *accumulate(request.rows for request in batch)]
        results = [
            {spec.name: outputs[spec.name][start:end] for spec in self.outputs}
            for start, end in pairwise(bounds)
        ]
        done = time.perf_counter_ns()
        return results, _Timings(executing - started, splitting - executing, done - splitting)

    def _check_outputs(self, outputs: Mapping[str, Array], rows: int) -> None:
        for spec in self.outputs:
            array = outputs.get(spec.name)
            if not isinstance(array, np.ndarray) or array.dtype != spec.dtype:
                found = "nothing" if array is None else getattr(array, "dtype", type(array))
                raise FailedPrecondition(
                    "MODEL_OUTPUT_MISMATCH",
                    f"model {self.name} returned {found} for output {spec.name!r}, "
                    f"metadata.json declares {spec.dtype}",
                    output=spec.name,
                )
            if array.ndim == 0 or array.shape[0] != rows:
                raise FailedPrecondition(
                    "MODEL_OUTPUT_MISMATCH",
                    f"model {self.name} returned output {spec.name!r} of shape "
                    f"{list(array.shape)} for a batch of {rows}",
                    output=spec.name,
                )

    def _succeed(self, request: _Request, outputs: dict[str, Array]) -> None:
        self.statistics.success_count += 1
        self.statistics.success_ns += time.monotonic_ns() - request.arrived_ns
        self.statistics.inference_count += request.rows
        self.statistics.last_inference_ms = time.time_ns() // 1_000_000
        if not request.future.done():
            request.future.set_result(outputs)

    def _fail(self, request: _Request, error: MedimgError) -> None:
        self._count_failure(request.arrived_ns)
        if not request.future.done():
            request.future.set_exception(error)

    def _count_failure(self, arrived_ns: int) -> None:
        self.statistics.failure_count += 1
        self.statistics.failure_ns += time.monotonic_ns() - arrived_ns


def _as_request_error(error: Exception) -> MedimgError:
    """The error a request that the model could not run gets. Domain errors pass as they
    are; anything else is the model refusing this input (torch and ONNX Runtime raise plain
    RuntimeErrors for shapes their layers cannot take), told in its last line, which
    carries the reason in TorchScript's long tracebacks."""
    if isinstance(error, MedimgError):
        return error
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1].strip() if lines else ""
    return InvalidArgument(
        "MODEL_EXECUTION_FAILED",
        f"the model could not run this input: {type(error).__name__}: {text}"[:_MAX_ERROR_TEXT],
    )
