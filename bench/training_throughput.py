"""Training throughput: a job through the training service against a bare MONAI training loop
on the same data, network, batch size and epochs, side by side in one run.

Starts a whole local platform (embedded PostgreSQL and Redis, the four services, their
Envoy sidecars and the gateway) in a temporary directory and ingests `--series` real DICOM
series over gRPC (pydicom's CT_small, 128x128, and MR_small, 64x64, half each, every copy
with new UIDs and a patient of its own). A dataset of them all, every patient in the
training split (no validation, no test: the bare loop only trains, so the job only trains),
is created through the gateway as an ml-engineer. Then, in rounds whose order alternates:

    service   CreateTrainingJob through the gateway; the service starts a worker process,
              which reads every series through ingest's pixel API (GetSeriesPixels through
              the training sidecar; the first job fetches, later ones find the worker's
              cache), builds MONAI's CacheDataset and trains, reporting progress to Redis
              at every step and checkpointing at every epoch. The figure is the worker's
              own images/s over its training loop (its last progress report, what
              `medimg train watch` shows): images trained / seconds from the loop's start
              to its last step. The job's wall time from CreateTrainingJob to SUCCEEDED
              (queue, worker start and imports, pixel reads, export of TorchScript and
              ONNX, registration) is shown apart.
    bare      a process of its own with the worker's torch thread count, given the job's
              own worker config: the same volumes (the worker's cache: what ingest
              served), through the same MONAI transforms once, into one tensor in memory;
              a torch DataLoader over a TensorDataset with shuffling; the same network
              (medimg_training.networks.build, same arguments), optimizer, loss, batch
              size, epochs and seed; no progress reports, no checkpoints. The figure is
              images / seconds from the loop's start to its last step.

The goal (issue 6): the service at least 0.9 of bare, on the medians over rounds.

Run from the repository root:

    .venv/bin/python bench/training_throughput.py [--series 256] [--epochs 2]
        [--batch-size 16] [--image-size 64] [--network DenseNet121] [--rounds 5]
        [--json out.json]
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
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli import mesh as meshlib
from medimg_cli.demo import chunks, token
from medimg_cli.platform import Platform
from medimg_cli.testing import free_port_offset

GOAL_OF_BARE = 0.9
SOURCES = ("CT_small.dcm", "MR_small.dcm")
TERMINAL = ("STATE_SUCCEEDED", "STATE_FAILED", "STATE_CANCELLED")


# Data ----------------------------------------------------------------------------------


def series_files(count: int) -> list[tuple[str, bytes]]:
    """(class, file) for `count` series: real pydicom test images, new UIDs, own patients."""
    files = []
    for index in range(count):
        name = SOURCES[index % len(SOURCES)]
        path = get_testdata_file(name, download=False)
        assert path is not None, f"pydicom's test file {name} is missing"
        dataset = pydicom.dcmread(str(path))
        dataset.StudyInstanceUID = generate_uid()
        dataset.SeriesInstanceUID = generate_uid()
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.PatientID = f"BENCH-TRAIN-{index:04d}"
        out = pydicom.filebase.DicomBytesIO()
        dataset.save_as(out, enforce_file_format=True)
        files.append((str(dataset.Modality), out.getvalue()))
    return files


def ingest(platform: Platform, files: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    """Uploads the files as `ops`; the dataset items (series name and class)."""
    with grpc.secure_channel(platform.sidecar("ingest"), platform.credentials()) as channel:
        answer: ingest_pb.UploadInstancesResponse = ingest_grpc.IngestServiceStub(
            channel
        ).UploadInstances(chunks(*(data for _, data in files)), timeout=300)
    items = []
    for result in answer.results:
        if result.outcome != ingest_pb.InstanceResult.OUTCOME_STORED:
            raise RuntimeError(f"file {result.index} was not stored: {result.reason}")
        series = result.instance.rsplit("/instances/", 1)[0]
        items.append({"series": series, "label": files[result.index][0]})
    return items


# The service ---------------------------------------------------------------------------


class Service:
    def __init__(self, state: Path) -> None:
        self.platform = Platform(
            state=state,
            port_offset=free_port_offset(meshlib.load_mesh()),
            service_settings={"LOG_LEVEL": "WARNING"},
        )

    def start(self) -> None:
        self.platform.start()
        atexit.register(self.platform.stop)
        self.rest = httpx.Client(
            base_url=self.platform.gateway_url,
            headers={"Authorization": f"Bearer {token(self.platform, 'bench', 'ml-engineer')}"},
            timeout=120,
        )

    def create_dataset(self, items: list[dict[str, str]]) -> str:
        body = {
            "task": "TASK_CLASSIFICATION",
            "classNames": sorted({item["label"] for item in items}),
            "items": items,
            "splitFractions": {"train": 1, "validation": 0, "test": 0},
        }
        answer = self.rest.post("/v1/datasets", params={"datasetId": "bench-train"}, json=body)
        answer.raise_for_status()
        return str(answer.json()["name"])

    def train(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Runs one job to its end; its figures and the path of its worker config."""
        created = self.rest.post("/v1/trainingJobs", json={"spec": spec})
        created.raise_for_status()
        name = created.json()["name"]
        while True:
            job = self.rest.get(f"/v1/{name}").json()
            if job["state"] in TERMINAL:
                break
            time.sleep(0.5)
        if job["state"] != "STATE_SUCCEEDED":
            raise RuntimeError(f"{name} ended {job['state']}: {job.get('errorMessage')}")
        progress = job["progress"]
        rate = float(progress["imagesPerSecond"])
        images = int(progress["totalSteps"]) * int(spec["batchSize"])
        wall = _seconds(job["endTime"]) - _seconds(job["createTime"])
        config = self.platform.state / "training" / "jobs" / name.split("/")[-1] / "worker.json"
        return {
            "job": name,
            "images": images,
            "images_per_second": rate,
            "loop_seconds": images / rate,
            "job_seconds": wall,
            "config": str(config),
        }


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


# The bare loop -------------------------------------------------------------------------


def bare(config_path: Path) -> dict[str, float]:
    """The bare loop, run in a process of its own (see the module docstring)."""
    import numpy as np
    import torch
    from monai.transforms.compose import Compose
    from monai.transforms.intensity.array import ScaleIntensity
    from monai.transforms.spatial.array import Resize
    from monai.transforms.utility.array import EnsureType
    from monai.utils.misc import set_determinism
    from torch.utils.data import DataLoader, TensorDataset

    from medimg_core import cpus
    from medimg_training import networks
    from medimg_training.worker import cache_path, network_inputs

    config = json.loads(config_path.read_text())
    spec = config["spec"]
    torch.set_num_threads(cpus.available())  # as the worker of a one-process job
    seed = int(spec["seed"])
    set_determinism(seed=seed)
    size = list(spec["image_size"])
    transform = Compose(
        [
            ScaleIntensity(minv=0.0, maxv=1.0),
            Resize(spatial_size=size),
            EnsureType(dtype=torch.float32, track_meta=False),
        ]
    )
    items = [item for item in config["items"] if item["split"] == "train"]
    cache = Path(config["cache_dir"])
    # What the worker learns from: every slice (2D) or the volume (3D), with its series' class.
    pairs = [
        (transform(picture), int(item["label_index"]))
        for item in items
        for picture in network_inputs(np.load(cache_path(cache, item["series"])), len(size))
    ]
    images = torch.stack([picture for picture, _ in pairs])
    labels = torch.tensor([label for _, label in pairs])
    loader = DataLoader(
        TensorDataset(images, labels),
        batch_size=int(spec["batch_size"]),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    torch.manual_seed(seed)
    model = networks.build(spec["network"]["name"], config["network_arguments"])
    optimizer = getattr(torch.optim, spec["optimizer"]["name"])(
        model.parameters(),
        lr=spec["optimizer"]["learning_rate"],
        weight_decay=spec["optimizer"]["weight_decay"],
    )
    loss_function = torch.nn.CrossEntropyLoss()
    model.train()
    done = 0
    started = time.monotonic()
    for _ in range(int(spec["epochs"])):
        for batch, truth in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_function(model(batch), truth)
            loss.backward()
            optimizer.step()
            float(loss.detach())  # the worker reads every step's loss too
            done += batch.shape[0]
    seconds = time.monotonic() - started
    return {"images": done, "images_per_second": done / seconds, "loop_seconds": seconds}


def run_bare(config: str) -> dict[str, float]:
    answer = subprocess.run(
        [sys.executable, __file__, "--bare", config], check=True, capture_output=True, text=True
    )
    figures: dict[str, float] = json.loads(answer.stdout.strip().splitlines()[-1])
    return figures


# Main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--network", default="DenseNet121")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    print(
        f"machine: {os.cpu_count()} cpus, {pyplatform.processor() or pyplatform.machine()}, "
        f"{pyplatform.platform()}, load before {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    import monai
    import torch

    versions = f"torch {torch.__version__}, monai {monai.__version__}"
    print(f"python {pyplatform.python_version()}, {versions}")
    home = Path(tempfile.mkdtemp(prefix="medimg-bench-training-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    service = Service(home / "medimg")
    service.start()
    items = ingest(service.platform, series_files(args.series))
    dataset = service.create_dataset(items)
    spec = {
        "dataset": dataset,
        "network": {"name": args.network},
        "imageSize": [args.image_size, args.image_size],
        "batchSize": args.batch_size,
        "epochs": args.epochs,
        "seed": "7",
        "model": "bench-train",
    }
    print(
        f"{args.series} series ({', '.join(sorted({i['label'] for i in items}))}), {args.network} "
        f"2D at {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.epochs} "
        f"epochs, {args.rounds} rounds (order alternates)\n"
    )
    rounds: list[dict[str, Any]] = []
    config = ""
    for index in range(args.rounds):
        figures: dict[str, Any] = {}
        order = ("service", "bare") if index % 2 == 0 else ("bare", "service")
        for path in order:
            if path == "service":
                figures[path] = service.train(spec)
                config = figures[path]["config"]
            else:
                if not config:  # the bare loop needs a worker's config and cache
                    config = service.train(spec)["config"]
                figures[path] = run_bare(config)
        service_figures, bare_figures = figures["service"], figures["bare"]
        ratio = service_figures["images_per_second"] / bare_figures["images_per_second"]
        print(
            f"round {index + 1} ({' then '.join(order)}): "
            f"service {service_figures['images_per_second']:.2f} images/s "
            f"({service_figures['images']} images in {service_figures['loop_seconds']:.1f} s; "
            f"job {service_figures['job_seconds']:.1f} s from create to SUCCEEDED), "
            f"bare {bare_figures['images_per_second']:.2f} images/s "
            f"({bare_figures['images']} images in {bare_figures['loop_seconds']:.1f} s); "
            f"{ratio:.2f} of bare",
            flush=True,
        )
        rounds.append({**figures, "of_bare": ratio})
    service.platform.stop()

    service_rate = statistics.median(r["service"]["images_per_second"] for r in rounds)
    bare_rate = statistics.median(r["bare"]["images_per_second"] for r in rounds)
    overhead = statistics.median(
        r["service"]["job_seconds"] - r["service"]["loop_seconds"] for r in rounds
    )
    print(
        f"\nmedians over rounds: service {service_rate:.2f} images/s, bare {bare_rate:.2f} "
        f"images/s: {service_rate / bare_rate:.2f} of bare; a job's time outside its training "
        f"loop (queue, worker start, pixel reads, export, registration): {overhead:.1f} s"
    )
    print(f"load after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    met = service_rate / bare_rate >= GOAL_OF_BARE
    print(f"\ngoal:\n  {'PASS' if met else 'FAIL'}  service >= {GOAL_OF_BARE} of bare")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": {"cpus": os.cpu_count()},
                    "arguments": vars(args) | {"json": str(args.json)},
                    "rounds": rounds,
                    "service_images_per_second": service_rate,
                    "bare_images_per_second": bare_rate,
                    "of_bare": service_rate / bare_rate,
                    "goal_met": met,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:  # the bare loop, in a process of its own
        print(json.dumps(bare(Path(sys.argv[2]))))
    else:
        main()
