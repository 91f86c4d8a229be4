"""Progress of a job on the Redis stream `medimg:training:progress:<job id>`.

Rank 0 of the workers appends one entry per report; the service appends an end entry with
the job's final state, once (`announce_end`), whichever replicas see the job end. Entries
hold numbers and the state only (no PHI): `state`, `epoch`, `epochs`, `step`,
`total_steps`, `loss`, `metrics` (JSON object of floats), `images_per_second`,
`eta_seconds`, `time` (Unix seconds).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

PREFIX = "medimg:training:progress:"
#: Entries kept per job: progress is for watching, the job's row keeps the last one.
MAX_ENTRIES = 10_000


def stream(job_id: str) -> str:
    return PREFIX + job_id


def encode(progress: Mapping[str, Any]) -> dict[str, str]:
    return {
        key: json.dumps(value) if isinstance(value, dict) else str(value)
        for key, value in progress.items()
    }


def decode(fields: Mapping[str, str]) -> dict[str, Any]:
    progress: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "metrics":
            progress[key] = {k: float(v) for k, v in json.loads(value).items()}
        elif key in ("epoch", "epochs", "step", "total_steps"):
            progress[key] = int(value)
        elif key in ("loss", "images_per_second", "eta_seconds", "time"):
            progress[key] = float(value)
        else:
            progress[key] = value
    return progress


# The end entry goes in once per ending (a job's `end_time`): the replica that took a cancel
# and the leader whose workers then stopped both announce it, and workers may still report
# between the two. One script, so that nothing comes between the look and the append.
_ANNOUNCE_END = """
if redis.call('GET', KEYS[2]) == ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
return 1
"""


async def announce_end(
    events: aioredis.Redis, job_id: str, ending: str, entry: Mapping[str, Any]
) -> bool:
    """Appends the job's end entry (with its final `state`) unless this `ending` (what tells
    one end of the job from the next, its `end_time`) was announced already; whether it was
    appended."""
    flat = [item for pair in encode(entry).items() for item in pair]
    keys = (stream(job_id), stream(job_id) + ":ended")
    appended = await events.eval(_ANNOUNCE_END, 2, *keys, str(MAX_ENTRIES), ending, *flat)
    return bool(appended)
