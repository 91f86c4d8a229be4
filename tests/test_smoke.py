"""Temporary smoke test of the fixtures."""
import httpx
from medimg_cli.platform import Platform

def test_platform_starts(platform: Platform) -> None:
    r = httpx.get(f"{platform.gateway_url}/v1/studies")
    assert r.status_code == 401
