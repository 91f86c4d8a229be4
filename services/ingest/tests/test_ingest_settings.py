"""Ingest's settings: MEDIMG_INGEST_* variables, and a loud exit naming the missing ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medimg_core.s3 import S3Location
from medimg_core.settings import load_settings
from medimg_ingest.objects import LocalObjectStore, S3ObjectStore, open_store
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


def required_but_the_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDIMG_INGEST_DATABASE_URL", "postgresql:///ingest")
    monkeypatch.setenv("MEDIMG_INGEST_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("MEDIMG_INGEST_AUDIT_TARGET", "127.0.0.1:7211")
    monkeypatch.setenv("MEDIMG_INGEST_DEID_KEY_FILE", str(tmp_path / "deid.key"))
    monkeypatch.setenv("MEDIMG_INGEST_IDENTITY_KEY_FILE", str(tmp_path / "identity.key"))


def test_an_s3_url_chooses_s3_and_needs_no_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    required_but_the_store(monkeypatch, tmp_path)
    monkeypatch.setenv("MEDIMG_INGEST_OBJECT_STORE_URL", "s3://medimg-prod-data/site-a/ingest/")
    monkeypatch.setenv("MEDIMG_INGEST_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("MEDIMG_INGEST_S3_REGION", "eu-west-1")
    settings = load_settings(IngestSettings)
    assert settings.object_dir is None
    store = open_store(settings)  # no request yet: nothing listens at the endpoint
    assert isinstance(store, S3ObjectStore)
    assert store.location == S3Location("medimg-prod-data", "site-a/ingest/")


def test_a_directory_chooses_the_local_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    required_but_the_store(monkeypatch, tmp_path)
    monkeypatch.setenv("MEDIMG_INGEST_OBJECT_DIR", str(tmp_path / "objects"))
    store = open_store(load_settings(IngestSettings))
    assert isinstance(store, LocalObjectStore)
    assert store.root == tmp_path / "objects"


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("s3://medimg-data", S3Location("medimg-data", "")),
        ("s3://medimg-data/", S3Location("medimg-data", "")),
        ("s3://medimg.data-1/a/b", S3Location("medimg.data-1", "a/b/")),
    ],
)
def test_s3_urls(url: str, location: S3Location) -> None:
    assert S3Location.parse(url) == location


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("/var/lib/objects", "is not an s3://bucket[/prefix] URL"),
        ("https://medimg-data.s3.amazonaws.com/x", "is not an s3://bucket[/prefix] URL"),
        ("s3://Medimg_Data", "is not a valid S3 bucket name"),
        ("s3://ab", "is not a valid S3 bucket name"),
        ("s3://key:secret@medimg-data", "has only a bucket and a key prefix"),
        ("s3://medimg-data/a?versionId=1", "has only a bucket and a key prefix"),
        ("s3://medimg-data/a//b", "empty segment"),
    ],
)
def test_a_bad_s3_url_stops_the_start_saying_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, reason: str
) -> None:
    required_but_the_store(monkeypatch, tmp_path)
    monkeypatch.setenv("MEDIMG_INGEST_OBJECT_STORE_URL", url)
    with pytest.raises(SystemExit) as caught:
        load_settings(IngestSettings)
    message = str(caught.value.code)
    assert "MEDIMG_INGEST_OBJECT_STORE_URL" in message
    assert reason in message
    assert "MEDIMG_INGEST_OBJECT_DIR" not in message  # one problem, said once


def test_no_store_at_all_names_both_choices(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    required_but_the_store(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as caught:
        load_settings(IngestSettings)
    message = str(caught.value.code)
    assert "MEDIMG_INGEST_OBJECT_DIR" in message
    assert "MEDIMG_INGEST_OBJECT_STORE_URL" in message
