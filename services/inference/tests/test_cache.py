"""The response cache on a real Redis: hits that never queue, the statistics Triton keeps,
and a Redis that is away or silent turning into fast misses, never errors."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import redis.asyncio as aioredis

from medimg_inference.backends import BackendOptions
from medimg_inference.cache import (
    DEFAULT_PREFIX,
    ResponseCache,
    decode_outputs,
    encode_outputs,
    input_digest,
)
from medimg_inference.repository import ModelName, ModelRepository, ModelVersion
from medimg_inference.serving import ModelServer
from services.inference.tests.support import (
    TORCHSCRIPT_DEPRECATED,
    GatedBackend,
    TrainedClassifier,
    classifier_metadata,
    write_bundle,
)

pytestmark = pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)

MakeServer = Callable[..., Awaitable[tuple[ModelServer, str]]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def make_server(tmp_path: Path, classifier: TrainedClassifier) -> AsyncIterator[MakeServer]:
    """make_server(redis_url, cached=True, **cache_options): a model server over a gated
    TorchScript classifier with a fresh name, loaded; returns it and the model's name."""
    made: list[tuple[ModelServer, ResponseCache, str]] = []

    async def make(
        redis_url: str, *, cached: bool = True, **options: float
    ) -> tuple[ModelServer, str]:
        name = f"m{uuid.uuid4().hex[:12]}"
        metadata = classifier_metadata({"response_cache": cached, "max_batch_size": 4})
        write_bundle(tmp_path, name, 1, metadata, {"model.ts": classifier.torchscript})
        settings = {"ttl_seconds": 60.0, "max_entry_bytes": 1 << 20, **options}
        cache = ResponseCache(redis_url, **settings)  # type: ignore[arg-type]
        server = ModelServer(
            ModelRepository(tmp_path),
            BackendOptions(intra_op_threads=1),
            cache=cache,
            backend_loader=GatedBackend.load,
        )
        made.append((server, cache, name))
        await server.load(name)
        return server, name

    yield make
    for server, cache, name in made:
        if server.ready(name):
            gate(server, name).gate.set()
        await server.close()
        await cache.aclose()


def gate(server: ModelServer, name: str) -> GatedBackend:
    return cast(GatedBackend, server.model(name).batcher.backends[0])


def test_the_digest_is_canonical() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((2, 1, 4, 4), dtype=np.float32)
    mask = rng.integers(0, 2, (2, 1, 4, 4)).astype(np.uint8)
    digest = input_digest({"image": image, "mask": mask})

    assert digest == input_digest({"mask": mask, "image": image})
    # The same values laid out otherwise in memory.
    assert digest == input_digest({"image": np.asfortranarray(image), "mask": mask})
    assert (
        len(
            {
                digest,
                input_digest({"image": image, "other": mask}),
                input_digest({"image": image.astype(np.float64), "mask": mask}),
                input_digest({"image": image.reshape(2, 1, 2, 8), "mask": mask}),
                input_digest({"image": image + np.float32(1e-7), "mask": mask}),
            }
        )
        == 5
    )


def test_outputs_round_trip_and_a_value_that_does_not_fit_is_a_miss(
    tmp_path: Path, classifier: TrainedClassifier
) -> None:
    write_bundle(
        tmp_path, "patches", 1, classifier_metadata(), {"model.ts": classifier.torchscript}
    )
    specs = ModelRepository(tmp_path).config("patches").outputs
    outputs = {"probabilities": classifier.expected(classifier.patches[:64])}

    encoded = encode_outputs(outputs)
    decoded = decode_outputs(encoded, specs)

    assert decoded is not None
    np.testing.assert_array_equal(decoded["probabilities"], outputs["probabilities"])
    assert len(encoded) < outputs["probabilities"].nbytes + 100
    assert decode_outputs(encode_outputs({"other": outputs["probabilities"]}), specs) is None
    as_float64 = {"probabilities": outputs["probabilities"].astype(np.float64)}
    assert decode_outputs(encode_outputs(as_float64), specs) is None
    assert decode_outputs(encoded[:-4], specs) is None
    assert decode_outputs(b"\x07junk", specs) is None


async def test_a_repeated_request_is_answered_from_the_cache_without_queueing(
    make_server: MakeServer, redis_url: str, classifier: TrainedClassifier
) -> None:
    server, name = await make_server(redis_url)
    patches = classifier.patches
    first = await server.infer(name, None, {"patch": patches[:2]})

    # Hold the model busy, then ask the same question again: the answer needs no model.
    backend = gate(server, name)
    backend.gate.clear()
    backend.started.clear()
    busy = asyncio.create_task(server.infer(name, None, {"patch": patches[5:6]}))
    assert await asyncio.to_thread(backend.started.wait, 10)
    again = await asyncio.wait_for(server.infer(name, None, {"patch": patches[:2]}), 5)
    assert not busy.done()
    backend.gate.set()
    await busy

    np.testing.assert_array_equal(again["probabilities"], first["probabilities"])
    np.testing.assert_allclose(again["probabilities"], classifier.expected(patches[:2]), atol=1e-5)
    statistics = server.statistics()[ModelName(name), ModelVersion(1)]
    assert (statistics.cache_hit_count, statistics.cache_miss_count) == (1, 2)
    assert statistics.success_count == 3
    assert (statistics.inference_count, statistics.execution_count) == (3, 2)
    assert statistics.cache_hit_ns > 0 and statistics.cache_miss_ns > 0
    # One entry per distinct request; its key is model, version and a digest, nothing else.
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = sorted(await client.keys(f"{DEFAULT_PREFIX}:{name}:*"))
        digest = input_digest({"patch": patches[:2]})
        assert f"{DEFAULT_PREFIX}:{name}:1:{digest}".encode() in keys
        assert len(keys) == 2
        ttl_ms = await client.pttl(keys[0])
        assert 0 < ttl_ms <= 60_000
    finally:
        await client.aclose()


async def test_a_model_without_the_cache_never_touches_it(
    make_server: MakeServer, redis_url: str, classifier: TrainedClassifier
) -> None:
    server, name = await make_server(redis_url, cached=False)

    for _ in range(2):
        await server.infer(name, None, {"patch": classifier.patches[:1]})

    statistics = server.statistics()[ModelName(name), ModelVersion(1)]
    assert (statistics.cache_hit_count, statistics.cache_miss_count) == (0, 0)
    assert statistics.execution_count == 2
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.keys(f"{DEFAULT_PREFIX}:{name}:*") == []
    finally:
        await client.aclose()


async def test_an_entry_above_the_size_cap_is_not_stored(
    make_server: MakeServer, redis_url: str, classifier: TrainedClassifier
) -> None:
    server, name = await make_server(redis_url, max_entry_bytes=16)

    for _ in range(2):
        await server.infer(name, None, {"patch": classifier.patches[:1]})

    statistics = server.statistics()[ModelName(name), ModelVersion(1)]
    assert (statistics.cache_hit_count, statistics.cache_miss_count) == (0, 2)


async def test_an_entry_expires_after_its_ttl(
    make_server: MakeServer, redis_url: str, classifier: TrainedClassifier
) -> None:
    server, name = await make_server(redis_url, ttl_seconds=0.2)
    request = {"patch": classifier.patches[:1]}

    await server.infer(name, None, request)
    await server.infer(name, None, request)
    await asyncio.sleep(0.4)
    await server.infer(name, None, request)

    statistics = server.statistics()[ModelName(name), ModelVersion(1)]
    assert (statistics.cache_hit_count, statistics.cache_miss_count) == (1, 2)


async def test_a_redis_where_nothing_listens_gives_fast_misses(
    make_server: MakeServer, classifier: TrainedClassifier
) -> None:
    server, name = await make_server(f"redis://127.0.0.1:{free_port()}/0")
    request = {"patch": classifier.patches[:1]}

    started = time.monotonic()
    answers = [await server.infer(name, None, request) for _ in range(20)]
    elapsed = time.monotonic() - started

    for outputs in answers:
        np.testing.assert_allclose(
            outputs["probabilities"], classifier.expected(request["patch"]), atol=1e-5
        )
    statistics = server.statistics()[ModelName(name), ModelVersion(1)]
    assert (statistics.cache_hit_count, statistics.cache_miss_count) == (0, 20)
    assert (statistics.success_count, statistics.failure_count) == (20, 0)
    assert elapsed < 2.0
    assert server.cache is not None and not server.cache.available


async def test_a_silent_redis_costs_one_timeout_then_nothing(
    make_server: MakeServer, classifier: TrainedClassifier
) -> None:
    # Something listens and accepts, but never answers: a hung Redis.
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        server, name = await make_server(
            f"redis://127.0.0.1:{port}/0", timeout_seconds=0.1, retry_after_seconds=30
        )
        request = {"patch": classifier.patches[:1]}
        started = time.monotonic()
        await server.infer(name, None, request)
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(10):
            await server.infer(name, None, request)
        next_ten = time.monotonic() - started
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()

    # The lookup timed out (the circuit opened), so nothing more is tried for a while.
    assert 0.1 <= first < 1.5
    assert next_ten < first
    statistics = server.statistics()[ModelName(name), ModelVersion(1)]
    assert (statistics.cache_miss_count, statistics.failure_count) == (11, 0)


async def test_a_lookup_never_eats_the_caller_s_deadline(
    make_server: MakeServer, classifier: TrainedClassifier
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        # A long cache timeout (5 s), but the caller has 2 s: the lookup takes at most half,
        # which leaves the model the other half even on a loaded machine.
        server, name = await make_server(f"redis://127.0.0.1:{port}/0", timeout_seconds=5)
        started = time.monotonic()
        outputs = await server.infer(
            name, None, {"patch": classifier.patches[:1]}, time.monotonic() + 2.0
        )
        elapsed = time.monotonic() - started
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()

    assert outputs["probabilities"].shape == (1, 2)
    assert elapsed < 2.0
