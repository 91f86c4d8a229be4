"""Progress of a job on the Redis stream `medimg:training:progress:<job id>`.

Rank 0 of the workers appends one entry per report; the service appends a last entry with
the job's final state. Entries hold numbers and the state only (no PHI): `state`, `epoch`,
`epochs`, `step`, `total_steps`, `loss`, `metrics` (JSON object of floats),
`images_per_second`, `eta_seconds`, `time` (Unix seconds).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

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
