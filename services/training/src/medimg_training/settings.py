"""Settings of the training service (`MEDIMG_TRAINING_*`)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from medimg_core.settings import AuditedServiceSettings


class TrainingSettings(AuditedServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIMG_TRAINING_", frozen=True)

    port: int = 7103
    #: PostgreSQL URL of the training database (required).
    database_url: str
    #: Redis URL: workers' progress streams, promotion events, the audit spool (required).
    redis_url: str
    #: Directory of training objects (required): `jobs/<job>/` (work files, checkpoints,
    #: the exported bundle before registration) and `models/<model>/<version>/` (bundles).
    object_dir: Path
    #: Where workers cache the volumes they fetched from ingest: pixels and pseudonyms
    #: only, never PHI. Default `<object_dir>/cache`.
    cache_dir: Path | None = None
    #: host:port of the sidecar's outbound listener for the ingest service; workers use it too.
    ingest_target: str
    #: Threads for torch and disk work off the event loop.
    worker_threads: int = 2
    #: Jobs whose workers run at once; more wait QUEUED.
    max_running_jobs: int = Field(default=1, ge=1)
    #: The most worker processes one job may ask for.
    max_processes_per_job: int = Field(default=4, ge=1)
    #: GPUs on this node that jobs may use; -1 counts them with torch at start-up.
    gpus: int = -1
    #: Seconds cancelled workers get after SIGTERM before SIGKILL.
    cancel_grace_seconds: float = 3.0
    #: Seconds between looks at a running job's workers and progress.
    poll_seconds: float = 0.5
    #: The Python that runs the workers (default: this one).
    worker_python: str = ""

    @property
    def cache(self) -> Path:
        return self.cache_dir or self.object_dir / "cache"
