"""Settings of the training service (`MEDIMG_TRAINING_*`)."""

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from medimg_core.s3 import S3Url
from medimg_core.settings import AuditedServiceSettings


class TrainingSettings(AuditedServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIMG_TRAINING_", frozen=True)

    port: int = 7103
    #: PostgreSQL URL of the training database (required).
    database_url: str
    #: Redis URL: workers' progress streams, promotion events, the audit spool (required).
    redis_url: str
    #: Directory of training objects (required): `jobs/<job>/` (work files, checkpoints,
    #: the exported bundle before registration) and `models/<model>/<version>/` (bundles,
    #: unless `model_store_url` is set).
    object_dir: Path
    #: The registry's bundles on S3 (or an S3-compatible store), `s3://bucket[/key/prefix]`:
    #: `<prefix><model>/<version>/`, the layout the inference service reads as its model
    #: repository on S3. Credentials come from the standard AWS chain, never from these
    #: settings. Unset: `<object_dir>/models`.
    model_store_url: S3Url | None = None
    #: The S3 API's endpoint, for an S3-compatible store (unset: AWS's for the region).
    s3_endpoint_url: str | None = None
    #: The bucket's AWS region (unset: the AWS chain's, e.g. AWS_REGION).
    s3_region: str | None = None
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
    #: Seconds between the leader's looks for queued jobs when nothing wakes it (a NOTIFY
    #: from the replica that queued one wakes it at once).
    schedule_poll_seconds: float = Field(default=5.0, gt=0)
    #: Seconds between a replica's tries for the scheduler's lease (see `leader`), and
    #: between the leader's checks that it still holds it.
    leader_retry_seconds: float = Field(default=3.0, gt=0)
    #: The Python that runs the workers (default: this one; local launcher only).
    worker_python: str = ""
    #: Where workers run: `local` processes of this service, a `kubernetes` Job per job, or a
    #: Kubeflow PyTorchJob per job (`kubeflow`: the training operator must be installed);
    #: see `launchers`.
    launcher: Literal["local", "kubernetes", "kubeflow"] = "local"
    #: Namespace of the workers' Jobs (default: this pod's, from its service account).
    kubernetes_namespace: str = ""
    #: The workers' pod template (`kind: PodTemplate`, YAML), for the kubernetes and kubeflow
    #: launchers.
    worker_pod_template: Path | None = None
    #: Image of the workers' container (default: the template's), for the kubernetes and
    #: kubeflow launchers.
    worker_image: str = ""
    #: Seconds a finished worker Job (and its pods' logs) is kept; long enough for the
    #: service to read how it ended.
    worker_ttl_seconds: int = Field(default=86_400, ge=60)

    @model_validator(mode="after")
    def _launcher_settings_fit(self) -> Self:
        kubernetes_only = {
            "KUBERNETES_NAMESPACE": self.kubernetes_namespace,
            "WORKER_POD_TEMPLATE": self.worker_pod_template,
            "WORKER_IMAGE": self.worker_image,
        }
        prefix = "MEDIMG_TRAINING_"
        if self.launcher == "local":
            given = [prefix + name for name, value in kubernetes_only.items() if value]
            if given:
                raise ValueError(
                    f"{', '.join(given)} apply to the kubernetes and kubeflow launchers only: "
                    f"set {prefix}LAUNCHER=kubernetes (or kubeflow) or unset them"
                )
            return self
        chosen = f"{prefix}LAUNCHER={self.launcher}"
        if self.worker_pod_template is None:
            raise ValueError(
                f"{chosen} needs {prefix}WORKER_POD_TEMPLATE: the path of the workers' pod "
                "template (deploy/k8s/base/training-worker-template.yaml)"
            )
        if self.worker_python:
            raise ValueError(
                f"{prefix}WORKER_PYTHON applies to the local launcher only: the worker image's "
                "python runs the workers in Kubernetes"
            )
        if self.gpus < 0:
            raise ValueError(
                f"{chosen} needs {prefix}GPUS: the GPUs one worker pod may have (a node of "
                "the GPU pool), not counted on the service's own node"
            )
        return self

    @property
    def pod_per_process(self) -> bool:
        """Whether each worker process has a pod of its own (`gpus` bounds one process's
        GPUs), rather than one node holding them all (`gpus` bounds the job's)."""
        return self.launcher == "kubeflow"

    @property
    def cache(self) -> Path:
        return self.cache_dir or self.object_dir / "cache"
