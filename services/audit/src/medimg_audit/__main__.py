"""Runs the audit service: `python -m medimg_audit`."""

import asyncio
from functools import partial

from medimg_audit.app import build
from medimg_audit.settings import AuditSettings
from medimg_core.server import serve
from medimg_core.settings import load_settings

if __name__ == "__main__":
    settings = load_settings(AuditSettings)
    asyncio.run(serve("audit", settings, partial(build, settings)))
