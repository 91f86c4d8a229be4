"""The model repository on S3, end to end: an inference process started with
MEDIMG_INFERENCE_MODEL_REPOSITORY_URL (a real S3 API on a socket, moto's server) loads the
model at start from the bucket, serves it to the stock tritonclient, and loads a version
uploaded afterwards when told to, as Triton does with an s3:// repository."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from medimg_cli.platform import Platform
from medimg_cli.testing import S3_REGION, free_port, new_bucket
from medimg_cli.testing import s3_client as make_client
from services.inference.tests.support import (
    TORCHSCRIPT_DEPRECATED,
    classifier_metadata,
    export_onnx,
    export_torchscript,
    random_patches,
    train_patch_classifier,
    write_bundle,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)]

MODEL = "s3-patches"
Array = npt.NDArray[np.float32]


def upload(endpoint: str, bucket: str, staging: Path, version: int, files: dict[str, Path]) -> None:
    bundle = write_bundle(staging, MODEL, version, classifier_metadata(), files)
    s3 = make_client(endpoint)
    for path in sorted(bundle.rglob("*")):
        if path.is_file():
            key = f"models/{MODEL}/{version}/{path.relative_to(bundle).as_posix()}"
            s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def test_an_inference_process_serves_models_from_s3(
    platform: Platform, s3_endpoint: str, tmp_path: Path, aws_credentials: dict[str, str]
) -> None:
    bucket = new_bucket(make_client(s3_endpoint), versioned=True)
    network = train_patch_classifier()
    upload(s3_endpoint, bucket, tmp_path / "staging", 1, {
        "model.ts": export_torchscript(network, tmp_path / "model.ts"),
    })  # fmt: skip
    port = free_port()
    env = platform.service_env(
        "inference",
        PORT=str(port),
        METRICS_PORT="0",
        MODEL_REPOSITORY=str(tmp_path / "repository"),
        MODEL_REPOSITORY_URL=f"s3://{bucket}/models",
        S3_ENDPOINT_URL=s3_endpoint,
        S3_REGION=S3_REGION,
        LOAD_MODELS=MODEL,  # must load from S3, or the process does not start
    )
    env |= aws_credentials
    log = tmp_path / "inference.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "medimg_inference"], env=env, stdout=out, stderr=out
        )
    # The service trusts its sidecar's XFCC header; called directly, the test sets it.
    caller = {"x-forwarded-client-cert": f"URI={platform.mesh.spiffe('ops')}"}
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 120
        while not _ready(client, caller):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "inference did not start"
            time.sleep(0.2)
        patches, _ = random_patches(6, np.random.default_rng(3))
        with torch.inference_mode():
            expected = network(torch.from_numpy(patches)).numpy()

        assert _infer(client, caller, patches, version="1") == pytest.approx(expected, abs=1e-5)

        upload(s3_endpoint, bucket, tmp_path / "staging", 2, {
            "model.onnx": export_onnx(network, tmp_path / "model.onnx"),
        })  # fmt: skip
        client.load_model(MODEL, headers=caller, client_timeout=60)
        index = client.get_model_repository_index(headers=caller)
        states = {(m.name, m.version, m.state) for m in index.models}
        assert {(MODEL, "1", "UNAVAILABLE"), (MODEL, "2", "READY")} <= states
        assert _infer(client, caller, patches, version="2") == pytest.approx(expected, abs=1e-5)
        config = client.get_model_config(MODEL, headers=caller).config
        assert config.platform == "onnxruntime_onnx"
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert "AWS_SECRET_ACCESS_KEY" not in log.read_text()
    assert "medimg-test-secret" not in log.read_text()
    assert sorted(os.listdir(tmp_path / "repository" / ".s3" / MODEL)) == ["1", "2"]


def _ready(client: triton.InferenceServerClient, caller: dict[str, str]) -> bool:
    try:
        return bool(client.is_model_ready(MODEL, headers=caller))
    except InferenceServerException:
        return False


def _infer(
    client: triton.InferenceServerClient, caller: dict[str, str], patches: Array, version: str
) -> Array:
    item = triton.InferInput("patch", list(patches.shape), "FP32")
    item.set_data_from_numpy(patches)
    result = client.infer(MODEL, [item], model_version=version, headers=caller, client_timeout=30)
    probabilities: Array | None = result.as_numpy("probabilities")
    assert probabilities is not None
    return probabilities
