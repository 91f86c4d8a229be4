"""The models loaded when the service starts, as Triton loads its model repository."""

from __future__ import annotations

import asyncio
import logging

from medimg_core.errors import InvalidArgument, MedimgError
from medimg_inference.repository import check_model_name
from medimg_inference.serving import ModelServer

log = logging.getLogger(__name__)

#: The `load_models` setting that names every model of the repository.
EVERY_MODEL = "*"


def parse_load_models(setting: str) -> list[str] | None:
    """The model names of a `load_models` setting ("a,b"), or None for every model ("*")."""
    if setting.strip() == EVERY_MODEL:
        return None
    names = [name.strip() for name in setting.split(",") if name.strip()]
    for name in names:
        check_model_name(name)
    if len(set(names)) != len(names):
        raise InvalidArgument("DUPLICATE_MODEL", f"load_models names a model twice: {setting!r}")
    return names


async def load_models(server: ModelServer, setting: str) -> None:
    """Loads the newest version of each model the setting names. With "*", a model that
    fails to load is logged and left out (the repository index says why), as Triton's
    repository does; a model named explicitly must load, or the service does not start."""
    names = parse_load_models(setting)
    if names is not None:
        for name in names:
            await server.load(name)
        return
    for name in await asyncio.to_thread(server.repository.model_names):
        try:
            await server.load(name)
        except MedimgError as error:
            log.warning(
                "model not loaded at start-up",
                extra={"fields": {"model": name, "reason": error.reason}},
            )
