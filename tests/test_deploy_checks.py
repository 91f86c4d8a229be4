"""Static checks of what deploy/ ships: hadolint over the Dockerfile, and checkov over the
Dockerfile, every rendered Kubernetes overlay and the Terraform (with the skips, and
their reasons, in deploy/checkov.yaml). No image is built and nothing is applied here:
there is no Docker daemon and no AWS account in CI."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
CHECKOV_CONFIG = ROOT / "deploy" / "checkov.yaml"
#: checkov lives in a virtualenv of its own (its pins clash with ours): scripts/setup.sh.
CHECKOV = ROOT / ".venv" / "checkov" / "bin" / "checkov"
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"


def checkov(*args: str) -> list[dict[str, Any]]:
    """checkov's JSON reports (one per framework); fails the test if anything failed."""
    assert CHECKOV.exists(), f"{CHECKOV} is missing: run scripts/setup.sh"
    done = subprocess.run(
        [str(CHECKOV), "--config-file", str(CHECKOV_CONFIG), "--output", "json", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )
    reports = json.loads(done.stdout)
    return reports if isinstance(reports, list) else [reports]


def failures(reports: list[dict[str, Any]]) -> list[str]:
    return [
        f"{check['check_id']} {check['resource']} ({check['file_path']}): {check['check_name']}"
        for report in reports
        for check in report["results"]["failed_checks"]
    ]


def passed(reports: list[dict[str, Any]]) -> int:
    return sum(report["summary"]["passed"] for report in reports)


def test_hadolint_passes_the_dockerfile() -> None:
    assert HADOLINT.exists(), f"{HADOLINT} is missing: run scripts/setup.sh"
    done = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_careless_dockerfile(tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN pip install torch\nCMD python -m medimg_ingest\n")
    done = subprocess.run(
        [str(HADOLINT), str(careless)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "DL3006" in done.stdout  # untagged base image
    assert "DL3042" in done.stdout  # pip cache kept


def test_checkov_passes_the_dockerfile() -> None:
    reports = checkov("--framework", "dockerfile", "-f", str(DOCKERFILE))
    assert not failures(reports), failures(reports)
    assert passed(reports) > 20


def test_checkov_catches_a_root_image(tmp_path: Path) -> None:
    root = tmp_path / "Dockerfile"
    root.write_text("FROM python:latest\nRUN pip install torch\n")
    found = {
        line.split()[0] for line in failures(checkov("--framework", "dockerfile", "-f", str(root)))
    }
    assert {"CKV_DOCKER_3", "CKV_DOCKER_7"} <= found  # no USER; a latest tag


def test_checkov_passes_the_kubernetes_overlays(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: scripts/setup.sh installs it"
    files = []
    for overlay in ("dev", "prod"):
        rendered = subprocess.run(
            [kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(rendered)
        files += ["-f", str(path)]
    reports = checkov("--framework", "kubernetes", *files)
    assert not failures(reports), failures(reports)
    assert passed(reports) > 300


def test_checkov_passes_the_terraform() -> None:
    reports = checkov("--framework", "terraform", "-d", str(ROOT / "deploy" / "terraform"))
    assert not failures(reports), failures(reports)
    assert passed(reports) > 150


@pytest.mark.skipif(
    shutil.which("terraform") is None,
    reason="terraform is not installable from this machine's registries (PyPI, Debian, npm)",
)
def test_terraform_is_formatted() -> None:
    done = subprocess.run(
        ["terraform", "fmt", "-check", "-recursive", "-diff", str(ROOT / "deploy" / "terraform")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout
