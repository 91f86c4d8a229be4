"""Versioned migrations on a real PostgreSQL: in order, once, checksummed, without gaps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from medimg_core import db


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.connect(database_url, max_size=2)
    yield pool
    await pool.close()


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql, encoding="utf-8")
    return directory


def numbered(count: int) -> dict[str, str]:
    """Migrations that only work in order: each one adds a row naming itself."""
    files = {"0001_log.sql": "CREATE TABLE log (id serial PRIMARY KEY, version int NOT NULL);"}
    for version in range(2, count + 1):
        files[f"{version:04d}_step_{version}.sql"] = (
            f"INSERT INTO log (version) VALUES ({version});"
        )
    return files


async def table_exists(pool: asyncpg.Pool, name: str) -> bool:
    return bool(await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


async def test_applies_in_numeric_order_once(pool: asyncpg.Pool, tmp_path: Path) -> None:
    files = numbered(12)
    # Written in reverse, so directory order is no help; 0010+ must sort after 0009.
    migrations = write(tmp_path / "m", dict(reversed(files.items())))
    applied = await db.migrate(pool, migrations)
    assert applied == list(files)
    rows = await pool.fetch("SELECT version FROM log ORDER BY id")
    assert [r["version"] for r in rows] == list(range(2, 13))
    recorded = await pool.fetch("SELECT version, name, sha256 FROM schema_migrations ORDER BY 1")
    assert [(r["version"], r["name"]) for r in recorded] == [
        (i, name) for i, name in enumerate(files, start=1)
    ]
    assert all(len(r["sha256"]) == 64 for r in recorded)

    assert await db.migrate(pool, migrations) == []
    assert await pool.fetchval("SELECT count(*) FROM log") == 11


async def test_only_new_migrations_are_applied(pool: asyncpg.Pool, tmp_path: Path) -> None:
    migrations = write(tmp_path / "m", numbered(3))
    assert await db.migrate(pool, migrations) == [
        "0001_log.sql",
        "0002_step_2.sql",
        "0003_step_3.sql",
    ]
    write(migrations, {"0004_step_4.sql": "INSERT INTO log (version) VALUES (4);"})
    assert await db.migrate(pool, migrations) == ["0004_step_4.sql"]
    rows = await pool.fetch("SELECT version FROM log ORDER BY id")
    assert [r["version"] for r in rows] == [2, 3, 4]


async def test_files_that_are_not_migrations_are_skipped(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    migrations = write(tmp_path / "m", {**numbered(1), "__init__.py": "", "README.md": "# not SQL"})
    assert await db.migrate(pool, migrations) == ["0001_log.sql"]


async def test_a_changed_migration_is_refused(pool: asyncpg.Pool, tmp_path: Path) -> None:
    migrations = write(tmp_path / "m", numbered(2))
    await db.migrate(pool, migrations)
    write(
        migrations,
        {
            "0002_step_2.sql": "INSERT INTO log (version) VALUES (22);",
            "0003_step_3.sql": "CREATE TABLE later (x int);",
        },
    )
    with pytest.raises(RuntimeError, match=r"0002_step_2\.sql changed"):
        await db.migrate(pool, migrations)
    assert not await table_exists(pool, "later")
    assert [r["version"] for r in await pool.fetch("SELECT version FROM log")] == [2]


async def test_a_gap_in_numbering_is_refused(pool: asyncpg.Pool, tmp_path: Path) -> None:
    files = numbered(3)
    del files["0002_step_2.sql"]
    with pytest.raises(RuntimeError, match="without gaps"):
        await db.migrate(pool, write(tmp_path / "m", files))
    assert not await table_exists(pool, "log")


async def test_numbering_must_start_at_one(pool: asyncpg.Pool, tmp_path: Path) -> None:
    migrations = write(tmp_path / "m", {"0002_first.sql": "CREATE TABLE log (x int);"})
    with pytest.raises(RuntimeError, match="without gaps"):
        await db.migrate(pool, migrations)
    assert not await table_exists(pool, "log")


async def test_two_migrations_with_one_number_are_refused(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    migrations = write(
        tmp_path / "m",
        {"0001_a.sql": "CREATE TABLE a (x int);", "0001_b.sql": "CREATE TABLE b (x int);"},
    )
    with pytest.raises(RuntimeError, match="without gaps"):
        await db.migrate(pool, migrations)
    assert not await table_exists(pool, "a")
    assert not await table_exists(pool, "b")


async def test_a_misnamed_sql_file_is_refused(pool: asyncpg.Pool, tmp_path: Path) -> None:
    migrations = write(tmp_path / "m", {**numbered(1), "0002_Add-Index.sql": "SELECT 1;"})
    with pytest.raises(RuntimeError):
        await db.migrate(pool, migrations)


async def test_a_failing_migration_leaves_nothing_behind_and_can_be_fixed(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    migrations = write(
        tmp_path / "m",
        {
            **numbered(1),
            "0002_broken.sql": "CREATE TABLE half (x int); INSERT INTO nowhere VALUES (1);",
        },
    )
    with pytest.raises(asyncpg.UndefinedTableError):
        await db.migrate(pool, migrations)
    assert await table_exists(pool, "log")
    assert not await table_exists(pool, "half")
    assert await pool.fetchval("SELECT array_agg(version) FROM schema_migrations") == [1]

    write(migrations, {"0002_broken.sql": "CREATE TABLE half (x int);"})
    # Another session: it would wait forever if the failed run had kept the lock.
    other = await db.connect(database_url, min_size=1, max_size=1)
    try:
        applied = await asyncio.wait_for(db.migrate(other, migrations), 10)
    finally:
        await other.close()
    assert applied == ["0002_broken.sql"]
    assert await table_exists(pool, "half")


async def test_replicas_starting_together_apply_each_migration_once(
    database_url: str, tmp_path: Path
) -> None:
    files = numbered(6)
    files["0007_slow.sql"] = "SELECT pg_sleep(0.2); CREATE TABLE slow (x int);"
    migrations = write(tmp_path / "m", files)
    pools = [await db.connect(database_url, min_size=1, max_size=1) for _ in range(3)]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(db.migrate(p, migrations) for p in pools)), 20
        )
        assert sorted(name for applied in results for name in applied) == sorted(files)
        assert sum(1 for r in results if r) == 1
        assert await pools[0].fetchval("SELECT count(*) FROM log") == 5
    finally:
        for p in pools:
            await p.close()
