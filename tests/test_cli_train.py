"""`medimg train watch | get | list` against the running platform, as a user runs them: real
jobs on real ingested DICOM, watched on a pseudo-terminal (live bars) and through a pipe
(plain lines), to SUCCEEDED (exit 0), to FAILED with the error shown (a worker killed),
CANCELLED, and jobs that do not exist."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg_cli.platform import Platform
from tests.helpers import bearer, fresh_instance, upload

pytestmark = pytest.mark.slow

#: A small network on small images: a job of a few steps takes seconds, not minutes.
SPEC: dict[str, Any] = {
    "network": {"name": "DenseNet"},
    "imageSize": [32, 32],
    "batchSize": 2,
    "seed": "5",
    "model": "cli-train",
}


def medimg(platform: Platform, *args: str) -> list[str]:
    return [sys.executable, "-m", "medimg_cli.cli", "--state", str(platform.state), *args]


def run(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        medimg(platform, *args), capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def dataset(platform: Platform) -> str:
    """A dataset version of 12 ingested series (CT and MR), each of its own patient. Splits
    follow keyed pseudonyms (a new key per platform): half and half leaves neither split
    empty but once in 2**11 runs."""
    files = [
        fresh_instance(name, PatientID=f"cli-train-{index}")
        for index, name in enumerate(["CT_small.dcm", "MR_small.dcm"] * 6)
    ]
    answer = upload(platform, *files)
    assert all(r.outcome == ingest_pb.InstanceResult.OUTCOME_STORED for r in answer.results)
    items = [
        {"series": r.instance.rsplit("/instances/", 1)[0], "label": ["CT", "MR"][r.index % 2]}
        for r in answer.results
    ]
    body = {
        "task": "TASK_CLASSIFICATION",
        "classNames": ["CT", "MR"],
        "items": items,
        "splitFractions": {"train": 0.5, "validation": 0.5, "test": 0},
    }
    created = httpx.post(
        f"{platform.gateway_url}/v1/datasets",
        params={"datasetId": "cli-train"},
        json=body,
        headers=bearer(platform, "max", "ml-engineer"),
        timeout=60,
    )
    assert created.status_code == 200, created.text
    return str(created.json()["name"])


def create_job(platform: Platform, dataset: str, **spec: Any) -> str:
    created = httpx.post(
        f"{platform.gateway_url}/v1/trainingJobs",
        json={"spec": {**SPEC, "dataset": dataset, **spec}},
        headers=bearer(platform, "max", "ml-engineer"),
        timeout=60,
    )
    assert created.status_code == 200, created.text
    return str(created.json()["name"])


class Terminal:
    """A command on a pseudo-terminal, its output collected as it comes."""

    def __init__(self, command: list[str]) -> None:
        leader, follower = pty.openpty()
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
        env.pop("NO_COLOR", None)
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env
        )
        os.close(follower)
        self._leader = leader
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._leader, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            self._chunks.append(chunk)
        os.close(self._leader)

    def wait(self, timeout: float) -> tuple[int, str]:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code, b"".join(self._chunks).decode(errors="replace")


def worker_pid(platform: Platform, job: str) -> int | None:
    """The pid of the job's worker process, found by the config file on its command line."""
    config = str(platform.state / "training" / "jobs" / job.removeprefix("trainingJobs/"))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"{config}/worker.json" in command and "medimg_training.worker" in command:
            return int(entry.name)
    return None


def lines_until(stream: Any, pattern: str, timeout: float) -> Iterator[str]:
    """Lines of `stream` up to and including the first that matches `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise AssertionError(f"the stream ended before a line matching {pattern!r}")
        yield line
        if re.search(pattern, line):
            return
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s")


def test_watch_follows_a_job_to_success_on_a_terminal_and_in_plain_lines(
    platform: Platform, dataset: str
) -> None:
    job = create_job(platform, dataset, epochs=2)
    # Two watchers of the same live job: one on a terminal, one through a pipe.
    terminal = Terminal(medimg(platform, "train", "watch", job))
    piped = run(platform, "train", "watch", job.removeprefix("trainingJobs/"), "--interval", "0")
    code, output = terminal.wait(timeout=60)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)  # colours and cursor moves out

    assert piped.returncode == 0, piped.stdout + piped.stderr
    lines = piped.stdout.splitlines()
    assert "\x1b" not in piped.stdout  # no colours, no cursor moves: a log stays readable
    assert all(line.startswith(f"{job} state=") for line in lines[:-1]), lines
    stepping = [
        re.search(
            r"state=RUNNING epoch=(\d+)/2 step=(\d+)/(\d+) loss=\d+\.\d+ "
            r"images_per_second=(\d+\.\d) eta=\d+:\d\d:\d\d",
            line,
        )
        for line in lines
    ]
    steps = [m for m in stepping if m]
    assert steps, lines
    total = int(steps[0][3])
    # --interval 0: every step (an epoch's last step again with its validation metrics).
    numbers = [int(m[2]) for m in steps]
    assert numbers == sorted(numbers) and set(numbers) == set(range(1, total + 1)), numbers
    assert {int(m[1]) for m in steps} == {1, 2}
    assert all(float(m[4]) > 0 for m in steps)
    assert any(re.search(r"accuracy=\d\.\d{4}", line) for line in lines), lines  # validation
    done = json.loads(run(platform, "train", "get", job).stdout)
    assert done["state"] == "STATE_SUCCEEDED"
    assert re.fullmatch(
        rf"{job} SUCCEEDED in \d+:\d\d:\d\d: {done['modelVersion']} \(accuracy=\d\.\d{{4}}.*\)",
        lines[-1],
    ), lines[-1]

    # The terminal got live bars (redrawn in place) and the same end.
    assert code == 0, screen
    assert "\x1b[" in output
    assert re.search(r"epochs .*2/2 +SUCCEEDED", screen), screen
    assert re.search(rf"steps .*{total}/{total} +loss \d+\.\d{{4}} +\d+\.\d images/s", screen)
    assert f"{job} SUCCEEDED" in screen and done["modelVersion"] in screen

    listed = run(platform, "train", "list", "--json", "--limit", "200")
    assert listed.returncode == 0, listed.stderr
    jobs = {j["name"]: j for j in map(json.loads, listed.stdout.splitlines())}
    assert jobs[job]["state"] == "STATE_SUCCEEDED"
    assert jobs[job]["spec"]["dataset"] == dataset
    table = run(platform, "train", "list")
    assert re.search(
        rf"^{job} +SUCCEEDED +{dataset} +DenseNet +2/2 +{total}/{total} +"
        rf"{done['modelVersion']} +max$",
        table.stdout,
        re.MULTILINE,
    ), table.stdout


def test_watch_exits_non_zero_with_the_error_when_the_worker_dies(
    platform: Platform, dataset: str
) -> None:
    job = create_job(platform, dataset, epochs=2000)  # runs until killed
    watcher = subprocess.Popen(
        medimg(platform, "train", "watch", job, "--interval", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    guard = threading.Timer(240, watcher.kill)  # a silent watcher must not hang the suite
    guard.start()
    try:
        assert watcher.stdout is not None
        seen = list(lines_until(watcher.stdout, r"state=RUNNING .* loss=", timeout=120))
        pid = worker_pid(platform, job)
        assert pid is not None, seen
        os.kill(pid, signal.SIGKILL)
        rest, errors = watcher.communicate(timeout=60)
    finally:
        guard.cancel()
        if watcher.poll() is None:
            watcher.kill()
        # Whatever happened, this job must not hold the platform's one running slot.
        httpx.post(
            f"{platform.gateway_url}/v1/{job}:cancel",
            json={},
            headers=bearer(platform, "max", "ml-engineer"),
            timeout=60,
        )
    assert watcher.returncode == 1, rest + errors
    assert re.search(
        rf"^{job} FAILED in \d+:\d\d:\d\d: WORKER_FAILED: .*SIGKILL", rest, re.MULTILINE
    ), rest


def test_a_job_past_its_max_runtime_fails_deadline_exceeded(
    platform: Platform, dataset: str
) -> None:
    job = create_job(platform, dataset, epochs=2000, maxRuntime="6s")  # would run for long
    watcher = subprocess.run(
        medimg(platform, "train", "watch", job, "--interval", "0"),
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert watcher.returncode == 1, watcher.stdout + watcher.stderr
    assert re.search(
        # Stopped soon after its 6 s (the cancel grace, a loaded machine), not after 2000 epochs.
        rf"^{job} FAILED in 0:00:(0[6-9]|1\d|2\d): DEADLINE_EXCEEDED: .*max_runtime \(0:00:06\)",
        watcher.stdout,
        re.MULTILINE,
    ), watcher.stdout
    assert json.loads(run(platform, "train", "get", job).stdout)["spec"]["maxRuntime"] == "6s"
    assert worker_pid(platform, job) is None


def test_watch_goes_on_through_a_restart_of_the_training_service(
    platform: Platform, dataset: str
) -> None:
    # The service ends the watch streams and stops the workers as soon as it drains (not at
    # the end of its grace), and resumes the job from its last checkpoint when it is back;
    # the watcher is told to watch again and does.
    # Long enough (some seconds of training) not to end before the service is stopped.
    job = create_job(platform, dataset, epochs=300, resumeOnRestart=True)
    watcher = subprocess.Popen(
        medimg(platform, "train", "watch", job, "--interval", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    guard = threading.Timer(400, watcher.kill)
    guard.start()
    try:
        assert watcher.stdout is not None
        list(lines_until(watcher.stdout, r"state=RUNNING epoch=2/300 .* loss=", timeout=120))
        training = platform.services["training"]
        try:
            assert training.stop(grace=30) == 0
        finally:
            # Other tests share the platform: training comes back whatever happened above.
            platform.start_service("training")
            platform.wait_until_ready(120)
        rest, errors = watcher.communicate(timeout=300)
    finally:
        guard.cancel()
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, rest + errors
    assert re.search(
        r"^lost the progress stream \(UNAVAILABLE SERVICE_DRAINING: .*\); watching again$",
        rest,
        re.M,
    )
    assert re.search(
        rf"^{job} SUCCEEDED in .*: registeredModels/cli-train/versions/\d+", rest, re.M
    )
    done = json.loads(run(platform, "train", "get", job).stdout)
    assert done["attempts"] == 2  # resumed once, from its checkpoint


def test_watch_of_a_cancelled_job_exits_non_zero(platform: Platform, dataset: str) -> None:
    job = create_job(platform, dataset, epochs=2000)
    cancelled = httpx.post(
        f"{platform.gateway_url}/v1/{job}:cancel",
        json={},
        headers=bearer(platform, "max", "ml-engineer"),
        timeout=60,
    )
    assert cancelled.status_code == 200, cancelled.text
    answer = run(platform, "train", "watch", job)
    assert answer.returncode == 3, answer.stdout + answer.stderr
    assert answer.stdout.splitlines()[-1].startswith(f"{job} CANCELLED")


def test_a_job_that_is_not_there_cannot_be_watched(platform: Platform) -> None:
    missing = run(platform, "train", "watch", "trainingJobs/0123456789abcdef")
    assert missing.returncode == 2
    assert "NOT_FOUND TRAINING_JOB_NOT_FOUND: trainingJobs/0123456789abcdef" in missing.stderr
    malformed = run(platform, "train", "get", "trainingJobs/a/b")
    assert malformed.returncode == 2
    assert "INVALID_ARGUMENT INVALID_NAME" in malformed.stderr


def test_nothing_to_watch_without_a_platform(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "medimg_cli.cli", "--state", str(tmp_path)]
    answer = subprocess.run(
        [*command, "train", "watch", "x"], capture_output=True, text=True, timeout=60, check=False
    )
    assert answer.returncode == 2
    assert "medimg is not running here" in answer.stderr
