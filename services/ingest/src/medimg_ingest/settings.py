"""Settings of the ingest service (`MEDIMG_INGEST_*`)."""

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from medimg_core.s3 import S3Url
from medimg_core.settings import AuditedServiceSettings
from medimg_ingest import deid


class IngestSettings(AuditedServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIMG_INGEST_", frozen=True)

    port: int = 7101
    #: PostgreSQL URL of the ingest index (required).
    database_url: str
    #: Redis URL for the instance events (required).
    redis_url: str
    #: The object store on S3 (or an S3-compatible store): `s3://bucket[/key/prefix]`.
    #: Credentials come from the standard AWS chain (environment, IRSA web identity), never
    #: from these settings. Unset: the directory `object_dir`.
    object_store_url: S3Url | None = None
    #: The S3 API's endpoint, for an S3-compatible store (unset: AWS's for the region).
    s3_endpoint_url: str | None = None
    #: The bucket's AWS region (unset: the AWS chain's, e.g. AWS_REGION).
    s3_region: str | None = None
    #: Directory of the object store (required unless `object_store_url` is set).
    object_dir: Path | None = Field(default=None, validate_default=True)
    #: The largest DICOM file accepted, in bytes.
    max_instance_bytes: int = 1024 * 1024 * 1024
    #: The most bytes one upload stream may carry (it is held in memory until validated).
    max_upload_bytes: int = 2 * 1024 * 1024 * 1024
    #: Threads that write objects and read files, off the event loop (and parse DICOM,
    #: where there are no worker processes).
    worker_threads: int = 4
    #: Processes that parse, validate and de-identify (Python runs one thread at a time
    #: per process: with N cores, N - 1 lets ingest use them all). 0: the worker threads.
    worker_processes: int = Field(default=0, ge=0, le=64)
    #: File of the secret HMAC key (32 bytes or more) behind replacement UIDs, patient
    #: pseudonyms and date shifts (required). Changing it breaks the link between studies
    #: ingested before and after.
    deid_key_file: Path
    #: File of the AES-256 key (32 bytes) that seals the pseudonym-to-patient links (required).
    identity_key_file: Path
    #: Files of earlier identity keys, a JSON list (`["/keys/identity-key.previous.bin"]`):
    #: links they sealed still open (each row names its key id) until `python -m
    #: medimg_ingest.rekey` has re-sealed every link with the current key.
    previous_identity_key_files: tuple[Path, ...] = ()
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
    #: Associations served at once (a thread each); one more is rejected as transient
    #: ("local limit exceeded"), which senders retry. A PACS often opens several.
    dimse_max_associations: int = Field(default=32, ge=1, le=1024)

    @field_validator("object_dir")
    @classmethod
    def _a_store(cls, directory: Path | None, info: ValidationInfo) -> Path | None:
        # A bad URL was reported already; it is missing from info.data then.
        if directory is None and info.data.get("object_store_url", "") is None:
            raise ValueError(
                "Field required: the object store's directory, or MEDIMG_INGEST_OBJECT_STORE_URL "
                "(s3://bucket[/prefix]) for S3"
            )
        return directory


def policy_of(settings: IngestSettings) -> deid.Policy:
    return deid.Policy(
        retain_modified_dates=settings.retain_modified_dates,
        retain_patient_characteristics=settings.retain_patient_characteristics,
        retain_device_identity=settings.retain_device_identity,
        retain_safe_private=settings.retain_safe_private,
        clean_descriptors=settings.clean_descriptors,
        allow_burned_in=settings.allow_burned_in,
    )
