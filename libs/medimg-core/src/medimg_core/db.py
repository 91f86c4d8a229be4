"""PostgreSQL: an asyncpg pool and versioned SQL migrations applied at start-up.

A service keeps its migrations as `NNNN_name.sql` files in a package of its own;
each file is applied once, in its own transaction, in order. Several replicas
starting at once serialise on an advisory lock. A migration that changed after it
was applied stops the start-up: migrations are append-only, like the schema's history.
"""

from __future__ import annotations

import hashlib
import logging
import re
from importlib.resources.abc import Traversable

import asyncpg

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x6D6564696D67  # "medimg": one lock for migrations, per database


async def connect(
    url: str, *, min_size: int = 1, max_size: int = 10, role: str | None = None
) -> asyncpg.Pool:
    """A pool; with `role`, every connection works as that role (SET ROLE at connect)."""
    settings = {"role": role} if role else None
    pool = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, server_settings=settings
    )
    assert pool is not None
    return pool


def _migrations(package: Traversable) -> list[tuple[int, str, str]]:
    found = []
    for entry in package.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME.match(entry.name)
        if not match:
            raise RuntimeError(f"migration {entry.name} is not named NNNN_lower_snake.sql")
        found.append((int(match[1]), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 0001, 0002, … without gaps: {versions}")
    return found


async def migrate(pool: asyncpg.Pool, package: Traversable) -> list[str]:
    """Applies the migrations not yet applied; returns the names it applied."""
    applied: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       sha256 text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                row["version"]: row["sha256"]
                for row in await conn.fetch("SELECT version, sha256 FROM schema_migrations")
            }
            for version, name, sql in _migrations(package):
                digest = hashlib.sha256(sql.encode()).hexdigest()
                if version in done:
                    if done[version] != digest:
                        raise RuntimeError(f"migration {name} changed after it was applied")
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, sha256) VALUES ($1, $2, $3)",
                        version,
                        name,
                        digest,
                    )
                log.info("applied migration", extra={"fields": {"migration": name}})
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied
