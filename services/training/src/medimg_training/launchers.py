"""Where a training job's workers run: local processes, or a Kubernetes Job.

The runner hands a launcher a job's `worker.json` and process count and gets back a
`Workers` handle: wait on it (None while they run, then how they ended), stop it (graceful,
then forced past the cancel grace), or find it again after a restart (`recover`).

- `LocalLauncher`: `python -m medimg_training.worker` for one process, `torchrun
  --standalone` for several, in a process group of their own (one `killpg` reaches every
  worker), output in the job's `worker.log`. `jobs.start` records the host and the group's
  pid; after a restart, workers are adopted only when that pid on this host still runs
  this job's `worker.json`. The workers die with the service's pod.
- `KubernetesLauncher`: one workload per training job, named `medimg-train-<job>`, its
  pods built from the operator's pod template file (the Envoy sidecar, the mesh
  certificate, the shared `object_dir` volume) plus the command, labels and GPUs of the
  job (`worker_pod`, the one place that builds them). Its `Workload` says which:
  `BATCH_JOB` (`MEDIMG_TRAINING_LAUNCHER=kubernetes`): a `batch/v1` Job, one pod running
  every process (torchrun for several); `PYTORCH_JOB` (`kubeflow`): a Kubeflow
  `kubeflow.org/v1` PyTorchJob, one pod per process (Master, then Workers), whose training
  operator sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK for `torch.distributed`.
  `jobs.start` records host `kubernetes:<namespace>/<plural>/<name>` and pid 0. The
  workload outlives the service: a restarted service adopts it by name. Kubernetes never
  retries a pod (`backoffLimit: 0`): resuming is the service's decision.

Workers get the W3C `traceparent` of the span that launched them in `TRACEPARENT` (the
OpenTelemetry environment carrier), and the OTLP endpoint in `MEDIMG_TRAINING_OTLP_ENDPOINT`
(local: the service's own; Kubernetes: the pod template's, their sidecar's listener).
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import yaml
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig
from lightkube.generic_resource import GenericNamespacedResource, create_namespaced_resource
from lightkube.resources.batch_v1 import Job as KubernetesJob
from lightkube.types import CascadeType

from medimg_training.jobs import Job
from medimg_training.settings import TrainingSettings

log = logging.getLogger(__name__)

#: Where workers find the Redis URL: the service's own variable (the Kubernetes pod
#: template takes it from the same Secret as the training Deployment).
REDIS_URL_VARIABLE = "MEDIMG_TRAINING_REDIS_URL"
#: Where workers send their spans: the service's own variable (`otlp_endpoint`).
OTLP_ENDPOINT_VARIABLE = "MEDIMG_TRAINING_OTLP_ENDPOINT"
#: The W3C traceparent of the span that launched the workers (OpenTelemetry's env carrier).
TRACEPARENT_VARIABLE = "TRACEPARENT"


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
    #: The W3C traceparent of the launching span ('': none); the workers' spans join it.
    traceparent: str = ""


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
        self._stopping: asyncio.Future[None] | None = None

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
        # One stop for all who ask (a cancel and the job's monitor may both): a second
        # SIGTERM would only disturb the workers' unwinding.
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
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
        self._otlp_endpoint = settings.otlp_endpoint
        self._jobs_root = jobs_root

    def environment(self, request: Launch) -> dict[str, str]:
        """The workers' environment: this one's, plus the Redis URL (it may hold a password:
        never in worker.json on the shared volume), the OTLP endpoint and the traceparent
        of this request (none of a parent's own leaks through)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", REDIS_URL_VARIABLE: self._redis_url}
        for variable, value in (
            (OTLP_ENDPOINT_VARIABLE, self._otlp_endpoint),
            (TRACEPARENT_VARIABLE, request.traceparent),
        ):
            if value:
                env[variable] = value
            else:
                env.pop(variable, None)
        return env

    async def launch(self, request: Launch) -> _LocalWorkers:
        command = worker_command(self._python, request.config, request.processes)
        with (request.config.parent / "worker.log").open("ab") as output:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.environment(request),
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


# Kubernetes workloads: a batch Job, or a Kubeflow PyTorchJob ----------------------------

#: The API calls KubernetesLauncher makes, as (API group, resource) -> verbs, per workload
#: kind: the Role `training-jobs` (deploy/k8s/base/training.yaml) grants exactly the batch
#: Job's; the kubeflow component (deploy/k8s/components/kubeflow) the PyTorchJob's.
KUBERNETES_VERBS: Mapping[tuple[str, str], frozenset[str]] = {
    ("batch", "jobs"): frozenset({"create", "get", "delete"}),
}
KUBEFLOW_VERBS: Mapping[tuple[str, str], frozenset[str]] = {
    ("kubeflow.org", "pytorchjobs"): frozenset({"create", "get", "delete"}),
}
#: The container of the pod template that runs the workers.
WORKER_CONTAINER = "worker"
#: What the training operator calls it: it sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE and
#: RANK for this container, and refuses a PyTorchJob without one.
PYTORCH_CONTAINER = "pytorch"
#: The master's rendezvous port (the operator's default port and name, stated explicitly:
#: the kubeflow NetworkPolicy opens it between a job's pods).
PYTORCH_PORT_NAME = "pytorchjob-port"
PYTORCH_PORT = 23456
WORKER_LABEL = "app.kubernetes.io/name"
WORKER_APP = "training-worker"
JOB_LABEL = "medimg.dev/training-job"
GPU_RESOURCE = "nvidia.com/gpu"
#: The in-cluster service account directory (namespace, token, ca.crt).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: Seconds between looks at a workload's status (the runner polls more often, for progress).
STATUS_INTERVAL_SECONDS = 2.0
#: Seconds past the cancel grace that a stop waits for a deleted workload to be gone.
STOP_MARGIN_SECONDS = 15.0
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

#: Kubeflow's PyTorchJob, through lightkube's generic resources (no typed model ships).
PyTorchJob = create_namespaced_resource("kubeflow.org", "v1", "PyTorchJob", "pytorchjobs")


class TemplateError(ValueError):
    """The worker pod template cannot run workers; the message says what to fix."""


def job_name(job_id: str) -> str:
    """The workload of a training job: a DNS-1035 label (job ids are 16 lowercase hex
    digits), as both a Job and a PyTorchJob need."""
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


def _labels(request: Launch) -> dict[str, str]:
    return {WORKER_LABEL: WORKER_APP, JOB_LABEL: request.job_id}


def worker_pod(
    template: Mapping[str, Any],
    request: Launch,
    *,
    processes: int,
    python: str,
    image: str,
    grace_seconds: float,
) -> dict[str, Any]:
    """The pod (a PodTemplateSpec) of `processes` of a job's workers: the template's, with
    the job's labels, the command and GPUs of those processes on the worker container, the
    traceparent in its environment, and the cancel grace as Kubernetes' SIGTERM-to-SIGKILL
    gap. The template is not changed."""
    command = worker_command(python, request.config, processes)
    gpus = request.gpus * processes
    pod = copy.deepcopy(dict(template["template"]))
    metadata = pod.setdefault("metadata", {})
    metadata["labels"] = {**metadata.get("labels", {}), **_labels(request)}
    spec = pod["spec"]
    spec["restartPolicy"] = "Never"
    spec["terminationGracePeriodSeconds"] = math.ceil(grace_seconds)
    (worker,) = [c for c in spec["containers"] if c["name"] == WORKER_CONTAINER]
    worker["command"] = command
    worker.pop("args", None)
    if image:
        worker["image"] = image
    if request.traceparent:
        env = [e for e in worker.get("env", []) if e["name"] != TRACEPARENT_VARIABLE]
        worker["env"] = [*env, {"name": TRACEPARENT_VARIABLE, "value": request.traceparent}]
    if gpus:
        resources = worker.setdefault("resources", {})
        for kind in ("requests", "limits"):
            resources.setdefault(kind, {})[GPU_RESOURCE] = gpus
        toleration = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        if toleration not in spec.get("tolerations", []):
            spec["tolerations"] = [*spec.get("tolerations", []), toleration]
    return pod


def _metadata(request: Launch, namespace: str) -> dict[str, Any]:
    return {"name": job_name(request.job_id), "namespace": namespace, "labels": _labels(request)}


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
    """The `batch/v1` Job of a training job: one pod running every process (torchrun for
    several), with the GPUs of all of them."""
    pod = worker_pod(template, request, processes=request.processes, python=python,
                     image=image, grace_seconds=grace_seconds)  # fmt: skip
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
        "metadata": _metadata(request, namespace),
        "spec": job_spec,
    }


def pytorchjob_manifest(
    template: Mapping[str, Any],
    request: Launch,
    *,
    python: str = "python",
    image: str = "",
    namespace: str,
    ttl_seconds: int,
    grace_seconds: float,
) -> dict[str, Any]:
    """The `kubeflow.org/v1` PyTorchJob of a training job: one pod per process (a Master,
    then `processes - 1` Workers), each `python -m medimg_training.worker CONFIG` with the
    GPUs of one process; the training operator gives each its RANK and the Master's address.
    Nothing retries (`backoffLimit: 0`, `restartPolicy: Never`): resuming is the service's."""
    pod = worker_pod(template, request, processes=1, python=python, image=image,
                     grace_seconds=grace_seconds)  # fmt: skip
    (worker,) = [c for c in pod["spec"]["containers"] if c["name"] == WORKER_CONTAINER]
    worker["name"] = PYTORCH_CONTAINER
    ports = [p for p in worker.get("ports", []) if p.get("name") != PYTORCH_PORT_NAME]
    worker["ports"] = [
        *ports,
        {"name": PYTORCH_PORT_NAME, "containerPort": PYTORCH_PORT, "protocol": "TCP"},
    ]
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": "Never", "template": pod}
    }
    if request.processes > 1:
        replicas["Worker"] = {
            "replicas": request.processes - 1,
            "restartPolicy": "Never",
            "template": copy.deepcopy(pod),
        }
    run_policy: dict[str, Any] = {
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": ttl_seconds,
        # A Master that ended takes its still running Workers with it; ended pods (and
        # their logs) stay for the TTL.
        "cleanPodPolicy": "Running",
    }
    if request.deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = request.deadline_seconds
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(request, namespace),
        "spec": {"runPolicy": run_policy, "pytorchReplicaSpecs": replicas},
    }


def _exit(
    found: Mapping[str, Any] | None,
    name: str,
    *,
    kind: str,
    succeeded: str,
    past_deadline: Callable[[str, str], bool],
) -> Exit | None:
    """How a workload ended, from its `status.conditions` (None: not yet)."""
    if found is None:
        return Exit(1, f"the worker {kind} {name} vanished before it ended", lost=True)
    for condition in (found.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == succeeded:
            return Exit(0)
        if condition.get("type") == "Failed":
            reason, message = condition.get("reason") or "", condition.get("message") or ""
            why = ": ".join(part for part in (reason, message) if part)
            return Exit(
                1,
                f"the worker {kind} {name} failed: {why or 'no reason given'}",
                deadline=past_deadline(reason, message),
            )
    return None


def job_exit(job: Mapping[str, Any] | None, name: str) -> Exit | None:
    """How a Job's workers ended, from the Job as the API serves it (None: it is gone)."""
    return _exit(
        job,
        name,
        kind="Job",
        succeeded="Complete",
        # activeDeadlineSeconds, i.e. the job's max_runtime, ran out.
        past_deadline=lambda reason, _message: reason == "DeadlineExceeded",
    )


def pytorchjob_exit(job: Mapping[str, Any] | None, name: str) -> Exit | None:
    """How a PyTorchJob's workers ended, from the PyTorchJob as the API serves it (None: it
    is gone). The operator marks a run past `activeDeadlineSeconds` Failed with reason
    `PyTorchJobFailed` and a message saying so (older operators: reason DeadlineExceeded)."""
    return _exit(
        job,
        name,
        kind="PyTorchJob",
        succeeded="Succeeded",
        past_deadline=lambda reason, message: (
            reason == "DeadlineExceeded" or "longer than specified deadline" in message
        ),
    )


def in_cluster_namespace(directory: Path = SERVICE_ACCOUNT_DIR) -> str:
    try:
        return (directory / "namespace").read_text().strip()
    except OSError as error:
        raise ValueError(
            "MEDIMG_TRAINING_KUBERNETES_NAMESPACE is unset and this is not a pod with a "
            f"service account token ({error})"
        ) from error


Manifest = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Workload:
    """A kind of Kubernetes object that runs a job's workers."""

    #: The lightkube resource class.
    resource: type[KubernetesJob] | type[GenericNamespacedResource]
    #: The resource's plural, as in the host `jobs.start` records.
    plural: str
    #: The launcher setting that chooses it.
    launcher: str
    manifest: Manifest
    exit: Callable[[Mapping[str, Any] | None, str], Exit | None]


BATCH_JOB = Workload(KubernetesJob, "jobs", "kubernetes", job_manifest, job_exit)
PYTORCH_JOB = Workload(PyTorchJob, "pytorchjobs", "kubeflow", pytorchjob_manifest, pytorchjob_exit)


class _KubernetesWorkers:
    def __init__(self, launcher: KubernetesLauncher, name: str) -> None:
        self.name = name
        self.host = f"kubernetes:{launcher.namespace}/{launcher.workload.plural}/{name}"
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
            found = await self._launcher.get(self.name)
        except Exception:  # the API server may be briefly away: look again later
            log.warning(
                "cannot read the workers' workload",
                exc_info=True,
                extra={"fields": {"job": self.name}},
            )
            return None
        return self._launcher.workload.exit(found, self.name)

    async def stop(self) -> None:
        await self._launcher.delete(self.name)


class KubernetesLauncher:
    """Runs each job's workers as a Kubernetes `Workload` (see the module docstring)."""

    detached = True

    def __init__(
        self,
        settings: TrainingSettings,
        client: AsyncClient,
        namespace: str,
        workload: Workload = BATCH_JOB,
    ) -> None:
        assert settings.worker_pod_template is not None  # the settings insist
        self.namespace = namespace
        self.workload = workload
        self._client = client
        self._settings = settings
        self._template = load_template(
            settings.worker_pod_template,
            mounts={"object_dir": settings.object_dir, "cache_dir": settings.cache},
        )

    @classmethod
    def in_cluster(
        cls, settings: TrainingSettings, workload: Workload = BATCH_JOB
    ) -> KubernetesLauncher:
        namespace = settings.kubernetes_namespace or in_cluster_namespace()
        try:
            config = KubeConfig.from_service_account(SERVICE_ACCOUNT_DIR)
        except (ConfigError, KeyError) as error:
            raise ValueError(
                f"MEDIMG_TRAINING_LAUNCHER={workload.launcher} needs the pod's API token at "
                f"{SERVICE_ACCOUNT_DIR} and KUBERNETES_SERVICE_HOST/PORT ({error!r})"
            ) from error
        client = AsyncClient(config, namespace=namespace, field_manager="medimg-training")
        return cls(settings, client, namespace, workload)

    def manifest(self, request: Launch) -> dict[str, Any]:
        return self.workload.manifest(
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
        workload = cast(
            KubernetesJob | GenericNamespacedResource, self.workload.resource.from_dict(manifest)
        )
        try:
            await self._client.create(workload)
        except ApiError as error:
            if error.status.code != 409:
                raise
            # An earlier attempt's (kept ttlSecondsAfterFinished for its logs).
            log.info("replacing the earlier workload", extra={"fields": {"job": name}})
            await self.delete(name)
            await self._client.create(workload)
        return _KubernetesWorkers(self, name)

    async def recover(self, job: Job) -> _KubernetesWorkers | None:
        name = job_name(job.job_id)
        return _KubernetesWorkers(self, name) if await self.get(name) is not None else None

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            found = await self._client.get(self.workload.resource, name, namespace=self.namespace)
        except ApiError as error:
            if error.status.code == 404:
                return None
            raise
        as_dict: dict[str, Any] = found.to_dict()
        return as_dict

    async def delete(self, name: str) -> None:
        """Deletes the workload and its pods (SIGTERM, SIGKILL past the grace) and waits,
        bounded, until it is gone."""
        grace = math.ceil(self._settings.cancel_grace_seconds)
        try:
            await self._client.delete(
                self.workload.resource,
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
        log.warning("the workers' workload is still being deleted", extra={"fields": {"job": name}})

    async def aclose(self) -> None:
        await self._client.close()


def build(settings: TrainingSettings, jobs_root: Path) -> LocalLauncher | KubernetesLauncher:
    if settings.launcher == "kubernetes":
        return KubernetesLauncher.in_cluster(settings, BATCH_JOB)
    if settings.launcher == "kubeflow":
        return KubernetesLauncher.in_cluster(settings, PYTORCH_JOB)
    return LocalLauncher(settings, jobs_root)
