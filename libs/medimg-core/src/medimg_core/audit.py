"""The audit client: how every service reports an access to patient data.

The event names the verified caller of the current RPC (workload, and user with
roles when one is behind it), the method, the trace, and the resource — never raw
PHI. Each event has an id chosen here, so a resend after a lost answer appends
nothing twice (the audit service's AppendEvents is idempotent by event id).

Delivery is at-least-once and does not hold patient work hostage to an audit outage:

1. `report` first calls AppendEvents directly with a short deadline (bounded by the
   caller's own deadline): the normal path, which returns the log indexes.
2. If audit cannot be reached (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED), the
   events go to a durable spool instead: the Redis stream `medimg:audit:spool:<service>`
   (one entry per event, the serialized `AuditEvent` in base64 under `event`; an event
   holds resource names and pseudonyms, never raw PHI). Redis runs with `appendonly
   yes`; with the default `appendfsync everysec` a crash of the Redis host itself can
   lose up to a second of spool, which is the durability this path offers. After a
   failed direct call, reports go straight to the spool for `direct_retry_seconds`, so
   a hanging audit service costs patient calls one short deadline, not one each.
3. A drainer task per process forwards the spool in batches, to the same AppendEvents,
   with the same event ids, and removes an entry (XACK and XDEL in one MULTI) only
   after audit acknowledged it. It backs off while audit is down and wakes as soon as
   a direct call succeeds again.

Policy per kind of call (`Kind`):

- `PHI_READ` (a read, list or export of patient data) and `PHI_WRITE` (anything else
  done to patient data): the call may proceed once the event is either in the audit
  log or in the spool. If neither took it, `report` raises UNAVAILABLE
  (`AUDIT_UNAVAILABLE`) and the caller must fail: a read of PHI fails closed, and so
  does a write, since ingest records an upload before indexing it (an instance is
  never served without its record).
- `NO_PHI` (an event about something that holds no patient data, passed explicitly):
  same path, but if nothing durable took the event it is logged and counted as lost,
  and the call proceeds.
- For every kind, an event audit refuses (INVALID_ARGUMENT and any other error that a
  resend would not cure) is not spooled: `report` raises, since it is a bug to see,
  not an outage to ride out.

Several replicas of one service share its spool through the consumer group `drainers`:
each entry is delivered to one replica (XREADGROUP). What a crash leaves behind:

- before XADD completes: the report raised (or returned) without spooling, and the
  caller failed; nothing to recover;
- after XADD, before the drainer read the entry: any replica reads it later;
- after XREADGROUP, before or after AppendEvents: the entry stays pending under the dead
  consumer; after `claim_idle_seconds` a live replica takes it over (XAUTOCLAIM) and
  resends it; if audit had appended it, the resend appends nothing (same event id);
- between AppendEvents and XACK/XDEL: the same, a deduplicated resend;
- a spool write whose answer was lost (Redis timed out after applying it): the caller
  failed closed, yet the event is drained later. The log then holds a record of an
  access that was attempted and refused; over-recording is the safe side.

An entry that cannot be decoded, or that audit refuses on its own, is moved to the
dead-letter stream `medimg:audit:dead:<service>` (never dropped) and counted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import enum
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
import prometheus_client
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError, ResponseError

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_core import calls, deadlines, telemetry, timestamps
from medimg_core.errors import PermissionDenied, Unauthenticated, Unavailable
from medimg_core.identity import UNVERIFIED
from medimg_core.settings import AuditedServiceSettings

log = logging.getLogger(__name__)

Action = pb.Action
Outcome = pb.Outcome

SPOOL_PREFIX = "medimg:audit:spool:"
DEAD_LETTER_PREFIX = "medimg:audit:dead:"
CONSUMER_GROUP = "drainers"
#: Codes a later resend may cure: the event is spooled. Anything else is refused for good.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
_FIELD = "event"

APPENDED = prometheus_client.Counter(
    "medimg_audit_client_appended_events",
    "Audit events appended directly by report(), acknowledged by the audit service.",
    ["service"],
)
SPOOLED = prometheus_client.Counter(
    "medimg_audit_client_spooled_events",
    "Audit events written to the durable spool because audit could not be reached.",
    ["service"],
)
DRAINED = prometheus_client.Counter(
    "medimg_audit_client_drained_events",
    "Spooled audit events forwarded to and acknowledged by the audit service.",
    ["service"],
)
DEAD_LETTERED = prometheus_client.Counter(
    "medimg_audit_client_dead_lettered_events",
    "Spooled entries audit refused or that could not be decoded, moved to the dead letters.",
    ["service"],
)
UNRECORDED = prometheus_client.Counter(
    "medimg_audit_client_unrecorded_reports",
    "Reports neither the audit log nor the spool took: failed closed, or lost if NO_PHI.",
    ["service", "kind"],
)
FAILURES = prometheus_client.Counter(
    "medimg_audit_client_failures",
    "Failed attempts, by stage (direct, spool, drain) and gRPC code or Redis error.",
    ["service", "stage", "reason"],
)
SPOOL_LENGTH = prometheus_client.Gauge(
    "medimg_audit_client_spool_length",
    "Entries in the service's audit spool stream (waiting or being forwarded).",
    ["service"],
)


class Kind(enum.Enum):
    """What kind of call reports the access; it decides what happens if nothing records it."""

    PHI_READ = "phi_read"
    PHI_WRITE = "phi_write"
    NO_PHI = "no_phi"


_READS = frozenset({pb.ACTION_READ, pb.ACTION_EXPORT})


@dataclass(frozen=True)
class Access:
    """One access to report: what was done to which resource, and how it ended."""

    action: pb.Action
    resource: str
    outcome: pb.Outcome = pb.OUTCOME_SUCCESS
    patient_pseudonym: str = ""
    #: Why a user broke the glass (re-identification), recorded with the event.
    break_glass_reason: str = ""


def kind_of(accesses: Sequence[Access]) -> Kind:
    """The kind of a report when the caller names none: any read or export makes it a read."""
    return Kind.PHI_READ if any(a.action in _READS for a in accesses) else Kind.PHI_WRITE


@dataclass(frozen=True)
class Delivery:
    """Where the events of one report went, each named by its event id, in report order."""

    kind: Kind
    #: Event id → log index, for events the audit log acknowledged.
    appended: Mapping[str, int] = field(default_factory=dict)
    #: Events held in the durable spool; the drainer forwards them.
    spooled: tuple[str, ...] = ()
    #: NO_PHI events nothing durable took (never set for PHI kinds, which raise instead).
    lost: tuple[str, ...] = ()

    @property
    def log_indexes(self) -> list[int]:
        return list(self.appended.values())


@dataclass(frozen=True)
class DeliveryOptions:
    #: Seconds a direct AppendEvents may take before the events are spooled instead.
    direct_deadline: float = 1.0
    #: Seconds reports go straight to the spool after a direct call failed.
    direct_retry_seconds: float = 2.0
    #: Seconds one AppendEvents of the drainer may take.
    drain_deadline: float = 10.0
    #: Spooled events per AppendEvents of the drainer (audit takes at most 1000).
    batch_size: int = 500
    #: Beyond this many entries the spool refuses more, so Redis memory stays bounded:
    #: reports then fail closed instead.
    spool_max_events: int = 200_000
    #: Seconds an entry stays pending under one consumer before another takes it over.
    #: Well above `drain_deadline`, so a live replica's batch is not resent from under it.
    claim_idle_seconds: float = 60.0
    #: Seconds between looks at the spool when nothing woke the drainer.
    poll_seconds: float = 1.0
    #: Backoff of the drainer while audit is down: first and largest pause, in seconds.
    backoff_seconds: float = 0.2
    max_backoff_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: AuditedServiceSettings) -> DeliveryOptions:
        return cls(
            direct_deadline=settings.audit_direct_deadline_seconds,
            drain_deadline=settings.default_deadline_seconds,
            batch_size=settings.audit_drain_batch_size,
            spool_max_events=settings.audit_spool_max_events,
            claim_idle_seconds=settings.audit_claim_idle_seconds,
        )


_VERBS = {
    "Get": pb.ACTION_READ, "List": pb.ACTION_READ, "Watch": pb.ACTION_READ,
    "Create": pb.ACTION_CREATE, "Upload": pb.ACTION_CREATE, "Append": pb.ACTION_CREATE,
    "Update": pb.ACTION_UPDATE, "Set": pb.ACTION_UPDATE, "Delete": pb.ACTION_DELETE,
    "Export": pb.ACTION_EXPORT,
}  # fmt: skip


def denial(method: str, error: Unauthenticated | PermissionDenied) -> Access:
    """The attempted access of a refused call: its action guessed from the method's verb."""
    name = method.rsplit("/", 1)[-1]
    verb = next((v for v in _VERBS if name.startswith(v)), None)
    outcome = (
        pb.OUTCOME_UNAUTHENTICATED if isinstance(error, Unauthenticated)
        else pb.OUTCOME_PERMISSION_DENIED
    )  # fmt: skip
    return Access(_VERBS[verb] if verb else pb.ACTION_EXECUTE, "", outcome)


def event_for(access: Access, service: str) -> pb.AuditEvent:
    """The audit event of an access made in the current RPC, reported by `service`."""
    call = calls.current()
    event = pb.AuditEvent(
        event_id=str(uuid.uuid4()),
        event_time=timestamps.now(),
        action=access.action,
        outcome=access.outcome,
        resource=access.resource,
        patient_pseudonym=access.patient_pseudonym,
        break_glass_reason=access.break_glass_reason,
        service=service,
        trace_id=telemetry.current_trace_id(),
    )
    if call is None:
        event.actor.workload = UNVERIFIED
    else:
        event.method = call.method
        event.actor.workload = call.principal.workload
        event.actor.user = call.principal.user or ""
        event.actor.roles.extend(sorted(call.principal.roles))
    return event


def encode(event: pb.AuditEvent) -> str:
    # Text, since the services' Redis clients decode responses.
    return base64.b64encode(event.SerializeToString()).decode("ascii")


def decode(fields: Mapping[Any, Any] | None) -> pb.AuditEvent | None:
    """The event of a spool entry, or None if the entry is not one this client wrote."""
    if not fields:
        return None
    value = fields.get(_FIELD, fields.get(_FIELD.encode()))
    if value is None:
        return None
    try:
        return pb.AuditEvent.FromString(base64.b64decode(value, validate=True))
    except (binascii.Error, DecodeError, ValueError):
        return None


class _NotDurable(Exception):
    """The spool did not take the events."""


class AuditDown(Exception):
    """The drainer could not forward a batch; it stays pending and is resent later."""


Entry = tuple[str, Mapping[Any, Any] | None]


class AuditClient:
    """Reports accesses to audit; with a Redis client, spools them while audit is down.

    Use it as an async context manager (or `start`/`close`): that runs the drainer.
    Without Redis there is no spool: `report` raises as soon as audit cannot be reached.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        service: str,
        default_deadline: float,
        redis: aioredis.Redis | None = None,
        options: DeliveryOptions | None = None,
    ) -> None:
        self._stub = pb_grpc.AuditServiceStub(channel)
        self._service = service
        self._options = options or DeliveryOptions(drain_deadline=default_deadline)
        self._redis = redis
        self.stream = SPOOL_PREFIX + service
        self.dead_letters = DEAD_LETTER_PREFIX + service
        # Unique per process: a restarted process is a new consumer, and what the old one
        # held is claimed after `claim_idle_seconds`.
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._direct_after = 0.0  # monotonic time before which reports skip the direct call
        self._work = asyncio.Event()  # set when this process spooled something
        self._audit_up = asyncio.Event()  # set when a direct call succeeded
        self._drainer: asyncio.Task[None] | None = None
        self._closing = False
        self._claim_at = 0.0
        self._claim_cursor = "0-0"

    @classmethod
    def for_service(
        cls,
        channel: grpc.aio.Channel,
        *,
        service: str,
        settings: AuditedServiceSettings,
        redis: aioredis.Redis | None,
    ) -> AuditClient:
        return cls(
            channel,
            service=service,
            default_deadline=settings.default_deadline_seconds,
            redis=redis,
            options=DeliveryOptions.from_settings(settings),
        )

    # Reporting ------------------------------------------------------------------------

    async def record_denial(self, method: str, error: Unauthenticated | PermissionDenied) -> None:
        """Records a refused call (the interceptor's on_denied). A refusal carries no PHI:
        if nothing durable takes it, it is counted as lost, and the caller is refused anyway."""
        await self.report([denial(method, error)], kind=Kind.NO_PHI)

    async def report(self, accesses: Sequence[Access], *, kind: Kind | None = None) -> Delivery:
        """Records the accesses in the audit log, or in the spool if audit is unreachable.

        Raises UNAVAILABLE (`AUDIT_UNAVAILABLE`) for PHI kinds when neither took them, or
        when audit refused them; DEADLINE_EXCEEDED if the caller has no time left.
        """
        kind = kind or kind_of(accesses)
        events = [event_for(a, self._service) for a in accesses]
        ids = tuple(e.event_id for e in events)
        if not events:
            return Delivery(kind)
        timeout = deadlines.timeout(self._options.direct_deadline)
        if self._redis is None or time.monotonic() >= self._direct_after:
            try:
                response = await self._stub.AppendEvents(
                    pb.AppendEventsRequest(events=events), timeout=timeout
                )
            except grpc.aio.AioRpcError as error:
                FAILURES.labels(self._service, "direct", error.code().name).inc()
                if error.code() not in TRANSIENT:
                    log.error("audit refused events", extra={"fields": {"code": error.code().name}})
                    raise Unavailable(
                        "AUDIT_UNAVAILABLE", "the audit log refused to record the access"
                    ) from error
                self._direct_after = time.monotonic() + self._options.direct_retry_seconds
            else:
                APPENDED.labels(self._service).inc(len(events))
                self._audit_up.set()
                return Delivery(kind, appended=dict(zip(ids, response.log_indexes, strict=True)))
        try:
            await self._spool(events)
        except _NotDurable as error:
            UNRECORDED.labels(self._service, kind.value).inc()
            log.error(
                "audit events not recorded anywhere durable",
                extra={"fields": {"kind": kind.value, "events": len(events)}},
            )
            if kind is Kind.NO_PHI:
                return Delivery(kind, lost=ids)
            raise Unavailable(
                "AUDIT_UNAVAILABLE",
                "the access could not be recorded in the audit log or its spool",
            ) from error
        SPOOLED.labels(self._service).inc(len(events))
        self._work.set()
        return Delivery(kind, spooled=ids)

    async def _spool(self, events: Sequence[pb.AuditEvent]) -> None:
        if self._redis is None:
            raise _NotDurable("no spool")
        try:
            length = int(await self._redis.xlen(self.stream))
            if length + len(events) > self._options.spool_max_events:
                FAILURES.labels(self._service, "spool", "SPOOL_FULL").inc()
                raise _NotDurable("the spool is full")
            # MULTI: the events of one report are spooled together or not at all. No
            # MAXLEN: trimming would drop events that are not in the log yet.
            async with self._redis.pipeline(transaction=True) as pipe:
                for event in events:
                    pipe.xadd(self.stream, {_FIELD: encode(event)})
                await pipe.execute()
        except RedisError as error:
            FAILURES.labels(self._service, "spool", type(error).__name__).inc()
            raise _NotDurable(str(error)) from error
        SPOOL_LENGTH.labels(self._service).set(length + len(events))

    # The drainer ----------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the drainer (if there is a spool). Redis being down does not stop start-up."""
        if self._redis is None or self._drainer is not None:
            return
        self._closing = False
        # A context of its own: the drainer must not inherit a call's deadline or identity.
        self._drainer = asyncio.create_task(
            self._drain_forever(),
            name=f"audit-drainer-{self._service}",
            context=contextvars.Context(),
        )

    async def close(self) -> None:
        """Stops the drainer. What is still spooled stays in Redis for the next drainer."""
        if self._drainer is None:
            return
        self._closing = True  # in case a cancellation is swallowed on the way
        drainer, self._drainer = self._drainer, None
        drainer.cancel()
        try:
            await drainer
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # close itself was cancelled: pass that on

    async def __aenter__(self) -> AuditClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _drain_forever(self) -> None:
        options = self._options
        backoff = 0.0
        group_ready = False
        while not self._closing:
            try:
                if not group_ready:
                    await self._ensure_group()
                    group_ready = True
                forwarded = await self.drain_once()
            except (AuditDown, RedisError) as error:
                if isinstance(error, ResponseError) and "NOGROUP" in str(error):
                    # The stream or group went away (a Redis without persistence restarted).
                    group_ready = False
                    continue
                if isinstance(error, RedisError):
                    FAILURES.labels(self._service, "drain", type(error).__name__).inc()
                backoff = min(
                    max(2 * backoff, options.backoff_seconds), options.max_backoff_seconds
                )
                # A successful direct call means audit is back: stop waiting then.
                self._audit_up.clear()
                await _wait(self._audit_up, backoff * random.uniform(0.5, 1))
                continue
            except Exception:
                # A bug must not end the drainer for the life of the process.
                log.exception("audit drainer failed")
                await asyncio.sleep(options.max_backoff_seconds)
                continue
            backoff = 0.0
            if not forwarded:
                self._work.clear()
                await _wait(self._work, options.poll_seconds)

    async def _ensure_group(self) -> None:
        assert self._redis is not None
        try:
            # From id 0: entries spooled before the group existed are drained too.
            await self._redis.xgroup_create(self.stream, CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def drain_once(self) -> int:
        """Forwards one batch of the spool; the number of entries settled (0: nothing to do).

        Raises `AuditDown` (the batch stays pending, to be resent) or a Redis error.
        """
        redis = self._redis
        assert redis is not None
        entries = await self._next_batch(redis)
        if not entries:
            SPOOL_LENGTH.labels(self._service).set(int(await redis.xlen(self.stream)))
            return 0
        settled: list[str] = []
        undecodable: list[Entry] = []
        batch: list[tuple[str, pb.AuditEvent]] = []
        for entry_id, fields in entries:
            event = decode(fields)
            if event is not None:
                batch.append((entry_id, event))
            elif fields:
                undecodable.append((entry_id, fields))
            else:
                settled.append(entry_id)  # deleted while pending: nothing left to send
        refused = await self._forward(batch)
        forwarded = [entry_id for entry_id, _ in batch if entry_id not in refused]
        dead = undecodable + [(i, f) for i, f in entries if i in refused]
        async with redis.pipeline(transaction=True) as pipe:
            for entry_id, fields in dead:
                pipe.xadd(self.dead_letters, {**dict(fields or {}), "spool_id": entry_id})
            done = [*settled, *forwarded, *(i for i, _ in dead)]
            pipe.xack(self.stream, CONSUMER_GROUP, *done)
            pipe.xdel(self.stream, *done)
            pipe.xlen(self.stream)
            *_, length = await pipe.execute()
        SPOOL_LENGTH.labels(self._service).set(int(length))
        DRAINED.labels(self._service).inc(len(forwarded))
        if dead:
            DEAD_LETTERED.labels(self._service).inc(len(dead))
            log.error("audit events dead-lettered", extra={"fields": {"entries": len(dead)}})
        return len(done)

    async def _next_batch(self, redis: aioredis.Redis) -> list[Entry]:
        count = self._options.batch_size
        # First what this consumer already holds (a batch that failed), then entries of a
        # consumer that went quiet, then new ones.
        own = await redis.xreadgroup(CONSUMER_GROUP, self.consumer, {self.stream: "0"}, count=count)
        entries = _entries(own)
        if entries:
            return entries
        now = time.monotonic()
        if now >= self._claim_at:
            self._claim_at = now + self._options.claim_idle_seconds / 2
            cursor, claimed, *_ = await redis.xautoclaim(
                self.stream,
                CONSUMER_GROUP,
                self.consumer,
                min_idle_time=int(self._options.claim_idle_seconds * 1000),
                start_id=self._claim_cursor,
                count=count,
            )
            self._claim_cursor = str(cursor)
            # Redis 6.2 names an entry deleted while pending (None, None); it is now ours
            # and the next read of our own pending entries settles it.
            entries = [(str(i), f) for i, f in claimed if i is not None]
            if entries:
                log.info("audit spool entries claimed", extra={"fields": {"entries": len(entries)}})
                return entries
            await self._forget_idle_consumers(redis)
        fresh = await redis.xreadgroup(
            CONSUMER_GROUP, self.consumer, {self.stream: ">"}, count=count
        )
        return _entries(fresh)

    async def _forget_idle_consumers(self, redis: aioredis.Redis) -> None:
        # Every process is a new consumer; drop the ones of gone processes that hold nothing
        # (a live one that is dropped is recreated by its next read).
        idle_ms = self._options.claim_idle_seconds * 10 * 1000
        for consumer in await redis.xinfo_consumers(self.stream, CONSUMER_GROUP):
            if (
                consumer["name"] != self.consumer
                and int(consumer["pending"]) == 0
                and int(consumer["idle"]) > idle_ms
            ):
                await redis.xgroup_delconsumer(self.stream, CONSUMER_GROUP, consumer["name"])

    async def _forward(self, batch: Sequence[tuple[str, pb.AuditEvent]]) -> set[str]:
        """Appends the batch; returns the entry ids audit refused for good.

        Raises `AuditDown` when a resend may succeed.
        """
        if not batch:
            return set()
        try:
            await self._append([e for _, e in batch])
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise AuditDown(error.code().name) from error
            if len(batch) == 1:
                return {batch[0][0]}
            # One bad event refuses the whole batch: find it by sending them one by one.
            refused: set[str] = set()
            for entry in batch:
                refused |= await self._forward([entry])
            return refused
        self._direct_after = 0.0
        return set()

    async def _append(self, events: Sequence[pb.AuditEvent]) -> None:
        try:
            await self._stub.AppendEvents(
                pb.AppendEventsRequest(events=events), timeout=self._options.drain_deadline
            )
        except grpc.aio.AioRpcError as error:
            FAILURES.labels(self._service, "drain", error.code().name).inc()
            raise


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Waits until `event` is set or `seconds` pass.

    Not `asyncio.wait_for`: on Python 3.11 it can swallow a cancellation that races its
    timeout, and the drainer would then outlive `close`.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _entries(response: Any) -> list[Entry]:
    """The entries of an XREADGROUP answer on one stream."""
    if not response:
        return []
    [(_, entries)] = response
    return [(str(i), f) for i, f in entries]
