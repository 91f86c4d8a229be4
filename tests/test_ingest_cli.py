"""`medimg ingest PATH...` against the running platform, as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from medimg_cli.platform import Platform
from tests.helpers import fresh_instance


def medimg_ingest(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "medimg_cli.cli", "--state", str(platform.state)]
    return subprocess.run(
        [*command, "ingest", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_a_folder_is_uploaded_recursively_with_a_summary(
    platform: Platform, tmp_path: Path
) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.dcm").write_bytes(fresh_instance())
    (tmp_path / "a" / "b" / "two.dcm").write_bytes(fresh_instance("MR_small.dcm"))
    (tmp_path / "a" / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / ".hidden").write_bytes(fresh_instance())  # left out
    again = tmp_path / "again.dcm"
    again.write_bytes((tmp_path / "a" / "one.dcm").read_bytes())

    answer = medimg_ingest(platform, str(tmp_path / "a"), str(again), "--batch-bytes", "20000")
    assert answer.returncode == 1, answer.stdout + answer.stderr  # one file was refused
    assert "4 files" in answer.stdout
    counts = dict(re.findall(r"^\W*(stored|duplicate|rejected|conflict|quarantined)\W+(\d+)",
                             answer.stdout, re.MULTILINE))  # fmt: skip
    assert counts == {"duplicate": "1", "rejected": "1", "stored": "2"}, answer.stdout
    assert "NOT_DICOM" in answer.stdout and "notes.txt" in answer.stdout


def test_a_missing_path_is_named(platform: Platform, tmp_path: Path) -> None:
    answer = medimg_ingest(platform, str(tmp_path / "nowhere"))
    assert answer.returncode == 2
    assert "nowhere: no such file or folder" in answer.stdout
