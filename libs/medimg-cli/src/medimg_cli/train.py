"""`medimg train list | get JOB | watch JOB`: the training jobs of the running platform.

The calls go over gRPC to training's sidecar as the `ops` identity, like `medimg ingest`.
`watch` follows `WatchTrainingJob` until the job ends: on a terminal, live bars for the
epochs (with the last validation metrics) and the steps (loss, images/s, the ETA the
worker estimates); anywhere else (a log, CI, a pipe), plain `key=value` lines, at most one
every `--interval` seconds apart from changes of state, epoch or metrics. A stream cut by
a restart of the training service is watched again (the service replays the latest
report). The exit status is the job's end: 0 SUCCEEDED, 1 FAILED (its reason and the
workers' last error shown), 3 CANCELLED; 2 when the job cannot be watched at all (no
platform, no such job, the call refused or timed out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from medimg.training.v1 import training_service_pb2 as pb
from medimg.training.v1 import training_service_pb2_grpc as pb_grpc
from medimg_cli.platform import read_status

State = pb.TrainingJob.State
_TERMINAL = frozenset({State.STATE_SUCCEEDED, State.STATE_FAILED, State.STATE_CANCELLED})
#: Exit status per final state; anything that is not SUCCEEDED is non-zero.
EXIT_CODES: Mapping[int, int] = {
    State.STATE_SUCCEEDED: 0,
    State.STATE_FAILED: 1,
    State.STATE_CANCELLED: 3,
}
EXIT_UNWATCHABLE = 2
_PREFIX = "trainingJobs/"
#: Seconds between two tries to watch again after the service went away.
_RETRY_SECONDS = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="train_command", required=True)
    listing = commands.add_parser("list", help="training jobs, most recent first")
    listing.add_argument("--limit", type=int, default=20, help="jobs to show (default 20)")
    listing.add_argument("--json", action="store_true", help="the jobs as JSON, one per line")
    get = commands.add_parser("get", help="one training job, as JSON")
    get.add_argument("job", help="trainingJobs/ID or ID")
    watch = commands.add_parser(
        "watch", help="follow a job's progress until it ends; the exit status is its end"
    )
    watch.add_argument("job", help="trainingJobs/ID or ID")
    watch.add_argument(
        "--plain",
        action="store_true",
        help="plain lines even on a terminal (the default when stdout is not one)",
    )
    watch.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="plain lines: seconds between two lines that only report more steps (default 2)",
    )
    for command in (listing, get, watch):
        command.add_argument(
            "--timeout",
            type=float,
            default=86400.0 if command is watch else 30.0,
            help="seconds before giving up (default: a day for watch, 30 s otherwise)",
        )


def job_name(text: str) -> str:
    """`trainingJobs/ID` from either that or the bare ID."""
    return text if text.startswith(_PREFIX) else _PREFIX + text


def command(args: argparse.Namespace, state: Path) -> int:
    out = Console(soft_wrap=True, highlight=False)
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    status = read_status(state)
    if status is None:
        err.print("medimg is not running here: start it with `medimg up`", style="red")
        return EXIT_UNWATCHABLE
    try:
        with _channel(status) as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            if args.train_command == "list":
                return _list(stub, args, out)
            if args.train_command == "get":
                job = stub.GetTrainingJob(
                    pb.GetTrainingJobRequest(name=job_name(args.job)), timeout=args.timeout
                )
                out.print_json(json_format.MessageToJson(job))
                return 0
            return _watch(stub, args, out)
    except grpc.RpcError as error:
        err.print(f"{args.train_command} failed: {describe(error)}", style="red")
        return EXIT_UNWATCHABLE


@contextmanager
def _channel(status: Mapping[str, Any]) -> Iterator[grpc.Channel]:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(status["ca"]).read_bytes(),
        private_key=Path(status["ops_key"]).read_bytes(),
        certificate_chain=Path(status["ops_cert"]).read_bytes(),
    )
    with grpc.secure_channel(status["services"]["training"]["sidecar"], credentials) as channel:
        yield channel


def describe(error: grpc.RpcError) -> str:
    """`CODE REASON: message` of a gRPC error (the reason from its ErrorInfo, when it has one)."""
    call: Any = error
    reason = ""
    status = rpc_status.from_call(call)
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = f" {info.reason}"
    return f"{call.code().name}{reason}: {call.details()}"


# list ---------------------------------------------------------------------------------


def _list(stub: pb_grpc.TrainingServiceStub, args: argparse.Namespace, out: Console) -> int:
    found: list[pb.TrainingJob] = []
    token = ""
    while len(found) < args.limit:
        page: pb.ListTrainingJobsResponse = stub.ListTrainingJobs(
            pb.ListTrainingJobsRequest(
                page_size=min(args.limit - len(found), 100), page_token=token
            ),
            timeout=args.timeout,
        )
        found += page.training_jobs
        token = page.next_page_token
        if not token:
            break
    if args.json:
        for job in found:
            out.print(json_format.MessageToJson(job, indent=None), markup=False)
        return 0
    columns = ("JOB", "STATE", "DATASET", "NETWORK", "EPOCH", "STEP", "MODEL VERSION", "CREATOR")
    rows = [
        (
            job.name,
            state_name(job.state),
            job.spec.dataset,
            job.spec.network.name,
            f"{job.progress.epoch}/{job.progress.epochs}",
            f"{job.progress.step}/{job.progress.total_steps}",
            job.model_version or "-",
            job.creator,
        )
        for job in found
    ]
    if out.is_terminal:
        table = Table(title=f"{len(found)} training jobs", title_justify="left")
        for column in columns:
            # Names stay whole (they are what the other commands take); the rest may wrap.
            table.add_column(column.lower(), no_wrap=column in ("JOB", "MODEL VERSION"))
        for row in rows:
            table.add_row(*row)
        out.print(table)
    else:
        # Off a terminal: columns as kubectl prints them, nothing cut, for grep and awk.
        widths = [max(len(text) for text in column) for column in zip(columns, *rows, strict=True)]
        for row in (columns, *rows):
            line = "  ".join(t.ljust(w) for t, w in zip(row, widths, strict=True))
            out.print(line.rstrip(), markup=False)
    if token:
        out.print(f"(more than {len(found)} jobs: --limit)", style="yellow")
    return 0


# watch --------------------------------------------------------------------------------


def state_name(state: int) -> str:
    return State.Name(state).removeprefix("STATE_")


def eta(report: pb.TrainingProgress) -> str:
    if not report.HasField("eta"):
        return "?"
    return str(dt.timedelta(seconds=round(report.eta.ToTimedelta().total_seconds())))


def metrics_text(report: pb.TrainingProgress, separator: str = " ") -> str:
    return " ".join(f"{k}{separator}{v:.4f}" for k, v in sorted(report.metrics.items()))


def epochs_done(report: pb.TrainingProgress) -> int:
    if report.state == State.STATE_SUCCEEDED:
        return report.epochs
    return max(report.epoch - 1, 0)


class View(Protocol):
    def show(self, report: pb.TrainingProgress) -> None: ...

    def note(self, text: str) -> None: ...


class Lines:
    """One plain line per report worth one: a new state, epoch or metrics, or `interval`
    seconds since the last line; never control characters."""

    def __init__(self, out: Console, interval: float) -> None:
        self._out = out
        self._interval = interval
        self._shown: tuple[Any, ...] | None = None
        self._at = 0.0

    def show(self, report: pb.TrainingProgress) -> None:
        key = (report.state, report.epoch, tuple(sorted(report.metrics.items())))
        now = time.monotonic()
        if key == self._shown and now - self._at < self._interval:
            return
        self._shown, self._at = key, now
        fields = [
            f"{report.training_job} state={state_name(report.state)}",
            f"epoch={report.epoch}/{report.epochs}",
            f"step={report.step}/{report.total_steps}",
        ]
        if report.step:
            fields += [
                f"loss={report.loss:.4f}",
                f"images_per_second={report.images_per_second:.1f}",
                f"eta={eta(report)}",
            ]
        if report.metrics:
            fields.append(metrics_text(report, "="))
        self._out.print(" ".join(fields), markup=False)

    def note(self, text: str) -> None:
        self._out.print(text, markup=False)


class Bars:
    """Two live bars: epochs (with the last validation metrics) and steps."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._epochs: TaskID = progress.add_task("epochs", total=None, info="")
        self._steps: TaskID = progress.add_task("steps", total=None, info="")

    def show(self, report: pb.TrainingProgress) -> None:
        state = state_name(report.state)
        self._progress.update(
            self._epochs,
            total=report.epochs or None,
            completed=epochs_done(report),
            info=f"{state}  {metrics_text(report)}".rstrip(),
        )
        info = ""
        if report.step:
            info = (
                f"loss {report.loss:.4f}  {report.images_per_second:.1f} images/s  "
                f"ETA {eta(report)}"
            )
        self._progress.update(
            self._steps, total=report.total_steps or None, completed=report.step, info=info
        )

    def note(self, text: str) -> None:
        self._progress.console.print(text, markup=False)


def follow(
    stub: pb_grpc.TrainingServiceStub, name: str, view: View, deadline: float
) -> pb.TrainingProgress:
    """The job's last report, once it carries a final state; every report goes to `view`.

    UNAVAILABLE (the training service restarting, its sidecar draining) and a stream that
    ends early are watched again until `deadline` (time.monotonic()). So is UNIMPLEMENTED
    once the stream has been lost: a service that is back but still starting listens (health
    NOT_SERVING) before its handlers are in, and answers that meanwhile."""
    lost = False
    while True:
        last: pb.TrainingProgress | None = None
        try:
            for report in stub.WatchTrainingJob(
                pb.WatchTrainingJobRequest(name=name), timeout=max(deadline - time.monotonic(), 0)
            ):
                view.show(report)
                last, lost = report, False
        except grpc.RpcError as error:
            if not _transient(error, starting=lost) or time.monotonic() + _RETRY_SECONDS > deadline:
                raise
            if not lost:
                view.note(f"lost the progress stream ({describe(error)}); watching again")
            lost = True
            time.sleep(_RETRY_SECONDS)
            continue
        if last is not None and last.state in _TERMINAL:
            return last
        if last is None:  # an empty stream, ended cleanly: ask again, but not in a hot loop
            time.sleep(_RETRY_SECONDS)


def _watch(stub: pb_grpc.TrainingServiceStub, args: argparse.Namespace, out: Console) -> int:
    name = job_name(args.job)
    deadline = time.monotonic() + args.timeout
    # Existence (and permission) first, so a wrong name fails at once, not after a stream.
    stub.GetTrainingJob(pb.GetTrainingJobRequest(name=name), timeout=args.timeout)
    if args.plain or not out.is_terminal:
        follow(stub, name, Lines(out, args.interval), deadline)
    else:
        columns: list[Any] = [
            TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
        ]  # fmt: skip
        with Progress(*columns, console=out, transient=False) as progress:
            follow(stub, name, Bars(progress), deadline)
    job = final_job(stub, name, deadline)
    print_end(out, job)
    return EXIT_CODES[job.state]


def final_job(stub: pb_grpc.TrainingServiceStub, name: str, deadline: float) -> pb.TrainingJob:
    """The ended job, asked again while the service is away (it may stop right after the
    job's last report) or back but still starting, until `deadline`."""
    while True:
        try:
            job: pb.TrainingJob = stub.GetTrainingJob(
                pb.GetTrainingJobRequest(name=name), timeout=max(deadline - time.monotonic(), 5)
            )
            return job
        except grpc.RpcError as error:
            if not _transient(error, starting=True) or time.monotonic() + _RETRY_SECONDS > deadline:
                raise
            time.sleep(_RETRY_SECONDS)


def _transient(error: grpc.RpcError, *, starting: bool) -> bool:
    """UNAVAILABLE: the service restarting, its sidecar draining. UNIMPLEMENTED, when the
    service may be starting: it listens before its handlers are in."""
    code: Any = error.code()
    return code == grpc.StatusCode.UNAVAILABLE or (
        starting and code == grpc.StatusCode.UNIMPLEMENTED
    )


def print_end(out: Console, job: pb.TrainingJob) -> None:
    state = state_name(job.state)
    took = ""
    if job.HasField("start_time") and job.HasField("end_time"):
        seconds = (job.end_time.ToDatetime() - job.start_time.ToDatetime()).total_seconds()
        took = f" in {dt.timedelta(seconds=round(seconds))}"
    if job.state == State.STATE_SUCCEEDED:
        metrics = metrics_text(job.progress, "=")
        out.print(
            f"{job.name} {state}{took}: {job.model_version}" + (f" ({metrics})" if metrics else ""),
            style="green",
            markup=False,
        )
    elif job.state == State.STATE_FAILED:
        out.print(
            f"{job.name} {state}{took}: {job.error_reason}: {job.error_message}",
            style="red",
            markup=False,
        )
    else:
        out.print(f"{job.name} {state}{took}", style="yellow", markup=False)
