"""Settings of the audit service (`MEDIMG_AUDIT_*`)."""

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from medimg_core.settings import ServiceSettings


class AuditSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIMG_AUDIT_", frozen=True)

    port: int = 7104
    #: PostgreSQL URL of the audit database (required). Migrations run as this user.
    database_url: str
    #: The role the service works as once migrated: it may only INSERT and SELECT.
    database_role: str = "medimg_audit_writer"
    #: PEM file of the Ed25519 key that signs checkpoints (required).
    signing_key_file: Path
    #: PEM files of the log's earlier public keys, a JSON list: after a rotation of the
    #: signing key the log signs on over a latest checkpoint signed by one of them.
    previous_public_key_files: tuple[Path, ...] = ()
    #: The origin line of every checkpoint: names this log.
    origin: str = "medimg.local/audit"
    #: Seconds between checkpoints while the log grows.
    checkpoint_interval_seconds: float = 10.0
