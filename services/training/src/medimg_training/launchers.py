"""Where a training job's workers run: local processes, or a Kubernetes Job.

The runner hands a launcher a job's `worker.json` and process count and gets back a
`Workers` handle: wait on it (None while they run, then how they ended), stop it (graceful,
then forced past the cancel grace), or find it again after a restart (`recover`).

- `LocalLauncher`: `python -m medimg_training.worker` for one process, `torchrun
  --standalone` for several, in a process group of their own (one `killpg` reaches every
  worker), output in the job's `worker.log`. `jobs.start` records the host and the group's
  pid; after a restart, workers are adopted only when that pid on this host still runs
  this job's `worker.json`. The workers die with the service's pod.
- `KubernetesLauncher`: one `batch/v1` Job per training job, named `medimg-train-<job>`,
  its pod built from the operator's pod template file (the Envoy sidecar, the mesh
  certificate, the shared `object_dir` volume) plus the command, labels and GPUs of the
  job. `jobs.start` records host `kubernetes:<namespace>/jobs/<name>` and pid 0. The Job
  outlives the service: a restarted service adopts it by name. Kubernetes never retries a
  pod (`backoffLimit: 0`): resuming is the service's decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import yaml
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig
from lightkube.resources.batch_v1 import Job as KubernetesJob
from lightkube.types import CascadeType

from medimg_training.jobs import Job
from medimg_training.settings import TrainingSettings

log = logging.getLogger(__name__)

#: Where workers find the Redis URL: the service's own variable (the Kubernetes pod
#: template takes it from the same Secret as the training Deployment).
REDIS_URL_VARIABLE = "MEDIMG_TRAINING_REDIS_URL"


@dataclass(frozen=True)
class Launch:
    """What a launcher needs to start a job's workers."""

    job_id: str
    #: The job's `worker.json` (under `object_dir`, which every worker sees at that path).
    config: Path
    processes: int
    #: GPUs of each process.
    gpus: int = 0
    #: Seconds the workers may run before Kubernetes stops them (the job's `max_runtime`;
    #: the job then fails DEADLINE_EXCEEDED); None: no limit. The runner's monitor
    #: enforces it on local workers.
    deadline_seconds: int | None = None


@dataclass(frozen=True)
class Exit:
    """How a job's workers ended."""

    #: 0: success; > 0: their exit status; < 0: killed by that signal (local processes).
    status: int
    #: What the launcher knows about why (e.g. a Job's Failed condition), for the job's error.
    detail: str = ""
    #: The workload vanished: nobody can say how the workers ended.
    lost: bool = False
    #: They were stopped for running past the job's `max_runtime`.
    deadline: bool = False

    def describe(self) -> str:
        if self.detail:
            return self.detail
        if self.status < 0:
            return f"the workers were killed by signal {signal.Signals(-self.status).name}"
        if self.status:
            return f"the workers exited with status {self.status}"
        return "the workers ended without a result"


class Workers(Protocol):
    """A job's running workers: started by this service or adopted after a restart."""

    #: What `jobs.start` records of them (`worker_host`, `worker_pid`).
    @property
    def host(self) -> str: ...

    @property
    def pid(self) -> int: ...

    async def wait(self, seconds: float) -> Exit | None:
        """Waits up to `seconds`; how they ended, or None while they run."""
        ...

    async def stop(self) -> None:
        """Asks them to stop, forces them past the cancel grace, and returns once they are
        gone (or, for a workload the service does not own, after a bounded wait)."""
        ...


class Launcher(Protocol):
    #: Whether workers outlive the service (then a graceful shutdown leaves them running).
    @property
    def detached(self) -> bool: ...

    async def launch(self, request: Launch) -> Workers: ...

    async def recover(self, job: Job) -> Workers | None:
        """The workers of a job left RUNNING by an earlier run of the service, if they
        still exist (for a Kubernetes Job, also one that has ended since)."""
        ...

    async def aclose(self) -> None: ...


def worker_command(python: str, config: Path, processes: int) -> list[str]:
    module = ["-m", "medimg_training.worker", str(config)]
    if processes == 1:
        return [python, *module]
    return [python, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}", *module]  # fmt: skip


# Local processes ------------------------------------------------------------------------


class _LocalWorkers:
    """A job's worker process group: our child, or one adopted after a restart."""

    def __init__(
        self, pid: int, process: asyncio.subprocess.Process | None, grace_seconds: float
    ) -> None:
        self.host = socket.gethostname()
        self.pid = pid
        self._process = process
        self._grace = grace_seconds

    def _status(self) -> int | None:
        # An adopted group is no child of ours: its exit status is unknown (0).
        if self._process is not None:
            return self._process.returncode
        return None if _alive(self.pid) else 0

    async def wait(self, seconds: float) -> Exit | None:
        if self._process is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), timeout=seconds)
        else:
            await asyncio.sleep(seconds)
        status = self._status()
        return None if status is None else Exit(status)

    def _signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, number)

    async def stop(self) -> None:
        self._signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace
        while self._status() is None and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        # The leader may be gone while its children linger: the group gets SIGKILL anyway.
        self._signal(signal.SIGKILL)
        if self._process is not None:
            await self._process.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purposes.
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return status != "Z"
    return True


def _runs_job(pid: int, config: Path) -> bool:
    """Whether `pid` is still this job's worker, not a stranger that got its pid."""
    try:
        return str(config) in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return False


class LocalLauncher:
    detached = False

    def __init__(self, settings: TrainingSettings, jobs_root: Path) -> None:
        self._python = settings.worker_python or sys.executable
        self._grace = settings.cancel_grace_seconds
        self._redis_url = settings.redis_url
        self._jobs_root = jobs_root

    async def launch(self, request: Launch) -> _LocalWorkers:
        command = worker_command(self._python, request.config, request.processes)
        with (request.config.parent / "worker.log").open("ab") as output:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # The Redis URL (it may hold a password) in the environment, never in
                # worker.json on the shared volume.
                env={**os.environ, "PYTHONUNBUFFERED": "1", REDIS_URL_VARIABLE: self._redis_url},
            )
        return _LocalWorkers(process.pid, process, self._grace)

    async def recover(self, job: Job) -> _LocalWorkers | None:
        pid = job.worker_pid
        config = self._jobs_root / job.job_id / "worker.json"
        if (
            pid is not None
            and job.worker_host == socket.gethostname()
            and _alive(pid)
            and _runs_job(pid, config)
        ):
            return _LocalWorkers(pid, None, self._grace)
        return None

    async def aclose(self) -> None:
        pass


# Kubernetes Jobs -----------------------------------------------------------------------

#: The API calls KubernetesLauncher makes, as (API group, resource) -> verbs: the Role
#: `training-jobs` (deploy/k8s/base/training.yaml) grants exactly these.
KUBERNETES_VERBS: Mapping[tuple[str, str], frozenset[str]] = {
    ("batch", "jobs"): frozenset({"create", "get", "delete"}),
}
#: The container of the pod template that runs the workers.
WORKER_CONTAINER = "worker"
WORKER_LABEL = "app.kubernetes.io/name"
WORKER_APP = "training-worker"
JOB_LABEL = "medimg.dev/training-job"
GPU_RESOURCE = "nvidia.com/gpu"
#: The in-cluster service account directory (namespace, token, ca.crt).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: Seconds between looks at a Job's status (the runner polls more often, for progress).
STATUS_INTERVAL_SECONDS = 2.0
#: Seconds past the cancel grace that a stop waits for a deleted Job to be gone.
STOP_MARGIN_SECONDS = 15.0
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class TemplateError(ValueError):
    """The worker pod template cannot run workers; the message says what to fix."""


def job_name(job_id: str) -> str:
    """The Job of a training job: a DNS-1123 label (job ids are 16 lowercase hex digits)."""
    name = f"medimg-train-{job_id}"
    if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise ValueError(f"job id {job_id!r} makes no valid Kubernetes name")
    return name


def load_template(path: Path, *, mounts: Mapping[str, Path]) -> dict[str, Any]:
    """The pod template (`kind: PodTemplate`) of the file, checked: a `worker` container
    that mounts each of `mounts` (what -> path the service uses for it) at that same path."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise TemplateError(f"cannot read the worker pod template {path}: {error}") from error
    if not isinstance(document, dict) or document.get("kind") != "PodTemplate":
        raise TemplateError(f"{path} is not a PodTemplate (apiVersion: v1, kind: PodTemplate)")
    spec = (document.get("template") or {}).get("spec") or {}
    containers = [c for c in spec.get("containers", []) if c.get("name") == WORKER_CONTAINER]
    if len(containers) != 1:
        raise TemplateError(f"{path}: the pod needs exactly one container {WORKER_CONTAINER!r}")
    mounted = [Path(m["mountPath"]) for m in containers[0].get("volumeMounts", [])]
    for what, needed in mounts.items():
        if not any(needed == m or m in needed.parents for m in mounted):
            raise TemplateError(
                f"{path}: the {WORKER_CONTAINER!r} container must mount the {what} at "
                f"{needed}, where the service writes it"
            )
    if spec.get("restartPolicy", "Never") != "Never":
        raise TemplateError(f"{path}: restartPolicy must be Never (the service resumes jobs)")
    return document


def job_manifest(
    template: Mapping[str, Any],
    request: Launch,
    *,
    python: str = "python",
    image: str = "",
    namespace: str,
    ttl_seconds: int,
    grace_seconds: float,
) -> dict[str, Any]:
    """The `batch/v1` Job of a training job: the template's pod with the job's command,
    labels and GPUs (GPUs of every process, on the one pod)."""
    pod = copy.deepcopy(dict(template["template"]))
    labels = {WORKER_LABEL: WORKER_APP, JOB_LABEL: request.job_id}
    metadata = pod.setdefault("metadata", {})
    metadata["labels"] = {**metadata.get("labels", {}), **labels}
    spec = pod["spec"]
    spec["restartPolicy"] = "Never"
    # Kubernetes' SIGTERM-to-SIGKILL gap for the pods is the cancel grace.
    spec["terminationGracePeriodSeconds"] = math.ceil(grace_seconds)
    (worker,) = [c for c in spec["containers"] if c["name"] == WORKER_CONTAINER]
    worker["command"] = worker_command(python, request.config, request.processes)
    worker.pop("args", None)
    if image:
        worker["image"] = image
    gpus = request.gpus * request.processes
    if gpus:
        resources = worker.setdefault("resources", {})
        for kind in ("requests", "limits"):
            resources.setdefault(kind, {})[GPU_RESOURCE] = gpus
        toleration = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        if toleration not in spec.get("tolerations", []):
            spec["tolerations"] = [*spec.get("tolerations", []), toleration]
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": ttl_seconds,
        "template": pod,
    }
    if request.deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = request.deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(request.job_id), "namespace": namespace, "labels": labels},
        "spec": job_spec,
    }


def job_exit(job: Mapping[str, Any] | None, name: str) -> Exit | None:
    """How a Job's workers ended, from the Job as the API serves it (None: it is gone)."""
    if job is None:
        return Exit(1, f"the worker Job {name} vanished before it ended", lost=True)
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return Exit(0)
        if condition.get("type") == "Failed":
            why = ": ".join(
                part for part in (condition.get("reason"), condition.get("message")) if part
            )
            return Exit(
                1,
                f"the worker Job {name} failed: {why or 'no reason given'}",
                # activeDeadlineSeconds, i.e. the job's max_runtime, ran out.
                deadline=condition.get("reason") == "DeadlineExceeded",
            )
    return None


def in_cluster_namespace(directory: Path = SERVICE_ACCOUNT_DIR) -> str:
    try:
        return (directory / "namespace").read_text().strip()
    except OSError as error:
        raise ValueError(
            "MEDIMG_TRAINING_KUBERNETES_NAMESPACE is unset and this is not a pod with a "
            f"service account token ({error})"
        ) from error


class _KubernetesWorkers:
    def __init__(self, launcher: KubernetesLauncher, name: str) -> None:
        self.name = name
        self.host = f"kubernetes:{launcher.namespace}/jobs/{name}"
        self.pid = 0
        self._launcher = launcher
        self._checked = -math.inf

    async def wait(self, seconds: float) -> Exit | None:
        await asyncio.sleep(seconds)
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked < STATUS_INTERVAL_SECONDS:
            return None
        self._checked = loop.time()
        try:
            job = await self._launcher.get(self.name)
        except Exception:  # the API server may be briefly away: look again later
            log.warning(
                "cannot read the worker Job", exc_info=True, extra={"fields": {"job": self.name}}
            )
            return None
        return job_exit(job, self.name)

    async def stop(self) -> None:
        await self._launcher.delete(self.name)


class KubernetesLauncher:
    """Runs each job's workers as a Kubernetes Job (see the module docstring)."""

    detached = True

    def __init__(self, settings: TrainingSettings, client: AsyncClient, namespace: str) -> None:
        assert settings.worker_pod_template is not None  # the settings insist
        self.namespace = namespace
        self._client = client
        self._settings = settings
        self._template = load_template(
            settings.worker_pod_template,
            mounts={"object_dir": settings.object_dir, "cache_dir": settings.cache},
        )

    @classmethod
    def in_cluster(cls, settings: TrainingSettings) -> KubernetesLauncher:
        namespace = settings.kubernetes_namespace or in_cluster_namespace()
        try:
            config = KubeConfig.from_service_account(SERVICE_ACCOUNT_DIR)
        except (ConfigError, KeyError) as error:
            raise ValueError(
                "MEDIMG_TRAINING_LAUNCHER=kubernetes needs the pod's API token at "
                f"{SERVICE_ACCOUNT_DIR} and KUBERNETES_SERVICE_HOST/PORT ({error!r})"
            ) from error
        client = AsyncClient(config, namespace=namespace, field_manager="medimg-training")
        return cls(settings, client, namespace)

    def manifest(self, request: Launch) -> dict[str, Any]:
        return job_manifest(
            self._template,
            request,
            image=self._settings.worker_image,
            namespace=self.namespace,
            ttl_seconds=self._settings.worker_ttl_seconds,
            grace_seconds=self._settings.cancel_grace_seconds,
        )

    async def launch(self, request: Launch) -> _KubernetesWorkers:
        manifest = self.manifest(request)
        name = manifest["metadata"]["name"]
        job = cast(KubernetesJob, KubernetesJob.from_dict(manifest))
        try:
            await self._client.create(job)
        except ApiError as error:
            if error.status.code != 409:
                raise
            # An earlier attempt's Job (kept ttlSecondsAfterFinished for its logs).
            log.info("replacing the earlier worker Job", extra={"fields": {"job": name}})
            await self.delete(name)
            await self._client.create(job)
        return _KubernetesWorkers(self, name)

    async def recover(self, job: Job) -> _KubernetesWorkers | None:
        name = job_name(job.job_id)
        return _KubernetesWorkers(self, name) if await self.get(name) is not None else None

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            job = await self._client.get(KubernetesJob, name, namespace=self.namespace)
        except ApiError as error:
            if error.status.code == 404:
                return None
            raise
        found: dict[str, Any] = job.to_dict()
        return found

    async def delete(self, name: str) -> None:
        """Deletes the Job and its pods (SIGTERM, SIGKILL past the grace) and waits, bounded,
        until the Job is gone."""
        grace = math.ceil(self._settings.cancel_grace_seconds)
        try:
            await self._client.delete(
                KubernetesJob,
                name,
                namespace=self.namespace,
                grace_period=grace,
                cascade=CascadeType.FOREGROUND,
            )
        except ApiError as error:
            if error.status.code == 404:
                return
            raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace + STOP_MARGIN_SECONDS
        while loop.time() < deadline:
            if await self.get(name) is None:
                return
            await asyncio.sleep(0.5)
        log.warning("the worker Job is still being deleted", extra={"fields": {"job": name}})

    async def aclose(self) -> None:
        await self._client.close()


def build(settings: TrainingSettings, jobs_root: Path) -> LocalLauncher | KubernetesLauncher:
    if settings.launcher == "kubernetes":
        return KubernetesLauncher.in_cluster(settings)
    return LocalLauncher(settings, jobs_root)
