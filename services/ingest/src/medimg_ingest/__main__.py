"""Runs the ingest service: `python -m medimg_ingest`."""

import asyncio
from functools import partial

from medimg_core.server import serve
from medimg_core.settings import load_settings
from medimg_ingest.app import build
from medimg_ingest.settings import IngestSettings

if __name__ == "__main__":
    settings = load_settings(IngestSettings)
    asyncio.run(serve("ingest", settings, partial(build, settings)))
