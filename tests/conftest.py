"""Fixtures of the cross-service tests (the platform itself comes from medimg_cli.testing)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from medimg_cli.platform import Platform


@pytest.fixture
def rest(platform: Platform) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=platform.gateway_url, timeout=30) as client:
        yield client
