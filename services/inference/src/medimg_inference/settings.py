"""Settings of the inference service (`MEDIMG_INFERENCE_*`)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from medimg_core.s3 import S3Url
from medimg_core.settings import AuditedServiceSettings


class InferenceSettings(AuditedServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIMG_INFERENCE_", frozen=True)

    port: int = 7102
    #: The model repository: `<dir>/<model>/<version>/` MONAI bundles (required). With
    #: `model_repository_url`, the local part: promoted versions, and the copies of the
    #: versions fetched from S3 (under `.s3/`). TensorRT engines built from ONNX files are
    #: cached under `.engines/`.
    model_repository: Path
    #: A model repository on S3 (or an S3-compatible store), `s3://bucket[/key/prefix]`,
    #: laid out as the directory; its versions are fetched when they are loaded.
    #: Credentials come from the standard AWS chain (environment, IRSA web identity), never
    #: from these settings. Unset: the directory alone.
    model_repository_url: S3Url | None = None
    #: The S3 API's endpoint, for an S3-compatible store (unset: AWS's for the region).
    s3_endpoint_url: str | None = None
    #: The bucket's AWS region (unset: the AWS chain's, e.g. AWS_REGION).
    s3_region: str | None = None
    #: The models loaded at start-up: "*" every model of the repository (as Triton does), ""
    #: none, or names separated by commas. A named model that fails to load stops the start.
    load_models: str = "*"
    #: host:port of the sidecar's outbound listener for ingest (Predict reads series there).
    ingest_target: str
    #: Redis URL of the durable audit spool while audit is down; without one, a Predict
    #: fails closed when audit cannot be reached. The same Redis holds the response cache
    #: and carries the model promotions; without one, both are off.
    redis_url: str | None = None
    #: Seconds a cached response lives (models opt in with "response_cache": true).
    response_cache_ttl_seconds: float = Field(default=3600.0, gt=0)
    #: The largest cached response, in bytes as stored; larger ones are not cached.
    response_cache_max_entry_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    #: Seconds one cache lookup or store may take before it counts as a miss.
    response_cache_timeout_seconds: float = Field(default=0.05, gt=0)
    #: Seconds the cache stops trying after Redis failed.
    response_cache_retry_seconds: float = Field(default=5.0, ge=0)
    #: The registry alias this service serves: promotions to it are loaded as they come.
    promotion_alias: str = "production"
    #: host:port of the sidecar's outbound listener for training. A promotion read from
    #: Redis is acted on only once the registry there confirms it; without one, promotions
    #: are off.
    training_target: str | None = None
    #: Threads one model execution may use on the CPU (torch, ONNX Runtime); unset: every
    #: core. Fewer lets that many instances of a model run at once (backends.TorchCpu):
    #: set a model's `instances` to cores / threads.
    intra_op_threads: int | None = Field(default=None, ge=1)
    #: The largest series volume Predict takes, in bytes of float32 voxels.
    max_volume_bytes: int = Field(default=1024 * 1024 * 1024, ge=1)
