"""The ingest pipeline alone: CPU per instance of `Pipeline.ingest`, against pydicom reading
and writing the same files, side by side in one run.

Prepares N distinct 512x512 CT instances in memory (copies of `693_UNCI.dcm` from the
`pydicom-data` package, as `ingest_throughput.py` prepares them: new Study/Series/SOP
Instance UIDs, studies of 30 instances each with its own PatientID and PatientName), starts
an embedded PostgreSQL and Redis in a temporary directory, and measures two modes, each
with the same number of concurrent callers (asyncio tasks) over the same worker threads:

    pydicom-read-write  per file, `pydicom.dcmread` and `pydicom.dcmwrite` to memory in a
                        worker thread: the least any DICOM store does with a file
    pipeline            per file, `Pipeline.ingest([file])` as one upload stream or one
                        C-STORE calls it: validation, de-identification, a durable
                        (fsynced) object, the audit report, the index transaction and the
                        announcement on Redis

The audit report goes to a hook that only counts (audit's own cost is measured by
`ingest_throughput.py`, through the mesh). The modes are interleaved in rounds, each round
on fresh instances, the order alternating. Shown per mode: the CPU time of this process
(user + system, all threads) per instance, that of PostgreSQL and Redis, the rate, and the
ratio of the pipeline's CPU per instance to the baseline's (median of the rounds); and how
many audit reports and index transactions the pipeline made per instance (group commit:
fewer than one when concurrent calls share them).

Run from the repository root:

    .venv/bin/python bench/ingest_pipeline.py [--instances 600] [--rounds 5] \\
        [--concurrency 4] [--threads 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as pyplatform
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from io import BytesIO
from pathlib import Path
from typing import Any

import asyncpg
import pydicom
import redis.asyncio as aioredis
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from medimg_cli.platform import EmbeddedPostgres, redis_server
from medimg_core import db
from medimg_core import redis as medimg_redis
from medimg_core.audit import Access
from medimg_ingest import deid
from medimg_ingest.identities import IdentityVault
from medimg_ingest.objects import LocalObjectStore
from medimg_ingest.pipeline import Outcome, Pipeline

SOURCE_FILE = "693_UNCI.dcm"
INSTANCES_PER_STUDY = 30
BASELINE = "pydicom-read-write"
PIPELINE = "pipeline"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def source() -> Dataset:
    path = get_testdata_file(SOURCE_FILE, download=False)
    if path is None:
        sys.exit(f"{SOURCE_FILE} not found: install the `pydicom-data` package (make setup)")
    return pydicom.dcmread(str(path))


def prepare(template: Dataset, tag: str, count: int) -> Iterator[bytes]:
    """`count` copies of `template` with new UIDs; a new study (own patient) every
    INSTANCES_PER_STUDY instances, one series per study."""
    study_uid = series_uid = ""
    for n in range(count):
        study, number = divmod(n, INSTANCES_PER_STUDY)
        if number == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
        template.StudyInstanceUID = study_uid
        template.SeriesInstanceUID = series_uid
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.PatientID = f"BENCH-{tag}-{study:03d}"
        template.PatientName = f"Bench^{tag}^Study{study:03d}"
        template.InstanceNumber = number + 1
        out = BytesIO()
        pydicom.dcmwrite(out, template, enforce_file_format=True)
        yield out.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def read_write(data: bytes) -> bytes:
    out = BytesIO()
    pydicom.dcmwrite(out, pydicom.dcmread(BytesIO(data)))
    return out.getvalue()


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu(root: int) -> float:
    """CPU seconds of a process, its live children and the children it has reaped."""

    def stat(pid: int) -> list[str]:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text[text.rindex(")") + 2 :].split()

    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(entry.name) == root:
            total += sum(int(x) for x in fields[11:15]) / CLOCK_TICKS
        elif int(fields[1]) == root:
            total += sum(int(x) for x in fields[11:13]) / CLOCK_TICKS
    return total


class Counted:
    """The audit hook: counts reports and accesses, records nothing."""

    def __init__(self) -> None:
        self.reports = 0
        self.accesses = 0

    async def __call__(self, accesses: Sequence[Access]) -> None:
        self.reports += 1
        self.accesses += len(accesses)


async def concurrently(
    call: Callable[[bytes], Awaitable[None]], instances: Sequence[bytes], concurrency: int
) -> None:
    """`concurrency` callers, each taking the next instance until none is left."""
    queue = iter(instances)

    async def caller() -> None:
        for data in queue:
            await call(data)

    await asyncio.gather(*(caller() for _ in range(concurrency)))


@dataclass
class Services:
    """PostgreSQL (with the ingest schema), Redis and the worker threads of one run."""

    pool: asyncpg.Pool
    events: aioredis.Redis
    executor: ThreadPoolExecutor
    pids: list[int]  # PostgreSQL's postmaster and Redis, for their CPU time


@asynccontextmanager
async def services(state: Path, threads: int) -> AsyncIterator[Services]:
    postgres = EmbeddedPostgres(state / "postgres")
    port = free_port()
    redis = redis_server(state / "redis", port)
    redis.start()
    executor = ThreadPoolExecutor(threads, "ingest")
    pool = await db.connect(postgres.url, max_size=4)
    events = medimg_redis.connect(f"redis://127.0.0.1:{port}/0")
    try:
        await db.migrate(pool, files("medimg_ingest.migrations"))
        postmaster = int((state / "postgres" / "postmaster.pid").read_text().split()[0])
        yield Services(pool, events, executor, [postmaster, redis.popen.pid if redis.popen else 0])
    finally:
        await events.aclose()
        await pool.close()
        executor.shutdown()
        redis.stop(grace=5)
        postgres.stop()


async def measure(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    load = os.getloadavg()
    template = source()
    per_round = args.instances // args.rounds
    warmup = 8
    print(f"preparing {args.instances + warmup} instances per mode", file=sys.stderr)
    baseline_files = list(prepare(template, "B", per_round))
    pipeline_files = list(prepare(template, "P", args.instances + warmup))
    async with services(state, args.threads) as running:
        audit = Counted()
        pipeline = Pipeline(
            pool=running.pool,
            objects=LocalObjectStore(state / "objects"),
            events=running.events,
            executor=running.executor,
            report=audit,
            policy=deid.Policy(),
            deid_key=os.urandom(32),
            vault=IdentityVault(os.urandom(32)),
        )
        loop = asyncio.get_running_loop()
        stored: list[str] = []

        async def baseline(data: bytes) -> None:
            await loop.run_in_executor(running.executor, read_write, data)

        async def ingest(data: bytes) -> None:
            [result] = await pipeline.ingest([data])
            if result.outcome is not Outcome.STORED:
                raise RuntimeError(f"not stored: {result.outcome} {result.reason}")
            stored.append(result.instance.rsplit("/", 1)[-1])

        await concurrently(baseline, baseline_files[:warmup], args.concurrency)
        await concurrently(ingest, pipeline_files[:warmup], args.concurrency)
        fresh = iter(pipeline_files[warmup:])
        rounds: dict[str, list[dict[str, float]]] = {BASELINE: [], PIPELINE: []}
        reports = transactions = 0
        for number in range(args.rounds):
            order = [BASELINE, PIPELINE] if number % 2 == 0 else [PIPELINE, BASELINE]
            for mode in order:
                if mode == BASELINE:
                    rounds[mode].append(
                        await timed(baseline, baseline_files, args.concurrency, running.pids)
                    )
                    continue
                reports_before = audit.reports
                stored.clear()
                batch = [next(fresh) for _ in range(per_round)]
                rounds[mode].append(await timed(ingest, batch, args.concurrency, running.pids))
                reports += audit.reports - reports_before
                # Rows written by one transaction share its id (xmin).
                transactions += await running.pool.fetchval(
                    "SELECT count(DISTINCT xmin::text) FROM instances "
                    "WHERE sop_instance_uid = ANY($1::text[])",
                    stored,
                )
            print(f"  round {number + 1}/{args.rounds} done ({' '.join(order)})", file=sys.stderr)
    measured = per_round * args.rounds
    return {
        "machine": {
            "nproc": len(os.sched_getaffinity(0)),
            "platform": pyplatform.platform(),
            "python": pyplatform.python_version(),
            "pydicom": pydicom.__version__,
            "loadavg_before": load,
        },
        "config": {
            "instances": measured,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "threads": args.threads,
            "file_bytes": len(pipeline_files[0]),
        },
        "rounds": rounds,
        "audit_reports_per_instance": reports / measured,
        "index_transactions_per_instance": transactions / measured,
    }


async def timed(
    call: Callable[[bytes], Awaitable[None]],
    batch: Sequence[bytes],
    concurrency: int,
    service_pids: Sequence[int],
) -> dict[str, float]:
    """Wall time, rate and CPU per instance (this process; PostgreSQL and Redis) of a batch."""
    cpu, service_cpu = own_cpu(), sum(map(tree_cpu, service_pids))
    start = time.perf_counter()
    await concurrently(call, batch, concurrency)
    wall = time.perf_counter() - start
    cpu = own_cpu() - cpu
    service_cpu = sum(map(tree_cpu, service_pids)) - service_cpu
    return {
        "instances": len(batch),
        "wall_s": wall,
        "cpu_ms": cpu * 1000 / len(batch),
        "services_cpu_ms": service_cpu * 1000 / len(batch),
        "rate": len(batch) / wall,
    }


def summary(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    table = {}
    for mode, rounds in result["rounds"].items():
        instances = sum(r["instances"] for r in rounds)
        table[mode] = {
            "instances": instances,
            "cpu_ms": statistics.median(r["cpu_ms"] for r in rounds),
            "services_cpu_ms": statistics.median(r["services_cpu_ms"] for r in rounds),
            "median_rate": statistics.median(r["rate"] for r in rounds),
            "overall_rate": instances / sum(r["wall_s"] for r in rounds),
        }
    return table


def report(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    table = summary(result)
    ratios = [
        p["cpu_ms"] / b["cpu_ms"]
        for p, b in zip(result["rounds"][PIPELINE], result["rounds"][BASELINE], strict=True)
    ]
    lines = [
        f"machine: {m['nproc']} cpus, {m['platform']}, load before "
        + " ".join(f"{x:.2f}" for x in m["loadavg_before"]),
        f"python {m['python']}, pydicom {m['pydicom']}",
        f"{c['instances']} instances per mode ({SOURCE_FILE}, 512x512 CT, {c['file_bytes']} "
        f"bytes), {c['rounds']} interleaved rounds, {c['concurrency']} concurrent callers, "
        f"{c['threads']} worker threads",
        "",
        f"{'mode':<20} {'inst':>5} {'cpu ms/inst':>12} {'pg+redis ms':>12} "
        f"{'median/s':>9} {'overall/s':>10}",
    ]
    for mode, row in table.items():
        lines.append(
            f"{mode:<20} {row['instances']:>5} {row['cpu_ms']:>12.2f} "
            f"{row['services_cpu_ms']:>12.2f} {row['median_rate']:>9.1f} "
            f"{row['overall_rate']:>10.1f}"
        )
    lines += [
        "",
        "cpu ms/inst: this process (all threads), median of rounds; pg+redis: PostgreSQL and Redis",
        f"pipeline / {BASELINE}, CPU per instance: {statistics.median(ratios):.2f}x "
        f"(rounds: {' '.join(f'{r:.2f}' for r in ratios)})",
        f"pipeline group commit: {result['audit_reports_per_instance']:.2f} audit reports and "
        f"{result['index_transactions_per_instance']:.2f} index transactions per instance",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=600, help="timed instances per mode")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent callers")
    parser.add_argument("--threads", type=int, default=4, help="worker threads")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medimg-bench-") as state:
        result = asyncio.run(measure(args, Path(state)))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
