"""The Kubeflow launcher (`MEDIMG_TRAINING_LAUNCHER=kubeflow`) without a cluster and without
the training operator: the PyTorchJobs it builds from the shipped pod template, checked
field by field (no schema of this CRD ships offline, and none is copied into the repo), its
pods checked against the Kubernetes schemas, how it reads a PyTorchJob's status, and the
contract with the operator run for real: each replica's command from the rendered
PyTorchJob, as local processes with the environment the training operator documents
(MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK) plus the pod template's, trains a job to the
end with DDP over gloo. No Kubeflow training operator runs here."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User

from medimg_core.errors import InvalidArgument
from medimg_training import launchers, progress, specs
from medimg_training.datasets import Dataset
from medimg_training.launchers import Exit, Launch
from medimg_training.settings import TrainingSettings
from medimg_training.worker import latest_checkpoint
from services.training.tests.support import otlp_receiver
from services.training.tests.test_ddp import config as worker_config
from services.training.tests.test_launchers import (
    CACHE_DIR,
    CONFIG,
    JOB,
    KUBERNETES_VERSIONS,
    OBJECT_DIR,
    TEMPLATE,
)

NAME = f"medimg-train-{JOB}"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return launchers.load_template(
        TEMPLATE, mounts={"object_dir": OBJECT_DIR, "cache_dir": CACHE_DIR}
    )


def build(template: dict[str, Any], request: Launch, **options: Any) -> dict[str, Any]:
    return launchers.pytorchjob_manifest(
        template,
        request,
        **{"namespace": "medimg", "ttl_seconds": 86_400, "grace_seconds": 2.5, **options},
    )


def check_pod(pod: dict[str, Any], version: str) -> None:
    """A replica's pod is a valid PodTemplateSpec (wrapped into a PodTemplate to validate)."""
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}}
    kubernetes_validate.validate({**wrapped, "template": pod}, version, strict=True)


def the_container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["spec"]["containers"]
    assert isinstance(container, dict)
    return container


# --- the PyTorchJob of a training job ---------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_a_single_process_job_is_a_master_alone(template: dict[str, Any], version: str) -> None:
    job = build(template, Launch(JOB, CONFIG, processes=1))
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    labels = {"app.kubernetes.io/name": "training-worker", "medimg.dev/training-job": JOB}
    assert job["metadata"] == {"name": NAME, "namespace": "medimg", "labels": labels}
    spec = job["spec"]
    assert set(spec) == {"runPolicy", "pytorchReplicaSpecs"}
    assert spec["runPolicy"] == {
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": 86_400,
        "cleanPodPolicy": "Running",
    }, "no activeDeadlineSeconds without a max_runtime"
    assert set(spec["pytorchReplicaSpecs"]) == {"Master"}
    master = spec["pytorchReplicaSpecs"]["Master"]
    assert set(master) == {"replicas", "restartPolicy", "template"}
    assert master["replicas"] == 1 and master["restartPolicy"] == "Never"
    pod = master["template"]
    check_pod(pod, version)
    assert labels.items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 3
    container = the_container(pod)
    # The operator finds its container by this name, and refuses a job without one.
    assert container["name"] == "pytorch"
    assert container["command"] == ["python", "-m", "medimg_training.worker", str(CONFIG)]
    assert container["ports"] == [
        {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}
    ]
    assert container["image"] == "medimg-training"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "tolerations" not in pod["spec"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_several_processes_are_a_master_and_workers_of_one_process_each(
    template: dict[str, Any], version: str
) -> None:
    request = Launch(
        JOB, CONFIG, processes=3, gpus=2, deadline_seconds=7200, traceparent=TRACEPARENT
    )
    job = build(template, request, image="registry.example/medimg-training:1.2.3-cuda")
    spec = job["spec"]
    assert spec["runPolicy"]["activeDeadlineSeconds"] == 7200
    assert spec["runPolicy"]["backoffLimit"] == 0
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 2
    assert replicas["Worker"]["restartPolicy"] == "Never"
    # The same pod for every replica: the operator tells them apart (RANK).
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    pod = replicas["Worker"]["template"]
    check_pod(pod, version)
    container = the_container(pod)
    # One process per pod, not torchrun: WORLD_SIZE and RANK come from the operator.
    assert container["command"] == ["python", "-m", "medimg_training.worker", str(CONFIG)]
    assert container["image"] == "registry.example/medimg-training:1.2.3-cuda"
    # The GPUs of one process on each pod, and leave to use a GPU node.
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == 2
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["TRACEPARENT"] == {"name": "TRACEPARENT", "value": TRACEPARENT}
    assert env["MEDIMG_TRAINING_OTLP_ENDPOINT"]["value"] == "http://127.0.0.1:4317"


def test_the_batch_job_and_the_pytorchjob_share_one_pod(template: dict[str, Any]) -> None:
    """Both are built by `worker_pod`: they differ only where the operator needs it."""
    before = copy.deepcopy(template)
    request = Launch(JOB, CONFIG, processes=1, gpus=1, traceparent=TRACEPARENT)
    batch = launchers.job_manifest(
        template, request, namespace="medimg", ttl_seconds=60, grace_seconds=2.5
    )["spec"]["template"]
    pytorch = build(template, request)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert template == before, "the template is not changed by a job"
    renamed = copy.deepcopy(pytorch)
    container = the_container(renamed)
    container["name"] = "worker"
    del container["ports"]
    assert renamed == batch
    # The sidecar (with its OTLP listener) and the volumes are the template's.
    assert pytorch["spec"]["initContainers"] == template["template"]["spec"]["initContainers"]
    assert pytorch["spec"]["volumes"] == template["template"]["spec"]["volumes"]


def test_the_launcher_builds_pytorchjobs_from_its_settings(tmp_path: Path) -> None:
    chosen = TrainingSettings(
        database_url="postgresql://unused",
        redis_url="redis://unused",
        ingest_target="127.0.0.1:9",
        audit_target="127.0.0.1:9",
        launcher="kubeflow",
        worker_pod_template=TEMPLATE,
        worker_image="registry.example/medimg-training:9",
        worker_ttl_seconds=600,
        gpus=1,
        object_dir=OBJECT_DIR,
        cache_dir=CACHE_DIR,
    )
    assert chosen.pod_per_process
    config = KubeConfig.from_one(
        cluster=Cluster(server="https://127.0.0.1:9"), user=User(token="unused")
    )
    client = AsyncClient(config, namespace="medimg")
    launcher = launchers.KubernetesLauncher(chosen, client, "medimg-staging", launchers.PYTORCH_JOB)
    assert launcher.detached
    job = launcher.manifest(Launch(JOB, CONFIG, processes=2))
    assert job["kind"] == "PyTorchJob" and job["metadata"]["namespace"] == "medimg-staging"
    assert job["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == 600
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    assert the_container(pod)["image"] == "registry.example/medimg-training:9"
    # The lightkube resource the launcher creates, gets and deletes.
    resource = launchers.PYTORCH_JOB.resource
    created = resource.from_dict(job)
    assert created.to_dict() == job
    assert resource._api_info.plural == "pytorchjobs"
    assert resource._api_info.resource.group == "kubeflow.org"
    if not launchers.SERVICE_ACCOUNT_DIR.exists():
        with pytest.raises(ValueError, match="LAUNCHER=kubeflow needs the pod's API token"):
            launchers.build(chosen.model_copy(update={"kubernetes_namespace": "m"}), tmp_path)


def test_gpus_bound_each_pod_not_the_job(dataset: Dataset) -> None:
    raw = {"network": {"name": "DenseNet"}, "resources": {"processes": 2, "gpus": 1}}
    spec = specs.with_defaults(raw, dataset)
    # A Job's one pod needs both GPUs; each of a PyTorchJob's pods one.
    with pytest.raises(InvalidArgument, match="but this node has 1"):
        specs.check(spec, dataset, max_processes=4, gpus=1)
    specs.check(spec, dataset, max_processes=4, gpus=1, pod_per_process=True)
    more = specs.with_defaults({**raw, "resources": {"processes": 2, "gpus": 2}}, dataset)
    with pytest.raises(InvalidArgument, match="but a worker pod may have 1"):
        specs.check(more, dataset, max_processes=4, gpus=1, pod_per_process=True)


# --- a PyTorchJob's status -----------------------------------------------------------------


def condition(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastUpdateTime": "2026-11-24T01:10:00Z",
        "lastTransitionTime": "2026-11-24T01:10:00Z",
    }


CREATED = condition("Created", "True", "PyTorchJobCreated", f"PyTorchJob {NAME} is created.")
RUNNING: dict[str, Any] = {
    "metadata": {"name": NAME, "namespace": "medimg"},
    "status": {
        "conditions": [
            CREATED,
            condition(
                "Running", "True", "PyTorchJobRunning", f"PyTorchJob medimg/{NAME} is running."
            ),
        ],
        "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 1}},
        "startTime": "2026-11-24T01:00:00Z",
    },
}
SUCCEEDED: dict[str, Any] = {
    "metadata": {"name": NAME, "namespace": "medimg"},
    "status": {
        "conditions": [
            CREATED,
            condition(
                "Running", "False", "PyTorchJobRunning", f"PyTorchJob medimg/{NAME} is running."
            ),
            condition(
                "Succeeded",
                "True",
                "PyTorchJobSucceeded",
                f"PyTorchJob medimg/{NAME} successfully completed.",
            ),
        ],
        "replicaStatuses": {"Master": {"succeeded": 1}, "Worker": {"succeeded": 1}},
        "startTime": "2026-11-24T01:00:00Z",
        "completionTime": "2026-11-24T01:10:00Z",
    },
}


def failed(message: str, reason: str = "PyTorchJobFailed") -> dict[str, Any]:
    return {
        "metadata": {"name": NAME, "namespace": "medimg"},
        "status": {
            "conditions": [
                CREATED,
                condition("Running", "False", "PyTorchJobRunning", "running"),
                condition("Failed", "True", reason, message),
            ],
            "replicaStatuses": {"Master": {"failed": 1}, "Worker": {"active": 1}},
            "completionTime": "2026-11-24T01:10:00Z",
        },
    }


def test_a_created_or_running_pytorchjob_has_not_ended() -> None:
    assert launchers.pytorchjob_exit(RUNNING, NAME) is None
    assert launchers.pytorchjob_exit({"metadata": {"name": NAME}}, NAME) is None
    just_created = {"status": {"conditions": [CREATED]}}
    assert launchers.pytorchjob_exit(just_created, NAME) is None
    # A Job's success condition means nothing here.
    complete = {"status": {"conditions": [condition("Complete", "True", "x", "y")]}}
    assert launchers.pytorchjob_exit(complete, NAME) is None


def test_a_succeeded_pytorchjob_succeeded() -> None:
    assert launchers.pytorchjob_exit(SUCCEEDED, NAME) == Exit(0)


def test_a_failed_pytorchjob_says_why() -> None:
    ended = launchers.pytorchjob_exit(
        failed(f"PyTorchJob medimg/{NAME} is failed because 1 Master replica(s) failed."), NAME
    )
    assert ended is not None and ended.status != 0 and not ended.lost and not ended.deadline
    assert ended.describe() == (
        f"the worker PyTorchJob {NAME} failed: PyTorchJobFailed: PyTorchJob medimg/{NAME} is "
        "failed because 1 Master replica(s) failed."
    )


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        # The operator's words past runPolicy.activeDeadlineSeconds (training-operator v1.7+).
        (
            "PyTorchJobFailed",
            f"Job {NAME} has failed because it was active longer than specified deadline",
        ),
        # Older operators name the reason.
        ("DeadlineExceeded", "Job was active longer than specified deadline"),
    ],
)
def test_a_pytorchjob_past_its_deadline_is_a_deadline(reason: str, message: str) -> None:
    ended = launchers.pytorchjob_exit(failed(message, reason), NAME)
    assert ended is not None and ended.deadline and ended.status != 0
    assert "active longer than specified deadline" in ended.describe()


def test_a_vanished_pytorchjob_is_a_lost_worker() -> None:
    ended = launchers.pytorchjob_exit(None, NAME)
    assert ended is not None and ended.lost
    assert ended.describe() == f"the worker PyTorchJob {NAME} vanished before it ended"


# --- the contract with the training operator, run for real ------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def pod_environment(container: dict[str, Any], given: dict[str, str]) -> dict[str, str]:
    """The container's env as the kubelet would give it: literal values, $(VAR) expanded,
    and `given` for what comes from Secrets and the downward API."""
    env: dict[str, str] = {}
    for entry in container["env"]:
        name = entry["name"]
        if "value" in entry:
            value = entry["value"]
            for known, replacement in env.items():
                value = value.replace(f"$({known})", replacement)
            env[name] = value
        else:
            env[name] = given[name]
    return env


@pytest.mark.slow
def test_the_rendered_replicas_train_a_job_with_the_operators_environment(
    dataset: Dataset, settings: TrainingSettings, template: dict[str, Any]
) -> None:
    path = worker_config(dataset, settings, JOB, processes=2)
    job = build(
        template, Launch(JOB, path, processes=2, traceparent=TRACEPARENT), python=sys.executable
    )
    replicas = job["spec"]["pytorchReplicaSpecs"]
    master_port = free_port()
    with otlp_receiver() as (receiver, endpoint):
        processes = []
        for rank, (replica, index) in enumerate([("Master", 0), ("Worker", 0)]):
            container = the_container(replicas[replica]["template"])
            given = {
                launchers.REDIS_URL_VARIABLE: settings.redis_url,
                "POD_NAME": f"{NAME}-{replica.lower()}-{index}",
                "POD_NAMESPACE": "medimg",
                "NODE_NAME": "node-1",
            }
            env = pod_environment(container, given)
            # The sidecar's OTLP listener is this test's receiver.
            env[launchers.OTLP_ENDPOINT_VARIABLE] = endpoint
            # What the training operator adds to the `pytorch` container of each pod.
            env |= {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(master_port),
                "WORLD_SIZE": "2",
                "RANK": str(rank),
                "PYTHONUNBUFFERED": "0",
            }
            env["PATH"] = os.environ["PATH"]
            processes.append(
                subprocess.Popen(
                    container["command"],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = [process.communicate(timeout=300)[0] for process in processes]
        assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
        spans = receiver.spans()

    # Rank 0 checkpointed, exported the bundle and reported progress to the end.
    job_dir = path.parent
    assert (job_dir / "result.json").is_file() and (job_dir / "bundle").is_dir()
    checkpoint = latest_checkpoint(job_dir)
    assert checkpoint is not None and checkpoint.name == "step-4.pt"
    assert not list(job_dir.glob("error-rank*.json"))
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        entries: list[tuple[str, dict[str, str]]] = client.xrange(progress.stream(JOB))  # type: ignore[assignment]
    finally:
        client.close()
    steps = [int(fields["step"]) for _, fields in entries if "loss" in fields]
    assert steps and steps[-1] == 4 and steps == sorted(steps)
    # Both ranks sent their spans into the launching trace, each with its rank.
    roots = [s for s in spans if s.span.name == "training.worker"]
    assert sorted(r.attributes["medimg.training.rank"] for r in roots) == [0, 1]
    for root in roots:
        assert root.span.trace_id.hex() == TRACEPARENT.split("-")[1]
        assert root.attributes["medimg.training.world_size"] == 2
    pods = {s.resource["k8s.pod.name"] for s in spans}
    assert pods == {f"{NAME}-master-0", f"{NAME}-worker-0"}
