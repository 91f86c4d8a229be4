"""The set of served models: load, unload, the index, version switches under load that fail
no request, and failed loads that leave the serving version alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from medimg_core.errors import FailedPrecondition, NotFound, Unavailable
from medimg_inference.backends import BackendOptions
from medimg_inference.repository import ModelName, ModelRepository, ModelVersion
from medimg_inference.serving import IndexEntry, ModelServer, ModelState
from services.inference.tests.support import (
    TORCHSCRIPT_DEPRECATED,
    TrainedClassifier,
    classifier_metadata,
    write_bundle,
)

pytestmark = pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ModelServer]:
    server = ModelServer(ModelRepository(tmp_path), BackendOptions(intra_op_threads=1))
    yield server
    await server.close()


def entry(index: list[IndexEntry], version: int) -> IndexEntry:
    return next(item for item in index if item.version == version)


async def test_load_serves_the_newest_version_until_unloaded(
    tmp_path: Path, server: ModelServer, classifier: TrainedClassifier
) -> None:
    write_bundle(
        tmp_path, "patches", 1, classifier_metadata(), {"model.ts": classifier.torchscript}
    )
    write_bundle(tmp_path, "patches", 2, classifier_metadata(), {"model.onnx": classifier.onnx})
    patches = classifier.patches[:3]

    config = await server.load("patches")
    outputs = await server.infer("patches", None, {"patch": patches})
    index = await server.index()

    assert config.version == 2
    assert server.ready("patches") and server.ready("patches", 2)
    assert not server.ready("patches", 1)
    np.testing.assert_allclose(outputs["probabilities"], classifier.expected(patches), atol=1e-5)
    assert entry(index, 2).state is ModelState.READY
    assert (entry(index, 1).state, entry(index, 1).reason) == (
        ModelState.UNAVAILABLE,
        "not loaded",
    )
    # The warmup request is not counted.
    assert server.statistics()[ModelName("patches"), ModelVersion(2)].success_count == 1
    with pytest.raises(Unavailable) as pinned:
        await server.infer("patches", 1, {"patch": patches})
    assert pinned.value.reason == "MODEL_NOT_READY"

    await server.unload("patches")

    assert not server.ready("patches")
    with pytest.raises(Unavailable) as unloaded:
        await server.infer("patches", None, {"patch": patches})
    assert unloaded.value.reason == "MODEL_NOT_READY"
    assert entry(await server.index(), 2).reason == "unloaded"
    await server.unload("patches")  # unloading again does nothing


async def test_unknown_models_are_not_found(tmp_path: Path, server: ModelServer) -> None:
    with pytest.raises(NotFound) as load_error:
        await server.load("missing")
    with pytest.raises(NotFound) as unload_error:
        await server.unload("missing")

    assert load_error.value.reason == unload_error.value.reason == "MODEL_NOT_FOUND"
    assert await server.index() == []


@dataclass
class Clients:
    """Clients that send requests without pause until stopped, and count the answers."""

    server: ModelServer
    patches: np.ndarray
    answered: int = 0
    failures: list[Exception] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self, index: int) -> None:
        rows = self.patches[index % len(self.patches) :][:1]
        while not self.stop.is_set():
            try:
                await self.server.infer("patches", None, {"patch": rows})
                self.answered += 1
            except Exception as error:  # noqa: BLE001 - every failure is recorded and asserted
                self.failures.append(error)
            async with self.changed:
                self.changed.notify_all()

    async def until(self, count: int) -> None:
        """Waits until `count` more requests were answered (or one failed)."""
        target = self.answered + count
        async with self.changed:
            await self.changed.wait_for(lambda: self.answered >= target or bool(self.failures))


async def test_a_version_switch_under_load_fails_no_request(
    tmp_path: Path, server: ModelServer, classifier: TrainedClassifier
) -> None:
    # More clients than a batch holds, so that requests wait in the queue at each switch.
    first_metadata = classifier_metadata({"max_batch_size": 4})
    write_bundle(tmp_path, "patches", 1, first_metadata, {"model.ts": classifier.torchscript})
    metadata = classifier_metadata({"instances": 2, "max_batch_size": 4})
    write_bundle(tmp_path, "patches", 2, metadata, {"model.onnx": classifier.onnx})
    await server.load("patches", 1)
    first = server.model("patches")
    clients = Clients(server, classifier.patches)
    running = [asyncio.create_task(clients.run(index)) for index in range(16)]

    await clients.until(50)
    await server.load("patches", 2)
    second = server.model("patches")
    await clients.until(50)
    await server.load("patches", 1)
    await clients.until(50)
    clients.stop.set()
    await asyncio.gather(*running)

    assert clients.failures == []
    assert first.batcher.statistics.success_count > 0
    assert second.batcher.statistics.success_count > 0
    assert server.model("patches").version == 1
    assert entry(await server.index(), 2).reason == "unloaded: another version serves"


@pytest.mark.parametrize(
    ("metadata", "model_files", "expected_reason"),
    [
        pytest.param(
            classifier_metadata(),
            {"model.onnx": b"\x08\x07 not a protobuf"},
            "MODEL_FILE_UNLOADABLE",
            id="corrupt model file",
        ),
        pytest.param(
            {"network_data_format": {}}, {"model.onnx": b""}, "INVALID_METADATA", id="metadata"
        ),
        pytest.param(classifier_metadata(), {}, "MODEL_FILE_NOT_FOUND", id="no model file"),
        pytest.param(
            classifier_metadata({"device": "cuda", "platform": "tensorrt"}),
            {"model.plan": b"engine"},
            "TENSORRT_NOT_INSTALLED",
            id="tensorrt",
        ),
    ],
)
async def test_a_failed_load_leaves_the_serving_version_alone(
    tmp_path: Path,
    server: ModelServer,
    classifier: TrainedClassifier,
    *,
    metadata: dict[str, object],
    model_files: dict[str, bytes],
    expected_reason: str,
) -> None:
    write_bundle(
        tmp_path, "patches", 1, classifier_metadata(), {"model.ts": classifier.torchscript}
    )
    write_bundle(tmp_path, "patches", 2, metadata, model_files)
    await server.load("patches", 1)
    clients = Clients(server, classifier.patches)
    running = [asyncio.create_task(clients.run(index)) for index in range(4)]
    await clients.until(20)

    with pytest.raises(FailedPrecondition) as error:
        await server.load("patches")
    await clients.until(20)
    clients.stop.set()
    await asyncio.gather(*running)

    assert error.value.reason == expected_reason
    assert clients.failures == []
    assert server.ready("patches", 1)
    index = await server.index()
    assert entry(index, 1).state is ModelState.READY
    assert entry(index, 2).state is ModelState.UNAVAILABLE
    assert entry(index, 2).reason == error.value.message


async def test_a_model_failing_its_warmup_does_not_load(
    tmp_path: Path, server: ModelServer, classifier: TrainedClassifier
) -> None:
    # The network returns one tensor where metadata.json declares two outputs.
    metadata = classifier_metadata()
    outputs = metadata["network_data_format"]["outputs"]
    outputs["logits"] = outputs["probabilities"]
    write_bundle(tmp_path, "patches", 1, metadata, {"model.ts": classifier.torchscript})

    with pytest.raises(FailedPrecondition) as error:
        await server.load("patches")

    assert error.value.reason == "WARMUP_FAILED"
    assert "declared output(s) probabilities, logits" in error.value.message
    assert not server.ready("patches")
    assert entry(await server.index(), 1).state is ModelState.UNAVAILABLE
