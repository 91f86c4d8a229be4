"""Ingest's settings: MEDIMG_INGEST_* variables, and a loud exit naming the missing ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medimg_core.settings import load_settings
from medimg_ingest.settings import IngestSettings, policy_of

REQUIRED = (
    "DATABASE_URL", "REDIS_URL", "OBJECT_DIR", "AUDIT_TARGET", "DEID_KEY_FILE", "IDENTITY_KEY_FILE"
)  # fmt: skip


@pytest.fixture(autouse=True)
def no_ingest_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("MEDIMG_INGEST_"):
            monkeypatch.delenv(name)


def test_missing_settings_name_every_variable() -> None:
    with pytest.raises(SystemExit) as caught:
        load_settings(IngestSettings)
    message = str(caught.value.code)
    for name in REQUIRED:
        assert f"MEDIMG_INGEST_{name}" in message


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDIMG_INGEST_DATABASE_URL", "postgresql:///ingest")
    monkeypatch.setenv("MEDIMG_INGEST_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("MEDIMG_INGEST_OBJECT_DIR", str(tmp_path))
    monkeypatch.setenv("MEDIMG_INGEST_AUDIT_TARGET", "127.0.0.1:7211")
    monkeypatch.setenv("MEDIMG_INGEST_DEID_KEY_FILE", str(tmp_path / "deid.key"))
    monkeypatch.setenv("MEDIMG_INGEST_IDENTITY_KEY_FILE", str(tmp_path / "identity.key"))
    monkeypatch.setenv("MEDIMG_INGEST_MAX_INSTANCE_BYTES", "1234")
    monkeypatch.setenv("MEDIMG_INGEST_CLEAN_DESCRIPTORS", "false")
    settings = load_settings(IngestSettings)
    assert not policy_of(settings).clean_descriptors
    assert policy_of(settings).retain_modified_dates  # the default
    assert settings.object_dir == tmp_path
    assert settings.max_instance_bytes == 1234
    assert settings.port == 7101
    assert settings.audit_target == "127.0.0.1:7211"
