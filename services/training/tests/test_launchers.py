"""The Kubernetes launcher without a cluster: the Jobs it builds from the shipped pod
template (valid against the Kubernetes schemas, offline), how it reads a Job's status, and
the settings that choose a launcher. Its API calls (create, get, delete) are not exercised
here: no API server runs offline. And how the local launcher stops its workers."""

from __future__ import annotations

import ast
import asyncio
import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User
from pydantic import ValidationError

from medimg_training import launchers
from medimg_training.jobs import Job, State
from medimg_training.launchers import Exit, Launch, TemplateError
from medimg_training.runner import launch_request
from medimg_training.settings import TrainingSettings
from services.training.tests.support import logged, stand_in_python, wait_for_line

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = ROOT / "deploy" / "k8s" / "base" / "training-worker-template.yaml"
#: The object_dir and cache_dir the training Deployment gives the service.
OBJECT_DIR = Path("/var/lib/medimg/training")
CACHE_DIR = Path("/var/cache/medimg")
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
JOB = "0123456789abcdef"
CONFIG = OBJECT_DIR / "jobs" / JOB / "worker.json"


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return launchers.load_template(
        TEMPLATE, mounts={"object_dir": OBJECT_DIR, "cache_dir": CACHE_DIR}
    )


def build(template: dict[str, Any], request: Launch, **options: Any) -> dict[str, Any]:
    return launchers.job_manifest(
        template,
        request,
        **{"namespace": "medimg", "ttl_seconds": 86_400, "grace_seconds": 2.5, **options},
    )


def containers(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = job["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


# --- the Job of a training job ---------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_a_single_process_job(template: dict[str, Any], version: str) -> None:
    job = build(template, Launch(JOB, CONFIG, processes=1))
    kubernetes_validate.validate(job, version, strict=True)
    assert job["metadata"]["name"] == f"medimg-train-{JOB}"
    assert job["metadata"]["namespace"] == "medimg"
    labels = {"app.kubernetes.io/name": "training-worker", "medimg.dev/training-job": JOB}
    assert job["metadata"]["labels"] == labels
    spec = job["spec"]
    assert spec["backoffLimit"] == 0, "resuming is the service's decision, not Kubernetes'"
    assert spec["ttlSecondsAfterFinished"] == 86_400
    assert "activeDeadlineSeconds" not in spec
    pod = spec["template"]
    assert labels.items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "medimg"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 3  # the cancel grace, rounded up
    worker = containers(job)["worker"]
    assert worker["command"] == ["python", "-m", "medimg_training.worker", str(CONFIG)]
    assert worker["image"] == "medimg-training"
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    assert "tolerations" not in pod["spec"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_a_jobs_max_runtime_is_the_jobs_active_deadline(
    template: dict[str, Any], version: str
) -> None:
    spec = {"resources": {"processes": 1, "gpus": 0}, "max_runtime": "5400.500s"}
    job = Job(JOB, spec, State.QUEUED, "max", datetime.now(UTC), None, None, "", "", {}, "", 0,
              None, "", False)  # fmt: skip
    manifest = build(template, launch_request(job, CONFIG))
    kubernetes_validate.validate(manifest, version, strict=True)
    assert manifest["spec"]["activeDeadlineSeconds"] == 5401  # whole seconds, rounded up
    without = Job(**{**job.__dict__, "spec": {"resources": spec["resources"]}})
    assert "activeDeadlineSeconds" not in build(template, launch_request(without, CONFIG))["spec"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_a_multi_process_gpu_job_with_a_deadline(template: dict[str, Any], version: str) -> None:
    request = Launch(JOB, CONFIG, processes=2, gpus=1, deadline_seconds=7200)
    job = build(template, request, image="registry.example/medimg-training:1.2.3-cuda")
    kubernetes_validate.validate(job, version, strict=True)
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    worker = containers(job)["worker"]
    assert worker["command"] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "medimg_training.worker",
        str(CONFIG),
    ]
    assert worker["image"] == "registry.example/medimg-training:1.2.3-cuda"
    # One pod holds every process: the GPUs of all of them, and leave to use a GPU node.
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert worker["resources"]["limits"]["memory"] == "16Gi"  # the template's own stay
    assert job["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_the_templates_sidecar_and_volumes_are_kept(template: dict[str, Any]) -> None:
    before = copy.deepcopy(template)
    job = build(template, Launch(JOB, CONFIG, processes=2, gpus=1))
    assert template == before, "the template is not changed by a job"
    pod = job["spec"]["template"]["spec"]
    shipped = template["template"]["spec"]
    assert pod["volumes"] == shipped["volumes"]
    assert pod["initContainers"] == shipped["initContainers"]
    (envoy,) = pod["initContainers"]
    assert envoy["restartPolicy"] == "Always", "a native sidecar: the Job ends with the worker"
    assert pod["serviceAccountName"] == "training-worker"
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["artefacts"]["persistentVolumeClaim"]["claimName"] == "training-artefacts"
    assert volumes["mesh-tls"]["secret"]["secretName"] == "training-mesh-tls"
    assert volumes["envoy-config"]["configMap"]["name"] == "envoy-training-worker"
    worker = containers(job)["worker"]
    mounts = {m["name"]: Path(m["mountPath"]) for m in worker["volumeMounts"]}
    # worker.json, checkpoints and results are files on the shared volume, at the same path.
    assert mounts["artefacts"] == OBJECT_DIR and mounts["cache"] == CACHE_DIR
    assert "mesh-tls" not in mounts, "only Envoy holds the mesh key"
    # Hardened as the services' pods are.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for name, container in containers(job).items():
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"]["drop"] == ["ALL"], name
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name


def test_a_job_id_that_makes_no_kubernetes_name_is_refused() -> None:
    assert launchers.job_name(JOB) == f"medimg-train-{JOB}"
    for bad in ("ABC", "a_b", "x" * 60, ""):
        with pytest.raises(ValueError, match="no valid Kubernetes name"):
            launchers.job_name(bad)


def write_template(tmp_path: Path, change: Any) -> Path:
    document = yaml.safe_load(TEMPLATE.read_text())
    change(document)
    path = tmp_path / "template.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = document["template"]["spec"]
    return spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(kind="Pod"), "is not a PodTemplate"),
        (
            lambda d: pod_spec(d)["containers"][0].update(name="trainer"),
            "exactly one container 'worker'",
        ),
        (
            lambda d: pod_spec(d)["containers"][0]["volumeMounts"].pop(0),
            "must mount the object_dir at /var/lib/medimg/training",
        ),
        (
            lambda d: pod_spec(d)["containers"][0]["volumeMounts"][1].update(mountPath="/cache"),
            "must mount the cache_dir at /var/cache/medimg",
        ),
        (lambda d: pod_spec(d).update(restartPolicy="OnFailure"), "restartPolicy must be Never"),
    ],
)
def test_a_template_that_cannot_run_workers_is_refused(
    tmp_path: Path, change: Any, message: str
) -> None:
    path = write_template(tmp_path, change)
    with pytest.raises(TemplateError, match=message):
        launchers.load_template(path, mounts={"object_dir": OBJECT_DIR, "cache_dir": CACHE_DIR})


def test_a_mount_above_the_directory_covers_it(tmp_path: Path) -> None:
    launchers.load_template(
        TEMPLATE, mounts={"object_dir": OBJECT_DIR / "deeper", "cache_dir": CACHE_DIR / "x"}
    )
    with pytest.raises(TemplateError, match="cannot read"):
        launchers.load_template(tmp_path / "missing.yaml", mounts={})


# --- a Job's status ----------------------------------------------------------------------

NAME = f"medimg-train-{JOB}"
RUNNING: dict[str, Any] = {
    "metadata": {"name": NAME},
    "status": {"active": 1, "ready": 1, "startTime": "2026-11-24T01:00:00Z", "terminating": 0},
}
# Kubernetes 1.31+: SuccessCriteriaMet, then Complete once the pods are gone.
COMPLETE: dict[str, Any] = {
    "metadata": {"name": NAME},
    "status": {
        "conditions": [
            {
                "type": "SuccessCriteriaMet",
                "status": "True",
                "reason": "CompletionsReached",
                "message": "Reached expected number of succeeded pods",
                "lastProbeTime": "2026-11-24T01:10:00Z",
                "lastTransitionTime": "2026-11-24T01:10:00Z",
            },
            {
                "type": "Complete",
                "status": "True",
                "reason": "CompletionsReached",
                "message": "Reached expected number of succeeded pods",
                "lastProbeTime": "2026-11-24T01:10:01Z",
                "lastTransitionTime": "2026-11-24T01:10:01Z",
            },
        ],
        "startTime": "2026-11-24T01:00:00Z",
        "completionTime": "2026-11-24T01:10:01Z",
        "succeeded": 1,
        "terminating": 0,
        "ready": 0,
    },
}


def failed(reason: str, message: str, *, terminal: bool = True) -> dict[str, Any]:
    conditions = [
        {
            "type": "FailureTarget",
            "status": "True",
            "reason": reason,
            "message": message,
            "lastProbeTime": "2026-11-24T01:05:00Z",
            "lastTransitionTime": "2026-11-24T01:05:00Z",
        }
    ]
    if terminal:
        conditions.append({**conditions[0], "type": "Failed"})
    return {
        "metadata": {"name": NAME},
        "status": {"conditions": conditions, "failed": 1, "terminating": 0 if terminal else 1},
    }


def test_a_running_job_has_not_ended() -> None:
    assert launchers.job_exit(RUNNING, NAME) is None
    assert launchers.job_exit({"metadata": {"name": NAME}, "status": {}}, NAME) is None
    suspended = {"status": {"conditions": [{"type": "Suspended", "status": "True"}]}}
    assert launchers.job_exit(suspended, NAME) is None
    # A condition that is no longer true does not count.
    stale = copy.deepcopy(COMPLETE)
    for condition in stale["status"]["conditions"]:
        condition["status"] = "False"
    assert launchers.job_exit(stale, NAME) is None


def test_a_complete_job_succeeded() -> None:
    assert launchers.job_exit(COMPLETE, NAME) == Exit(0)


def test_a_failed_job_says_why() -> None:
    ended = launchers.job_exit(
        failed("BackoffLimitExceeded", "Job has reached the specified backoff limit"), NAME
    )
    assert ended is not None and ended.status != 0 and not ended.lost
    assert ended.describe() == (
        f"the worker Job {NAME} failed: BackoffLimitExceeded: "
        "Job has reached the specified backoff limit"
    )
    deadline = launchers.job_exit(
        failed("DeadlineExceeded", "Job was active longer than specified deadline"), NAME
    )
    assert deadline is not None and "DeadlineExceeded" in deadline.describe()
    assert deadline.deadline and not ended.deadline


def test_a_failing_job_ends_once_its_pods_are_gone() -> None:
    # FailureTarget alone: the pods are still terminating, the checkpoint may be mid-write.
    assert launchers.job_exit(failed("PodFailurePolicy", "x", terminal=False), NAME) is None


def test_a_vanished_job_is_a_lost_worker() -> None:
    ended = launchers.job_exit(None, NAME)
    assert ended is not None and ended.lost and ended.status != 0
    assert ended.describe() == f"the worker Job {NAME} vanished before it ended"


def test_how_local_workers_ended_reads_well() -> None:
    assert Exit(-9).describe() == "the workers were killed by signal SIGKILL"
    assert Exit(3).describe() == "the workers exited with status 3"
    assert Exit(0).describe() == "the workers ended without a result"


# --- settings --------------------------------------------------------------------------


def settings(tmp_path: Path, **changes: Any) -> TrainingSettings:
    values: dict[str, Any] = {
        "database_url": "postgresql://unused",
        "redis_url": "redis://unused",
        "object_dir": tmp_path / "training",
        "ingest_target": "127.0.0.1:9",
        "audit_target": "127.0.0.1:9",
        **changes,
    }
    return TrainingSettings(**values)


def test_the_local_launcher_is_the_default(tmp_path: Path) -> None:
    assert settings(tmp_path).launcher == "local"
    launcher = launchers.build(settings(tmp_path), tmp_path / "training" / "jobs")
    assert isinstance(launcher, launchers.LocalLauncher) and not launcher.detached


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"launcher": "kubernetes", "gpus": 1},
            "LAUNCHER=kubernetes needs MEDIMG_TRAINING_WORKER_POD_TEMPLATE",
        ),
        (
            {"launcher": "kubernetes", "worker_pod_template": TEMPLATE},
            "LAUNCHER=kubernetes needs MEDIMG_TRAINING_GPUS",
        ),
        (
            {
                "launcher": "kubernetes",
                "worker_pod_template": TEMPLATE,
                "gpus": 0,
                "worker_python": "/usr/bin/python3",
            },
            "WORKER_PYTHON applies to the local launcher only",
        ),
        (
            {"worker_pod_template": TEMPLATE, "kubernetes_namespace": "medimg"},
            "MEDIMG_TRAINING_KUBERNETES_NAMESPACE, MEDIMG_TRAINING_WORKER_POD_TEMPLATE apply "
            "to the kubernetes and kubeflow launchers only",
        ),
        (
            {"launcher": "kubeflow", "gpus": 1},
            "LAUNCHER=kubeflow needs MEDIMG_TRAINING_WORKER_POD_TEMPLATE",
        ),
        (
            {"launcher": "kubeflow", "worker_pod_template": TEMPLATE},
            "LAUNCHER=kubeflow needs MEDIMG_TRAINING_GPUS",
        ),
        ({"launcher": "slurm"}, "Input should be 'local', 'kubernetes' or 'kubeflow'"),
    ],
)
def test_a_bad_launcher_combination_stops_start_up(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        settings(tmp_path, **changes)


def test_the_namespace_comes_from_the_pod_when_unset(tmp_path: Path) -> None:
    (tmp_path / "namespace").write_text("medimg-staging")
    assert launchers.in_cluster_namespace(tmp_path) == "medimg-staging"
    with pytest.raises(ValueError, match="KUBERNETES_NAMESPACE is unset and this is not a pod"):
        launchers.in_cluster_namespace(tmp_path / "elsewhere")


async def test_the_kubernetes_launcher_builds_its_jobs_from_its_settings(tmp_path: Path) -> None:
    chosen = settings(
        tmp_path,
        launcher="kubernetes",
        worker_pod_template=TEMPLATE,
        worker_image="registry.example/medimg-training:9",
        worker_ttl_seconds=600,
        cancel_grace_seconds=4.2,
        gpus=1,
        object_dir=OBJECT_DIR,
        cache_dir=CACHE_DIR,
    )
    # A client that is never used: no API server answers offline.
    config = KubeConfig.from_one(
        cluster=Cluster(server="https://127.0.0.1:9"), user=User(token="unused")
    )
    client = AsyncClient(config, namespace="medimg")
    launcher = launchers.KubernetesLauncher(chosen, client, "medimg-staging")
    try:
        assert launcher.detached, "Jobs outlive the service and are adopted after a restart"
        job = launcher.manifest(Launch(JOB, CONFIG, processes=1))
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[-1], strict=True)
        assert job["metadata"]["namespace"] == "medimg-staging"
        assert job["spec"]["ttlSecondsAfterFinished"] == 600
        assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5
        assert containers(job)["worker"]["image"] == "registry.example/medimg-training:9"
    finally:
        await launcher.aclose()
    # A service whose object_dir the template does not mount refuses to start.
    elsewhere = settings(
        tmp_path,
        launcher="kubernetes",
        worker_pod_template=TEMPLATE,
        gpus=0,
        object_dir=Path("/srv/medimg/training"),
    )
    with pytest.raises(TemplateError, match="must mount the object_dir"):
        launchers.KubernetesLauncher(elsewhere, client, "medimg")


@pytest.mark.skipif(
    launchers.SERVICE_ACCOUNT_DIR.exists(), reason="runs inside a pod: the token is there"
)
def test_outside_a_pod_the_kubernetes_launcher_stops_start_up(tmp_path: Path) -> None:
    chosen = settings(
        tmp_path,
        launcher="kubernetes",
        worker_pod_template=TEMPLATE,
        kubernetes_namespace="medimg",
        gpus=0,
    )
    with pytest.raises(ValueError, match="needs the pod's API token"):
        launchers.build(chosen, tmp_path / "jobs")


def test_the_declared_verbs_are_the_calls_the_launcher_makes() -> None:
    """KUBERNETES_VERBS (which the Role must equal, tests/test_deploy_k8s.py) against the
    lightkube client methods launchers.py calls: a new call without its verb fails here."""
    verbs = {"create": "create", "get": "get", "delete": "delete", "list": "list",
             "watch": "watch", "wait": "watch", "patch": "patch", "apply": "patch",
             "replace": "update", "deletecollection": "deletecollection", "log": "get"}  # fmt: skip
    tree = ast.parse(Path(launchers.__file__).read_text())
    called = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "_client"
        and node.attr != "close"
    }
    assert called <= set(verbs), f"map these lightkube methods to verbs: {called - set(verbs)}"
    # Both workloads go through the same calls.
    made = frozenset(verbs[method] for method in called)
    assert dict(launchers.KUBERNETES_VERBS) == {("batch", "jobs"): made}
    assert dict(launchers.KUBEFLOW_VERBS) == {("kubeflow.org", "pytorchjobs"): made}
    job, pytorchjob = launchers.BATCH_JOB.resource, launchers.PYTORCH_JOB.resource
    for workload, verbs_of in ((job, launchers.KUBERNETES_VERBS),
                               (pytorchjob, launchers.KUBEFLOW_VERBS)):  # fmt: skip
        info = workload._api_info
        assert set(verbs_of) == {(info.resource.group, info.plural)}


# --- local workers --------------------------------------------------------------------

#: A worker that logs each SIGTERM it gets and takes a while to unwind from the first.
COUNTS_SIGTERMS = """
import signal, sys, time
stopped = []
def handler(number, frame):
    print("SIGTERM", flush=True)
    stopped.append(number)
signal.signal(signal.SIGTERM, handler)
print("ready", flush=True)
while not stopped:
    time.sleep(0.01)
time.sleep(0.5)
"""


async def test_local_workers_asked_twice_to_stop_get_one_sigterm(
    settings: TrainingSettings, tmp_path: Path
) -> None:
    python = stand_in_python(tmp_path, COUNTS_SIGTERMS)
    settings = settings.model_copy(
        update={"worker_python": str(python), "cancel_grace_seconds": 30.0}
    )
    config = tmp_path / "jobs" / JOB / "worker.json"
    config.parent.mkdir(parents=True)
    workers = await launchers.LocalLauncher(settings, tmp_path / "jobs").launch(
        Launch(JOB, config, processes=1)
    )
    log = config.parent / "worker.log"
    await wait_for_line(log, "ready")
    # A cancel stops them; the job's monitor, seeing it cancelled, asks again meanwhile.
    first = asyncio.create_task(workers.stop())
    await wait_for_line(log, "SIGTERM")
    await asyncio.wait_for(asyncio.gather(workers.stop(), first), timeout=30)
    assert logged(log) == ["ready", "SIGTERM"]
    assert await workers.wait(0) == Exit(0)
