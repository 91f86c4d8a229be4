"""The user's commands, as a new user runs them: `medimg up --demo`, `status`, `token`, `down`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from medimg_cli import mesh as meshlib
from medimg_cli.platform import Platform
from medimg_cli.testing import free_port_offset

pytestmark = pytest.mark.slow


def medimg(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medimg_cli.cli", "--state", str(state), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_up_demo_status_token_down(platform: Platform, tmp_path: Path) -> None:
    # The session's platform holds its ports; this one takes the next free range.
    offset = free_port_offset(meshlib.load_mesh(), start=platform.port_offset + 2000)
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medimg_cli.cli",
            "--state",
            str(tmp_path),
            "up",
            "--demo",
            "--port-offset",
            str(offset),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert up.stdout is not None
    output = []
    deadline = time.monotonic() + 120
    for line in up.stdout:
        output.append(line)
        if "medimg is up" in line or time.monotonic() > deadline:
            break
    shown = "".join(output)
    assert "medimg is up" in shown, shown
    assert "OUTCOME_STORED" in shown
    assert "ACTION_CREATE" in shown and "ACTION_READ" in shown

    status = medimg(tmp_path, "status", "--json")
    assert status.returncode == 0, status.stderr
    described = json.loads(status.stdout)
    for key in ("ca", "ops_cert", "ops_key", "database_url", "redis_url"):
        assert described[key]
    assert Path(described["ops_key"]).stat().st_mode & 0o077 == 0
    assert described["services"]["ingest"]["sidecar"] == f"127.0.0.1:{7001 + offset}"

    token = medimg(tmp_path, "token", "--user", "dr-who", "--role", "clinician")
    assert token.returncode == 0, token.stderr
    studies = httpx.get(
        f"{described['gateway']['url']}/v1/studies",
        headers={"Authorization": f"Bearer {token.stdout.strip()}"},
    )
    assert studies.status_code == 200
    assert studies.json()["studies"]

    down = medimg(tmp_path, "down")
    assert down.returncode == 0, down.stderr
    assert up.wait(60) == 0
    with up.stdout:
        rest = up.stdout.read()
    assert "stopped:" in rest and "=1" not in rest and "=-" not in rest, rest
    assert medimg(tmp_path, "status").returncode == 3
