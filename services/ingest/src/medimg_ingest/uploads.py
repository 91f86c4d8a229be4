"""The upload pipeline: files from a chunked stream, validated, stored, indexed, announced.

All or nothing: every file is read and validated before the first one is stored, and
the index takes them in one transaction. An object written for an upload that then
fails is content-addressed and unindexed: a retry reuses it, and it is never served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from medimg_core import redis as medimg_redis
from medimg_core.errors import InvalidArgument
from medimg_ingest import dicom, index
from medimg_ingest.objects import ObjectStore

log = logging.getLogger(__name__)

#: Redis stream that announces each newly stored instance (resource names only).
INSTANCE_STORED_STREAM = "medimg:ingest:instance-stored"


@dataclass(frozen=True)
class Outcome:
    instance: str
    created: bool


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


class Uploads:
    def __init__(
        self,
        pool: asyncpg.Pool,
        objects: ObjectStore,
        events: aioredis.Redis,
        executor: Executor,
    ) -> None:
        self._pool = pool
        self._objects = objects
        self._events = events
        self._executor = executor

    async def store(
        self,
        files: Sequence[bytes],
        *,
        before_index: Callable[[Sequence[str]], Awaitable[object]] | None = None,
    ) -> list[Outcome]:
        """Validates, stores and indexes the files; all or nothing.

        `before_index` gets the instance names once the objects are durable and before the
        index makes them visible: ingest records the access in the audit log there, so an
        instance is never served without its audit record (if audit fails, nothing is indexed).
        """
        loop = asyncio.get_running_loop()
        headers = await asyncio.gather(
            *(
                loop.run_in_executor(self._executor, dicom.read_header, data, i)
                for i, data in enumerate(files)
            )
        )
        stored = await asyncio.gather(
            *(
                loop.run_in_executor(self._executor, self._put, header, data)
                for header, data in zip(headers, files, strict=True)
            )
        )
        if before_index is not None:
            await before_index([instance_name(h) for h in headers])
        created = await index.add_instances(self._pool, stored)
        outcomes = [Outcome(instance_name(h), new) for h, new in zip(headers, created, strict=True)]
        await self._announce([o.instance for o in outcomes if o.created])
        return outcomes

    def _put(self, header: dicom.InstanceHeader, data: bytes) -> index.StoredObject:
        key, digest = self._objects.key_for(data)
        self._objects.put(key, data)
        return index.StoredObject(header, len(data), digest, key)

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
