"""Audit log: append throughput against a plain INSERT, and proof latency at a million events.

One run on one embedded PostgreSQL (durable commits: synchronous_commit on, fsync on):

1. Append throughput. The same batches of events go, interleaved batch by batch, to
   `medimg_audit.log.append` (validation, idempotency check, canonical bytes, leaf
   hashes, new Merkle nodes, under the append lock) and to two baselines, each a plain
   batched INSERT of the identical rows (every column the log stores, canonical bytes
   and leaf hash included, computed beforehand and not timed):
   - `ordinary`: the ordinary audit table the log replaces, serving the same queries:
     audit_events' columns and indexes (`LIKE ... INCLUDING INDEXES`), without the tree
     or the triggers. The goal is judged against it: it isolates what tamper evidence
     costs. Goal: at least 0.5 of it, and at least 5,000 events/s.
   - `bare`: the same table with only the primary key and the unique event id, shown so
     that what the filter indexes cost is in view too.
   Then concurrent callers against as many concurrent inserters into `ordinary` (the
   services report at once; appends serialise on the lock), twice: `--appenders`
   callers with batches of `--batch`, and `--reporters` callers with one event each (an
   ingested instance is one event). Each appends two ways: every batch in a transaction
   of its own (`log.append`), and through the service's group commit (`log.Appender`,
   one transaction for every batch that waited).
2. Inclusion-proof latency with the log at `--events` events (default 1,000,000):
   `log.inclusion_proof` for random leaves against the full size (one query for the
   O(log n) stored nodes, then the fold). Goal: p99 under 5 ms.
3. Full verification of that log: the audit service runs as its own process on the same
   database, a checkpoint is signed, and `medimg_cli.verify.verify` downloads every event
   and checkpoint, re-hashes every event, rebuilds the tree and checks signatures,
   consistency and sampled inclusion proofs. Goal: under 60 s.

Run from the repository root:

    .venv/bin/python bench/audit_log.py [--events 1000000] [--batch 1000] [--proofs 2000]
        [--single-events 5000] [--reporters 32]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import grpc
from google.protobuf import timestamp_pb2

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_audit import log
from medimg_cli.pki import create_signing_key
from medimg_cli.platform import EmbeddedPostgres, create_databases, with_database
from medimg_cli.verify import load_public_key, verify
from medimg_core import db

Row = tuple[object, ...]
WORKLOAD = "spiffe://medimg.local/ns/medimg/sa/ingest"
OPS = "spiffe://medimg.local/ns/medimg/sa/ops"

#: The baselines: audit_events as a plain table, with the same query indexes or with none.
_BASELINES = """
CREATE TABLE ordinary_events (LIKE audit_events INCLUDING INDEXES);
ALTER TABLE ordinary_events DROP COLUMN subtree_hashes;
CREATE TABLE bare_events (LIKE audit_events);
ALTER TABLE bare_events DROP COLUMN subtree_hashes, ADD PRIMARY KEY (log_index),
    ADD UNIQUE (event_id);
"""


def events(first: int, count: int) -> list[pb.AuditEvent]:
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return [
        pb.AuditEvent(
            event_id=str(uuid.uuid4()),
            event_time=now,
            actor=pb.Actor(workload=WORKLOAD, user=f"user-{n % 50}", roles=["clinician"]),
            action=pb.ACTION_READ,
            outcome=pb.OUTCOME_SUCCESS,
            resource=f"studies/1.2.826.0.1.{n}/series/1.2.826.0.2.{n}",
            patient_pseudonym=f"p-{n % 997}",
            service="ingest",
            method="/medimg.ingest.v1.IngestService/GetStudy",
            trace_id=f"{n:032x}",
        )
        for n in range(first, first + count)
    ]


def stored_rows(first: int, batch: list[pb.AuditEvent]) -> list[Row]:
    """The rows the log stores for these events, as a plain INSERT would be given them."""
    record = datetime.now(UTC)
    rows: list[Row] = []
    for i, (e, prepared) in enumerate(zip(batch, log.prepare(batch, "ingest"), strict=True)):
        event_id, event_time = uuid.UUID(e.event_id), e.event_time.ToDatetime(tzinfo=UTC)
        data = log.canonical(prepared, log_index=first + i, record_time=record.isoformat())
        rows.append(
            (
                first + i, event_id, event_time, record, "ingest", e.actor.workload,
                e.actor.user, list(e.actor.roles), e.action, e.outcome, e.resource,
                e.patient_pseudonym, e.service, e.method, e.trace_id, e.break_glass_reason,
                data, hashlib.sha256(b"\0" + data).digest(),
            )
        )  # fmt: skip
    return rows


async def plain_insert(conn: asyncpg.Connection, table: str, rows: list[Row]) -> None:
    async with conn.transaction():
        await conn.executemany(
            f"INSERT INTO {table} VALUES "
            "($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18)",
            rows,
        )


async def throughput(pool: asyncpg.Pool, events_total: int, batch: int) -> dict[str, float]:
    """Events/s of log.append and of each baseline, the same batches interleaved."""
    spent = {"append": 0.0, "ordinary_events": 0.0, "bare_events": 0.0}
    async with pool.acquire() as conn:
        for first in range(0, events_total, batch):
            chunk = events(first, min(batch, events_total - first))
            rows = stored_rows(first, chunk)
            kinds = list(spent)
            shift = (first // batch) % len(kinds)  # each goes first in turn
            for kind in kinds[shift:] + kinds[:shift]:
                started = time.perf_counter()
                if kind == "append":
                    await log.append(pool, chunk, "ingest")
                else:
                    await plain_insert(conn, kind, rows)
                spent[kind] += time.perf_counter() - started
    return {kind: events_total / seconds for kind, seconds in spent.items()}


async def concurrent_throughput(
    pool: asyncpg.Pool, events_total: int, batch: int, callers: int
) -> dict[str, float]:
    """Events/s of `callers` concurrent callers appending batches of `batch` events: each
    batch in a transaction of its own (`log.append`), through the service's group commit
    (`log.Appender`), and as plain inserts into the ordinary table (each its own
    transaction)."""
    appender = log.Appender(pool)

    async def append(chunk: list[pb.AuditEvent]) -> None:
        await log.append(pool, chunk, "ingest")

    async def group_append(chunk: list[pb.AuditEvent]) -> None:
        await appender.append(chunk, "ingest")

    rates = {}
    for kind, work in (("append", append), ("appender", group_append)):
        size = await log.tree_size(pool)
        chunks = [events(size + first, batch) for first in range(0, events_total, batch)]
        todo = iter(chunks)
        started = time.perf_counter()
        await asyncio.gather(*(_work_through(todo, work) for _ in range(callers)))
        rates[kind] = len(chunks) * batch / (time.perf_counter() - started)
    base = await pool.fetchval("SELECT coalesce(max(log_index) + 1, 0) FROM ordinary_events")
    chunks = [events(first, batch) for first in range(0, events_total, batch)]
    rows = [stored_rows(base + n * batch, chunk) for n, chunk in enumerate(chunks)]

    async def insert(chunk_rows: list[Row]) -> None:
        async with pool.acquire() as conn:
            await plain_insert(conn, "ordinary_events", chunk_rows)

    todo_rows = iter(rows)
    started = time.perf_counter()
    await asyncio.gather(*(_work_through(todo_rows, insert) for _ in range(callers)))
    rates["ordinary_events"] = len(rows) * batch / (time.perf_counter() - started)
    return rates


T = TypeVar("T")


async def _work_through(todo: Iterator[T], work: Callable[[T], Awaitable[None]]) -> None:
    for item in todo:  # callers share `todo`: each takes the next batch
        await work(item)


async def fill(pool: asyncpg.Pool, target: int, batch: int) -> float:
    size = await log.tree_size(pool)
    started = time.perf_counter()
    while size < target:
        count = min(batch, target - size)
        await log.append(pool, events(size, count), "ingest")
        size += count
    return time.perf_counter() - started


async def proof_latency(pool: asyncpg.Pool, size: int, proofs: int) -> dict[str, float]:
    rng = random.Random(7)
    samples = []
    for _ in range(proofs):
        index = rng.randrange(size)
        started = time.perf_counter_ns()
        proof = await log.inclusion_proof(pool, index, size)
        samples.append((time.perf_counter_ns() - started) / 1e6)
        assert proof
    return {
        "p50_ms": statistics.median(samples),
        "p99_ms": statistics.quantiles(samples, n=100, method="inclusive")[98],
        "max_ms": max(samples),
    }


class _AsOps(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Calls the service's own port as its sidecar would for the ops identity."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = (*(details.metadata or ()), ("x-forwarded-client-cert", f"URI={OPS}"))
        return await continuation(details._replace(metadata=metadata), request)


async def verification(url: str, state: Path) -> tuple[float, bool, int]:
    """Seconds to verify the whole log; whether it verified; how many events."""
    create_signing_key(state / "audit-key.pem", state / "audit-pub.pem")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "MEDIMG_AUDIT_PORT": str(port),
        "MEDIMG_AUDIT_DATABASE_URL": url,
        "MEDIMG_AUDIT_SIGNING_KEY_FILE": str(state / "audit-key.pem"),
        "MEDIMG_AUDIT_CHECKPOINT_INTERVAL_SECONDS": "86400",
    }
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "medimg_audit", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}",
            interceptors=[cast(Any, _AsOps())],
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        ) as channel:
            await asyncio.wait_for(channel.channel_ready(), 60)
            stub = pb_grpc.AuditServiceStub(channel)
            await stub.CreateCheckpoint(pb.CreateCheckpointRequest(), timeout=60)
            started = time.perf_counter()
            report = await verify(stub, load_public_key(state / "audit-pub.pem"))
            seconds = time.perf_counter() - started
            latest = await stub.GetCheckpoint(
                pb.GetCheckpointRequest(name="checkpoints/latest"), timeout=60
            )
        return seconds, report.ok, latest.tree_size
    finally:
        service.terminate()
        await service.wait()


async def run(args: argparse.Namespace) -> None:
    state = Path(tempfile.mkdtemp(prefix="medimg-bench-audit-"))
    server = EmbeddedPostgres(state / "postgres")
    try:
        await create_databases(server.url, ["bench_audit"])
        url = with_database(server.url, "bench_audit")
        owner = await db.connect(url, max_size=1)
        await db.migrate(owner, files("medimg_audit.migrations"))
        await owner.execute(_BASELINES)
        await owner.close()
        pool = await db.connect(url)
        try:
            print(f"machine: {os.cpu_count()} cpus; PostgreSQL embedded, durable commits")
            rates = await throughput(pool, args.throughput_events, args.batch)
            ratio = rates["append"] / rates["ordinary_events"]
            print(
                f"\n1. append throughput, {args.throughput_events} events "
                f"in batches of {args.batch}, interleaved, one caller at a time"
            )
            print(f"   bare table INSERT      {rates['bare_events']:>9.0f} events/s")
            print(f"   ordinary table INSERT  {rates['ordinary_events']:>9.0f} events/s")
            print(f"   log.append (Merkle)    {rates['append']:>9.0f} events/s")
            verdict = "PASS" if ratio >= 0.5 and rates["append"] >= 5000 else "FAIL"
            print(
                f"   ratio to ordinary {ratio:.2f} (goal >= 0.5 and >= 5000 events/s): "
                f"{verdict}; to bare {rates['append'] / rates['bare_events']:.2f}"
            )
            for events_total, batch, callers in (
                (args.throughput_events, args.batch, args.appenders),
                (args.single_events, 1, args.reporters),
            ):
                rates = await concurrent_throughput(pool, events_total, batch, callers)
                print(f"   {callers} concurrent callers, batches of {batch}:")
                print(f"   ordinary table INSERT  {rates['ordinary_events']:>9.0f} events/s")
                print(f"   log.append, each alone {rates['append']:>9.0f} events/s")
                print(f"   Appender (grouped)     {rates['appender']:>9.0f} events/s")
                print(
                    f"   ratio to ordinary: alone {rates['append'] / rates['ordinary_events']:.2f}"
                    f", grouped {rates['appender'] / rates['ordinary_events']:.2f}"
                )

            seconds = await fill(pool, args.events, args.batch)
            size = await log.tree_size(pool)
            print(f"\n2. inclusion proofs at {size} events ({seconds:.0f} s to fill)")
            latency = await proof_latency(pool, size, args.proofs)
            verdict = "PASS" if latency["p99_ms"] < 5 else "FAIL"
            print(
                f"   {args.proofs} proofs: p50 {latency['p50_ms']:.3f} ms, "
                f"p99 {latency['p99_ms']:.3f} ms, max {latency['max_ms']:.3f} ms "
                f"(goal p99 < 5 ms): {verdict}"
            )
            seconds, verified, events_verified = await verification(url, state)
            verdict = "PASS" if verified and seconds < 60 else "FAIL"
            print(
                f"\n3. full verification of {events_verified} events: {seconds:.1f} s, "
                f"{'verified' if verified else 'NOT verified'} (goal < 60 s): {verdict}"
            )
        finally:
            await pool.close()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="log size for the proofs")
    parser.add_argument("--throughput-events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--appenders", type=int, default=4, help="concurrent callers")
    parser.add_argument("--single-events", type=int, default=5000)
    parser.add_argument("--reporters", type=int, default=32, help="callers of one event each")
    parser.add_argument("--proofs", type=int, default=2000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
