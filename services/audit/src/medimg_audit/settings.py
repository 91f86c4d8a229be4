"""Settings of the audit service (`MEDIMG_AUDIT_*`)."""

from pydantic_settings import SettingsConfigDict

from medimg_core.settings import ServiceSettings


class AuditSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIMG_AUDIT_", frozen=True)

    port: int = 7104
    #: PostgreSQL URL of the audit database (required).
    database_url: str
