"""The one pipeline behind every door (gRPC, DICOMweb, DIMSE): each file validated,
de-identified, stored, indexed, announced and audited, exactly once.

Per file, in a worker thread: parse and validate, check that the pixels decode, decide on
quarantine, de-identify by the policy, and write the de-identified bytes to the object
store (durable before anything points at them). Then for the batch: report the stores to
audit (before the index makes anything visible: fail closed), index them in one
transaction with the sealed pseudonym links, and announce the new ones. A file that fails
gets its own result; its neighbours go on. An instance is acknowledged only once its
object and its index row are durable; an object whose indexing then fails is
content-addressed and unindexed: a retry reuses it, and nothing serves it.

The stored bytes depend only on the file and the policy and key, never on the door:
the file meta is rebuilt here, so the same file sent through any door is stored once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
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

from medimg_core import redis as medimg_redis
from medimg_core.audit import Access, Action
from medimg_core.errors import InvalidArgument
from medimg_ingest import deid, dicom, index, pixels, volumes
from medimg_ingest.identities import IdentityVault
from medimg_ingest.objects import ObjectStore

log = logging.getLogger(__name__)

#: Redis stream that announces each newly stored instance (resource names only).
INSTANCE_STORED_STREAM = "medimg:ingest:instance-stored"
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
    current = bytearray()
    total = 0
    async for chunk, last in chunks:
        total += len(chunk)
        if max_total_bytes is not None and total > max_total_bytes:
            raise InvalidArgument(
                "UPLOAD_TOO_LARGE",
                f"the upload is larger than the limit of {max_total_bytes} bytes: send fewer "
                "files per stream",
                limit=max_total_bytes,
            )
        if len(current) + len(chunk) > max_bytes:
            raise InvalidArgument(
                "INSTANCE_TOO_LARGE",
                f"file {len(files)} is larger than the limit of {max_bytes} bytes",
                index=len(files),
                limit=max_bytes,
            )
        current += chunk
        if last:
            files.append(bytes(current))
            current = bytearray()
    if current:
        files.append(bytes(current))
    if not files:
        raise InvalidArgument("EMPTY_UPLOAD", "the upload stream carried no file")
    return files


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

    async def ingest(self, files: Sequence[bytes]) -> list[Result]:
        """Each file's result, in order."""
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(
            *(loop.run_in_executor(self._executor, self._prepare, data, i)
              for i, data in enumerate(files))
        )  # fmt: skip
        stored = [p for p in prepared if isinstance(p, index.StoredObject)]
        placements: dict[int, index.Placement] = {}
        if stored:
            await self._report([_stored(o) for o in stored])
            placed = await index.add_instances(self._pool, stored)
            placements = {id(o): p for o, p in zip(stored, placed, strict=True)}
        results = [p if isinstance(p, Result) else _result(p, placements[id(p)]) for p in prepared]
        await self._announce([r.instance for r in results if r.outcome is Outcome.STORED])
        return results

    def _prepare(self, data: bytes, position: int) -> index.StoredObject | Result:
        """Validates, de-identifies and stores one file; a Result when it is refused."""
        try:
            original = dicom.read_instance(data, position)
            pixels.check_decodable(original)
        except InvalidArgument as error:
            return Result(Outcome.REJECTED, reason=error.reason, message=error.message)
        quarantine = BURNED_IN if deid.needs_quarantine(original, self._policy) else ""
        clean = deid.deidentify(original, self._policy, self._deid_key)
        data = _serialize(clean.dataset)
        key, digest = self._objects.key_for(data)
        self._objects.put(key, data)
        sealed = self._vault.seal(clean.pseudonym, clean.patient_id_original)
        return index.StoredObject(
            dicom.header_of(clean.dataset),
            len(data),
            digest,
            key,
            quarantine=quarantine,
            identity=(self._vault.key_id, sealed),
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

    async def _announce(self, instances: Sequence[str]) -> None:
        # The index is the record; the stream is a notification. A Redis outage must not
        # turn a stored instance into a failed upload (the client would retry in vain).
        try:
            for name in instances:
                await medimg_redis.publish(self._events, INSTANCE_STORED_STREAM, {"instance": name})
        except redis.exceptions.RedisError as error:
            log.warning(
                "instance events not published", extra={"fields": {"error": type(error).__name__}}
            )


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
    """Part 10 bytes of a de-identified instance, the same whichever door it came through:
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
    out = BytesIO()
    pydicom.dcmwrite(out, dataset, enforce_file_format=True)
    return out.getvalue()


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
