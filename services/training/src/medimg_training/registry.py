"""The model registry: models, their versions (bundles with lineage) and aliases.

A version's bundle lies at `<model>/<version>/` in the bundle store (bundle_store.py: the
training volume, or S3), the layout of the inference service's repository; its row names
where, and the job, dataset, spec, code version,
metrics and creator that produced it, and the bundle's digest
(`medimg_core.bundles.bundle_digest`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from medimg_core import redis as medimg_redis
from medimg_core.errors import InvalidArgument, NotFound
from medimg_training.bundle_store import BundleStore
from medimg_training.jobs import Job

#: The stream the inference service follows to load promoted versions.
PROMOTED_STREAM = "medimg:training:model-promoted"
DEFAULT_ALIAS = "production"
_MODEL = re.compile(r"registeredModels/([A-Za-z0-9][A-Za-z0-9_.-]{0,127})")
_VERSION = re.compile(
    r"registeredModels/([A-Za-z0-9][A-Za-z0-9_.-]{0,127})/versions/([1-9][0-9]{0,8})"
)
_ALIAS = re.compile(r"[a-z][a-z0-9-]{0,62}")


@dataclass(frozen=True)
class Model:
    model_id: str
    latest_version: int
    aliases: Mapping[str, int]
    create_time: datetime

    @property
    def name(self) -> str:
        return f"registeredModels/{self.model_id}"


@dataclass(frozen=True)
class Version:
    model_id: str
    version: int
    job_id: str
    dataset: str
    spec: Mapping[str, Any]
    code_version: str
    metrics: Mapping[str, float]
    creator: str
    #: Where the bundle is: an absolute path, or an s3://bucket/prefix/ URI.
    bundle: str
    sha256: str
    aliases: tuple[str, ...]
    create_time: datetime

    @property
    def name(self) -> str:
        return f"registeredModels/{self.model_id}/versions/{self.version}"

    @property
    def bundle_uri(self) -> str:
        return self.bundle if self.bundle.startswith("s3://") else Path(self.bundle).as_uri()


def parse_model(name: str) -> str:
    match = _MODEL.fullmatch(name)
    if not match:
        raise InvalidArgument("INVALID_NAME", "a model name looks like registeredModels/{model}")
    return match[1]


def parse_version(name: str) -> tuple[str, int]:
    match = _VERSION.fullmatch(name)
    if not match:
        raise InvalidArgument(
            "INVALID_NAME", "a model version looks like registeredModels/{model}/versions/{version}"
        )
    return match[1], int(match[2])


async def register(
    pool: asyncpg.Pool,
    job: Job,
    bundle: Path,
    store: BundleStore,
    *,
    metrics: Mapping[str, float],
    code_version: str,
    sha256: str,
) -> str:
    """Places the job's bundle in the store as the model's next version and records it;
    returns the version's name. Idempotent per job: a job registers one version, once."""
    model_id = job.spec["model"]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO models (model_id) VALUES ($1) ON CONFLICT DO NOTHING", model_id
        )
        await conn.execute("SELECT 1 FROM models WHERE model_id = $1 FOR UPDATE", model_id)
        existing = await conn.fetchrow(
            "SELECT model_id, version FROM model_versions WHERE job_id = $1", job.job_id
        )
        if existing is not None:
            return f"registeredModels/{existing['model_id']}/versions/{existing['version']}"
        version = await conn.fetchval(
            "SELECT coalesce(max(version), 0) + 1 FROM model_versions WHERE model_id = $1",
            model_id,
        )
        # Inside the lock: no other registration takes this version meanwhile.
        location = await asyncio.to_thread(store.place, bundle, model_id, version)
        try:
            await conn.execute(
                """INSERT INTO model_versions (model_id, version, job_id, dataset, spec,
                       code_version, metrics, creator, bundle_path, sha256)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
                model_id,
                version,
                job.job_id,
                job.spec["dataset"],
                json.dumps(job.spec),
                code_version,
                json.dumps(dict(metrics)),
                job.creator,
                location,
                sha256,
            )
        except BaseException:
            await asyncio.to_thread(store.remove, location, bundle)
            raise
    return f"registeredModels/{model_id}/versions/{version}"


def _version(row: asyncpg.Record, aliases: tuple[str, ...]) -> Version:
    return Version(
        model_id=row["model_id"],
        version=row["version"],
        job_id=row["job_id"],
        dataset=row["dataset"],
        spec=json.loads(row["spec"]),
        code_version=row["code_version"],
        metrics=json.loads(row["metrics"]),
        creator=row["creator"],
        bundle=row["bundle_path"],
        sha256=row["sha256"],
        aliases=aliases,
        create_time=row["create_time"],
    )


async def get_version(pool: asyncpg.Pool, name: str) -> Version:
    model_id, version = parse_version(name)
    row = await pool.fetchrow(
        "SELECT * FROM model_versions WHERE model_id = $1 AND version = $2", model_id, version
    )
    if row is None:
        raise NotFound("MODEL_VERSION_NOT_FOUND", f"{name} does not exist")
    aliases = await pool.fetch(
        "SELECT alias FROM model_aliases WHERE model_id = $1 AND version = $2 ORDER BY alias",
        model_id,
        version,
    )
    return _version(row, tuple(a["alias"] for a in aliases))


async def list_versions(
    pool: asyncpg.Pool, parent: str, *, before: int | None, limit: int
) -> tuple[list[Version], bool]:
    model_id = parse_model(parent)
    if not await pool.fetchval("SELECT 1 FROM models WHERE model_id = $1", model_id):
        raise NotFound("MODEL_NOT_FOUND", f"{parent} does not exist")
    rows = await pool.fetch(
        """SELECT v.*, coalesce((SELECT array_agg(alias ORDER BY alias) FROM model_aliases a
                   WHERE a.model_id = v.model_id AND a.version = v.version), '{}') AS aliases
           FROM model_versions v
           WHERE model_id = $1 AND ($2::integer IS NULL OR version < $2)
           ORDER BY version DESC LIMIT $3""",
        model_id,
        before,
        limit + 1,
    )
    return [_version(r, tuple(r["aliases"])) for r in rows[:limit]], len(rows) > limit


async def get_model(pool: asyncpg.Pool, model_id: str) -> Model:
    found, _ = await _models(pool, model_id=model_id, after=None, limit=1)
    if not found:
        raise NotFound("MODEL_NOT_FOUND", f"registeredModels/{model_id} does not exist")
    return found[0]


async def list_models(
    pool: asyncpg.Pool, *, after: str | None, limit: int
) -> tuple[list[Model], bool]:
    return await _models(pool, model_id=None, after=after, limit=limit)


async def _models(
    pool: asyncpg.Pool, *, model_id: str | None, after: str | None, limit: int
) -> tuple[list[Model], bool]:
    rows = await pool.fetch(
        """SELECT m.model_id, m.create_time,
                  (SELECT coalesce(max(version), 0) FROM model_versions v
                   WHERE v.model_id = m.model_id) AS latest,
                  (SELECT coalesce(jsonb_object_agg(alias, version), '{}') FROM model_aliases a
                   WHERE a.model_id = m.model_id) AS aliases
           FROM models m
           WHERE ($1::text IS NULL OR m.model_id = $1) AND ($2::text IS NULL OR m.model_id > $2)
           ORDER BY m.model_id LIMIT $3""",
        model_id,
        after,
        limit + 1,
    )
    models = [
        Model(r["model_id"], r["latest"], json.loads(r["aliases"]), r["create_time"])
        for r in rows[:limit]
    ]
    return models, len(rows) > limit


async def set_alias(pool: asyncpg.Pool, model_id: str, alias: str, version: int, who: str) -> None:
    if not _ALIAS.fullmatch(alias):
        raise InvalidArgument(
            "INVALID_ALIAS", "an alias is 1 to 63 lower-case letters, digits and hyphens"
        )
    if not await pool.fetchval(
        "SELECT 1 FROM model_versions WHERE model_id = $1 AND version = $2", model_id, version
    ):
        raise NotFound(
            "MODEL_VERSION_NOT_FOUND",
            f"registeredModels/{model_id}/versions/{version} does not exist",
        )
    await pool.execute(
        """INSERT INTO model_aliases (model_id, alias, version, set_by) VALUES ($1, $2, $3, $4)
           ON CONFLICT (model_id, alias)
           DO UPDATE SET version = $3, set_by = $4, update_time = now()""",
        model_id,
        alias,
        version,
        who,
    )


async def promote(
    pool: asyncpg.Pool, events: aioredis.Redis, name: str, alias: str, who: str
) -> Version:
    """Points `alias` at the version, then publishes the promotion for inference."""
    model_id, number = parse_version(name)
    await set_alias(pool, model_id, alias or DEFAULT_ALIAS, number, who)
    version = await get_version(pool, name)
    await medimg_redis.publish(
        events,
        PROMOTED_STREAM,
        {
            "model": model_id,
            "version": str(number),
            "alias": alias or DEFAULT_ALIAS,
            "bundle": version.bundle_uri,
            "sha256": version.sha256,
        },
    )
    return version
