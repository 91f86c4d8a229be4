"""The models this process serves: loading, version switches, unloading and inference.

One version of each model serves at a time. Loading builds the new version beside the old
one (backends, batcher, a warmup request), then swaps it in with one assignment: requests
that arrive after the swap go to the new version, those already queued on the old one are
answered by it, and only then is it closed. So a version switch under load fails no
request, and a load that fails anywhere leaves the old version serving.

With a response cache, a model whose metadata turns it on is looked up there before its
batcher (a hit never queues), and its outputs are stored there after a success.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from monai.transforms.compose import Compose

from medimg_core.errors import FailedPrecondition, MedimgError, NotFound, Unavailable
from medimg_inference.backends import Array, Backend, BackendOptions, load_backend
from medimg_inference.batcher import DynamicBatcher, ModelStatistics
from medimg_inference.cache import ResponseCache, input_digest, off_loop
from medimg_inference.repository import (
    ModelConfig,
    ModelName,
    ModelRepository,
    ModelVersion,
    build_transforms,
    check_model_name,
    warmup_shape,
)


class ModelState(StrEnum):
    """A model version's state, as the KServe repository index reports it."""

    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class IndexEntry:
    """One version of one model of the repository (version None: the model has none)."""

    name: ModelName
    version: ModelVersion | None
    state: ModelState
    reason: str = ""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A version being served. `preprocessing` and `postprocessing` are its MONAI
    pipelines, for the callers that turn series into model inputs and outputs into
    predictions (they work on one batch item, channel first)."""

    config: ModelConfig
    batcher: DynamicBatcher
    preprocessing: Compose
    postprocessing: Compose

    @property
    def version(self) -> ModelVersion:
        return self.config.version


#: Opens one backend of a model version (blocking; called in a thread).
BackendLoader = Callable[[ModelConfig, BackendOptions], Backend]


class ModelServer:
    """Loads models from `repository` and answers inference requests with them, through
    `cache` for the models that turn the response cache on. `load_backend` opens backends
    (tests put a gate in front of the real one)."""

    def __init__(
        self,
        repository: ModelRepository,
        options: BackendOptions | None = None,
        *,
        cache: ResponseCache | None = None,
        backend_loader: BackendLoader = load_backend,
    ) -> None:
        self.repository = repository
        self.options = options or BackendOptions()
        self.cache = cache
        self._load_backend = backend_loader
        self._serving: dict[ModelName, LoadedModel] = {}
        self._loading: dict[ModelName, ModelVersion] = {}
        # Why a version is not serving, for the index: the error of its last load, or that
        # it was unloaded.
        self._reasons: dict[tuple[ModelName, ModelVersion], str] = {}
        self._locks: dict[ModelName, asyncio.Lock] = {}

    async def load(self, name: str, version: int | None = None) -> ModelConfig:
        """Loads `version` of `name` (the newest when None) and makes it the one serving.
        Loading the version already serving loads it afresh (a reload). On failure the
        version serving before, if any, still serves, and the error says why."""
        model = check_model_name(name)
        async with self._locks.setdefault(model, asyncio.Lock()):
            if version is None:
                version = await asyncio.to_thread(self.repository.latest_version, model)
            target = ModelVersion(version)
            self._loading[model] = target
            try:
                loaded = await self._open(model, target)
            except MedimgError as error:
                self._reasons[model, target] = error.message
                raise
            finally:
                del self._loading[model]
            previous = self._serving.get(model)
            self._serving[model] = loaded
            self._reasons.pop((model, target), None)
            if previous is not None:
                if previous.version != target:
                    self._reasons[model, previous.version] = "unloaded: another version serves"
                # Answers what it has queued before it closes.
                await previous.batcher.close()
            return loaded.config

    async def unload(self, name: str) -> None:
        """Stops serving `name` once its queued requests are answered. Unloading a model
        that is not loaded does nothing; NOT_FOUND if the repository has no such model."""
        model = check_model_name(name)
        async with self._locks.setdefault(model, asyncio.Lock()):
            loaded = self._serving.pop(model, None)
            if loaded is None:
                if model not in await asyncio.to_thread(self.repository.model_names):
                    raise NotFound(
                        "MODEL_NOT_FOUND", f"no model {name!r} in the repository", model=name
                    )
                return
            self._reasons[model, loaded.version] = "unloaded"
            await loaded.batcher.close()

    def ready(self, name: str, version: int | None = None) -> bool:
        """Whether `name` serves, at `version` if one is given."""
        loaded = self._serving.get(ModelName(name))
        return loaded is not None and version in (None, loaded.version)

    def model(self, name: str, version: int | None = None) -> LoadedModel:
        """The version of `name` serving; UNAVAILABLE MODEL_NOT_READY if it is not loaded,
        or another version is."""
        loaded = self._serving.get(ModelName(name))
        if loaded is None or version not in (None, loaded.version):
            what = f"model {name!r}" + ("" if version is None else f" version {version}")
            raise Unavailable(
                "MODEL_NOT_READY",
                f"{what} is not loaded",
                model=name[:128],
                **({} if version is None else {"version": version}),
            )
        return loaded

    async def infer(
        self,
        name: str,
        version: int | None,
        inputs: dict[str, Array],
        deadline: float | None = None,
    ) -> dict[str, Array]:
        """Runs `inputs` (see DynamicBatcher.infer) through the version of `name` serving;
        `deadline` is an absolute time.monotonic() value."""
        # No await between finding the model and queueing the request (batcher.infer
        # queues first), so a version switch cannot close the batcher in between.
        loaded = self.model(name, version)
        if self.cache is None or not loaded.config.response_cache:
            return await loaded.batcher.infer(inputs, deadline)
        return await self._infer_cached(self.cache, loaded, version, inputs, deadline)

    async def _infer_cached(
        self,
        cache: ResponseCache,
        loaded: LoadedModel,
        version: int | None,
        inputs: dict[str, Array],
        deadline: float | None,
    ) -> dict[str, Array]:
        arrived_ns = time.monotonic_ns()
        arrays = all(isinstance(array, np.ndarray) for array in inputs.values())
        if not arrays or (deadline is not None and deadline <= time.monotonic()):
            # The batcher refuses these with the right error; there is nothing to look up.
            return await loaded.batcher.infer(inputs, deadline, arrived_ns=arrived_ns)
        size = sum(array.nbytes for array in inputs.values())
        digest = await off_loop(size, input_digest, inputs)
        name = loaded.config.name
        cached = await cache.lookup(
            cache.key(name, loaded.version, digest), loaded.config.outputs, deadline
        )
        lookup_ns = time.monotonic_ns() - arrived_ns
        if cached is not None:
            loaded.batcher.statistics.record_cache_hit(arrived_ns, lookup_ns)
            return cached
        loaded.batcher.statistics.record_cache_miss(lookup_ns)
        # The lookup awaited, so the version may have switched meanwhile: find it again, and
        # queue without an await in between.
        current = self.model(name, version)
        outputs = await current.batcher.infer(inputs, deadline, arrived_ns=arrived_ns)
        if not current.config.response_cache:
            return outputs
        storing_ns = time.monotonic_ns()
        await cache.store(cache.key(name, current.version, digest), outputs, deadline)
        current.batcher.statistics.record_cache_insert(time.monotonic_ns() - storing_ns)
        return outputs

    def statistics(self) -> dict[tuple[ModelName, ModelVersion], ModelStatistics]:
        """The statistics of every version serving, since it loaded (warmup excluded). Safe
        to call from another thread (the metrics server's)."""
        # list() copies the table in one step, so a load or unload cannot change it mid-loop.
        return {
            (name, loaded.version): loaded.batcher.statistics.snapshot()
            for name, loaded in list(self._serving.items())
        }

    async def index(self) -> list[IndexEntry]:
        """Every version of every model in the repository, and every one serving, with its
        state and, when it is not serving, the reason."""
        on_disk = await asyncio.to_thread(self._versions_on_disk)
        entries = []
        for name in sorted(set(on_disk) | set(self._serving)):
            loaded = self._serving.get(name)
            versions = set(on_disk.get(name, ()))
            if loaded is not None:
                versions.add(loaded.version)
            if not versions:
                entries.append(IndexEntry(name, None, ModelState.UNAVAILABLE, "no version"))
            for version in sorted(versions):
                if loaded is not None and loaded.version == version:
                    entries.append(IndexEntry(name, version, ModelState.READY))
                elif self._loading.get(name) == version:
                    entries.append(IndexEntry(name, version, ModelState.LOADING))
                else:
                    reason = self._reasons.get((name, version), "not loaded")
                    entries.append(IndexEntry(name, version, ModelState.UNAVAILABLE, reason))
        return entries

    async def close(self) -> None:
        """Unloads every model, answering what each has queued."""
        for name in list(self._serving):
            await self.unload(name)

    def _versions_on_disk(self) -> dict[ModelName, list[ModelVersion]]:
        return {name: self.repository.versions(name) for name in self.repository.model_names()}

    async def _open(self, name: ModelName, version: ModelVersion) -> LoadedModel:
        """A new version, warmed up and ready to serve; nothing left open on failure."""
        config = await asyncio.to_thread(self.repository.config, name, version)
        backends: list[Backend] = []
        try:
            backends.append(await asyncio.to_thread(self._load_backend, config, self.options))
            for _ in range(config.execution.instances - 1):
                backends.append(await asyncio.to_thread(backends[0].replicate, self.options))
            preprocessing, postprocessing = await asyncio.to_thread(_pipelines, config)
        except BaseException:
            for backend in backends:
                await asyncio.to_thread(backend.close)
            raise
        batcher = DynamicBatcher(
            config.inputs, config.outputs, config.batching, backends, name=f"{name}/{version}"
        )
        batcher.start()
        try:
            await batcher.infer(_warmup_inputs(config))
        except MedimgError as error:
            await batcher.close()
            raise FailedPrecondition(
                "WARMUP_FAILED",
                f"model {name} version {version} failed its warmup request: {error.message}",
                model=name,
                version=version,
            ) from error
        except BaseException:
            await batcher.close()
            raise
        batcher.statistics = ModelStatistics()
        return LoadedModel(config, batcher, preprocessing, postprocessing)


def _pipelines(config: ModelConfig) -> tuple[Compose, Compose]:
    where: dict[str, str | int] = {"model": config.name, "version": config.version}
    return (
        build_transforms(config.preprocessing, field="medimg.preprocessing", **where),
        build_transforms(config.postprocessing, field="medimg.postprocessing", **where),
    )


def _warmup_inputs(config: ModelConfig) -> dict[str, Array]:
    """One row of zeros per input, in the smallest shape each input accepts."""
    return {
        spec.name: np.zeros((1, *warmup_shape(spec)), dtype=spec.dtype) for spec in config.inputs
    }
