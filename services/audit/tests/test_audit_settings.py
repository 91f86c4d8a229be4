"""Audit's settings: MEDIMG_AUDIT_* variables, and a loud exit naming the missing ones."""

from __future__ import annotations

import pytest

from medimg_audit.settings import AuditSettings
from medimg_core.settings import load_settings


def test_missing_database_url_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDIMG_AUDIT_DATABASE_URL", raising=False)
    with pytest.raises(SystemExit) as caught:
        load_settings(AuditSettings)
    assert "MEDIMG_AUDIT_DATABASE_URL" in str(caught.value.code)
    assert "MEDIMG_AUDIT_SIGNING_KEY_FILE" in str(caught.value.code)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIMG_AUDIT_DATABASE_URL", "postgresql:///audit")
    monkeypatch.setenv("MEDIMG_AUDIT_PORT", "7777")
    monkeypatch.setenv("MEDIMG_AUDIT_SIGNING_KEY_FILE", "/keys/audit.pem")
    settings = load_settings(AuditSettings)
    assert (settings.database_url, settings.port) == ("postgresql:///audit", 7777)
    assert str(settings.signing_key_file) == "/keys/audit.pem"
