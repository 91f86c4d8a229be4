"""The one pipeline behind every door (gRPC, DICOMweb, DIMSE): each file validated,
de-identified, stored, indexed, announced and audited, exactly once.

Per file, in a worker thread: parse and validate, check that the pixels decode, decide on
quarantine, de-identify by the policy, and write the de-identified bytes to the object
store (durable before anything points at them). Then for the batch, together with the
batches of every other call in flight (group commit, see `Pipeline._commit`): report the
stores to audit (before the index makes anything visible: fail closed), index them in one
transaction with the sealed pseudonym links, and announce the new ones. A file that fails
gets its own result, and a call whose report or index rows fail gets its own error; their
neighbours go on. An instance is acknowledged only once its object, its audit record and
its index row are durable; an object whose indexing then fails is content-addressed and
unindexed: a retry reuses it, and nothing serves it.

The stored bytes depend only on the file and the policy and key, never on the door:
the file meta is rebuilt here, so the same file sent through any door is stored once.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import struct
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from io import BytesIO

import asyncpg
import pydicom
import redis.asyncio as aioredis
import redis.exceptions
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medimg_core import calls, telemetry
from medimg_core.audit import Access, Action
from medimg_core.errors import InvalidArgument
from medimg_ingest import deid, dicom, index, part10, pixels, volumes
from medimg_ingest.identities import IdentityVault
from medimg_ingest.objects import ObjectStore
from medimg_ingest.workers import Workers

log = logging.getLogger(__name__)

#: Redis stream that announces each newly stored instance (resource names only).
INSTANCE_STORED_STREAM = "medimg:ingest:instance-stored"
#: About how many entries the stream keeps (as medimg_core.redis.publish trims).
INSTANCE_STORED_MAX_LENGTH = 100_000
#: The most instances one group commit takes (audit takes at most 1000 events a report).
MAX_GROUP_INSTANCES = 500
#: Written into the file meta of every stored instance (Implementation Class UID).
IMPLEMENTATION_CLASS_UID = UID("2.25.304611008311148645742061647993512004849")
IMPLEMENTATION_VERSION_NAME = "MEDIMG_1"
#: The reason a quarantined instance is held back.
BURNED_IN = "BURNED_IN_ANNOTATION"


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    CONFLICT = "conflict"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class Result:
    """What became of one file. `message` never carries patient data."""

    outcome: Outcome
    instance: str = ""
    reason: str = ""
    message: str = ""
    patient_pseudonym: str = ""


def instance_name(header: dicom.InstanceHeader) -> str:
    return (
        f"studies/{header.study_uid}/series/{header.series_uid}/instances/{header.sop_instance_uid}"
    )


async def collect_files(
    chunks: AsyncIterable[tuple[bytes, bool]], max_bytes: int, *, max_total_bytes: int | None = None
) -> list[bytes]:
    """Joins (chunk, last_chunk) pairs into whole files; the stream's end also ends a file.

    `max_bytes` bounds each file, `max_total_bytes` the whole upload (held in memory)."""
    files: list[bytes] = []
    # The chunks of the current file, joined once it ends: one copy of each file.
    current: list[bytes] = []
    size = total = 0
    async for chunk, last in chunks:
        total += len(chunk)
        if max_total_bytes is not None and total > max_total_bytes:
            raise InvalidArgument(
                "UPLOAD_TOO_LARGE",
                f"the upload is larger than the limit of {max_total_bytes} bytes: send fewer "
                "files per stream",
                limit=max_total_bytes,
            )
        size += len(chunk)
        if size > max_bytes:
            raise InvalidArgument(
                "INSTANCE_TOO_LARGE",
                f"file {len(files)} is larger than the limit of {max_bytes} bytes",
                index=len(files),
                limit=max_bytes,
            )
        if chunk:
            current.append(chunk)
        if last:
            files.append(b"".join(current))
            current, size = [], 0
    if current:
        files.append(b"".join(current))
    if not files:
        raise InvalidArgument("EMPTY_UPLOAD", "the upload stream carried no file")
    return files


@dataclass(frozen=True)
class Transformed:
    """A file made ready to store: its de-identified Part 10 bytes and what is kept of it."""

    data: bytes
    header: dicom.InstanceHeader
    quarantine: str = ""
    #: The patient's pseudonym and original Patient ID, for the sealed link ("" when the
    #: file was de-identified before: nothing to link).
    pseudonym: str = ""
    patient_id: str = ""


def transform(
    data: bytes, position: int, deidentified: bool, policy: deid.Policy, deid_key: bytes
) -> Transformed | Result:
    """Parses and validates one file and de-identifies it by `policy`: the CPU-bound part of
    ingesting, the same in a thread or a worker process (a module-level function of
    picklable values for that). A Result when the file is refused. `deidentified` files
    (made here from stored instances) are only re-encoded."""
    try:
        original = dicom.read_instance(data, position)
        pixels.check_decodable(original)
        if deidentified:
            return Transformed(_serialize(original), dicom.header_of(original))
        quarantine = BURNED_IN if deid.needs_quarantine(original, policy) else ""
        clean = deid.deidentify(original, policy, deid_key)
        return Transformed(
            _serialize(clean.dataset),
            dicom.header_of(clean.dataset),
            quarantine,
            clean.pseudonym,
            clean.patient_id_original,
        )
    except InvalidArgument as error:
        return Result(Outcome.REJECTED, reason=error.reason, message=error.message)


class Pipeline:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        objects: ObjectStore,
        events: aioredis.Redis,
        executor: Executor,
        report: Callable[[Sequence[Access]], Awaitable[object]],
        policy: deid.Policy,
        deid_key: bytes,
        vault: IdentityVault,
        workers: Workers | None = None,
        max_group_instances: int = MAX_GROUP_INSTANCES,
    ) -> None:
        self._pool = pool
        self._objects = objects
        self._events = events
        self._executor = executor
        #: Records the stores in the audit log (AuditClient.report); before the index.
        self._report = report
        self._policy = policy
        self._deid_key = deid_key
        self._vault = vault
        #: Processes for parsing, validating and de-identifying; None: `executor`'s threads.
        self._workers = workers
        self._max_group = max_group_instances
        #: Calls whose objects are stored and wait for the next group commit.
        self._waiting: list[_Waiting] = []
        self._committing: asyncio.Task[None] | None = None

    async def ingest(self, files: Sequence[bytes], *, deidentified: bool = False) -> list[Result]:
        """Each file's result, in order. `deidentified` files were made here from stored
        instances (a SEG of a stored series): stored as they are, since de-identifying them
        again would replace the stored UIDs they reference."""
        prepared = await asyncio.gather(
            *(self._prepare(data, i, deidentified) for i, data in enumerate(files))
        )
        stored = [p for p in prepared if isinstance(p, index.StoredObject)]
        placements: dict[int, index.Placement] = {}
        if stored:
            placed = await self._commit(stored)
            placements = {id(o): p for o, p in zip(stored, placed, strict=True)}
        return [p if isinstance(p, Result) else _result(p, placements[id(p)]) for p in prepared]

    async def _prepare(
        self, data: bytes, position: int, deidentified: bool
    ) -> index.StoredObject | Result:
        """Validates, de-identifies and stores one file; a Result when it is refused. The
        CPU-bound part runs in a worker process where there are some, else in a thread."""
        loop = asyncio.get_running_loop()
        if self._workers is None:
            return await loop.run_in_executor(
                self._executor, self._prepare_here, data, position, deidentified
            )
        made = await self._workers.run(
            transform, data, position, deidentified, self._policy, self._deid_key
        )
        if isinstance(made, Result):
            return made
        return await loop.run_in_executor(self._executor, self._store, made)

    def _prepare_here(
        self, data: bytes, position: int, deidentified: bool
    ) -> index.StoredObject | Result:
        made = transform(data, position, deidentified, self._policy, self._deid_key)
        return made if isinstance(made, Result) else self._store(made)

    def _store(self, made: Transformed) -> index.StoredObject:
        """Writes the object durably and seals its pseudonym link (in a thread)."""
        key, digest = self._objects.key_for(made.data)
        self._objects.put(key, made.data)
        identity = None
        if made.pseudonym:
            identity = (self._vault.key_id, self._vault.seal(made.pseudonym, made.patient_id))
        return index.StoredObject(
            made.header, len(made.data), digest, key, quarantine=made.quarantine, identity=identity
        )

    async def volume(self, stored: Sequence[tuple[str, str]]) -> volumes.Volume:
        """The stored instances (object key, sha256), each checked against its hash, as one
        volume (see volumes.series_volume), built in a worker thread."""

        def build() -> volumes.Volume:
            datasets = [
                pydicom.dcmread(BytesIO(self._objects.get_verified(key, sha256)))
                for key, sha256 in stored
            ]
            return volumes.series_volume(datasets)

        return await asyncio.get_running_loop().run_in_executor(self._executor, build)

    # Group commit ----------------------------------------------------------------------

    async def _commit(self, objects: Sequence[index.StoredObject]) -> list[index.Placement]:
        """Audits, indexes and announces the stored objects of one call, together with those
        of every other call in flight (group commit); where each object went.

        The objects wait while the group before them commits, then commit with everything
        that arrived meanwhile: one audit report per caller, one index transaction and one
        announcement for the whole group. Under light load a group is a single call, and
        none waits for more than the one commit ahead of it. A caller that gives up
        (cancelled) before its group starts is left out of it; its objects stay unindexed,
        for the orphan sweep, as they would after any failure between store and index."""
        waiting = _Waiting(
            list(objects),
            # Each access is audited as made by its own caller, in its own trace.
            context=contextvars.copy_context(),
            caller=(calls.current(), telemetry.current_trace_id()),
            placed=asyncio.get_running_loop().create_future(),
        )
        self._waiting.append(waiting)
        if self._committing is None:
            # A context of its own: the committer acts for no caller in particular.
            self._committing = asyncio.create_task(
                self._commit_waiting(), name="ingest-group-commit", context=contextvars.Context()
            )
        return await waiting.placed

    async def _commit_waiting(self) -> None:
        try:
            while self._waiting:
                group = self._next_group()
                try:
                    await self._commit_group(group)
                except Exception as error:
                    # A fault of this group (its calls have their answer): the next goes on.
                    log.exception("group commit failed")
                    for waiting in group:
                        _settle(waiting, error)
        finally:
            self._committing = None
            for waiting in self._waiting:  # cancelled (shutdown): no commit will come
                waiting.placed.cancel()
            self._waiting.clear()

    def _next_group(self) -> list[_Waiting]:
        """The calls that wait (those still waiting for an answer), oldest first, up to the
        group's limit of instances; a call larger than the limit is a group of its own."""
        group: list[_Waiting] = []
        size = 0
        while self._waiting:
            waiting = self._waiting[0]
            if waiting.placed.done():  # its caller gave up
                self._waiting.pop(0)
                continue
            if group and size + len(waiting.objects) > self._max_group:
                break
            group.append(self._waiting.pop(0))
            size += len(waiting.objects)
        return group

    async def _commit_group(self, group: list[_Waiting]) -> None:
        try:
            indexed = await self._index(await self._audit(group))
            await self.announce(
                [
                    instance_name(obj.header)
                    for waiting, placements in indexed
                    for obj, placement in zip(waiting.objects, placements, strict=True)
                    if placement is index.Placement.NEW and not obj.quarantine
                ]
            )
        except asyncio.CancelledError:
            for waiting in group:
                waiting.placed.cancel()
            raise
        for waiting, placements in indexed:
            _settle(waiting, placements)

    async def _audit(self, group: list[_Waiting]) -> list[_Waiting]:
        """Reports the stores of the group, one report per caller; the calls whose stores are
        on record. The others get their error (audit before index: fail closed)."""
        by_caller: dict[tuple[object, str], list[_Waiting]] = {}
        for waiting in group:
            by_caller.setdefault(waiting.caller, []).append(waiting)
        parts = list(by_caller.values())
        failures = await asyncio.gather(*(self._report_for(part) for part in parts))
        audited: list[_Waiting] = []
        alone: list[_Waiting] = []
        for part, failure in zip(parts, failures, strict=True):
            if failure is None:
                audited += part
            elif len(part) == 1:
                _settle(part[0], failure)
            else:  # not one call's bad event failing its neighbours: each reported alone
                alone += part
        failures = await asyncio.gather(*(self._report_for([waiting]) for waiting in alone))
        for waiting, failure in zip(alone, failures, strict=True):
            if failure is None:
                audited.append(waiting)
            else:
                _settle(waiting, failure)
        return audited

    async def _report_for(self, part: list[_Waiting]) -> Exception | None:
        """Reports the stores of calls of one caller, in that caller's context."""
        accesses = [_stored(obj) for waiting in part for obj in waiting.objects]

        async def report() -> None:
            await self._report(accesses)

        try:
            await asyncio.create_task(report(), context=part[0].context)
        except Exception as error:  # noqa: BLE001 - the calls' own error, given back to them
            return error
        return None

    async def _index(self, audited: list[_Waiting]) -> list[tuple[_Waiting, list[index.Placement]]]:
        """Indexes the audited calls' objects in one transaction; if it fails, each call's in
        a transaction of its own, so that no call's objects fail its neighbours. A call
        whose own transaction fails gets its error."""
        if not audited:
            return []
        objects = [obj for waiting in audited for obj in waiting.objects]
        try:
            placed = await index.add_instances(self._pool, objects)
        except Exception as error:  # noqa: BLE001 - each call is answered with its own
            if len(audited) == 1:
                _settle(audited[0], error)
                return []
            indexed = []
            for waiting in audited:
                try:
                    indexed.append(
                        (waiting, await index.add_instances(self._pool, waiting.objects))
                    )
                except Exception as alone:  # noqa: BLE001 - this call's own error
                    _settle(waiting, alone)
            return indexed
        indexed, start = [], 0
        for waiting in audited:
            end = start + len(waiting.objects)
            indexed.append((waiting, placed[start:end]))
            start = end
        return indexed

    async def announce(self, instances: Sequence[str]) -> None:
        """Announces newly indexed instances (resource names) on the instance stream."""
        # The index is the record; the stream is a notification. A Redis outage must not
        # turn a stored instance into a failed upload (the client would retry in vain).
        if not instances:
            return
        try:
            async with self._events.pipeline(transaction=False) as pipe:
                for name in instances:
                    pipe.xadd(
                        INSTANCE_STORED_STREAM,
                        {"instance": name},
                        maxlen=INSTANCE_STORED_MAX_LENGTH,
                        approximate=True,
                    )
                await pipe.execute()
        except redis.exceptions.RedisError as error:
            log.warning(
                "instance events not published", extra={"fields": {"error": type(error).__name__}}
            )


@dataclass(eq=False)
class _Waiting:
    """One call's stored objects, waiting to be committed with a group."""

    objects: list[index.StoredObject]
    #: The caller's context (its identity, trace and deadline), for its audit report.
    context: contextvars.Context
    #: Who the audit names, and in which trace: calls with the same share one report.
    caller: tuple[object, str]
    placed: asyncio.Future[list[index.Placement]]


def _settle(waiting: _Waiting, outcome: list[index.Placement] | Exception) -> None:
    """Answers a waiting call, unless it has its answer already or gave up waiting."""
    if waiting.placed.done():
        return
    if isinstance(outcome, Exception):
        waiting.placed.set_exception(outcome)
    else:
        waiting.placed.set_result(outcome)


def _stored(obj: index.StoredObject) -> Access:
    name = instance_name(obj.header)
    return Access(Action.ACTION_CREATE, name, patient_pseudonym=obj.header.patient_id)


def _result(stored: index.StoredObject, placement: index.Placement) -> Result:
    name, pseudonym = instance_name(stored.header), stored.header.patient_id
    if placement is index.Placement.CONFLICT:
        return Result(
            Outcome.CONFLICT,
            name,
            "INSTANCE_CONFLICT",
            "an instance with this SOP Instance UID and other content is already stored",
        )
    if placement is index.Placement.DUPLICATE:
        return Result(Outcome.DUPLICATE, name, patient_pseudonym=pseudonym)
    if stored.quarantine:
        return Result(
            Outcome.QUARANTINED,
            name,
            stored.quarantine,
            "its pixels may show identifying text: held back until a person has looked",
            pseudonym,
        )
    return Result(Outcome.STORED, name, patient_pseudonym=pseudonym)


def _serialize(dataset: pydicom.Dataset) -> bytes:
    """Part 10 bytes of a de-identified instance (see `storage_form`)."""
    storage_form(dataset)
    try:
        # What pydicom's dcmwrite writes, at a fraction of its cost (see part10).
        return part10.encode(dataset)
    except (TypeError, ValueError, struct.error) as error:
        # e.g. implicit VR elements under an explicit transfer syntax: pydicom reads such a
        # file, but it cannot be written back as one.
        raise InvalidArgument(
            "UNENCODABLE_DATASET",
            "the instance cannot be written in its transfer syntax: is its data set encoded "
            "as its file meta says?",
        ) from error


def storage_form(dataset: pydicom.Dataset) -> None:
    """Gives an instance what it is stored with, the same whichever door it came through:
    our own file meta, and Explicit VR Little Endian for what came as Implicit."""
    meta = dataset.file_meta
    if meta.get("TransferSyntaxUID") == ImplicitVRLittleEndian:
        # What DIMSE senders often negotiate; a file of the same instance is usually explicit.
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle"):
        if keyword in meta:
            delattr(meta, keyword)
    dataset.preamble = b"\0" * 128


async def sweep_orphans(
    pool: asyncpg.Pool, objects: ObjectStore, executor: Executor, grace_seconds: float
) -> int:
    """Removes objects (and temporary files) that no index row points at and that were last
    written more than `grace_seconds` ago: what a crash between store and index leaves.
    Returns how many went."""
    loop = asyncio.get_running_loop()
    older_than = time.time() - grace_seconds
    candidates = await loop.run_in_executor(executor, objects.orphan_candidates, older_than)
    if not candidates:
        return 0
    referenced = {
        row["object_key"]
        for row in await pool.fetch(
            "SELECT object_key FROM instances WHERE object_key = ANY($1::text[]) UNION "
            "SELECT object_key FROM quarantined_instances WHERE object_key = ANY($1::text[])",
            candidates,
        )
    }
    removed = 0
    for key in candidates:
        if key not in referenced:
            removed += await loop.run_in_executor(executor, objects.discard, key, older_than)
    if removed:
        log.info("orphaned objects removed", extra={"fields": {"count": removed}})
    return removed


async def sweep_forever(
    pool: asyncpg.Pool, objects: ObjectStore, executor: Executor, grace_seconds: float
) -> None:
    """`sweep_orphans` now (after a crash) and then every grace period."""
    while True:
        try:
            await sweep_orphans(pool, objects, executor, grace_seconds)
        except (OSError, asyncpg.PostgresError) as error:
            log.warning("orphan sweep failed", extra={"fields": {"error": type(error).__name__}})
        await asyncio.sleep(max(grace_seconds, 60))
