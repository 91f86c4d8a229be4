"""`medimg ingest PATH...`: uploads DICOM files and folders to the running platform.

Files go over gRPC to ingest's sidecar as the `ops` identity, in streams of up to
`--batch-bytes` (ingest holds a stream in memory until every file of it is checked).
Every file gets its own result; the summary counts them and names the refused files with
their reasons. The exit status is 1 when any file was refused or conflicted.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from medimg.ingest.v1 import ingest_service_pb2 as pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from medimg_cli.demo import chunks
from medimg_cli.platform import read_status

_OUTCOMES = {v: pb.InstanceResult.Outcome.Name(v) for v in pb.InstanceResult.Outcome.values()}
_REFUSED = {pb.InstanceResult.OUTCOME_REJECTED, pb.InstanceResult.OUTCOME_CONFLICT}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (recursive)")
    parser.add_argument(
        "--batch-bytes", type=int, default=256 * 1024 * 1024, help="bytes per upload stream"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per upload stream")


def files_under(paths: Sequence[Path]) -> list[Path]:
    """Every regular file under `paths`, hidden ones left out, in a stable order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))
            )
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts)


def batches(files: Sequence[Path], limit: int) -> Iterator[list[Path]]:
    """Consecutive groups of files of at most `limit` bytes (a larger file goes alone)."""
    batch: list[Path] = []
    size = 0
    for path in files:
        length = path.stat().st_size
        if batch and size + length > limit:
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += length
    if batch:
        yield batch


@dataclass
class Summary:
    outcomes: Counter[str]
    refused: list[tuple[Path, str, str]]  # file, reason, message

    @property
    def ok(self) -> bool:
        return not self.refused


def upload(stub: pb_grpc.IngestServiceStub, files: Sequence[Path], args: argparse.Namespace,
           progress: Progress | None = None) -> Summary:  # fmt: skip
    summary = Summary(Counter(), [])
    task = progress.add_task("ingest", total=len(files)) if progress else None
    for batch in batches(files, args.batch_bytes):
        response: pb.UploadInstancesResponse = stub.UploadInstances(
            chunks(*(path.read_bytes() for path in batch)), timeout=args.timeout
        )
        for result in response.results:
            path = batch[result.index]
            summary.outcomes[_OUTCOMES[result.outcome]] += 1
            if result.outcome in _REFUSED:
                summary.refused.append((path, result.reason, result.message))
        if progress is not None and task is not None:
            progress.advance(task, len(batch))
    return summary


def command(args: argparse.Namespace, state: Path) -> int:
    status = read_status(state)
    console = Console(soft_wrap=True)  # paths and reasons stay whole, for grep
    if status is None:
        console.print("medimg is not running here: start it with `medimg up`", style="red")
        return 2
    try:
        files = files_under(args.paths)
    except FileNotFoundError as error:
        console.print(str(error), style="red")
        return 2
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(status["ca"]).read_bytes(),
        private_key=Path(status["ops_key"]).read_bytes(),
        certificate_chain=Path(status["ops_cert"]).read_bytes(),
    )
    columns: list[Any] = [
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(),
    ]  # fmt: skip
    with (
        grpc.secure_channel(status["services"]["ingest"]["sidecar"], credentials) as channel,
        Progress(*columns, console=console, transient=True) as progress,
    ):
        try:
            summary = upload(pb_grpc.IngestServiceStub(channel), files, args, progress)
        except grpc.RpcError as error:
            console.print(f"upload failed: {error.code().name}: {error.details()}", style="red")
            return 1
    _print(console, len(files), summary)
    return 0 if summary.ok else 1


def _print(console: Console, total: int, summary: Summary) -> None:
    table = Table(title=f"{total} files")
    table.add_column("outcome")
    table.add_column("files", justify="right")
    for outcome, count in sorted(summary.outcomes.items()):
        table.add_row(outcome.removeprefix("OUTCOME_").lower(), str(count))
    console.print(table)
    for path, reason, message in summary.refused:
        console.print(f"[red]{reason}[/red] {path}: {message}", highlight=False)
