"""Inference throughput: medimg served through its sidecar, the same backend raw in-process,
and TorchServe serving the same TorchScript model, side by side in one run.

Models (random weights: throughput does not depend on them), built here with MONAI:

    densenet121-2d   DenseNet121, 2D, input 1x224x224 float32, 2 classes
    unet-3d          UNet, 3D, input 1x96x96x96 float32, channels (16, 32, 64, 128), 2 classes

Each is exported to TorchScript (traced) and ONNX (torch.export, dynamic batch) and written as
a model bundle; a third bundle, `openvino`, holds the same TorchScript file with
`medimg.accelerator` "openvino" (converted and run by OpenVINO). What is measured, per model:

    raw-<path>         (torchscript, onnx, openvino) medimg's own backend class
                       (medimg_inference.backends) loaded in a process of its own, as many
                       instances as the cores hold at `--intra-op-threads` threads each
                       (default 1), each run back to back by a thread of its own on batches
                       of 1, 2, 4, 8 and 16 rows: the best images/s over those batch sizes
                       is the ceiling a server can reach, and the smallest batch within 3%
                       of it is the one served. medimg's defaults apply: the UNet's
                       TorchScript module runs frozen (medimg.optimize), DenseNet's as stored
    raw-torchscript-as-stored  the same, with the module as stored (medimg.optimize false),
                       as TorchServe runs it: printed for comparison; its batch is the one
                       TorchServe serves
    medimg-<path>      (torchscript, onnx, openvino) the whole local platform; the stock
                       tritonclient gRPC (asyncio) client sends one image per ModelInfer
                       request through the inference sidecar (mTLS, ops identity), with N
                       requests in flight (closed loop), the model's dynamic batcher at the
                       batch size chosen raw, with the same instances and threads
                       (MEDIMG_INFERENCE_INTRA_OP_THREADS)
    torchserve         TorchServe 0.12 (installed by this script into a folder of its own,
                       pinned by constraints.txt) serving the same TorchScript file with its
                       batching on (the batch size chosen raw as stored, 2 workers of 1
                       torch thread each, as FACTS.md found best on 2 cores); httpx (asyncio)
                       posts the same float32 bytes, N in flight

Each served path runs at concurrency 1, 8 and 64 for `--seconds` after `--warmup` seconds, in
rounds whose order rotates; figures are medians over rounds. Beside the rates, the CPU time
(user + system, from /proc) each group of processes used per image in the timed windows:
the inference service (raw: its own process), the five Envoys, TorchServe (its frontend and
workers), the rest of medimg (the other services, PostgreSQL, Redis) and the client (this
process, which sends for every path). Latency percentiles are over all
requests of all rounds. Goals (issue 5): medimg at least 0.9 of raw at its best batch size,
and, serving the TorchScript file (as stored or in OpenVINO), at least 1.5x TorchServe's
throughput at a lower p99.

Run from the repository root, after `make setup`:

    .venv/bin/python bench/inference_throughput.py [--models densenet121-2d unet-3d]
        [--seconds 20] [--warmup 5] [--rounds 2] [--intra-op-threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
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
import time
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from medimg_cli import mesh as meshlib
from medimg_cli.cputime import CpuMeter, tree
from medimg_cli.platform import Platform
from medimg_cli.testing import free_port_offset
from medimg_inference.backends import BackendOptions, load_backend
from medimg_inference.repository import METADATA_PATH, load_bundle

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 8, 64)
BATCHES = (1, 2, 4, 8, 16)
MAX_BATCH = 16
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
TORCHSERVE_PACKAGES = ("torchserve", "torch-model-archiver", "enum-compat", "pyyaml")
GOAL_OF_RAW = 0.9
GOAL_OF_TORCHSERVE = 1.5
#: medimg's bundles of each model: its platform, or "openvino" (the TorchScript file in it).
PATHS = ("torchscript", "onnx", "openvino")
#: The paths that serve the TorchScript file TorchServe serves.
SAME_FILE_AS_TORCHSERVE = ("torchscript", "openvino")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    shape: tuple[int, ...]  # one item, channel first

    def network(self) -> torch.nn.Module:
        from monai.networks.nets.densenet import DenseNet121
        from monai.networks.nets.unet import UNet

        if len(self.shape) == 3:
            return DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
        return UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            channels=(16, 32, 64, 128),
            strides=(2, 2, 2),
            num_res_units=2,
        )


MODELS = {
    spec.name: spec
    for spec in (ModelSpec("densenet121-2d", (1, 224, 224)), ModelSpec("unet-3d", (1, 96, 96, 96)))
}


# Bundles -------------------------------------------------------------------------------


def _tensor(channels: int, spatial: list[int]) -> dict[str, Any]:
    return {
        "type": "image",
        "format": "magnitude",
        "modality": "n/a",
        "num_channels": channels,
        "spatial_shape": spatial,
        "dtype": "float32",
        "value_range": [],
        "is_patch_data": False,
        "channel_def": {"0": "image"},
    }


def write_bundles(spec: ModelSpec, root: Path) -> dict[str, Path]:
    """`<root>/<name>-<path>/1/` for each of PATHS; the bundle by path."""
    torch.manual_seed(0)
    network = spec.network().eval()
    example = torch.zeros(2, *spec.shape)
    out_spatial = [] if len(spec.shape) == 3 else list(spec.shape[1:])
    bundles = {}
    for platform, file_name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        bundle = root / f"{spec.name}-{platform}" / "1"
        (bundle / "models").mkdir(parents=True)
        (bundle / METADATA_PATH).parent.mkdir(parents=True)
        model_file = bundle / "models" / file_name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if platform == "torchscript":
                torch.jit.trace(network, example).save(str(model_file))  # type: ignore[no-untyped-call]
            else:
                program = torch.onnx.export(
                    network,
                    (example,),
                    input_names=["image"],
                    output_names=["pred"],
                    dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}},
                    verbose=False,
                )
                assert program is not None
                program.save(str(model_file))
        metadata = {
            "version": "0.1.0",
            "monai_version": "1.6.1",
            "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": np.__version__,
            "optional_packages_version": {},
            "task": f"{spec.name} throughput benchmark",
            "description": "random weights",
            "authors": "medimg bench",
            "copyright": "medimg",
            "network_data_format": {
                "inputs": {"image": _tensor(1, list(spec.shape[1:]))},
                "outputs": {"pred": _tensor(2, out_spatial)},
            },
            "medimg": {
                "platform": platform,
                "max_batch_size": MAX_BATCH,
                "max_queue_delay_us": 5000,
                "queue_limit": 256,
            },
        }
        (bundle / METADATA_PATH).write_text(json.dumps(metadata, indent=2))
        bundles[platform] = bundle
    bundles["openvino"] = root / f"{spec.name}-openvino" / "1"
    shutil.copytree(bundles["torchscript"], bundles["openvino"])
    accelerated = json.loads((bundles["openvino"] / METADATA_PATH).read_text())
    accelerated["medimg"]["accelerator"] = "openvino"
    (bundles["openvino"] / METADATA_PATH).write_text(json.dumps(accelerated, indent=2))
    return bundles


def set_serving(bundle: Path, max_batch_size: int, instances: int) -> None:
    metadata = json.loads((bundle / METADATA_PATH).read_text())
    metadata["medimg"]["max_batch_size"] = max_batch_size
    metadata["medimg"]["instances"] = instances
    (bundle / METADATA_PATH).write_text(json.dumps(metadata, indent=2))


def instances_for(threads: int) -> int:
    """Instances of a model that the cores hold at `threads` per execution."""
    return max(1, len(os.sched_getaffinity(0)) // threads)


# Raw, in process -----------------------------------------------------------------------


def raw_throughput(
    bundle: Path, name: str, seconds: float, threads: int, *, optimize: bool = True
) -> dict[str, Any]:
    """Images/s of medimg's backend in a process of its own, per batch size, and the best;
    with `optimize` False, a TorchScript module as stored rather than frozen (medimg.optimize).

    A process of its own, as the service's is: in this one, torch has run on other threads
    (export), and two threads with OpenMP teams slow each other down (backends.TorchCpu)."""
    command = [__file__, "--raw", str(bundle), name, str(seconds), str(threads), str(optimize)]
    answer = subprocess.run(
        [sys.executable, *command],
        check=True,
        capture_output=True,
        text=True,
    )
    figures: dict[str, Any] = json.loads(answer.stdout.strip().splitlines()[-1])
    figures["per_batch"] = {int(batch): rate for batch, rate in figures["per_batch"].items()}
    return figures


def measure_raw(
    bundle: Path, name: str, seconds: float, threads: int, optimize: bool
) -> dict[str, Any]:
    """Images/s of medimg's backend in this process, per batch size, and the best: as many
    instances as the cores hold at `threads` threads each, each run back to back by a caller
    thread of its own, as the service's batcher runs them."""
    config = load_bundle(bundle, name, 1)  # type: ignore[arg-type]
    config = replace(config, execution=replace(config.execution, optimize=optimize))
    backends = [load_backend(config, BackendOptions(threads))]
    backends += [
        backends[0].replicate(BackendOptions(threads)) for _ in range(instances_for(threads) - 1)
    ]
    spec_shape = config.inputs[0].shape
    per_batch, cpu_ms = {}, {}

    def back_to_back(backend: Any, data: dict[str, Any], until: float) -> int:
        done = 0
        while time.perf_counter() < until:
            backend.execute(data)
            done += len(data["image"])
        return done

    try:
        with ThreadPoolExecutor(len(backends)) as callers:
            for batch in BATCHES:
                data = {"image": np.random.default_rng(0).random((batch, *spec_shape), np.float32)}
                list(callers.map(lambda b, d=data: b.execute(d), backends))  # warm
                start, cpu = time.perf_counter(), time.process_time()
                run = partial(back_to_back, data=data, until=start + seconds / 2)
                done = sum(callers.map(run, backends))
                per_batch[batch] = done / (time.perf_counter() - start)
                cpu_ms[batch] = 1000 * (time.process_time() - cpu) / done
    finally:
        for backend in backends:
            backend.close()
    best = max(per_batch, key=lambda b: per_batch[b])
    return {
        "per_batch": per_batch,
        "best_batch": best,
        # What to serve at: the smallest batch within 3% of the best rate (a larger one gains
        # nothing measurable here and costs latency and memory).
        "serving_batch": min(b for b, rate in per_batch.items() if rate >= 0.97 * per_batch[best]),
        "images_per_s": per_batch[best],
        "cpu_ms_per_image": cpu_ms[best],
    }


# Closed-loop load ----------------------------------------------------------------------


async def closed_loop(
    send: Callable[[], Awaitable[None]],
    concurrency: int,
    warmup: float,
    seconds: float,
    meter: CpuMeter,
) -> dict[str, Any]:
    """`concurrency` senders back to back; rate, latencies and CPU per image by process
    group, of the timed window."""
    latencies: list[float] = []
    failures = 0
    first_error = ""
    timed = False
    stop_at = time.perf_counter() + warmup + seconds
    window_start = time.perf_counter() + warmup

    async def sender() -> None:
        nonlocal failures, first_error
        while (now := time.perf_counter()) < stop_at:
            try:
                await send()
            except Exception as error:  # noqa: BLE001 - counted: a failure is a result here
                failures += 1
                first_error = first_error or f"{type(error).__name__}: {error}"[:300]
                continue
            if now >= window_start and timed:
                latencies.append(time.perf_counter() - now)

    cpu: dict[str, float] = {}

    async def mark() -> None:
        nonlocal timed, cpu
        await asyncio.sleep(warmup)
        timed, before = True, meter.sample()
        await asyncio.sleep(seconds)
        cpu = {group: used - before[group] for group, used in meter.sample().items()}

    await asyncio.gather(mark(), *(sender() for _ in range(concurrency)))
    return {
        "cpu_ms_per_image": {
            group: 1000 * used / max(len(latencies), 1) for group, used in cpu.items()
        },
        "failures": failures,
        "first_error": first_error,
        "images_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)) if latencies else None,
        "p99_ms": 1000 * float(np.percentile(latencies, 99)) if latencies else None,
        "latencies": latencies,
    }


# medimg --------------------------------------------------------------------------------


class Medimg:
    def __init__(self, state: Path, threads: int) -> None:
        self.platform = Platform(
            state=state,
            port_offset=free_port_offset(meshlib.load_mesh()),
            # Every service gets the settings; only inference has INTRA_OP_THREADS.
            service_settings={"LOG_LEVEL": "WARNING", "INTRA_OP_THREADS": str(threads)},
        )

    @property
    def repository(self) -> Path:
        return self.platform.state / "models"

    def start(self) -> None:
        self.platform.start()
        atexit.register(self.platform.stop)

    def client(self) -> Any:
        import tritonclient.grpc.aio as triton

        pki = self.platform.pki
        assert pki is not None
        return triton.InferenceServerClient(
            self.platform.sidecar("inference"),
            ssl=True,
            root_certificates=str(pki.ca_cert),
            private_key=str(pki.key("ops")),
            certificate_chain=str(pki.cert("ops")),
        )

    async def run(  # noqa: PLR0917 - a Runner
        self,
        model: str,
        shape: tuple[int, ...],
        concurrency: int,
        warmup: float,
        seconds: float,
        meter: CpuMeter,
    ) -> dict[str, Any]:
        import tritonclient.grpc.aio as triton

        client = self.client()
        try:
            await client.load_model(model)
            data = np.random.default_rng(1).random((1, *shape), np.float32)
            tensor = triton.InferInput("image", list(data.shape), "FP32")
            tensor.set_data_from_numpy(data)

            async def send() -> None:
                await client.infer(model, [tensor], client_timeout=60)

            return await closed_loop(send, concurrency, warmup, seconds, meter)
        finally:
            await client.close()


# TorchServe ----------------------------------------------------------------------------

HANDLER = '''
"""TorchServe handler of the benchmark: float32 bytes in, float32 bytes out, batched."""
import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

SHAPE = {shape!r}


class Handler(BaseHandler):
    def preprocess(self, data):
        rows = [np.frombuffer(row.get("body") or row.get("data"), np.float32) for row in data]
        return torch.from_numpy(np.stack(rows).reshape(len(rows), *SHAPE))

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            return self.model(data)

    def postprocess(self, data):
        return [row.numpy().tobytes() for row in data]
'''


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TorchServe:
    """TorchServe from its own folder of packages, on free ports, token auth off."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.site = home / "site"
        self.store = home / "model-store"
        self.port = _free_port()
        self.management = _free_port()
        self.metrics = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def install(self) -> None:
        self.site.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "-c", str(ROOT / "constraints.txt"), "--target", str(self.site),
             *TORCHSERVE_PACKAGES],
            check=True,
        )  # fmt: skip

    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(self.site), os.environ.get("PYTHONPATH", "")])
        return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}

    def archive(self, name: str, torchscript: Path, shape: tuple[int, ...]) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        handler = self.home / f"{name}_handler.py"
        handler.write_text(HANDLER.format(shape=shape))
        # TorchServe's handler takes a TorchScript file by its .pt extension.
        serialized = self.home / f"{name}.pt"
        shutil.copyfile(torchscript, serialized)
        subprocess.run(
            [sys.executable, str(self.site / "bin" / "torch-model-archiver"), "--force",
             "--model-name", name, "--version", "1", "--serialized-file", str(serialized),
             "--handler", str(handler), "--export-path", str(self.store)],
            check=True, env=self.env(),
        )  # fmt: skip

    def start(self, models: dict[str, int]) -> None:
        """Serves each model (name -> its batch size), two workers each."""
        config = self.home / "config.properties"
        model_config = {
            name: {"1": {"batchSize": batch, "maxBatchDelay": 5, "minWorkers": 2,
                         "maxWorkers": 2, "responseTimeout": 120, "marName": f"{name}.mar"}}
            for name, batch in models.items()
        }  # fmt: skip
        config.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{self.port}",
                    f"management_address=http://127.0.0.1:{self.management}",
                    f"metrics_address=http://127.0.0.1:{self.metrics}",
                    "disable_token_authorization=true",
                    "enable_envvars_config=false",
                    f"model_store={self.store}",
                    "load_models=" + ",".join(f"{name}.mar" for name in models),
                    f"models={json.dumps(model_config)}",
                    "default_workers_per_model=2",
                    "job_queue_size=1000",
                    # A 3D UNet's answer (2x96x96x96 float32, 7 MB) is over the 6.5 MB default.
                    f"max_request_size={MAX_MESSAGE_BYTES}",
                    f"max_response_size={MAX_MESSAGE_BYTES}",
                    f"number_of_netty_threads={os.cpu_count()}",
                ]
            )
            + "\n"
        )
        log = (self.home / "torchserve.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(self.site / "bin" / "torchserve"), "--start", "--foreground",
             "--ncs", "--model-store", str(self.store), "--ts-config", str(config)],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=self.home,
            start_new_session=True,
        )  # fmt: skip
        atexit.register(self.stop)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{self.management}/models", timeout=2)
                names = {m["modelName"] for m in ready.json().get("models", [])}
                if names >= set(models) and all(self._workers_ready(m) for m in models):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited; see {self.home / 'torchserve.log'}")
            time.sleep(1)
        raise RuntimeError(f"TorchServe did not get ready; see {self.home / 'torchserve.log'}")

    def _workers_ready(self, model: str) -> bool:
        answer = httpx.get(f"http://127.0.0.1:{self.management}/models/{model}", timeout=2)
        workers = answer.json()[0].get("workers", [])
        return len(workers) >= 2 and all(w.get("status") == "READY" for w in workers)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
        self.process = None

    async def run(  # noqa: PLR0917 - a Runner
        self,
        model: str,
        shape: tuple[int, ...],
        concurrency: int,
        warmup: float,
        seconds: float,
        meter: CpuMeter,
    ) -> dict[str, Any]:
        body = np.random.default_rng(1).random((1, *shape), np.float32).tobytes()
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        url = f"http://127.0.0.1:{self.port}/predictions/{model}"
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:

            async def send() -> None:
                answer = await client.post(
                    url, content=body, headers={"Content-Type": "application/octet-stream"}
                )
                answer.raise_for_status()

            return await closed_loop(send, concurrency, warmup, seconds, meter)


# The run -------------------------------------------------------------------------------


Runner = Callable[[str, tuple[int, ...], int, float, float, CpuMeter], Awaitable[dict[str, Any]]]


def cpu_meter(medimg: Medimg, torchserve: TorchServe) -> CpuMeter:
    """The CPU of every process of the run, in the groups the report shows."""
    platform = medimg.platform

    def pids(*processes: Any) -> list[int]:
        return [p.pid for p in processes if p is not None and p.pid is not None]

    def rest_of_medimg() -> list[int]:
        others = [platform.services[s] for s in platform.services if s != "inference"]
        pidfile = platform.state / "postgres" / "postmaster.pid"
        postgres = tree(int(pidfile.read_text().split()[0])) if pidfile.exists() else []
        return pids(*others, getattr(platform, "_redis", None)) + postgres

    return CpuMeter(
        {
            "inference": lambda: tree(platform.services["inference"].pid),
            "envoy (5)": lambda: pids(*platform.envoys.values()),
            "torchserve": lambda: tree(torchserve.process.pid if torchserve.process else None),
            "rest of medimg": rest_of_medimg,
            "client": lambda: [os.getpid()],
        }
    )


async def one_round(  # noqa: PLR0917
    index: int,
    models: list[str],
    medimg: Medimg,
    torchserve: TorchServe,
    meter: CpuMeter,
    args: Any,
) -> dict[str, dict[str, Any]]:
    """Every served path of every model at every concurrency, the path order rotated."""
    measured: dict[str, dict[str, Any]] = {}
    for name in models:
        paths: list[tuple[str, Runner, str]] = [
            (f"{name} medimg-{platform}", medimg.run, f"{name}-{platform}") for platform in PATHS
        ]
        paths.append((f"{name} torchserve", torchserve.run, name))
        shift = index % len(paths)
        for label, run, model in paths[shift:] + paths[:shift]:
            for concurrency in CONCURRENCY:
                figures = await run(
                    model, MODELS[name].shape, concurrency, args.warmup, args.seconds, meter
                )
                measured[f"{label} c={concurrency}"] = figures
                failed = (
                    f", {figures['failures']} FAILED ({figures['first_error']})"
                    if figures["failures"]
                    else ""
                )
                print(
                    f"round {index + 1} {label} c={concurrency}: "
                    f"{figures['images_per_s']:.1f} images/s, p50 {figures['p50_ms'] or 0:.1f} ms, "
                    f"p99 {figures['p99_ms'] or 0:.1f} ms{failed}",
                    flush=True,
                )
    return measured


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median images/s over rounds; p50/p99 over every request of every round."""
    out: dict[str, Any] = {}
    for key in rounds[0]:
        rates = [r[key]["images_per_s"] for r in rounds]
        latencies = [lat for r in rounds for lat in r[key].get("latencies", [])]
        out[key] = {
            "images_per_s": statistics.median(rates),
            "per_round": rates,
            "failures": sum(r[key]["failures"] for r in rounds),
            "cpu_ms_per_image": {
                group: statistics.median(r[key]["cpu_ms_per_image"][group] for r in rounds)
                for group in rounds[0][key]["cpu_ms_per_image"]
            },
        }
        if latencies:
            out[key]["p50_ms"] = 1000 * float(np.percentile(latencies, 50))
            out[key]["p99_ms"] = 1000 * float(np.percentile(latencies, 99))
            out[key]["requests"] = len(latencies)
    return out


def _ms(figures: dict[str, Any], key: str) -> str:
    return f"{figures[key]:.1f} ms" if key in figures else "n/a"


def print_cpu(served: dict[str, Any], results: dict[str, Any]) -> None:
    print(
        "\nCPU ms per image, by process (user+system over the timed windows, median of rounds;"
        " raw: its own process at its best batch):"
    )
    groups = list(next(iter(served.values()))["cpu_ms_per_image"])
    print(f"  {'path':<40}{'raw':>8}" + "".join(f"{g:>16}" for g in groups))
    for key, figures in served.items():
        name, platform = key.split()[0], key.split()[1].removeprefix("medimg-")
        raw_cpu = results["models"][name]["raw"].get(platform, {}).get("cpu_ms_per_image")
        print(
            f"  {key:<40}{'' if raw_cpu is None else f'{raw_cpu:.1f}':>8}"
            + "".join(f"{figures['cpu_ms_per_image'][g]:>16.1f}" for g in groups)
        )


def _failed(figures: dict[str, Any]) -> str:
    return f", {figures['failures']} requests FAILED" if figures["failures"] else ""


def measure_raws(
    name: str, by_platform: dict[str, Path], args: Any, instances: int
) -> dict[str, Any]:
    """Raw figures of each platform's bundle; each bundle then set to be served at its best
    batch size, as one tunes Triton with perf_analyzer."""
    raw = {
        platform: raw_throughput(bundle, f"{name}-{platform}", args.seconds, args.intra_op_threads)
        for platform, bundle in by_platform.items()
    }
    # For comparison only: the TorchScript module as stored (TorchServe runs it so).
    stored = raw_throughput(by_platform["torchscript"], f"{name}-torchscript", args.seconds,
                            args.intra_op_threads, optimize=False)  # fmt: skip
    for platform, figures in [*raw.items(), ("torchscript-as-stored", stored)]:
        batches = ", ".join(f"{batch}: {rate:.1f}" for batch, rate in figures["per_batch"].items())
        print(f"{name} raw-{platform}: images/s by batch {batches}; served at batch "
              f"{figures['serving_batch']}")  # fmt: skip
        if platform in by_platform:
            set_serving(by_platform[platform], figures["serving_batch"], instances)
    return {**raw, "torchscript-as-stored": stored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--intra-op-threads", type=int, default=1,
        help="threads per execution; medimg (raw and served) runs cores / threads instances",
    )  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    print(
        f"machine: {os.cpu_count()} cpus, {pyplatform.processor() or pyplatform.machine()}, "
        f"{pyplatform.platform()}, load before {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    home = Path(tempfile.mkdtemp(prefix="medimg-bench-inference-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    threads, instances = args.intra_op_threads, instances_for(args.intra_op_threads)
    print(f"medimg: {instances} instance(s) per model, {threads} thread(s) per execution")
    medimg = Medimg(home / "medimg", threads)
    torchserve = TorchServe(home / "torchserve")
    torchserve.install()

    bundles = {spec: write_bundles(MODELS[spec], medimg.repository) for spec in args.models}
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "models": {}}
    for name, by_platform in bundles.items():
        results["models"][name] = {"raw": measure_raws(name, by_platform, args, instances)}
        torchserve.archive(name, by_platform["torchscript"] / "models" / "model.ts",
                           MODELS[name].shape)  # fmt: skip

    medimg.start()
    torchserve.start(
        {name: results["models"][name]["raw"]["torchscript-as-stored"]["serving_batch"]
         for name in bundles}
    )  # fmt: skip

    meter = cpu_meter(medimg, torchserve)
    rounds = [
        asyncio.run(one_round(index, list(bundles), medimg, torchserve, meter, args))
        for index in range(args.rounds)
    ]
    served = summarize(rounds)
    results["served"] = served
    torchserve.stop()
    medimg.platform.stop()

    print("\nmedians over rounds (p50/p99 over every request):")
    goals: dict[str, bool] = {}
    for name in bundles:
        raw = results["models"][name]["raw"]
        for concurrency in CONCURRENCY:
            peer = served[f"{name} torchserve c={concurrency}"]
            print(
                f"  {name} torchserve c={concurrency}: {peer['images_per_s']:.1f} images/s, "
                f"p50 {_ms(peer, 'p50_ms')}, p99 {_ms(peer, 'p99_ms')}{_failed(peer)}"
            )
            for platform in PATHS:
                ours = served[f"{name} medimg-{platform} c={concurrency}"]
                of_raw = ours["images_per_s"] / raw[platform]["images_per_s"]
                of_peer = ours["images_per_s"] / max(peer["images_per_s"], 1e-9)
                print(
                    f"  {name} medimg-{platform} c={concurrency}: {ours['images_per_s']:.1f} "
                    f"images/s, p50 {_ms(ours, 'p50_ms')}, p99 {_ms(ours, 'p99_ms')}"
                    f"{_failed(ours)}; "
                    f"{of_raw:.2f} of raw-{platform} (best batch "
                    f"{raw[platform]['best_batch']}, {raw[platform]['images_per_s']:.1f}/s); "
                    f"{of_peer:.2f}x torchserve"
                )
                ours["of_raw"], ours["of_torchserve"] = of_raw, of_peer
                if concurrency == max(CONCURRENCY):
                    goals[f"{name} medimg-{platform} >= {GOAL_OF_RAW} of raw, no failure"] = (
                        of_raw >= GOAL_OF_RAW and not ours["failures"]
                    )
                if platform in SAME_FILE_AS_TORCHSERVE and concurrency == max(CONCURRENCY):
                    goals[
                        f"{name} medimg-{platform} >= {GOAL_OF_TORCHSERVE}x torchserve, lower p99"
                    ] = (
                        of_peer >= GOAL_OF_TORCHSERVE
                        and not ours["failures"]
                        and ours.get("p99_ms", float("inf")) < peer.get("p99_ms", float("inf"))
                    )
    print_cpu(served, results)
    print("\ngoals:")
    for goal, met in goals.items():
        print(f"  {'PASS' if met else 'FAIL'}  {goal}")
    results["goals"] = goals
    if args.json:
        for figures in served.values():
            figures.pop("latencies", None)
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--raw"]:  # the raw measurement, in a process of its own
        bundle, name, seconds, threads, optimize = sys.argv[2:7]
        print(json.dumps(
            measure_raw(Path(bundle), name, float(seconds), int(threads), optimize == "True")
        ))  # fmt: skip
    else:
        main()
