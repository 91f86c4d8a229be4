"""Typed settings: read once from prefixed environment variables, loud about what is missing."""

from __future__ import annotations

import pydantic
import pytest
from pydantic_settings import SettingsConfigDict

from medimg_core.settings import AuditedServiceSettings, ServiceSettings, load_settings


class DemoSettings(AuditedServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIMG_DEMO_", frozen=True)

    port: int = 7099
    database_url: str
    workers: int = 2


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "AUDIT_TARGET", "PORT", "WORKERS", "GRACE_SECONDS"):
        monkeypatch.delenv(f"MEDIMG_DEMO_{name}", raising=False)
        monkeypatch.delenv(name, raising=False)


def test_missing_required_values_exit_naming_each_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEDIMG_DEMO_AUDIT_TARGET", "127.0.0.1:9000")
    with pytest.raises(SystemExit) as caught:
        load_settings(DemoSettings)
    message = str(caught.value.code)
    assert "DemoSettings" in message
    assert "MEDIMG_DEMO_DATABASE_URL" in message
    assert "MEDIMG_DEMO_AUDIT_TARGET" not in message


def test_every_missing_variable_is_named() -> None:
    with pytest.raises(SystemExit) as caught:
        load_settings(DemoSettings)
    message = str(caught.value.code)
    assert "MEDIMG_DEMO_DATABASE_URL" in message
    assert "MEDIMG_DEMO_AUDIT_TARGET" in message
    assert caught.value.code != 0


def test_an_invalid_value_is_named_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIMG_DEMO_DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("MEDIMG_DEMO_AUDIT_TARGET", "127.0.0.1:9000")
    monkeypatch.setenv("MEDIMG_DEMO_WORKERS", "many")
    with pytest.raises(SystemExit) as caught:
        load_settings(DemoSettings)
    assert "MEDIMG_DEMO_WORKERS" in str(caught.value.code)


def test_values_are_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIMG_DEMO_DATABASE_URL", "postgresql://db/demo")
    monkeypatch.setenv("MEDIMG_DEMO_AUDIT_TARGET", "127.0.0.1:9000")
    monkeypatch.setenv("MEDIMG_DEMO_PORT", "7555")
    monkeypatch.setenv("MEDIMG_DEMO_GRACE_SECONDS", "2.5")
    monkeypatch.setenv("WORKERS", "9")  # no prefix: not ours
    settings = load_settings(DemoSettings)
    assert settings.database_url == "postgresql://db/demo"
    assert settings.audit_target == "127.0.0.1:9000"
    assert settings.port == 7555
    assert settings.grace_seconds == 2.5
    assert settings.workers == 2
    assert settings.max_message_bytes == 64 * 1024 * 1024


def test_unprefixed_variable_does_not_satisfy_a_required_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/other")
    monkeypatch.setenv("MEDIMG_DEMO_AUDIT_TARGET", "127.0.0.1:9000")
    with pytest.raises(SystemExit) as caught:
        load_settings(DemoSettings)
    assert "MEDIMG_DEMO_DATABASE_URL" in str(caught.value.code)


def test_settings_are_frozen_and_know_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ServiceSettings(port=1, trust_domain="example.org", namespace="ns1")
    assert settings.gateway == "spiffe://example.org/ns/ns1/sa/gateway"
    assert settings.spiffe("audit") == "spiffe://example.org/ns/ns1/sa/audit"
    with pytest.raises(pydantic.ValidationError):
        settings.port = 2
