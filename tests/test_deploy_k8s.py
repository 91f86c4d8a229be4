"""deploy/k8s: every overlay renders with `kubectl kustomize`, every object is valid against
the Kubernetes schemas (offline, kubernetes-validate), every workload has probes, limits,
a non-root read-only security context, a PDB and network policies, no Service reaches a
service without its sidecar, and what comes from deploy/mesh.toml has not drifted."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from medimg_cli import k8s
from medimg_cli import mesh as meshlib
from medimg_cli.pki import ensure_pki
from medimg_core.s3 import S3Location
from medimg_protos import DESCRIPTOR_SET_PATH
from medimg_training import launchers

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
#: Native sidecars (init containers with restartPolicy Always) need 1.29; EKS runs newer.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
#: Kinds no schema of kubernetes-validate covers: checked structurally below.
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("trust.cert-manager.io/v1alpha1", "Bundle"),
}
#: Secrets the manifests reference and an operator creates (docs/operations.md).
EXTERNAL_SECRETS = {
    "medimg-postgres",
    "medimg-redis",
    "ingest-keys",
    "audit-signing-key",
    "gateway-jwks",
}
WORKLOADS = ("audit", "ingest", "inference", "training", "gateway")
#: Mesh identities that are not Envoy-fronted workloads: the traces' collector
#: (deploy/monitoring), whose own receiver terminates the mesh's mTLS.
COLLECTOR = k8s.COLLECTOR

Objects = list[dict[str, Any]]


def kustomize(directory: Path) -> Objects:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: scripts/setup.sh installs it (apt-get install kubectl)"
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def mesh() -> meshlib.Mesh:
    return meshlib.load_mesh()


@pytest.fixture(scope="module")
def rendered() -> dict[str, Objects]:
    """Each overlay rendered once for the module."""
    return {overlay: kustomize(K8S / "overlays" / overlay) for overlay in OVERLAYS}


def of_kind(objects: Objects, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# --- rendering and schemas --------------------------------------------------------------


def test_every_overlay_renders_every_workload(rendered: dict[str, Objects]) -> None:
    for overlay, objects in rendered.items():
        assert set(of_kind(objects, "Deployment")) == {*WORKLOADS, COLLECTOR}, overlay
        # Everything lands in the namespace of the SPIFFE ids.
        namespaced = [o for o in objects if o["kind"] != "Namespace"]
        assert {o["metadata"].get("namespace") for o in namespaced} == {"medimg"}, overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_are_valid_kubernetes(
    rendered: dict[str, Objects], overlay: str, version: str
) -> None:
    checked = 0
    for obj in rendered[overlay]:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        # strict: an unknown or misspelt field is an error, not silently dropped.
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked > 30


def test_the_schema_check_catches_a_misspelt_field(rendered: dict[str, Objects]) -> None:
    deployment = copy.deepcopy(of_kind(rendered["prod"], "Deployment")["ingest"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_cert_manager_objects(rendered: dict[str, Objects], mesh: meshlib.Mesh) -> None:
    for overlay, objects in rendered.items():
        issuers = of_kind(objects, "Issuer")
        certificates = of_kind(objects, "Certificate")
        assert set(issuers[k8s.ISSUER]["spec"]) == {"ca"}, overlay
        ca_secret = issuers[k8s.ISSUER]["spec"]["ca"]["secretName"]
        deployments = of_kind(objects, "Deployment")
        for workload in WORKLOADS:
            certificate = certificates[f"{workload}-mesh"]
            spec = certificate["spec"]
            assert spec["uris"] == [f"spiffe://medimg.local/ns/medimg/sa/{workload}"]
            assert spec["uris"] == [mesh.spiffe(workload)]
            assert spec["issuerRef"] == {
                "name": k8s.ISSUER,
                "kind": "Issuer",
                "group": "cert-manager.io",
            }
            assert {"server auth", "client auth"} <= set(spec["usages"])
            # The pod mounts this certificate's Secret where its Envoy reads it.
            volumes = deployments[workload]["spec"]["template"]["spec"]["volumes"]
            secrets = {v["name"]: v.get("secret", {}).get("secretName") for v in volumes}
            assert secrets["mesh-tls"] == spec["secretName"], workload
            envoy = next(c for c in pod_containers(deployments[workload]) if c["name"] == "envoy")
            mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
            assert mounts["mesh-tls"] == k8s.TLS_DIR
        # The collector's certificate: the mesh's, mounted where its receiver reads it.
        spec = certificates[f"{COLLECTOR}-mesh"]["spec"]
        assert spec["uris"] == [mesh.spiffe(COLLECTOR)]
        assert spec["issuerRef"]["name"] == k8s.ISSUER
        assert {"server auth", "client auth"} <= set(spec["usages"])
        volumes = deployments[COLLECTOR]["spec"]["template"]["spec"]["volumes"]
        assert {"name": "mesh-tls", "secret": {"secretName": spec["secretName"]}} in volumes
        others = set(certificates) - {f"{w}-mesh" for w in (*WORKLOADS, COLLECTOR)}
        if overlay == "dev":
            # cert-manager makes the dev CA itself, in the Secret the CA Issuer reads.
            assert others == {ca_secret}
            assert certificates[ca_secret]["spec"]["isCA"] is True
            assert certificates[ca_secret]["spec"]["secretName"] == ca_secret
            assert issuers["medimg-selfsigned"]["spec"] == {"selfSigned": {}}
        else:
            assert others == set(), "prod's CA comes from the organisation's PKI"


def test_the_trust_bundle_gathers_the_labelled_ca_secrets(
    rendered: dict[str, Objects], mesh: meshlib.Mesh
) -> None:
    """trust-manager's Bundle (no schema here: checked by structure against its v1alpha1
    API): Secrets selected by label, in the mesh's namespace only, into the ConfigMap
    every Envoy mounts."""
    for overlay, objects in rendered.items():
        bundles = of_kind(objects, "Bundle")
        assert set(bundles) == {k8s.TRUST_BUNDLE}, overlay
        bundle = bundles[k8s.TRUST_BUNDLE]
        assert bundle["apiVersion"] == "trust.cert-manager.io/v1alpha1"
        assert set(bundle["spec"]) == {"sources", "target"}
        (source,) = bundle["spec"]["sources"]
        assert set(source) == {"secret"}, "the mesh trusts its own CAs, never default CAs"
        secret = source["secret"]
        assert set(secret) == {"selector", "key"}, "a selector, not a name (never both)"
        assert secret["key"] == "tls.crt"
        assert secret["selector"] == {"matchLabels": {k8s.TRUST_LABEL: "true"}}
        target = bundle["spec"]["target"]
        assert set(target) == {"configMap", "namespaceSelector"}
        assert target["configMap"] == {"key": k8s.TRUST_KEY}
        assert target["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": mesh.namespace}
        }
        if overlay == "dev":
            # The CA cert-manager makes in dev carries the label from its first issuance.
            ca = of_kind(objects, "Certificate")[
                of_kind(objects, "Issuer")[k8s.ISSUER]["spec"]["ca"]["secretName"]
            ]
            assert ca["spec"]["secretTemplate"]["labels"] == {k8s.TRUST_LABEL: "true"}


def test_every_envoy_trusts_the_bundle_alone(rendered: dict[str, Objects]) -> None:
    """Every Envoy (sidecars, gateway, training workers) reads its CA from the bundle's
    mount, never from its Secret's ca.crt (only the CA that issued it: a CA rotation would
    fail calls)."""
    for overlay, objects in rendered.items():
        maps = of_kind(objects, "ConfigMap")
        pods = {
            name: d["spec"]["template"]["spec"]
            for name, d in of_kind(objects, "Deployment").items()
            if name != COLLECTOR
        }
        pods["training-worker"] = worker_template(objects)["template"]["spec"]
        for name, pod in pods.items():
            volumes = {v["name"]: v for v in pod["volumes"]}
            envoy = next(
                c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "envoy"
            )
            mounts = {m["mountPath"]: m["name"] for m in envoy["volumeMounts"]}
            trust = volumes[mounts[k8s.TRUST_DIR]]
            assert trust["configMap"] == {"name": k8s.TRUST_BUNDLE}, (overlay, name)
            config = maps[volumes[mounts[k8s.CONFIG_DIR]]["configMap"]["name"]]["data"]
            ((ca,),) = [json.loads(config[k8s.CA_SDS_FILE])["resources"]]
            assert ca["validation_context"] == {
                "trusted_ca": {"filename": f"{k8s.TRUST_DIR}/{k8s.TRUST_KEY}"},
                "watched_directory": {"path": k8s.TRUST_DIR},
            }, (overlay, name)
            assert f"{k8s.TLS_DIR}/ca.crt" not in config["envoy.json"], (overlay, name)


def test_no_secret_values_are_committed(rendered: dict[str, Objects]) -> None:
    for overlay, objects in rendered.items():
        assert not of_kind(objects, "Secret"), overlay
        referenced = set()
        for deployment in of_kind(objects, "Deployment").values():
            for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
                if "secret" in volume:
                    referenced.add(volume["secret"]["secretName"])
            for container in pod_containers(deployment):
                for variable in container.get("env", []):
                    if "secretKeyRef" in variable.get("valueFrom", {}):
                        referenced.add(variable["valueFrom"]["secretKeyRef"]["name"])
        tls = {k8s.tls_secret(w) for w in (*WORKLOADS, COLLECTOR)}
        assert referenced - tls == EXTERNAL_SECRETS, overlay


# --- workloads ----------------------------------------------------------------------------


def test_every_workload_is_probed_limited_non_root_and_read_only(
    rendered: dict[str, Objects],
) -> None:
    for overlay, objects in rendered.items():
        for name, deployment in of_kind(objects, "Deployment").items():
            pod = deployment["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["securityContext"]["runAsUser"] > 0
            assert pod.get("automountServiceAccountToken") is False, name
            assert pod["serviceAccountName"] == name
            for container in pod_containers(deployment):
                where = f"{overlay}/{name}/{container['name']}"
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] is True, where
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["capabilities"]["drop"] == ["ALL"], where
                assert context.get("runAsUser", pod["securityContext"]["runAsUser"]) > 0
                limits = container["resources"]["limits"]
                assert {"cpu", "memory"} <= set(limits), where
                assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
                long_running = container["name"] != "protos"  # the gateway's one-shot copy
                if long_running:
                    assert "readinessProbe" in container, where
            main = pod["containers"][-1] if name != "gateway" else pod["containers"][0]
            assert "livenessProbe" in main and "readinessProbe" in main, name


def test_services_are_probed_over_grpc_health_through_the_sidecar(
    rendered: dict[str, Objects],
) -> None:
    for deployment in of_kind(rendered["prod"], "Deployment").values():
        name = deployment["metadata"]["name"]
        if name in {"gateway", COLLECTOR}:
            continue
        (service,) = deployment["spec"]["template"]["spec"]["containers"]
        (envoy,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert envoy["restartPolicy"] == "Always", "Envoy is a native sidecar"
        ports = {p["containerPort"] for p in envoy["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert service[probe]["grpc"]["port"] == k8s.HEALTH_PORT, (name, probe)
        assert k8s.HEALTH_PORT in ports


def test_termination_outlasts_the_drain(rendered: dict[str, Objects]) -> None:
    for deployment in of_kind(rendered["prod"], "Deployment").values():
        name = deployment["metadata"]["name"]
        if name in {"gateway", COLLECTOR}:
            continue
        pod = deployment["spec"]["template"]["spec"]
        settings = env(pod["containers"][0])
        prefix = f"MEDIMG_{name.upper()}_"
        drain = float(settings[prefix + "DRAIN_DELAY_SECONDS"]) + float(
            settings[prefix + "GRACE_SECONDS"]
        )
        assert pod["terminationGracePeriodSeconds"] > drain, name


def test_each_workload_has_a_pdb_and_network_policies(rendered: dict[str, Objects]) -> None:
    for overlay, objects in rendered.items():
        pdbs = of_kind(objects, "PodDisruptionBudget")
        policies = of_kind(objects, "NetworkPolicy")
        deny = policies["default-deny"]["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}, overlay
        for name, deployment in of_kind(objects, "Deployment").items():
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            selector = deployment["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items()
            assert pdbs[name]["spec"]["selector"]["matchLabels"] == selector, name
            assert pdbs[name]["spec"]["maxUnavailable"] == 1, "a drain is never blocked"
            own = policies[f"mesh-{name}"]["spec"]
            assert own["podSelector"]["matchLabels"] == selector
            assert set(own["policyTypes"]) == {"Ingress", "Egress"}


def test_network_policies_allow_exactly_the_mesh_paths(
    rendered: dict[str, Objects], mesh: meshlib.Mesh
) -> None:
    policies = of_kind(rendered["prod"], "NetworkPolicy")
    scrape = {k8s.METRICS_PORT}
    for name, spec in mesh.services.items():
        policy = policies[f"mesh-{name}"]["spec"]
        sources: dict[int, set[str]] = {}
        for rule in policy["ingress"]:
            for port in rule["ports"]:
                for peer in rule["from"]:
                    who = peer.get("podSelector", {}).get("matchLabels", {}).get(k8s.NAME_LABEL)
                    sources.setdefault(port["port"], set()).add(who or "monitoring")
        callers = {"gateway"} | {n for n, s in mesh.services.items() if name in s.upstreams}
        assert sources == {spec.sidecar_port: callers, **{port: {"monitoring"} for port in scrape}}
        # Outbound: only the upstreams' sidecar ports (plus DNS and the backends elsewhere).
        egress = {
            (rule["to"][0]["podSelector"]["matchLabels"][k8s.NAME_LABEL], rule["ports"][0]["port"])
            for rule in policy["egress"]
        }
        spans = (COLLECTOR, k8s.OTLP_PORT)  # its spans, through its sidecar
        assert egress == {(u, mesh.services[u].sidecar_port) for u in spec.upstreams} | {spans}, (
            name
        )
        # The service's own plaintext and metrics ports are never opened.
        opened = set(sources)
        assert spec.service_port not in opened and spec.metrics_port not in opened


def test_no_service_is_reachable_without_the_mesh(
    rendered: dict[str, Objects], mesh: meshlib.Mesh
) -> None:
    """Every Service lands on an Envoy's TLS (or gateway) listener, on the collector's
    receiver that requires a mesh client certificate, or on the DIMSE door (ingest's Envoy,
    a TCP proxy to the SCP on 127.0.0.1, admitted from the hospital CIDR alone)."""
    dimse = f"{k8s.DIMSE_SERVICE}-dimse"
    for overlay, objects in rendered.items():
        deployments = of_kind(objects, "Deployment")
        services = of_kind(objects, "Service")
        assert set(services) == {*WORKLOADS, COLLECTOR, dimse}, overlay
        for name, service in services.items():
            if name == COLLECTOR:
                check_collector_service(objects, service)
                continue
            if name == dimse:
                check_dimse_service(objects, service, overlay)
                continue
            envoy = next(c for c in pod_containers(deployments[name]) if c["name"] == "envoy")
            envoy_ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
            allowed = (
                {mesh.gateway.port} if name == "gateway" else {mesh.services[name].sidecar_port}
            )
            for port in service["spec"]["ports"]:
                # Every Service port lands on the Envoy's TLS (or gateway) listener.
                assert envoy_ports[port["targetPort"]] in allowed, (overlay, name, port)
                assert port["port"] in allowed
            if name != "gateway":
                assert service["spec"]["clusterIP"] == "None"
                spec = mesh.services[name]
                (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
                # The service itself has no container port at all: it binds 127.0.0.1.
                assert "ports" not in container
                assert env(container)[f"MEDIMG_{name.upper()}_PORT"] == str(spec.service_port)
        for service in services.values():
            assert service["spec"].get("type", "ClusterIP") != "NodePort"


def check_collector_service(objects: Objects, service: dict[str, Any]) -> None:
    """The collector's Service reaches its OTLP receiver alone, which serves TLS with the
    mounted mesh certificate and requires a client certificate of the mesh CA."""
    deployment = of_kind(objects, "Deployment")[COLLECTOR]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["clusterIP"] == "None"
    assert [(p["port"], ports[p["targetPort"]]) for p in service["spec"]["ports"]] == [
        (k8s.OTLP_PORT, k8s.OTLP_PORT)
    ]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_map = of_kind(objects, "ConfigMap")[volumes["config"]["configMap"]["name"]]
    config_path = next(a for a in container["args"] if a.startswith("--config=")).split("=")[1]
    assert Path(config_path).parent == Path(mounts["config"])
    config = yaml.safe_load(config_map["data"][Path(config_path).name])
    protocols = config["receivers"]["otlp"]["protocols"]
    assert set(protocols) == {"grpc"}, "no plaintext (or HTTP) receiver is open"
    assert protocols["grpc"]["endpoint"] == f"0.0.0.0:{k8s.OTLP_PORT}"
    tls = protocols["grpc"]["tls"]
    tls_dir = Path(mounts["mesh-tls"])
    assert volumes["mesh-tls"]["secret"]["secretName"] == k8s.tls_secret(COLLECTOR)
    assert (tls["cert_file"], tls["key_file"]) == (
        str(tls_dir / "tls.crt"),
        str(tls_dir / "tls.key"),
    )
    # Client certificates are checked against the mesh's trust bundle, as every Envoy does.
    assert volumes["mesh-trust"]["configMap"]["name"] == k8s.TRUST_BUNDLE
    assert tls["client_ca_file"] == str(Path(mounts["mesh-trust"]) / k8s.TRUST_KEY)


def check_dimse_service(objects: Objects, service: dict[str, Any], overlay: str) -> None:
    deployment = of_kind(objects, "Deployment")[k8s.DIMSE_SERVICE]
    envoy = next(c for c in pod_containers(deployment) if c["name"] == "envoy")
    envoy_ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    (port,) = service["spec"]["ports"]
    assert port["port"] == envoy_ports[port["targetPort"]] == k8s.DIMSE_PORT
    assert service["spec"]["selector"] == {k8s.NAME_LABEL: k8s.DIMSE_SERVICE}
    # Envoy's listener on that port is a TCP proxy to the SCP on the pod's loopback.
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config_map = of_kind(objects, "ConfigMap")[volumes["envoy-config"]["configMap"]["name"]]
    config = yaml.safe_load(config_map["data"]["envoy.json"])
    (listener,) = [
        listener
        for listener in config["static_resources"]["listeners"]
        if listener["address"]["socket_address"]["port_value"] == k8s.DIMSE_PORT
    ]
    (chain,) = listener["filter_chains"]
    assert "transport_socket" not in chain
    (proxy,) = chain["filters"]
    assert proxy["name"] == "envoy.filters.network.tcp_proxy"
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    (endpoint,) = clusters[proxy["typed_config"]["cluster"]]["load_assignment"]["endpoints"][0][
        "lb_endpoints"
    ]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": k8s.DIMSE_SERVICE_PORT,
    }
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    settings = env(container)
    assert settings["MEDIMG_INGEST_DIMSE_HOST"] == "127.0.0.1"
    assert settings["MEDIMG_INGEST_DIMSE_PORT"] == str(k8s.DIMSE_SERVICE_PORT)
    # Only the hospital networks, on that port alone; no other policy opens it.
    policies = of_kind(objects, "NetworkPolicy")
    opening = [
        policy
        for policy in policies.values()
        for rule in policy["spec"].get("ingress", [])
        if any(p["port"] == k8s.DIMSE_PORT for p in rule.get("ports", []))
    ]
    assert [p["metadata"]["name"] for p in opening] == ["ingest-dimse"], overlay
    rule, *health_checks = opening[0]["spec"]["ingress"]
    assert rule["ports"] == [{"port": k8s.DIMSE_PORT, "protocol": "TCP"}]
    cidrs = [peer["ipBlock"]["cidr"] for peer in rule["from"]]
    assert len(cidrs) == len(rule["from"]) == 1, "ipBlocks only"
    if overlay == "prod":
        # An internal NLB that lets the hospital networks in, and passes on their address.
        annotations = service["metadata"]["annotations"]
        assert service["spec"]["type"] == "LoadBalancer"
        assert annotations["service.beta.kubernetes.io/aws-load-balancer-scheme"] == "internal"
        assert (
            "preserve_client_ip.enabled=true"
            in annotations["service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"]
        )
        assert service["spec"]["loadBalancerSourceRanges"] == cidrs
        assert cidrs != [k8s.DIMSE_CLIENTS_CIDR], "prod replaces the base's placeholder"
        # The NLB's health checks (from its addresses in the VPC, target type ip) reach
        # the pod's health port, which the policy admits from the VPC alone.
        prefix = "service.beta.kubernetes.io/aws-load-balancer-healthcheck-"
        assert annotations[f"{prefix}protocol"] == "TCP"
        assert int(annotations[f"{prefix}port"]) == envoy_ports["grpc-health"] == k8s.HEALTH_PORT
        vpc = re.search(
            r'variable "vpc_cidr" \{[^}]*default\s*=\s*"([^"]+)"',
            (ROOT / "deploy" / "terraform" / "variables.tf").read_text(),
        )
        assert vpc is not None
        assert health_checks == [
            {
                "from": [{"ipBlock": {"cidr": vpc.group(1)}}],
                "ports": [{"port": k8s.HEALTH_PORT, "protocol": "TCP"}],
            }
        ]
    else:
        assert service["spec"]["type"] == "ClusterIP"
        assert health_checks == []


def test_prod_scales_3_to_20_and_inference_on_queue_time(rendered: dict[str, Objects]) -> None:
    hpas = of_kind(rendered["prod"], "HorizontalPodAutoscaler")
    deployments = of_kind(rendered["prod"], "Deployment")
    assert set(hpas) == set(WORKLOADS)
    for name, hpa in hpas.items():
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20), name
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    custom = [m for m in hpas["inference"]["spec"]["metrics"] if m["type"] == "Pods"]
    assert [m["pods"]["metric"]["name"] for m in custom] == ["medimg_inference_queue_seconds"]
    # training's replicas share the scheduling through a leader lease: rolled like the rest.
    assert deployments["training"]["spec"]["strategy"]["type"] == "RollingUpdate"
    assert deployments["training"]["spec"]["replicas"] == 3
    budgets = of_kind(rendered["prod"], "PodDisruptionBudget")
    assert budgets["training"]["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "training"
    }


def test_inference_runs_on_the_gpu_pool_in_prod_only(rendered: dict[str, Objects]) -> None:
    prod = of_kind(rendered["prod"], "Deployment")["inference"]["spec"]["template"]["spec"]
    assert prod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert prod["nodeSelector"] == {"medimg.io/node-pool": "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in prod[
        "tolerations"
    ]
    dev = of_kind(rendered["dev"], "Deployment")["inference"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in dev["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in dev


def role_rules(role: dict[str, Any]) -> dict[tuple[str, str], frozenset[str]]:
    """A Role's rules as (API group, resource) -> verbs."""
    return {
        (group, resource): frozenset(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def test_training_may_run_jobs_and_nothing_more(rendered: dict[str, Objects]) -> None:
    objects = rendered["prod"]
    (role,) = of_kind(objects, "Role").values()
    # Exactly the calls the launcher makes: none more, none missing.
    assert role_rules(role) == dict(launchers.KUBERNETES_VERBS)
    (binding,) = of_kind(objects, "RoleBinding").values()
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "training", "namespace": "medimg"}
    ]
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")


def worker_template(objects: Objects) -> dict[str, Any]:
    """The workers' pod template as the training pod mounts it."""
    (deployment,) = [d for n, d in of_kind(objects, "Deployment").items() if n == "training"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config_map = of_kind(objects, "ConfigMap")[volumes["worker-template"]["configMap"]["name"]]
    template: dict[str, Any] = yaml.safe_load(config_map["data"]["pod-template.yaml"])
    return template


def test_prod_runs_training_jobs_as_kubernetes_jobs(rendered: dict[str, Objects]) -> None:
    deployment = of_kind(rendered["prod"], "Deployment")["training"]
    pod = deployment["spec"]["template"]["spec"]
    (envoy,) = pod["initContainers"]
    (training,) = pod["containers"]
    settings = env(training)
    assert settings["MEDIMG_TRAINING_LAUNCHER"] == "kubernetes"
    mounts = {m["name"]: m["mountPath"] for m in training["volumeMounts"]}
    template_path = Path(settings["MEDIMG_TRAINING_WORKER_POD_TEMPLATE"])
    assert mounts["worker-template"] == str(template_path.parent)
    # The workers run the release's training image, whatever the template names.
    assert settings["MEDIMG_TRAINING_WORKER_IMAGE"] == training["image"]
    assert training["image"].endswith("/medimg-training:0.1.0-cuda")
    # The API token reaches the training container alone, never Envoy.
    assert pod["automountServiceAccountToken"] is False
    assert mounts["kube-api-access"] == str(launchers.SERVICE_ACCOUNT_DIR)
    assert "kube-api-access" not in {m["name"] for m in envoy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    sources = volumes["kube-api-access"]["projected"]["sources"]
    assert {"path": "token", "expirationSeconds": 3607} in [
        s.get("serviceAccountToken") for s in sources
    ]
    # dev keeps local processes and has no token at all.
    dev = of_kind(rendered["dev"], "Deployment")["training"]["spec"]["template"]["spec"]
    assert "MEDIMG_TRAINING_LAUNCHER" not in env(dev["containers"][0])
    assert "kube-api-access" not in {v["name"] for v in dev["volumes"]}


def irsa_settings(objects: Objects, service: str) -> dict[str, str]:
    """The settings of the service's container, once its IRSA wiring is checked: the role
    terraform names for it (iam.tf), and the token projected into that container alone."""
    pod = of_kind(objects, "Deployment")[service]["spec"]["template"]["spec"]
    (envoy,) = pod["initContainers"]
    (container,) = pod["containers"]
    settings = env(container)
    account = settings["AWS_ROLE_ARN"].split(":")[4]
    assert settings["AWS_ROLE_ARN"] == f"arn:aws:iam::{account}:role/medimg-prod-{service}"
    volumes = {v["name"]: v for v in pod["volumes"]}
    (source,) = volumes["aws-iam-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "sts.amazonaws.com"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(settings["AWS_WEB_IDENTITY_TOKEN_FILE"]).parent == Path(mounts["aws-iam-token"])
    assert "aws-iam-token" not in {m["name"] for m in envoy.get("volumeMounts", [])}
    return settings


def data_bucket(settings: dict[str, str]) -> str:
    """The name terraform gives the data bucket (storage.tf), in the role's account."""
    return f"medimg-prod-data-{settings['AWS_ROLE_ARN'].split(':')[4]}"


def test_prod_ingest_keeps_instances_on_s3_with_its_own_role(
    rendered: dict[str, Objects],
) -> None:
    settings = irsa_settings(rendered["prod"], "ingest")
    assert "MEDIMG_INGEST_OBJECT_DIR" not in settings
    location = S3Location.parse(settings["MEDIMG_INGEST_OBJECT_STORE_URL"])
    assert location == S3Location(data_bucket(settings))  # the role allows instances/ at the root
    pod = of_kind(rendered["prod"], "Deployment")["ingest"]["spec"]["template"]["spec"]
    assert "objects" not in {v["name"] for v in pod["volumes"]}  # no volume is left
    assert "ingest-objects" not in of_kind(rendered["prod"], "PersistentVolumeClaim")
    assert "ingest-objects" in of_kind(rendered["dev"], "PersistentVolumeClaim")


def test_prod_inference_reads_the_model_repository_on_s3(rendered: dict[str, Objects]) -> None:
    settings = irsa_settings(rendered["prod"], "inference")
    location = S3Location.parse(settings["MEDIMG_INFERENCE_MODEL_REPOSITORY_URL"])
    # The prefix terraform's role lets inference list and read, and nothing more.
    assert location == S3Location(data_bucket(settings), "models/")
    iam = (ROOT / "deploy" / "terraform" / "iam.tf").read_text()
    assert 'inference = { read = ["models/"], write = [], delete = [] }' in iam
    # The promoted versions and the fetched copies share the replica's emptyDir.
    assert settings["MEDIMG_INFERENCE_MODEL_REPOSITORY"] == "/var/lib/medimg/models"
    dev = of_kind(rendered["dev"], "Deployment")["inference"]["spec"]["template"]["spec"]
    assert "MEDIMG_INFERENCE_MODEL_REPOSITORY_URL" not in env(dev["containers"][0])


def test_prod_training_registers_bundles_where_inference_serves_them(
    rendered: dict[str, Objects],
) -> None:
    training = irsa_settings(rendered["prod"], "training")
    inference = irsa_settings(rendered["prod"], "inference")
    # A promotion names the version under training's store; inference fetches it only from
    # its own repository on S3: the two must be the same place.
    store = S3Location.parse(training["MEDIMG_TRAINING_MODEL_STORE_URL"])
    assert store == S3Location.parse(inference["MEDIMG_INFERENCE_MODEL_REPOSITORY_URL"])
    iam = (ROOT / "deploy" / "terraform" / "iam.tf").read_text()
    assert 'write = ["models/"], delete = ["models/"] }' in iam  # training's role
    dev = of_kind(rendered["dev"], "Deployment")["training"]["spec"]["template"]["spec"]
    assert "MEDIMG_TRAINING_MODEL_STORE_URL" not in env(dev["containers"][0])


def test_prod_services_reach_s3_only_through_the_vpc(rendered: dict[str, Objects]) -> None:
    policy = of_kind(rendered["prod"], "NetworkPolicy")["backend-object-store"]["spec"]
    assert policy["podSelector"] == {
        "matchExpressions": [
            {
                "key": "app.kubernetes.io/name",
                "operator": "In",
                "values": ["ingest", "training", "inference"],
            }
        ]
    }
    assert policy["egress"] == [
        {
            "to": [{"ipBlock": {"cidr": "10.40.0.0/16"}}],
            "ports": [{"port": 443, "protocol": "TCP"}],
        }
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_worker_jobs_from_the_shipped_template_are_valid(
    rendered: dict[str, Objects], version: str, tmp_path: Path
) -> None:
    objects = rendered["prod"]
    template = worker_template(objects)
    assert template == yaml.safe_load((K8S / "base" / "training-worker-template.yaml").read_text())
    training = env(
        of_kind(objects, "Deployment")["training"]["spec"]["template"]["spec"]["containers"][0]
    )
    # The workers' Redis URL comes from the Secret training's own does, not worker.json.
    (worker,) = template["template"]["spec"]["containers"]
    pod = of_kind(objects, "Deployment")["training"]["spec"]["template"]["spec"]
    (service,) = pod["containers"]
    variable = launchers.REDIS_URL_VARIABLE
    redis_url = {e["name"]: e for e in worker["env"]}[variable]
    assert redis_url == {e["name"]: e for e in service["env"]}[variable]
    assert redis_url["valueFrom"]["secretKeyRef"]["name"] == "medimg-redis"
    # Their spans leave through their sidecar's OTLP listener, as training's own do (the
    # sidecar runs training's config: it has that listener, checked below).
    variable = launchers.OTLP_ENDPOINT_VARIABLE
    assert (
        env(worker)[variable]
        == env(service)[variable]
        == f"http://127.0.0.1:{k8s.OTLP_LISTEN_PORT}"
    )
    path = tmp_path / "pod-template.yaml"
    path.write_text(yaml.safe_dump(template))
    # The service's own start-up check: the worker mounts object_dir and cache_dir there.
    launchers.load_template(
        path,
        mounts={
            "object_dir": Path(training["MEDIMG_TRAINING_OBJECT_DIR"]),
            "cache_dir": Path(training["MEDIMG_TRAINING_CACHE_DIR"]),
        },
    )
    request = launchers.Launch(
        job_id="0123456789abcdef",
        config=Path(training["MEDIMG_TRAINING_OBJECT_DIR"])
        / "jobs"
        / "0123456789abcdef"
        / "worker.json",
        processes=2,
        gpus=1,
    )
    job = launchers.job_manifest(
        template, request, namespace="medimg", ttl_seconds=3600, grace_seconds=3
    )
    kubernetes_validate.validate(job, version, strict=True)
    pod = job["spec"]["template"]["spec"]
    # Every ConfigMap and Secret the worker pod names exists under that very name.
    # (trust-manager writes each Bundle's ConfigMap, under the Bundle's name.)
    maps = set(of_kind(objects, "ConfigMap")) | set(of_kind(objects, "Bundle"))
    for volume in pod["volumes"]:
        if "configMap" in volume:
            assert volume["configMap"]["name"] in maps
        if "secret" in volume:
            assert volume["secret"]["secretName"] == k8s.tls_secret("training")
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims <= set(of_kind(objects, "PersistentVolumeClaim"))
    assert pod["serviceAccountName"] in of_kind(objects, "ServiceAccount")
    assert pod["automountServiceAccountToken"] is False
    # Their Envoy runs the training sidecar's config: the same files, kept in step.
    (envoy_config,) = [
        v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "envoy-config"
    ]
    training_volumes = of_kind(objects, "Deployment")["training"]["spec"]["template"]["spec"][
        "volumes"
    ]
    (training_config,) = [
        v["configMap"]["name"] for v in training_volumes if v["name"] == "envoy-config"
    ]
    assert (
        of_kind(objects, "ConfigMap")[envoy_config]["data"]
        == of_kind(objects, "ConfigMap")[training_config]["data"]
    )


def test_worker_pods_reach_ingest_redis_and_dns_only(
    rendered: dict[str, Objects], mesh: meshlib.Mesh
) -> None:
    for overlay, objects in rendered.items():
        policies = of_kind(objects, "NetworkPolicy")
        selecting = {
            name
            for name, policy in policies.items()
            if policy["spec"]["podSelector"] == {}
            or launchers.WORKER_APP in policy["spec"]["podSelector"].get("matchLabels", {}).values()
            or any(
                launchers.WORKER_APP in e.get("values", [])
                for e in policy["spec"]["podSelector"].get("matchExpressions", [])
            )
        }
        assert selecting == {"default-deny", "allow-dns", "backend-redis", "training-worker"}
        own = policies["training-worker"]["spec"]
        assert set(own["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in own
        ingest_port = mesh.services["ingest"].sidecar_port
        assert own["egress"] == [
            {
                "to": [{"podSelector": {"matchLabels": {k8s.NAME_LABEL: "ingest"}}}],
                "ports": [{"port": ingest_port, "protocol": "TCP"}],
            },
            {
                "to": [{"podSelector": {"matchLabels": {k8s.NAME_LABEL: COLLECTOR}}}],
                "ports": [{"port": k8s.OTLP_PORT, "protocol": "TCP"}],
            },
        ], overlay
        # ingest admits them on its sidecar port alone.
        admit = policies["ingest-from-training-workers"]["spec"]
        assert admit["podSelector"] == {"matchLabels": {k8s.NAME_LABEL: "ingest"}}
        assert admit["ingress"] == [
            {
                "from": [{"podSelector": {"matchLabels": {k8s.NAME_LABEL: launchers.WORKER_APP}}}],
                "ports": [{"port": ingest_port, "protocol": "TCP"}],
            }
        ]


def test_the_kubeflow_component_adds_only_what_pytorchjobs_need(
    rendered: dict[str, Objects], tmp_path: Path
) -> None:
    """prod plus components/kubeflow (kustomize wants relative paths): the launcher switched,
    a Role of exactly the kubeflow launcher's calls, worker pods that reach each other."""
    base = Path(os.path.relpath(K8S, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(base / "overlays" / "prod")],
                "components": [str(base / "components" / "kubeflow")],
            }
        )
    )
    objects = kustomize(tmp_path)
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)
    added = {(o["kind"], o["metadata"]["name"]) for o in objects} - {
        (o["kind"], o["metadata"]["name"]) for o in rendered["prod"]
    }
    assert added == {
        ("Role", "training-pytorchjobs"),
        ("RoleBinding", "training-pytorchjobs"),
        ("NetworkPolicy", "training-worker-peers"),
    }
    role = of_kind(objects, "Role")["training-pytorchjobs"]
    assert role_rules(role) == dict(launchers.KUBEFLOW_VERBS)
    binding = of_kind(objects, "RoleBinding")["training-pytorchjobs"]
    assert binding["roleRef"]["name"] == "training-pytorchjobs"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "training", "namespace": "medimg"}
    ]
    (training,) = of_kind(objects, "Deployment")["training"]["spec"]["template"]["spec"][
        "containers"
    ]
    assert env(training)["MEDIMG_TRAINING_LAUNCHER"] == "kubeflow"
    peers = of_kind(objects, "NetworkPolicy")["training-worker-peers"]["spec"]
    workers = {"podSelector": {"matchLabels": {k8s.NAME_LABEL: launchers.WORKER_APP}}}
    assert peers["podSelector"] == workers["podSelector"]
    assert peers["ingress"] == [{"from": [workers]}] and peers["egress"] == [{"to": [workers]}]
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")


# --- what comes from deploy/mesh.toml -----------------------------------------------------


def test_generated_files_are_what_the_renderer_makes(mesh: meshlib.Mesh) -> None:
    rendered = k8s.render(mesh, DESCRIPTOR_SET_PATH)
    problems = k8s.differences(rendered, K8S / "base" / "generated")
    assert not problems, "run `.venv/bin/medimg k8s render`: " + "; ".join(problems)


def test_drift_is_detected(mesh: meshlib.Mesh, tmp_path: Path) -> None:
    rendered = k8s.render(mesh, DESCRIPTOR_SET_PATH)
    k8s.write(rendered, tmp_path)
    assert k8s.differences(rendered, tmp_path) == []
    config = tmp_path / "envoy" / "sidecar-ingest.json"
    config.write_text(config.read_text().replace('"TLSv1_3"', '"TLSv1_2"', 1))
    (tmp_path / "stale.json").write_text("{}")
    assert k8s.differences(rendered, tmp_path) == [
        f"differs {config}",
        f"extra {tmp_path / 'stale.json'}",
    ]


def test_config_maps_carry_the_rendered_envoy_configs(
    rendered: dict[str, Objects], mesh: meshlib.Mesh
) -> None:
    configs = k8s.render_envoy(mesh, DESCRIPTOR_SET_PATH)
    maps = of_kind(rendered["prod"], "ConfigMap")
    for deployment in of_kind(rendered["prod"], "Deployment").values():
        name = deployment["metadata"]["name"]
        if name == COLLECTOR:
            continue
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        config_map = maps[volumes["envoy-config"]["configMap"]["name"]]
        key = "gateway" if name == "gateway" else f"sidecar-{name}"
        assert yaml.safe_load(config_map["data"]["envoy.json"]) == configs[key]


def test_pod_envoy_configs_listen_where_kubernetes_needs(mesh: meshlib.Mesh) -> None:
    configs = k8s.render_envoy(mesh, DESCRIPTOR_SET_PATH)
    for name, spec in mesh.services.items():
        config = configs[f"sidecar-{name}"]
        listeners = {
            listener["name"]: listener["address"]["socket_address"]
            for listener in config["static_resources"]["listeners"]
        }
        assert listeners["inbound"] == {"address": "0.0.0.0", "port_value": spec.sidecar_port}
        assert listeners["pod_health"]["port_value"] == k8s.HEALTH_PORT
        for upstream, port in spec.upstreams.items():
            assert listeners[f"outbound_{upstream}"] == {"address": "127.0.0.1", "port_value": port}
        assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
        clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
        for upstream in spec.upstreams:
            cluster = clusters[f"outbound_{upstream}"]
            (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            assert cluster["type"] == "STRICT_DNS"
            assert endpoint["endpoint"]["address"]["socket_address"] == {
                "address": f"{upstream}.medimg.svc.cluster.local",
                "port_value": mesh.services[upstream].sidecar_port,
            }
        local = clusters["local_service"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        assert local["endpoint"]["address"]["socket_address"] == {
            "address": "127.0.0.1",
            "port_value": spec.service_port,
        }
        # The plaintext health port forwards Health/Check alone.
        (health,) = [
            listener
            for listener in config["static_resources"]["listeners"]
            if listener["name"] == "pod_health"
        ]
        routes = health["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
            "virtual_hosts"
        ][0]["routes"]
        assert [r["match"] for r in routes] == [
            {"path": "/grpc.health.v1.Health/Check"},
            {"prefix": "/"},
        ]
        assert routes[1]["direct_response"]["status"] == 404


def test_spans_leave_through_the_sidecar_to_the_collector(
    rendered: dict[str, Objects], mesh: meshlib.Mesh
) -> None:
    """Each service exports to its own sidecar's OTLP listener on 127.0.0.1, which forwards
    to the collector's headless Service over mTLS, checking the collector's SPIFFE id."""
    configs = k8s.render_envoy(mesh, DESCRIPTOR_SET_PATH)
    for overlay, objects in rendered.items():
        deployments = of_kind(objects, "Deployment")
        for name in mesh.services:
            (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
            variables = [e["name"] for e in container["env"]]
            settings = env(container)
            endpoint = settings[f"MEDIMG_{name.upper()}_OTLP_ENDPOINT"]
            assert endpoint == f"http://127.0.0.1:{k8s.OTLP_LISTEN_PORT}", (overlay, name)
            # The pod's identity in the spans' resource: each $(VAR) is defined before use.
            attributes = settings["OTEL_RESOURCE_ATTRIBUTES"]
            position = variables.index("OTEL_RESOURCE_ATTRIBUTES")
            for variable in ("POD_NAME", "POD_NAMESPACE", "NODE_NAME"):
                assert f"$({variable})" in attributes
                assert variables.index(variable) < position, (overlay, name, variable)
    for name in mesh.services:
        config = configs[f"sidecar-{name}"]
        (listener,) = [
            entry for entry in config["static_resources"]["listeners"] if entry["name"] == "otlp"
        ]
        assert listener["address"]["socket_address"] == {
            "address": "127.0.0.1",
            "port_value": k8s.OTLP_LISTEN_PORT,
        }
        routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
            "virtual_hosts"
        ][0]["routes"]
        assert routes[0]["match"] == {"prefix": f"/{meshlib.OTLP_TRACE_SERVICE}/"}
        assert routes[0]["route"]["cluster"] == meshlib.OTLP_CLUSTER
        assert routes[1]["direct_response"]["status"] == 404
        clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
        cluster = clusters[meshlib.OTLP_CLUSTER]
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert cluster["type"] == "STRICT_DNS"
        assert endpoint["endpoint"]["address"]["socket_address"] == {
            "address": f"{COLLECTOR}.medimg.svc.cluster.local",
            "port_value": k8s.OTLP_PORT,
        }
        tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
        validation = tls["combined_validation_context"]["default_validation_context"]
        assert validation["match_typed_subject_alt_names"] == [
            {"san_type": "URI", "matcher": {"exact": mesh.spiffe(COLLECTOR)}}
        ]
        # The sidecar's own mesh certificate, from the Secret mount like its other clusters.
        assert tls["tls_certificate_sds_secret_configs"][0]["name"] == meshlib.CERTIFICATE_SECRET
    # The collector admits exactly the services' pods and the training workers', on OTLP.
    for objects in rendered.values():
        policy = of_kind(objects, "NetworkPolicy")[f"mesh-{COLLECTOR}"]["spec"]
        (rule,) = policy["ingress"]
        assert rule["ports"] == [{"port": k8s.OTLP_PORT, "protocol": "TCP"}]
        senders = {peer["podSelector"]["matchLabels"][k8s.NAME_LABEL] for peer in rule["from"]}
        assert senders == {*mesh.services, launchers.WORKER_APP}


def test_pod_envoy_configs_pass_envoy_validation(mesh: meshlib.Mesh, tmp_path: Path) -> None:
    """Envoy 1.40 (the version of the sidecar image) accepts every pod config, with its SDS
    files from the same ConfigMap and the mounted files replaced by a dev PKI of the same
    identities."""
    pki = ensure_pki(tmp_path / "pki", mesh.trust_domain, mesh.namespace, mesh.all_identities())
    files = k8s.render(mesh, DESCRIPTOR_SET_PATH).files
    mounts_sds = (k8s.CERTIFICATE_SDS_FILE, k8s.CA_SDS_FILE)
    for key in [k for k in files if k.startswith("envoy/")]:
        name = Path(key).stem
        identity = name.removeprefix("sidecar-")
        config_dir = tmp_path / name
        config_dir.mkdir()
        mounts = {
            f"{k8s.TLS_DIR}/tls.crt": pki.cert(identity),
            f"{k8s.TLS_DIR}/tls.key": pki.key(identity),
            f"{k8s.TRUST_DIR}/{k8s.TRUST_KEY}": pki.ca_cert,
            k8s.TRUST_DIR: pki.root,
            k8s.TLS_DIR: pki.identity_dir(identity),
            k8s.JWKS_PATH: pki.jwks,
            k8s.DESCRIPTOR_PATH: DESCRIPTOR_SET_PATH,
            **{f"{k8s.CONFIG_DIR}/{sds}": config_dir / sds for sds in mounts_sds},
        }
        written = {config_dir / sds: files[f"sds/{name}/{sds}"] for sds in mounts_sds}
        written[config_dir / "envoy.json"] = files[key]
        for path, rendered in written.items():
            text = rendered
            for mounted, local in mounts.items():
                text = text.replace(f'"{mounted}"', f'"{local}"')
            path.write_text(text)
        path = config_dir / "envoy.json"
        command = [*meshlib.envoy_command(path, log_level="error"), "--mode", "validate"]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        assert done.returncode == 0, f"{key}: {done.stdout}{done.stderr}"
