"""The promotion hook on a real Redis stream and real bundles: a promoted version installed
and served under load with no failed request, every replica acting on every promotion, bad
entries skipped without stopping the loop, and entries the registry does not confirm
(forged, stale) refused.

The registry here is a record of what training registered and where its aliases point (the
real one, over the mesh, is exercised end to end by tests/test_training.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from medimg_cli.testing import new_bucket
from medimg_cli.testing import s3_client as make_client
from medimg_core import redis as medimg_redis
from medimg_core import s3
from medimg_core.bundles import bundle_digest
from medimg_core.s3 import S3Location
from medimg_inference.backends import BackendOptions
from medimg_inference.promotion import (
    PROMOTION_STREAM,
    BundleLocation,
    PromotionFollower,
    Registered,
    RegistryUnavailable,
)
from medimg_inference.repository import ModelName, ModelRepository, ModelVersion
from medimg_inference.s3_models import S3_CACHE, S3Models
from medimg_inference.serving import ModelServer, ModelState
from services.inference.tests.support import (
    TORCHSCRIPT_DEPRECATED,
    TrainedClassifier,
    classifier_metadata,
    write_bundle,
)

pytestmark = pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)

Replica = tuple[ModelServer, PromotionFollower]
StartReplica = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = medimg_redis.connect(redis_url)
    yield client
    await client.aclose()


class Registry:
    """What the training registry holds: versions, their bundles and where aliases point."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int], Registered] = {}
        #: How many of the next questions fail as if the registry were unreachable.
        self.unavailable = 0
        self.asked = 0

    async def registered(self, model: ModelName, version: ModelVersion) -> Registered | None:
        self.asked += 1
        if self.unavailable:
            self.unavailable -= 1
            raise RegistryUnavailable("UNAVAILABLE")
        return self.records.get((model, version))

    def point(
        self, name: str, version: int, bundle: BundleLocation, sha256: str, alias: str
    ) -> None:
        """Registers the version (if new) and points the alias at it, as promotion does."""
        for key, record in list(self.records.items()):
            if key[0] == name and alias in record.aliases:
                self.records[key] = replace(record, aliases=record.aliases - {alias})
        old = self.records.get((name, version))
        aliases = (old.aliases if old else frozenset()) | {alias}
        self.records[name, version] = Registered(bundle, sha256, aliases)


@pytest.fixture
def registry() -> Registry:
    return Registry()


@pytest.fixture
def stream() -> str:
    """A stream of this test's own (the production name, made unique)."""
    return f"{PROMOTION_STREAM}:{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def start_replica(
    tmp_path: Path, redis: aioredis.Redis, stream: str, registry: Registry, s3_endpoint: str
) -> AsyncIterator[StartReplica]:
    """start_replica(alias="production"): a model server over a repository of its own (and
    one on S3 with `on_s3`), and its follower task, caught up with the stream."""
    async with AsyncExitStack() as stack:

        async def start(
            alias: str = "production",
            repository: Path | None = None,
            on_s3: S3Location | None = None,
        ) -> Replica:
            root = repository or tmp_path / f"replica-{uuid.uuid4().hex[:8]}"
            root.mkdir(exist_ok=True)
            remote = None
            if on_s3 is not None:  # a model repository on S3 too
                remote = S3Models(on_s3, make_client(s3_endpoint), root / S3_CACHE)
            options = BackendOptions(intra_op_threads=1)
            server = ModelServer(ModelRepository(root, remote), options)
            stack.push_async_callback(server.close)
            follower = PromotionFollower(
                redis, server, registry, alias=alias, stream=stream, block_ms=100, retry_seconds=0.1
            )
            task = asyncio.create_task(follower.run())
            stack.push_async_callback(_cancel, task)
            await asyncio.wait_for(follower.caught_up.wait(), 30)
            return server, follower

        yield start


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def registry_bundle(
    registry: Path, name: str, version: int, classifier: TrainedClassifier, **medimg: Any
) -> tuple[Path, str]:
    """A bundle in the training registry's layout, and its digest."""
    files = {"model.onnx": classifier.onnx} if version % 2 else {"model.ts": classifier.torchscript}
    path = write_bundle(registry, name, version, classifier_metadata(medimg), files)
    return path, bundle_digest(path)


async def publish(  # noqa: PLR0917 - the fields of the entry, in their order
    redis: aioredis.Redis,
    stream: str,
    name: str,
    version: int | str,
    bundle: BundleLocation | str,
    sha256: str,
    alias: str = "production",
) -> None:
    """Writes a promotion entry, as anyone who can write to Redis could."""
    if isinstance(bundle, Path):
        uri = bundle.as_uri()
    else:
        uri = bundle.url if isinstance(bundle, S3Location) else bundle
    fields = {
        "model": name,
        "version": str(version),
        "alias": alias,
        "bundle": uri,
        "sha256": sha256,
    }
    await medimg_redis.publish(redis, stream, fields)


async def promote(  # noqa: PLR0917 - the fields of the entry, in their order
    redis: aioredis.Redis,
    stream: str,
    registry: Registry,
    name: str,
    version: int,
    bundle: BundleLocation,
    sha256: str,
    alias: str = "production",
) -> None:
    """Promotes as training does: the registry's alias first, then the entry."""
    registry.point(name, version, bundle, sha256, alias)
    await publish(redis, stream, name, version, bundle, sha256, alias)


async def until(condition: Callable[[], bool]) -> None:
    """Polls `condition` (state of another task, no event to wait on) for up to 30 s."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_a_promotion_under_load_is_served_with_no_failed_request(
    tmp_path: Path,
    redis: aioredis.Redis,
    stream: str,
    *,
    registry: Registry,
    start_replica: StartReplica,
    classifier: TrainedClassifier,
) -> None:
    bundles = tmp_path / "registry"
    repository = tmp_path / "repository"
    write_bundle(
        repository,
        "patches",
        1,
        classifier_metadata({"max_batch_size": 4}),
        {"model.ts": classifier.torchscript},
    )
    server, follower = await start_replica(repository=repository)
    await server.load("patches", 1)
    bundle, digest = registry_bundle(bundles, "patches", 2, classifier, instances=2)
    failures: list[Exception] = []
    answered = {1: 0, 2: 0}
    stop = asyncio.Event()

    async def client(index: int) -> None:
        rows = classifier.patches[index : index + 1]
        while not stop.is_set():
            version = server.model("patches").version
            try:
                outputs = await server.infer("patches", None, {"patch": rows})
            except Exception as error:  # noqa: BLE001 - every failure is recorded and asserted
                failures.append(error)
                continue
            np.testing.assert_allclose(
                outputs["probabilities"], classifier.expected(rows), atol=1e-5
            )
            answered[version] += 1

    clients = [asyncio.create_task(client(index)) for index in range(12)]
    await until(lambda: answered[1] >= 30)
    await promote(redis, stream, registry, "patches", 2, bundle, digest)
    await until(lambda: server.ready("patches", 2))
    await until(lambda: answered[2] >= 30)
    stop.set()
    await asyncio.gather(*clients)

    assert failures == []
    assert follower.applied == 1 and follower.refused == 0
    installed = repository / "patches" / "2"
    assert bundle_digest(installed) == digest
    # A copy, not links into the registry; nothing left of the staging directory.
    assert not any(path.is_symlink() for path in installed.rglob("*"))
    assert sorted(path.name for path in (repository / "patches").iterdir()) == ["1", "2"]


async def test_every_replica_acts_on_every_promotion_and_catches_up_at_start(
    tmp_path: Path,
    redis: aioredis.Redis,
    stream: str,
    *,
    registry: Registry,
    start_replica: StartReplica,
    classifier: TrainedClassifier,
) -> None:
    bundles = {
        (name, version): registry_bundle(tmp_path / "registry", name, version, classifier)
        for name in ("alpha", "beta")
        for version in (1, 2, 3)
    }
    # Before any replica starts: alpha 1 then 2 to production, beta 1 to staging only.
    for name, version, alias in (
        ("alpha", 1, "production"),
        ("alpha", 2, "production"),
        ("beta", 1, "staging"),
    ):
        await promote(redis, stream, registry, name, version, *bundles[name, version], alias=alias)

    replicas = [await start_replica() for _ in range(2)]

    for server, follower in replicas:
        assert server.ready("alpha", 2)  # the latest promotion, not each in turn
        assert follower.applied == 1
        assert not server.ready("beta")
        assert not (server.repository.root / "alpha" / "1").exists()
    # Staging serves beta, and not alpha's production versions.
    staging, _ = await start_replica(alias="staging")
    assert staging.ready("beta", 1) and not staging.ready("alpha")

    await promote(redis, stream, registry, "alpha", 3, *bundles["alpha", 3])
    await promote(redis, stream, registry, "beta", 2, *bundles["beta", 2])
    for server, _ in replicas:

        def promoted(server: ModelServer = server) -> bool:
            return server.ready("alpha", 3) and server.ready("beta", 2)

        await until(promoted)
    # Read, not consumed: the stream still holds every entry for whoever reads next.
    assert await redis.xlen(stream) == 5
    late, _ = await start_replica()
    assert late.ready("alpha", 3) and late.ready("beta", 2)


async def test_bad_entries_are_logged_skipped_and_the_loop_goes_on(
    tmp_path: Path,
    redis: aioredis.Redis,
    stream: str,
    *,
    registry: Registry,
    start_replica: StartReplica,
    classifier: TrainedClassifier,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundles = tmp_path / "registry"
    good, good_digest = registry_bundle(bundles, "patches", 3, classifier)
    other, other_digest = registry_bundle(bundles, "patches", 5, classifier, max_batch_size=2)
    broken = write_bundle(bundles, "patches", 4, {"network_data_format": {}}, {"model.onnx": b"x"})
    server, follower = await start_replica()
    caplog.set_level(logging.WARNING, logger="medimg_inference.promotion")

    async def refused(count: int) -> None:
        await until(lambda: follower.refused == count)

    # Entries that do not parse.
    await medimg_redis.publish(redis, stream, {"model": "patches", "version": "3"})
    await publish(redis, stream, "patches", "03", good, good_digest)
    await publish(redis, stream, "patches", 3, "https://registry.example/patches/3", good_digest)
    await publish(redis, stream, "patches", 3, "file:patches/3", good_digest)
    await publish(redis, stream, "../patches", 3, good, good_digest)
    # Entries the registry does not confirm: a version it does not hold (forged), then one
    # whose bundle is not the registry's.
    await publish(redis, stream, "patches", 3, good, good_digest)
    await refused(6)
    registry.point("patches", 3, good, good_digest, "production")
    await publish(redis, stream, "patches", 3, other, other_digest)
    await refused(7)
    # Confirmed, but the bundle fails: its content is no longer what was registered, it is
    # gone, it does not load.
    await promote(redis, stream, registry, "patches", 3, good, other_digest)
    await refused(8)
    await promote(redis, stream, registry, "patches", 6, tmp_path / "nowhere", good_digest)
    await refused(9)
    await promote(redis, stream, registry, "patches", 4, broken, bundle_digest(broken))
    await refused(10)
    await promote(redis, stream, registry, "patches", 5, other, other_digest, alias="staging")
    await promote(redis, stream, registry, "patches", 3, good, good_digest)

    await until(lambda: server.ready("patches", 3))
    assert follower.applied == 1 and follower.refused == 10  # staging is not ours: skipped
    # A replayed entry whose alias has moved on since.
    await publish(redis, stream, "patches", 4, broken, bundle_digest(broken))
    await refused(11)
    # Promoting a version the repository holds with other content is refused too.
    await promote(redis, stream, registry, "patches", 3, other, other_digest)
    await refused(12)

    reasons = [record.__dict__["fields"]["reason"] for record in caplog.records]
    assert reasons == [
        "PROMOTION_FIELD_MISSING",
        "INVALID_PROMOTION_VERSION",
        "UNSUPPORTED_BUNDLE_URI",
        "UNSUPPORTED_BUNDLE_URI",
        "INVALID_MODEL_NAME",
        "PROMOTION_NOT_REGISTERED",
        "PROMOTION_MISMATCH",
        "BUNDLE_DIGEST_MISMATCH",
        "BUNDLE_NOT_FOUND",
        "INVALID_METADATA",
        "PROMOTION_NOT_CURRENT",
        "VERSION_EXISTS",
    ]
    # The mismatched copy never reached the repository; the unloadable one did (it is the
    # registry's bundle, faithfully copied) and the index says why it does not serve.
    root = server.repository.root
    assert sorted(path.name for path in (root / "patches").iterdir()) == ["3", "4"]
    index = {entry.version: entry for entry in await server.index()}
    assert index[ModelVersion(3)].state is ModelState.READY
    unloadable = index[ModelVersion(4)]
    assert unloadable.state is ModelState.UNAVAILABLE
    assert "network_data_format" in unloadable.reason
    assert server.ready("patches", 3)


async def test_a_registry_out_of_reach_is_waited_out(
    tmp_path: Path,
    redis: aioredis.Redis,
    stream: str,
    *,
    registry: Registry,
    start_replica: StartReplica,
    classifier: TrainedClassifier,
) -> None:
    server, follower = await start_replica()
    bundle, digest = registry_bundle(tmp_path / "registry", "patches", 1, classifier)
    registry.unavailable = 3
    await promote(redis, stream, registry, "patches", 1, bundle, digest)
    await until(lambda: server.ready("patches", 1))
    assert registry.unavailable == 0 and registry.asked == 4
    assert follower.applied == 1 and follower.refused == 0


@pytest.mark.usefixtures("aws_credentials")
async def test_a_bundle_on_s3_is_fetched_from_the_repository_there_and_checked(
    tmp_path: Path,
    redis: aioredis.Redis,
    stream: str,
    *,
    registry: Registry,
    start_replica: StartReplica,
    classifier: TrainedClassifier,
    s3_endpoint: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Training keeps its bundles on S3 (MEDIMG_TRAINING_MODEL_STORE_URL), which replicas
    serve as their model repository there: a promotion names the version's prefix."""
    client = make_client(s3_endpoint)
    bucket = new_bucket(client, versioned=True)
    repository = S3Location(bucket, "models/")
    bundles = {}
    for version in (1, 2):  # uploaded as training uploads them (medimg_core.s3.upload_tree)
        local, digest = registry_bundle(tmp_path / "registry", "patches", version, classifier)
        prefix = f"models/patches/{version}/"
        s3.upload_tree(client, bucket, prefix, local)
        bundles[version] = (S3Location(bucket, prefix), digest)
    caplog.set_level(logging.WARNING, logger="medimg_inference.promotion")
    on_s3, follower = await start_replica(on_s3=repository)
    elsewhere, stranger = await start_replica()  # no repository on S3

    await promote(redis, stream, registry, "patches", 1, *bundles[1])
    await until(lambda: on_s3.ready("patches", 1))
    assert not (on_s3.repository.root / "patches").exists()  # fetched, not copied in
    assert (on_s3.repository.root / S3_CACHE / "patches" / "1").is_dir()
    await until(lambda: stranger.refused == 1)
    assert not elsewhere.ready("patches")

    # The bucket's copy is not what was registered: refused, version 1 keeps serving.
    client.put_object(Bucket=bucket, Key="models/patches/2/models/extra.bin", Body=b"planted")
    await promote(redis, stream, registry, "patches", 2, *bundles[2])
    await until(lambda: follower.refused == 1 and stranger.refused == 2)
    assert on_s3.ready("patches", 1) and follower.applied == 1
    skipped = [r for r in caplog.records if r.getMessage() == "promotion skipped"]
    reasons = [record.__dict__["fields"]["reason"] for record in skipped]
    assert sorted(reasons) == ["BUNDLE_DIGEST_MISMATCH"] + ["BUNDLE_OUTSIDE_REPOSITORY"] * 2
