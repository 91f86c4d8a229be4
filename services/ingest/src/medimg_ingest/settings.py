"""Settings of the ingest service (`MEDIMG_INGEST_*`)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from medimg_core.settings import AuditedServiceSettings
from medimg_ingest import deid


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
    #: File of the secret HMAC key (32 bytes or more) behind replacement UIDs, patient
    #: pseudonyms and date shifts (required). Changing it breaks the link between studies
    #: ingested before and after.
    deid_key_file: Path
    #: File of the AES-256 key (32 bytes) that seals the pseudonym-to-patient links (required).
    identity_key_file: Path
    #: The de-identification policy: PS3.15 Annex E options on top of the Basic Profile.
    retain_modified_dates: bool = True
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_safe_private: bool = False
    clean_descriptors: bool = True
    #: Store instances that may show identifying text in their pixels instead of holding
    #: them in quarantine.
    allow_burned_in: bool = False
    #: Seconds an object may sit unindexed (an upload between store and index) before the
    #: sweep removes it as left over from a crash; longer than any upload takes.
    orphan_grace_seconds: float = 3600
    #: The DIMSE SCP (C-ECHO, C-STORE, C-FIND): address, port (0 turns it off), AE title.
    #: DIMSE carries no identity: open the port to the PACS and modalities only.
    dimse_host: str = "127.0.0.1"
    dimse_port: int = 11112
    dimse_ae_title: str = Field(default="MEDIMG", min_length=1, max_length=16)


def policy_of(settings: IngestSettings) -> deid.Policy:
    return deid.Policy(
        retain_modified_dates=settings.retain_modified_dates,
        retain_patient_characteristics=settings.retain_patient_characteristics,
        retain_device_identity=settings.retain_device_identity,
        retain_safe_private=settings.retain_safe_private,
        clean_descriptors=settings.clean_descriptors,
        allow_burned_in=settings.allow_burned_in,
    )
