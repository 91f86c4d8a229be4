"""Runs the training service: `python -m medimg_training`."""

import asyncio
from functools import partial

from medimg_core.server import serve
from medimg_core.settings import load_settings
from medimg_training.app import build
from medimg_training.settings import TrainingSettings

if __name__ == "__main__":
    settings = load_settings(TrainingSettings)
    asyncio.run(serve("training", settings, partial(build, settings)))
