"""deploy/monitoring: the alert rules pass promtool's checks and unit tests; a real
Prometheus scrapes the running platform (every service's /metrics and every Envoy's
/stats/prometheus) with every target up and loads the rules; and every metric the rules,
the dashboards and the HPA's adapter name is one the platform really exports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import promql_parser
import pytest
import torch
import tritonclient.grpc as triton
import yaml

from medimg_cli.platform import Platform
from medimg_inference.metrics import GpuProbe, GpuReading, InferenceCollector
from services.inference.tests.support import (
    TORCHSCRIPT_DEPRECATED,
    PatchClassifier,
    classifier_metadata,
    export_torchscript,
    random_patches,
    write_bundle,
)
from tests.helpers import bearer, fresh_instance, upload

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)]

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
PROMETHEUS_DIR = MONITORING / "prometheus"
RULES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
JOBS = ("medimg-services", "medimg-envoy")
#: Names of the series Prometheus makes itself, not the platform.
SYNTHETIC = {"up"}
#: A model of this test's own in the session's shared repository.
MODEL = "monitoring-patches"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is missing: scripts/setup.sh installs Debian's `prometheus` package "
            "(which ships prometheus and promtool) when run as root; else `apt-get install "
            "prometheus`"
        )
    return path


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> str:
    done = subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


# --- the files, checked by promtool -------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    assert RULES
    out = promtool("check", "rules", *map(str, RULES))
    assert "SUCCESS" in out


def test_rule_unit_tests_pass() -> None:
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert tests
    out = promtool("test", "rules", *(str(t.relative_to(PROMETHEUS_DIR)) for t in tests))
    assert "SUCCESS" in out


def alerts() -> dict[str, dict[str, Any]]:
    found = {}
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    found[rule["alert"]] = rule
    return found


def test_every_alert_has_a_unit_test_and_a_runbook() -> None:
    tested = set()
    for path in (PROMETHEUS_DIR / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check["exp_alerts"]:
                    tested.add(check["alertname"])
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name, rule in alerts().items():
        assert name in tested, f"{name} never fires in a promtool unit test"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        anchor = rule["annotations"]["runbook"].split("#")[1]
        assert f"## {anchor.replace('-', ' ')}".lower() in operations.lower(), anchor


def test_cluster_scrape_config_matches_the_pods() -> None:
    """Debian's Prometheus has no Kubernetes discovery, so promtool cannot check this file
    here: its jobs are checked against the local ones, and its port against deploy/k8s."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(JOBS)
    assert jobs["medimg-services"]["metrics_path"] == "/metrics"
    assert jobs["medimg-envoy"]["metrics_path"] == "/stats/prometheus"
    for job in jobs.values():
        keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
        assert {"source_labels": ["__meta_kubernetes_pod_container_port_name"]} | {
            "regex": "http-metrics",
            "action": "keep",
        } in keep
        targets = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
        assert {"service", "pod", "namespace"} <= targets
    assert config["rule_files"] == ["rules/*.yml"]


def test_hpa_metric_is_served_by_the_adapter() -> None:
    adapter = yaml.safe_load((MONITORING / "prometheus-adapter.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    hpa = next(
        doc
        for doc in yaml.safe_load_all((ROOT / "deploy/k8s/base/inference.yaml").read_text())
        if doc["kind"] == "HorizontalPodAutoscaler"
    )
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert rule["name"]["as"] == pods["metric"]["name"]
    promql_parser.parse(adapter_query(rule["metricsQuery"]))


def adapter_query(template: str) -> str:
    return template.replace("<<.GroupBy>>", "pod").replace("<<.LabelMatchers>>", 'pod="p"')


def test_otel_collector_pipelines_use_defined_components() -> None:
    config = yaml.safe_load((MONITORING / "otel-collector.yaml").read_text())
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline[kind]) <= set(config[kind]), kind
    assert set(config["service"]["extensions"]) <= set(config["extensions"])


def test_dashboards_are_well_formed() -> None:
    assert {p.stem for p in DASHBOARDS} == {
        "platform-overview",
        "inference",
        "ingest",
        "training",
        "audit",
    }
    uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        uids.add(dashboard["uid"])
        assert dashboard["templating"]["list"][0]["type"] == "datasource"
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in dashboard["panels"]:
            assert panel["targets"], (path.name, panel["title"])
            for target in panel["targets"]:
                promql_parser.parse(target["expr"])
    assert len(uids) == len(DASHBOARDS)


# --- what the rules and dashboards name ---------------------------------------------------


def metric_names(expression: str) -> set[str]:
    names: set[str] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expression), visit)
    return names


def used_metrics() -> tuple[dict[str, set[str]], set[str]]:
    """(metric name -> where it is used, names of recording rules)."""
    used: dict[str, set[str]] = {}
    recorded = set()
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    recorded.add(rule["record"])
                where = f"{path.name}:{rule.get('record') or rule.get('alert')}"
                for name in metric_names(rule["expr"]):
                    used.setdefault(name, set()).add(where)
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                for name in metric_names(target["expr"]):
                    used.setdefault(name, set()).add(f"{path.name}:{panel['title']}")
    adapter = yaml.safe_load((MONITORING / "prometheus-adapter.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        for name in metric_names(adapter_query(rule["metricsQuery"])):
            used.setdefault(name, set()).add("prometheus-adapter.yaml")
    return used, recorded


def gpu_metric_names() -> set[str]:
    """The GPU metrics exist only where NVML or torch.cuda finds a GPU, which CI lacks: the
    names are taken from the inference service's own collector, given one reading."""

    class OneGpu(GpuProbe):
        def read(self) -> list[GpuReading]:
            return [GpuReading("GPU-0", 0.5, 80 * 2**30, 40 * 2**30)]

    # No model server: only the GPU families are collected.
    collector = InferenceCollector.__new__(InferenceCollector)
    collector.gpus = OneGpu()
    return {metric.name for metric in collector._gpu_metrics()}


# --- the live platform, scraped by a real Prometheus ---------------------------------------


@pytest.fixture(scope="module")
def traffic(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A little of everything, so that every labelled series exists: an upload, REST
    calls to each service through the gateway, a refused token, and inferences."""
    upload(platform, fresh_instance())
    with httpx.Client(base_url=platform.gateway_url, timeout=30) as rest:
        assert rest.get("/v1/studies", headers=bearer(platform, "mon", "clinician")).is_success
        assert rest.get("/v1/auditEvents", headers=bearer(platform, "mon", "auditor")).is_success
        jobs = rest.get("/v1/trainingJobs", headers=bearer(platform, "mon", "ml-engineer"))
        assert jobs.is_success
        assert rest.get("/v1/models", headers=bearer(platform, "mon", "clinician")).is_success
        assert rest.get("/v1/studies").status_code == 401
    model = export_torchscript(PatchClassifier(), tmp_path_factory.mktemp("mon") / "model.ts")
    write_bundle(
        platform.model_repository,
        MODEL,
        1,
        classifier_metadata({"max_batch_size": 8}),
        {"model.ts": model.read_bytes()},
    )
    assert platform.pki is not None
    client = triton.InferenceServerClient(
        platform.sidecar("inference"),
        ssl=True,
        root_certificates=str(platform.pki.ca_cert),
        private_key=str(platform.pki.key("ops")),
        certificate_chain=str(platform.pki.cert("ops")),
    )
    try:
        client.load_model(MODEL, client_timeout=60)
        patches, _ = random_patches(4, np.random.default_rng(3))
        tensor = triton.InferInput("patch", list(patches.shape), "FP32")
        tensor.set_data_from_numpy(patches)
        with torch.inference_mode():
            client.infer(MODEL, [tensor], client_timeout=60)
    finally:
        client.close()


@dataclass(frozen=True)
class Prometheus:
    url: str
    log: Path

    def api(self, path: str, **params: str) -> Any:
        answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        answer.raise_for_status()
        body = answer.json()
        assert body["status"] == "success", body
        return body["data"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def local_scrape_config(platform: Platform) -> dict[str, Any]:
    """deploy/monitoring/prometheus/prometheus.yml for the local run: the same jobs and
    `service` label, on the launcher's ports instead of the pods' port 15090."""
    services = [
        {
            "targets": [f"127.0.0.1:{platform.port(spec.metrics_port)}"],
            "labels": {"service": name},
        }
        for name, spec in platform.mesh.services.items()
    ]
    envoys = [
        {
            "targets": [f"127.0.0.1:{platform.port(spec.admin_port)}"],
            "labels": {"service": name},
        }
        for name, spec in platform.mesh.services.items()
    ] + [
        {
            "targets": [f"127.0.0.1:{platform.port(platform.mesh.gateway.admin_port)}"],
            "labels": {"service": "gateway"},
        }
    ]
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in RULES],
        "scrape_configs": [
            {"job_name": "medimg-services", "metrics_path": "/metrics", "static_configs": services},
            {
                "job_name": "medimg-envoy",
                "metrics_path": "/stats/prometheus",
                "static_configs": envoys,
            },
        ],
    }


@pytest.fixture(scope="module")
def prometheus(
    platform: Platform, traffic: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(local_scrape_config(platform)))
    promtool("check", "config", str(config), cwd=work)
    port = free_port()
    log = work / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        server = Prometheus(f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready: {log}"
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_prometheus_scrapes_every_target_up(platform: Platform, prometheus: Prometheus) -> None:
    expected = {(job, name) for job in JOBS for name in platform.mesh.services} | {
        ("medimg-envoy", "gateway")
    }

    def healthy() -> set[tuple[str, str]]:
        targets = prometheus.api("targets")["activeTargets"]
        return {
            (t["labels"]["job"], t["labels"]["service"]) for t in targets if t["health"] == "up"
        }

    assert wait_for(lambda: healthy() == expected), (healthy(), expected)
    # And `up` itself, as the alert reads it.
    up = prometheus.api("query", query='sum(up{job=~"medimg-services|medimg-envoy"})')
    assert float(up["result"][0]["value"][1]) == len(expected)


def test_prometheus_loads_and_evaluates_the_rules(prometheus: Prometheus) -> None:
    def groups() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = prometheus.api("rules")["groups"]
        evaluated = all(rule["health"] == "ok" for g in found for rule in g["rules"])
        return found if found and evaluated else []

    loaded = wait_for(groups)
    assert loaded, f"rules not loaded or not evaluated: {prometheus.log.read_text()[-2000:]}"
    names = {rule["name"] for group in loaded for rule in group["rules"]}
    assert set(alerts()) <= names
    # Nothing is firing on a healthy platform (pending or firing alerts would show here).
    firing = prometheus.api("alerts")["alerts"]
    assert [a for a in firing if a["state"] == "firing"] == []


def test_every_metric_named_is_exported_by_the_platform(prometheus: Prometheus) -> None:
    used, recorded = used_metrics()
    assert len(used) > 30

    def exported() -> set[str]:
        names: list[str] = prometheus.api("label/__name__/values")
        return set(names)

    gpu = gpu_metric_names()
    wanted = set(used) - recorded - SYNTHETIC - gpu
    have = wait_for(lambda: wanted <= exported() and exported())
    missing = {name: sorted(used[name]) for name in sorted(wanted - (have or set()))}
    assert not missing, f"named but not exported by the running platform: {missing}"
    # The GPU-only names are the collector's, and nothing else is taken on trust.
    assert set(used) & gpu == gpu
    assert (set(used) - set(have)) - recorded - SYNTHETIC <= gpu


def test_image_healthcheck_probe(platform: Platform) -> None:
    """The probe the image's HEALTHCHECK runs (medimg_core.healthcheck), against a real
    service and against a port where nothing listens."""
    serving = subprocess.run(
        [sys.executable, "-m", "medimg_core.healthcheck", platform.service_address("audit")],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert serving.returncode == 0, serving.stderr
    assert serving.stdout.strip().endswith("SERVING")
    env = {**os.environ, "MEDIMG_SERVICE": "ingest"}
    env["MEDIMG_INGEST_PORT"] = str(platform.port(platform.mesh.services["ingest"].service_port))
    by_env = subprocess.run(
        [sys.executable, "-m", "medimg_core.healthcheck"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env=env,
    )
    assert by_env.returncode == 0, by_env.stderr
    closed = subprocess.run(
        [sys.executable, "-m", "medimg_core.healthcheck", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert closed.returncode == 1
    assert "UNAVAILABLE" in closed.stderr
