"""Settings of the ingest service (`MEDIMG_INGEST_*`)."""

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from medimg_core.settings import AuditedServiceSettings


class IngestSettings(AuditedServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIMG_INGEST_", frozen=True)

    port: int = 7101
    #: PostgreSQL URL of the ingest index (required).
    database_url: str
    #: Redis URL for the instance events (required).
    redis_url: str
    #: Directory of the object store (required).
    object_dir: Path
    #: The largest DICOM file accepted, in bytes.
    max_instance_bytes: int = 1024 * 1024 * 1024
    #: The most bytes one upload stream may carry (it is held in memory until validated).
    max_upload_bytes: int = 2 * 1024 * 1024 * 1024
    #: Threads that parse DICOM and write objects, off the event loop.
    worker_threads: int = 4
