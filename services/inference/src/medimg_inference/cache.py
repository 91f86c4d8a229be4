"""The response cache: identical requests to a model version answered from Redis, as
Triton's response cache answers them.

A model opts in with `"response_cache": true` in the "medimg" section of its metadata.json.
An entry's key is `<prefix>:<model>:<version>:<sha256>`, the SHA-256 of the request's inputs
(see `input_digest`), so keys carry no PHI; its value is the model's outputs for them, in the
compact format of `encode_outputs`, kept for a TTL, and only if it is within a size cap.

The cache is an optimisation, never a dependency: Redis being down, slow or unreachable
turns every lookup into a miss and every store into nothing, each bounded by a short timeout
(and by half the time the caller has left), and after a failure the cache stops trying for a
few seconds (a circuit breaker), so an outage costs the callers one timeout, not one each.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from medimg_inference.backends import Array
from medimg_inference.repository import ModelName, ModelVersion, TensorSpec

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "medimg:inference:cache"

# Encoded values: a format byte, the header's length (4 bytes, big-endian), the JSON header
# [[name, dtype, shape], ...], then each array's bytes, C order, in header order; the part
# after the format byte is zlib-compressed when that makes it smaller.
_RAW = b"\x01"
_ZLIB = b"\x02"
_LENGTH = struct.Struct(">I")
# Below this many bytes, hashing, encoding and decoding stay on the event loop (a thread
# hop costs more); above, they go to a thread so that a volume never stalls the loop.
_INLINE_BYTES = 256 * 1024
_COMPRESS_FROM_BYTES = 1024

T = TypeVar("T")


def input_digest(inputs: Mapping[str, Array]) -> str:
    """SHA-256 (hex) of the inputs in a canonical form: by name, each input's name, dtype
    (numpy's spelling with byte order, e.g. "<f4"), shape, then its bytes in C order."""
    names = sorted(inputs)
    header = [[name, inputs[name].dtype.str, list(inputs[name].shape)] for name in names]
    digest = hashlib.sha256(json.dumps(header, separators=(",", ":")).encode())
    for name in names:
        digest.update(np.ascontiguousarray(inputs[name]).data)
    return digest.hexdigest()


def encode_outputs(outputs: Mapping[str, Array]) -> bytes:
    names = sorted(outputs)
    arrays = [np.ascontiguousarray(outputs[name]) for name in names]
    header = json.dumps(
        [
            [name, array.dtype.str, list(array.shape)]
            for name, array in zip(names, arrays, strict=True)
        ],
        separators=(",", ":"),
    ).encode()
    body = b"".join([_LENGTH.pack(len(header)), header, *(array.tobytes() for array in arrays)])
    if len(body) >= _COMPRESS_FROM_BYTES:
        compressed = zlib.compress(body, 1)
        if len(compressed) < len(body):
            return _ZLIB + compressed
    return _RAW + body


def decode_outputs(data: bytes, specs: Sequence[TensorSpec]) -> dict[str, Array] | None:
    """The outputs encoded in `data`, or None unless they are exactly the outputs `specs`
    declares (names and dtypes) with consistent sizes: a value that does not fit is a miss."""
    try:
        if data[:1] == _ZLIB:
            body = zlib.decompress(data[1:])
        elif data[:1] == _RAW:
            body = data[1:]
        else:
            return None
        (length,) = _LENGTH.unpack_from(body)
        header = json.loads(body[_LENGTH.size : _LENGTH.size + length])
        declared = {spec.name: spec.dtype for spec in specs}
        if sorted(name for name, _, _ in header) != sorted(declared):
            return None
        outputs: dict[str, Array] = {}
        offset = _LENGTH.size + length
        for name, dtype_text, shape in header:
            dtype = np.dtype(dtype_text)
            if dtype != declared[name]:
                return None
            size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            if offset + size > len(body):
                return None
            outputs[name] = np.frombuffer(body, dtype, count=size // dtype.itemsize, offset=offset)
            outputs[name] = outputs[name].reshape(shape)
            offset += size
        return outputs if offset == len(body) else None
    except (ValueError, TypeError, KeyError, struct.error, zlib.error):
        return None


def _nbytes(arrays: Mapping[str, Array]) -> int:
    return sum(array.nbytes for array in arrays.values())


async def off_loop(size: int, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)`, on a thread when `size` bytes make it long enough to matter."""
    if size < _INLINE_BYTES:
        return function(*args)
    return await asyncio.to_thread(function, *args)


class ResponseCache:
    """Model outputs in Redis, by model, version and input digest (see the module doc).

    `timeout_seconds` bounds each Redis call (half the caller's remaining time bounds it
    further); after a failure the cache answers misses for `retry_after_seconds` without
    calling Redis. Values above `max_entry_bytes` (encoded) are not stored."""

    def __init__(
        self,
        redis_url: str,
        *,
        ttl_seconds: float,
        max_entry_bytes: int,
        timeout_seconds: float = 0.05,
        retry_after_seconds: float = 5.0,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.ttl_ms = max(1, round(ttl_seconds * 1000))
        self.max_entry_bytes = max_entry_bytes
        self.timeout_seconds = timeout_seconds
        self.retry_after_seconds = retry_after_seconds
        self.prefix = prefix
        # No retries and short socket timeouts: a failure must surface within the timeout.
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_connect_timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
        )
        self._open_until = 0.0

    def key(self, model: ModelName, version: ModelVersion, digest: str) -> str:
        return f"{self.prefix}:{model}:{version}:{digest}"

    @property
    def available(self) -> bool:
        """False while the circuit is open (after a failure)."""
        return time.monotonic() >= self._open_until

    async def lookup(
        self, key: str, outputs: Sequence[TensorSpec], deadline: float | None = None
    ) -> dict[str, Array] | None:
        """The cached outputs for `key`, or None: not cached, not decodable as `outputs`,
        or Redis not answering in time."""
        data = await self._call(lambda client: client.get(key), deadline)
        if not isinstance(data, bytes):
            return None
        decoded = await off_loop(len(data), decode_outputs, data, outputs)
        if decoded is None:
            log.warning("a cached response does not fit its model; ignored", extra=_key_fields(key))
        return decoded

    async def store(
        self, key: str, outputs: Mapping[str, Array], deadline: float | None = None
    ) -> bool:
        """Caches `outputs` under `key`; False if they are too large or Redis failed."""
        data = await off_loop(_nbytes(outputs), encode_outputs, outputs)
        if len(data) > self.max_entry_bytes:
            return False
        stored = await self._call(lambda client: client.set(key, data, px=self.ttl_ms), deadline)
        return bool(stored)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _call(
        self, command: Callable[[aioredis.Redis], Awaitable[Any]], deadline: float | None
    ) -> Any:
        """The command's result, or None if the circuit is open, the time is too short, or
        Redis failed (which opens the circuit)."""
        if not self.available:
            return None
        budget = self.timeout_seconds
        if deadline is not None:
            budget = min(budget, (deadline - time.monotonic()) / 2)
            if budget <= 0:
                return None
        try:
            async with asyncio.timeout(budget):
                return await command(self._redis)
        except (RedisError, OSError, TimeoutError) as error:
            # A timeout the caller's deadline forced says nothing about Redis.
            if budget >= self.timeout_seconds or not isinstance(error, TimeoutError):
                self._trip(error)
            return None

    def _trip(self, error: BaseException) -> None:
        if self.available:
            log.warning(
                "the response cache is unavailable; answering misses for %.1f s",
                self.retry_after_seconds,
                extra={"fields": {"error_type": type(error).__name__}},
            )
        self._open_until = time.monotonic() + self.retry_after_seconds


def _key_fields(key: str) -> dict[str, Any]:
    # The key names the model, its version and a digest: nothing of the patient.
    return {"fields": {"cache_key": key}}
