"""Runs the inference service: `python -m medimg_inference`."""

import asyncio
from functools import partial

from medimg_core.server import serve
from medimg_core.settings import load_settings
from medimg_inference.app import build
from medimg_inference.settings import InferenceSettings

if __name__ == "__main__":
    settings = load_settings(InferenceSettings)
    asyncio.run(serve("inference", settings, partial(build, settings)))
