"""Redis: one asyncio client per service, and events on Redis Streams.

Stream entries carry resource names and codes only, never PHI.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis


def connect(url: str) -> aioredis.Redis:
    # Short socket timeouts: an unreachable Redis must fail fast, not eat the caller's deadline.
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=30,
        socket_connect_timeout=2,
        socket_timeout=2,
    )


async def publish(
    client: aioredis.Redis, stream: str, fields: Mapping[str, str], *, max_length: int = 100_000
) -> str:
    """Appends an event to a stream, trimming it to about `max_length` entries."""
    entry_id = await client.xadd(stream, dict(fields), maxlen=max_length, approximate=True)  # type: ignore[arg-type]
    return str(entry_id)
