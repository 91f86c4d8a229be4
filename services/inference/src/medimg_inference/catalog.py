"""What the repository holds, model by model, for ListModels and GetModel: the versions on
disk, the one serving, and the contract (tensors, labels, task) of the version described."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from medimg_core.errors import MedimgError, NotFound
from medimg_inference.predict import Task, task_of
from medimg_inference.repository import ModelConfig, ModelName, ModelVersion, check_model_name
from medimg_inference.serving import IndexEntry, ModelServer, ModelState


@dataclass(frozen=True, eq=False)
class ModelDescription:
    """One model. `config` and `task` describe the version serving, else the newest; they
    are None (and `state_reason` says why) when that version's bundle cannot be read."""

    name: ModelName
    versions: tuple[ModelVersion, ...]
    loaded_version: ModelVersion | None
    state: ModelState
    state_reason: str
    config: ModelConfig | None
    task: Task | None


async def list_models(
    server: ModelServer, *, after: str | None, limit: int
) -> tuple[list[ModelDescription], bool]:
    """Up to `limit` models named after `after` (by name), and whether more follow."""
    names = await asyncio.to_thread(server.repository.model_names)
    page = [name for name in names if after is None or name > after]
    return await _describe_all(server, page[:limit]), len(page) > limit


async def get_model(server: ModelServer, name: str) -> ModelDescription:
    """The model `name`; NOT_FOUND MODEL_NOT_FOUND if the repository has none."""
    model = check_model_name(name)
    if model not in await asyncio.to_thread(server.repository.model_names):
        raise NotFound("MODEL_NOT_FOUND", f"no model models/{name} in the repository")
    return (await _describe_all(server, [model]))[0]


async def _describe_all(server: ModelServer, names: Sequence[ModelName]) -> list[ModelDescription]:
    index = await server.index()
    return [await _describe(server, name, [e for e in index if e.name == name]) for name in names]


async def _describe(
    server: ModelServer, name: ModelName, entries: list[IndexEntry]
) -> ModelDescription:
    versions = tuple(e.version for e in entries if e.version is not None)
    ready = [e for e in entries if e.state is ModelState.READY]
    loading = [e for e in entries if e.state is ModelState.LOADING]
    loaded = server.model(name).config if ready else None
    state = ModelState.READY if ready else ModelState.LOADING if loading else ModelState.UNAVAILABLE
    reason = "" if ready or loading or not entries else entries[-1].reason
    config = loaded
    if config is None and versions:
        try:
            config = await asyncio.to_thread(server.repository.config, name, versions[-1])
        except MedimgError as error:
            reason = error.message
    task = None
    if config is not None:
        try:
            task = task_of(config)
        except MedimgError as error:
            reason = reason or error.message
    return ModelDescription(
        name=name,
        versions=versions,
        loaded_version=loaded.version if loaded is not None else None,
        state=state,
        state_reason=reason,
        config=config,
        task=task,
    )
