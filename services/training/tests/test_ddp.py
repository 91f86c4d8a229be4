"""Two worker processes (DDP over gloo on CPU) reach the same weights as one process with
the same global batch and seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from medimg_training import launchers, specs
from medimg_training.datasets import Dataset
from medimg_training.settings import TrainingSettings
from medimg_training.worker import latest_checkpoint

pytestmark = pytest.mark.slow


def config(dataset: Dataset, settings: TrainingSettings, job: str, processes: int) -> Path:
    raw: dict[str, Any] = {
        # Instance norm: batch statistics per process would differ from the global batch's.
        "network": {"name": "DenseNet", "arguments": {"norm": "instance"}},
        "image_size": [32, 32],
        "batch_size": 4,
        "epochs": 2,
        "seed": 11,
        "optimizer": {"name": "SGD", "learning_rate": 0.1},
        "resources": {"processes": processes},
    }
    spec = specs.with_defaults(raw, dataset)
    specs.check(spec, dataset, max_processes=2, gpus=0)
    classes = list(dataset.class_names)
    directory = settings.object_dir / "jobs" / job
    directory.mkdir(parents=True)
    values = {
        "job_id": job,
        "spec": spec,
        "dataset": dataset.name,
        "class_names": classes,
        "items": [
            {"series": i.series, "label_index": classes.index(i.label), "split": str(i.split)}
            for i in dataset.items
        ],
        "network_arguments": specs.network_arguments(spec, dataset),
        "ingest_target": settings.ingest_target,
        "max_message_bytes": settings.max_message_bytes,
        "fetch_deadline_seconds": 10,
        "job_dir": str(directory),
        "cache_dir": str(settings.cache),
        "resume": False,
        "code_version": "test",
        "creator": "max",
    }
    path = directory / "worker.json"
    path.write_text(json.dumps(values))
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = latest_checkpoint(path.parent)
    assert checkpoint is not None
    state: dict[str, torch.Tensor] = torch.load(checkpoint, weights_only=True)["model"]
    return state


def test_two_processes_match_one(dataset: Dataset, settings: TrainingSettings) -> None:
    one = config(dataset, settings, "one", 1)
    two = config(dataset, settings, "two", 2)
    worker = ["-m", "medimg_training.worker"]
    env = {**os.environ, launchers.REDIS_URL_VARIABLE: settings.redis_url}
    subprocess.run([sys.executable, *worker, str(one)], check=True, timeout=300, env=env)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         *worker, str(two)],
        check=True,
        timeout=300,
        env=env,
    )  # fmt: skip
    single, distributed = weights(one), weights(two)
    assert single.keys() == distributed.keys()
    assert json.loads((one.parent / "checkpoints" / "latest.json").read_text())["step"] == 4
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value, atol=1e-5, rtol=1e-4, msg=key)
