"""The Kubernetes flavour of the mesh: what deploy/k8s needs, rendered from deploy/mesh.toml.

`medimg k8s render` writes deploy/k8s/base/generated/, a kustomize Component the base
includes: the Envoy configs (as ConfigMaps), and the objects whose every port and peer
comes from the mesh description: Services, NetworkPolicies, cert-manager Certificates and
a patch per Deployment with its mesh ports and upstream addresses. Nothing there is
hand-edited; tests render again and compare.

The Envoy configs are those of the local run (medimg_cli.mesh.render), moved into a pod:

- the inbound (sidecar) and gateway listeners bind every address of the pod; the service
  itself, the outbound listeners and Envoy's admin stay on 127.0.0.1, as locally;
- certificates come from the workload's cert-manager Secret mounted at TLS_DIR, through
  file-based SDS: the SDS files sit in the Envoy ConfigMap beside envoy.json, and name
  TLS_DIR as the directory to watch, so the kubelet's swap of `..data` when cert-manager
  renews the Secret makes Envoy reload the pair without a restart;
- the CAs Envoy trusts come from the trust bundle, not from the Secret's ca.crt (which
  holds only the CA that issued that workload): trust-manager's Bundle TRUST_BUNDLE
  gathers the tls.crt of every Secret labelled TRUST_LABEL (the mesh CA, and during a CA
  rotation the next one too) into the ConfigMap TRUST_BUNDLE, mounted at TRUST_DIR and
  watched the same way, so a CA rotation fails no call (docs/operations.md);
- the JWKS and the gateway's descriptor set come from their own mounts;
- an upstream is its headless Service's DNS name (STRICT_DNS, so Envoy balances each
  call over the ready pods, where a ClusterIP would pin a long-lived HTTP/2 connection);
- two plaintext listeners serve what the kubelet and Prometheus need and nothing else:
  HEALTH_PORT forwards only `grpc.health.v1.Health/Check` to the service (the kubelet's
  native gRPC probe: no probe binary in the image, and it checks Envoy and the service
  together), and METRICS_PORT serves Envoy's /stats/prometheus and /ready and the
  service's /metrics (both bound to 127.0.0.1 in the pod);
- spans: each sidecar has an OTLP listener on 127.0.0.1:OTLP_LISTEN_PORT (what
  MEDIMG_<SERVICE>_OTLP_ENDPOINT names) that forwards TraceService/Export to the
  collector's headless Service over mTLS with the workload's own certificate, checking the
  collector's SAN (deploy/monitoring: its receiver requires a client certificate of the
  mesh CA). The local run has no collector, so its sidecars have no such listener;
- DIMSE: the service's C-STORE SCP binds 127.0.0.1 as locally, on DIMSE_SERVICE_PORT;
  ingest's Envoy forwards DIMSE_PORT of the pod to it (a TCP proxy: DIMSE has no TLS and
  no identity here, so the Service `ingest-dimse` and its network policy admit the
  hospital's PACS and modalities, nothing else).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import secrets
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medimg_cli import mesh as meshlib
from medimg_cli.pki import Pki

__all__ = [
    "COLLECTOR",
    "CONFIG_DIR",
    "DIMSE_PORT",
    "HEALTH_PORT",
    "METRICS_PORT",
    "OTLP_LISTEN_PORT",
    "OTLP_PORT",
    "TLS_DIR",
    "TRUST_BUNDLE",
    "TRUST_DIR",
    "TRUST_KEY",
    "TRUST_LABEL",
    "Rendered",
    "add_arguments",
    "command",
    "default_out_dir",
    "differences",
    "render",
    "render_envoy",
    "write",
]

#: Where a pod mounts its cert-manager Secret (tls.crt, tls.key, ca.crt).
TLS_DIR = "/etc/medimg/tls"
#: The mesh's trust bundle: trust-manager's Bundle and the ConfigMap it writes (key
#: TRUST_KEY, PEM of every CA the mesh trusts), mounted by every Envoy at TRUST_DIR.
TRUST_BUNDLE = "medimg-mesh-trust"
TRUST_KEY = "ca.crt"
TRUST_DIR = "/etc/medimg/trust"
#: The label that puts a CA Secret's tls.crt into the bundle (on medimg-mesh-ca; during a
#: rotation also on the Secret that carries the next CA).
TRUST_LABEL = "medimg.dev/mesh-trust"
#: Where the gateway mounts the JWKS of the identity provider (Secret gateway-jwks).
JWKS_PATH = "/etc/medimg/jwks/jwks.json"
#: Where the gateway's init container copies the descriptor set of the deployed protos.
DESCRIPTOR_PATH = "/etc/medimg/protos/descriptor_set.binpb"
#: Where the Envoy ConfigMap is mounted (key envoy.json).
CONFIG_DIR = "/etc/envoy"
#: The ConfigMap's SDS resource files (keys beside envoy.json): the workload's certificate
#: and key, and the CA it trusts, both read from TLS_DIR.
CERTIFICATE_SDS_FILE = "certificate.json"
CA_SDS_FILE = "ca.json"
#: Plaintext gRPC health of the service, for the kubelet's gRPC probes.
HEALTH_PORT = 15021
#: Plaintext HTTP: Envoy's /stats/prometheus and /ready, the service's /metrics.
METRICS_PORT = 15090
ANY_ADDRESS = "0.0.0.0"
CLUSTER_DOMAIN = "cluster.local"
#: Labels that select a workload's pods (Deployments, Services, policies, PDBs).
NAME_LABEL = "app.kubernetes.io/name"
PART_OF = {"app.kubernetes.io/part-of": "medimg"}
#: The namespace Prometheus runs in: only it may scrape METRICS_PORT.
MONITORING_NAMESPACE = "monitoring"
#: The OpenTelemetry collector (deploy/monitoring): its Deployment, Service, certificate
#: identity and network policy names, and its OTLP/gRPC receiver's port (TLS, client
#: certificates of the mesh CA required).
COLLECTOR = "otel-collector"
OTLP_PORT = 4317
#: The sidecars' plaintext OTLP listener on 127.0.0.1 (each pod has its own loopback).
OTLP_LISTEN_PORT = 4317
#: Where the collector sends traces on: Tempo in the monitoring namespace.
TRACING_BACKEND = "tempo"
#: The DIMSE door: ingest's Envoy listens on DIMSE_PORT (what PACS dial, as locally) and
#: forwards to the service's SCP on 127.0.0.1:DIMSE_SERVICE_PORT.
DIMSE_SERVICE = "ingest"
DIMSE_PORT = 11112
DIMSE_SERVICE_PORT = 11113
#: The addresses DIMSE is admitted from in the base: a placeholder the overlays replace
#: with the hospital networks' (the prod overlay does, as it does the backends' CIDR).
DIMSE_CLIENTS_CIDR = "10.0.0.0/16"
GATEWAY = meshlib.GATEWAY_IDENTITY
#: The training workers' pods (deploy/k8s/base/training-worker-template.yaml).
TRAINING_WORKER = "training-worker"
GENERATED_RELATIVE = Path("deploy") / "k8s" / "base" / "generated"

# Placeholder root of the PKI the local renderer is given: every file it names under it
# is mapped to a mount of the pod, and any left over fails the render.
_PKI_ROOT = Path("/medimg-k8s-pki-placeholder")
_SDS_ROOT = Path("/medimg-k8s-sds-placeholder")
_HEALTH_CHECK = f"{meshlib.HEALTH_PREFIX}Check"


def default_out_dir() -> Path:
    """deploy/k8s/base/generated beside the deploy/mesh.toml in use."""
    return meshlib.default_mesh_path().parent.parent / GENERATED_RELATIVE


# --- Envoy -----------------------------------------------------------------------------


def render_envoy(
    mesh: meshlib.Mesh, descriptor_set: Path, *, cluster_domain: str = CLUSTER_DOMAIN
) -> dict[str, meshlib.EnvoyConfig]:
    """The Envoy bootstrap configs of the pods, keyed as medimg_cli.mesh.render keys them,
    with their SDS files (`secrets`) keyed by their path in the pod."""
    collector = meshlib.Collector(
        host=service_host(mesh, COLLECTOR, cluster_domain),
        port=OTLP_PORT,
        identity=COLLECTOR,
        listen_port=OTLP_LISTEN_PORT,
    )
    local = meshlib.render(
        mesh, Pki(_PKI_ROOT), descriptor_set, sds_dir=_SDS_ROOT, collector=collector
    )
    files = _file_mounts(mesh, descriptor_set)
    configs: dict[str, meshlib.EnvoyConfig] = {}
    for key, config in local.items():
        identity = GATEWAY if key == "gateway" else key.removeprefix("sidecar-")
        mapping = {**files["common"], **files[identity]}
        pod = _map_strings(dict(config), mapping)
        sds = {
            mapping[path]: _map_strings(resource, mapping)
            for path, resource in config.secrets.items()
        }
        leftover = [s for s in _strings([pod, sds]) if str(_PKI_ROOT) in s or str(_SDS_ROOT) in s]
        if leftover:
            raise ValueError(f"{key}: local file paths left in the pod config: {leftover}")
        listeners = pod["static_resources"]["listeners"]
        clusters = pod["static_resources"]["clusters"]
        public = "gateway" if key == "gateway" else "inbound"
        _listener(listeners, public)["address"]["socket_address"]["address"] = ANY_ADDRESS
        for cluster in clusters:
            if cluster["name"].startswith("outbound_"):
                _to_dns(mesh, cluster, cluster_domain)
        admin_port = pod["admin"]["address"]["socket_address"]["port_value"]
        clusters.append(_plain_cluster("envoy_admin", admin_port))
        routes = [_exact("/stats/prometheus", "envoy_admin"), _exact("/ready", "envoy_admin")]
        if key != "gateway":
            spec = mesh.services[identity]
            clusters.append(_plain_cluster("service_metrics", spec.metrics_port))
            routes.append(_exact("/metrics", "service_metrics"))
            listeners.append(_health_listener())
            if identity == DIMSE_SERVICE:
                listeners.append(_dimse_listener())
                clusters.append(_plain_cluster("local_dimse", DIMSE_SERVICE_PORT))
        listeners.append(_pod_listener("pod_metrics", METRICS_PORT, "AUTO", routes))
        configs[key] = meshlib.EnvoyConfig(pod, sds)
    return configs


def _file_mounts(mesh: meshlib.Mesh, descriptor_set: Path) -> dict[str, dict[str, str]]:
    pki = Pki(_PKI_ROOT)
    mounts: dict[str, dict[str, str]] = {
        "common": {
            str(pki.ca_cert): f"{TRUST_DIR}/{TRUST_KEY}",
            # The CA's directory is watched for its renames: in the pod, the bundle's mount.
            str(pki.ca_cert.parent): TRUST_DIR,
            str(pki.jwks): JWKS_PATH,
            str(descriptor_set.resolve()): DESCRIPTOR_PATH,
        }
    }
    for identity in [*mesh.services, GATEWAY]:
        sds = meshlib.sds_files(_SDS_ROOT, identity)
        mounts[identity] = {
            str(pki.cert(identity)): f"{TLS_DIR}/tls.crt",
            str(pki.key(identity)): f"{TLS_DIR}/tls.key",
            str(pki.identity_dir(identity)): TLS_DIR,
            str(sds[meshlib.CERTIFICATE_SECRET]): f"{CONFIG_DIR}/{CERTIFICATE_SDS_FILE}",
            str(sds[meshlib.CA_SECRET]): f"{CONFIG_DIR}/{CA_SDS_FILE}",
        }
    return mounts


def _map_strings(value: Any, mapping: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _map_strings(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, mapping) for v in value]
    if isinstance(value, str):
        return mapping.get(value, value)
    return copy.copy(value)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _listener(listeners: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for listener in listeners:
        if listener["name"] == name:
            return listener
    # The local renderer changed shape: fail rather than ship a loopback-only pod.
    raise ValueError(f"no listener {name!r} in the rendered config")


def service_host(mesh: meshlib.Mesh, service: str, cluster_domain: str = CLUSTER_DOMAIN) -> str:
    """The DNS name of a service's headless Service: one A record per ready pod."""
    return f"{service}.{mesh.namespace}.svc.{cluster_domain}"


def _to_dns(mesh: meshlib.Mesh, cluster: dict[str, Any], cluster_domain: str) -> None:
    service = cluster["name"].removeprefix("outbound_")
    if service not in mesh.services:
        raise ValueError(f"cluster {cluster['name']}: {service!r} is not a service of the mesh")
    cluster["type"] = "STRICT_DNS"
    cluster["dns_lookup_family"] = "V4_ONLY"
    cluster["dns_refresh_rate"] = "5s"
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    if address["port_value"] != mesh.services[service].sidecar_port:
        raise ValueError(f"cluster {cluster['name']}: not the sidecar port of {service}")
    address["address"] = service_host(mesh, service, cluster_domain)


def _plain_cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": meshlib.LOOPBACK,
                                        "port_value": port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def _exact(path: str, cluster: str) -> dict[str, Any]:
    return {"match": {"path": path}, "route": {"cluster": cluster}}


def _pod_listener(
    name: str, port: int, codec: str, routes: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    routes = [
        *routes,
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    return {
        "name": name,
        "address": {"socket_address": {"address": ANY_ADDRESS, "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": name,
                            "codec_type": codec,
                            "normalize_path": True,
                            "merge_slashes": True,
                            "path_with_escaped_slashes_action": "REJECT_REQUEST",
                            **extra,
                            "route_config": {
                                "name": name,
                                "virtual_hosts": [
                                    {"name": name, "domains": ["*"], "routes": routes}
                                ],
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/"
                                        "envoy.extensions.filters.http.router.v3.Router"
                                    },
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


def _dimse_listener() -> dict[str, Any]:
    # Plain TCP to the SCP: DICOM's own TLS (PS3.15 Annex B) is not offered here, and the
    # calling AE title is not an identity, so the network policy is the access control.
    return {
        "name": "dimse",
        "address": {"socket_address": {"address": ANY_ADDRESS, "port_value": DIMSE_PORT}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            "stat_prefix": "dimse",
                            "cluster": "local_dimse",
                        },
                    }
                ]
            }
        ],
    }


def _health_listener() -> dict[str, Any]:
    # Only Health/Check, never Watch or any other method: this port has no mTLS and no RBAC.
    route = _exact(_HEALTH_CHECK, "local_service")
    route["route"]["timeout"] = "2s"
    return _pod_listener("pod_health", HEALTH_PORT, "HTTP2", [route])


# --- Kubernetes objects ------------------------------------------------------------------


def labels(name: str) -> dict[str, str]:
    return {NAME_LABEL: name, **PART_OF}


def callers_of(mesh: meshlib.Mesh, service: str) -> list[str]:
    """The workloads that connect to a service's sidecar: the gateway (it routes to every
    service's API) and every service that has it as an upstream."""
    return [GATEWAY] + [n for n, s in mesh.services.items() if service in s.upstreams]


def _port(name: str, number: int) -> dict[str, Any]:
    return {"name": name, "port": number, "protocol": "TCP"}


def _service(mesh: meshlib.Mesh, name: str) -> dict[str, Any]:
    spec: dict[str, Any]
    if name == COLLECTOR:
        # Headless, as the services': each sidecar balances its spans over the collectors.
        spec = {
            "clusterIP": "None",
            "ports": [{**_port("grpc-otlp", OTLP_PORT), "targetPort": "grpc-otlp"}],
        }
    elif name == GATEWAY:
        spec = {
            "type": "ClusterIP",
            "ports": [{**_port("http", mesh.gateway.port), "targetPort": "http"}],
        }
    else:
        spec = {
            # Headless: the callers' Envoys resolve every ready pod and balance each call.
            "clusterIP": "None",
            "ports": [
                {**_port("grpc-mesh", mesh.services[name].sidecar_port), "targetPort": "grpc-mesh"}
            ],
        }
    spec["selector"] = {NAME_LABEL: name}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels(name)},
        "spec": spec,
    }


def _dimse_service() -> dict[str, Any]:
    """The DIMSE door's Service: a ClusterIP on ingest's Envoy (its `dicom` port); the prod
    overlay makes it an internal load balancer the hospital network reaches."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{DIMSE_SERVICE}-dimse", "labels": labels(DIMSE_SERVICE)},
        "spec": {
            "type": "ClusterIP",
            "ports": [{**_port("dicom", DIMSE_PORT), "targetPort": "dicom"}],
            "selector": {NAME_LABEL: DIMSE_SERVICE},
        },
    }


def _pods(*names: str) -> list[dict[str, Any]]:
    return [{"podSelector": {"matchLabels": {NAME_LABEL: n}}} for n in names]


def _network_policies(mesh: meshlib.Mesh) -> list[dict[str, Any]]:
    def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "labels": PART_OF},
            "spec": spec,
        }

    scrape = {
        "from": [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}
                }
            }
        ],
        "ports": [{"port": METRICS_PORT, "protocol": "TCP"}],
    }
    spans = {"to": _pods(COLLECTOR), "ports": [{"port": OTLP_PORT, "protocol": "TCP"}]}
    policies = [
        # Nothing in or out of the namespace that a policy below does not allow.
        policy("default-deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        policy(
            "allow-dns",
            {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                                },
                                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                            }
                        ],
                        "ports": [
                            {"port": 53, "protocol": "UDP"},
                            {"port": 53, "protocol": "TCP"},
                        ],
                    }
                ],
            },
        ),
    ]
    for name, spec in mesh.services.items():
        egress = [
            {
                "to": _pods(upstream),
                "ports": [{"port": mesh.services[upstream].sidecar_port, "protocol": "TCP"}],
            }
            for upstream in spec.upstreams
        ]
        egress.append(spans)
        policies.append(
            policy(
                f"mesh-{name}",
                {
                    "podSelector": {"matchLabels": {NAME_LABEL: name}},
                    "policyTypes": ["Ingress", "Egress"],
                    "ingress": [
                        {
                            "from": _pods(*callers_of(mesh, name)),
                            "ports": [{"port": spec.sidecar_port, "protocol": "TCP"}],
                        },
                        scrape,
                    ],
                    "egress": egress,
                },
            )
        )
    policies.append(
        policy(
            f"mesh-{GATEWAY}",
            {
                "podSelector": {"matchLabels": {NAME_LABEL: GATEWAY}},
                "policyTypes": ["Ingress", "Egress"],
                # REST clients come from anywhere the load balancer lets in.
                "ingress": [
                    {"ports": [{"port": mesh.gateway.port, "protocol": "TCP"}]},
                    scrape,
                ],
                "egress": [
                    {
                        "to": _pods(name),
                        "ports": [{"port": spec.sidecar_port, "protocol": "TCP"}],
                    }
                    for name, spec in mesh.services.items()
                ],
            },
        )
    )
    policies.append(
        policy(
            f"{DIMSE_SERVICE}-dimse",
            {
                # PACS and modalities, from the hospital network only: DIMSE carries no
                # identity, so this policy is its access control. Ingress only: what ingest
                # reaches is mesh-ingest's.
                "podSelector": {"matchLabels": {NAME_LABEL: DIMSE_SERVICE}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [{"ipBlock": {"cidr": DIMSE_CLIENTS_CIDR}}],
                        "ports": [{"port": DIMSE_PORT, "protocol": "TCP"}],
                    }
                ],
            },
        )
    )
    policies.append(
        policy(
            f"mesh-{COLLECTOR}",
            {
                "podSelector": {"matchLabels": {NAME_LABEL: COLLECTOR}},
                "policyTypes": ["Ingress", "Egress"],
                # Spans from every service's sidecar, and from the training workers' (they
                # run the training sidecar's config), on the TLS receiver alone.
                "ingress": [
                    {
                        "from": _pods(*mesh.services, TRAINING_WORKER),
                        "ports": [{"port": OTLP_PORT, "protocol": "TCP"}],
                    }
                ],
                "egress": [
                    {
                        "to": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {
                                        "kubernetes.io/metadata.name": MONITORING_NAMESPACE
                                    }
                                },
                                "podSelector": {"matchLabels": {NAME_LABEL: TRACING_BACKEND}},
                            }
                        ],
                        "ports": [{"port": OTLP_PORT, "protocol": "TCP"}],
                    }
                ],
            },
        )
    )
    return policies


#: The CA Issuer of the mesh (deploy/k8s/base/issuer.yaml).
ISSUER = "medimg-mesh-ca"


def tls_secret(identity: str) -> str:
    """The Secret cert-manager keeps a workload's certificate in."""
    return f"{identity}-mesh-tls"


def _certificate(mesh: meshlib.Mesh, identity: str) -> dict[str, Any]:
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {"name": f"{identity}-mesh", "labels": labels(identity)},
        "spec": {
            "secretName": tls_secret(identity),
            # The SPIFFE id is the identity; the sidecars' RBAC matches it, nothing else.
            "uris": [mesh.spiffe(identity)],
            "duration": "2160h",
            "renewBefore": "720h",
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
            "issuerRef": {"name": ISSUER, "kind": "Issuer", "group": "cert-manager.io"},
        },
    }


def _deployment_patch(mesh: meshlib.Mesh, name: str) -> dict[str, Any]:
    """What a workload's Deployment takes from the mesh: its Envoy's ports and config, and
    the service's own ports and upstream addresses (as `medimg up` sets them locally)."""
    envoy_ports = [
        {"name": "grpc-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
        {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
    ]
    if name == GATEWAY:
        envoy_ports.insert(
            0, {"name": "http", "containerPort": mesh.gateway.port, "protocol": "TCP"}
        )
        envoy_ports = [p for p in envoy_ports if p["name"] != "grpc-health"]
        containers: list[dict[str, Any]] = []
    else:
        spec = mesh.services[name]
        envoy_ports.insert(
            0, {"name": "grpc-mesh", "containerPort": spec.sidecar_port, "protocol": "TCP"}
        )
        prefix = f"MEDIMG_{name.upper()}_"
        env = {
            "PORT": str(spec.service_port),
            "METRICS_PORT": str(spec.metrics_port),
            "TRUST_DOMAIN": mesh.trust_domain,
            "NAMESPACE": mesh.namespace,
            **{
                f"{upstream.upper()}_TARGET": f"{meshlib.LOOPBACK}:{port}"
                for upstream, port in spec.upstreams.items()
            },
            # Spans go to the sidecar's OTLP listener, which forwards them over mTLS.
            "OTLP_ENDPOINT": f"http://{meshlib.LOOPBACK}:{OTLP_LISTEN_PORT}",
        }
        if name == DIMSE_SERVICE:
            # On loopback, as locally; the pod's DIMSE_PORT is Envoy's (the `dicom` port).
            env |= {"DIMSE_HOST": meshlib.LOOPBACK, "DIMSE_PORT": str(DIMSE_SERVICE_PORT)}
            envoy_ports.insert(1, {"name": "dicom", "containerPort": DIMSE_PORT, "protocol": "TCP"})
        containers = [
            {
                "name": name,
                "env": [
                    *_POD_ENV,
                    *({"name": prefix + k, "value": v} for k, v in env.items()),
                    # The spans' resource says which pod sent them (OpenTelemetry's SDK reads
                    # this variable): the collector needs no access to the Kubernetes API.
                    {
                        "name": "OTEL_RESOURCE_ATTRIBUTES",
                        "value": "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),"
                        "k8s.node.name=$(NODE_NAME)",
                    },
                ],
            }
        ]
    envoy = {"name": "envoy", "ports": envoy_ports, "volumeMounts": [_TRUST_MOUNT]}
    pod_spec: dict[str, Any] = {
        "volumes": [
            {"name": "envoy-config", "configMap": {"name": f"envoy-{name}"}},
            {"name": "mesh-tls", "secret": {"secretName": tls_secret(name)}},
            TRUST_VOLUME,
        ],
    }
    if containers:
        # Envoy is a native sidecar: up before the service, stopped after it has drained.
        pod_spec["initContainers"] = [envoy]
        pod_spec["containers"] = containers
    else:
        pod_spec["containers"] = [envoy]  # the gateway is Envoy alone
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"template": {"spec": pod_spec}},
    }


#: The trust bundle's volume and Envoy's mount of it (its ca.json names TRUST_DIR).
TRUST_VOLUME: dict[str, Any] = {"name": "mesh-trust", "configMap": {"name": TRUST_BUNDLE}}
_TRUST_MOUNT: dict[str, Any] = {"name": "mesh-trust", "mountPath": TRUST_DIR, "readOnly": True}


def _trust_bundle(mesh: meshlib.Mesh) -> dict[str, Any]:
    """trust-manager's Bundle of the mesh CAs. Its sources are Secrets selected by label
    (the Bundle never changes during a rotation: labelling a second CA Secret adds it);
    trust-manager reads them in its trust namespace, which must be the mesh's (its Helm
    value app.trust.namespace, docs/operations.md). Cluster-scoped: the target ConfigMap
    is written in the mesh's namespace alone."""
    return {
        "apiVersion": "trust.cert-manager.io/v1alpha1",
        "kind": "Bundle",
        "metadata": {"name": TRUST_BUNDLE, "labels": PART_OF},
        "spec": {
            "sources": [
                {"secret": {"selector": {"matchLabels": {TRUST_LABEL: "true"}}, "key": "tls.crt"}}
            ],
            "target": {
                "configMap": {"key": TRUST_KEY},
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": mesh.namespace}
                },
            },
        },
    }


#: The downward API variables OTEL_RESOURCE_ATTRIBUTES refers to (defined before it).
_POD_ENV: tuple[dict[str, Any], ...] = tuple(
    {"name": variable, "valueFrom": {"fieldRef": {"fieldPath": field}}}
    for variable, field in (
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("NODE_NAME", "spec.nodeName"),
    )
)


@dataclass(frozen=True)
class Rendered:
    """Everything `medimg k8s render` writes: relative path -> file text."""

    files: Mapping[str, str]


def render(
    mesh: meshlib.Mesh, descriptor_set: Path, *, cluster_domain: str = CLUSTER_DOMAIN
) -> Rendered:
    """The generated kustomize Component of deploy/k8s/base, as file texts."""
    files: dict[str, str] = {}

    def add(path: str, document: dict[str, Any]) -> str:
        files[path] = json.dumps(document, indent=2) + "\n"
        return path

    resources: list[str] = []
    patches: list[str] = []
    generators: list[tuple[str, dict[str, str]]] = []
    workloads = [*mesh.services, GATEWAY]
    for key, config in render_envoy(mesh, descriptor_set, cluster_domain=cluster_domain).items():
        identity = GATEWAY if key == "gateway" else key.removeprefix("sidecar-")
        # ConfigMap key (the file name under CONFIG_DIR) -> generated file.
        config_files = {"envoy.json": add(f"envoy/{key}.json", config)}
        for pod_path, resource in config.secrets.items():
            name = Path(pod_path).name
            config_files[name] = add(f"sds/{key}/{name}", resource)
        generators.append((f"envoy-{identity}", config_files))
    for name in workloads:
        resources.append(add(f"service-{name}.json", _service(mesh, name)))
        resources.append(add(f"certificate-{name}.json", _certificate(mesh, name)))
        patches.append(add(f"deployment-{name}.json", _deployment_patch(mesh, name)))
    # The collector's Deployment and config are deploy/monitoring's; its Service and
    # identity are the mesh's, like the workloads'.
    resources.append(add(f"service-{COLLECTOR}.json", _service(mesh, COLLECTOR)))
    resources.append(add(f"certificate-{COLLECTOR}.json", _certificate(mesh, COLLECTOR)))
    resources.append(add(f"service-{DIMSE_SERVICE}-dimse.json", _dimse_service()))
    resources.append(add(f"bundle-{TRUST_BUNDLE}.json", _trust_bundle(mesh)))
    for document in _network_policies(mesh):
        resources.append(add(f"networkpolicy-{document['metadata']['name']}.json", document))
    files["kustomization.yaml"] = _kustomization(resources, patches, generators)
    return Rendered(files)


def _kustomization(
    resources: list[str], patches: list[str], generators: list[tuple[str, dict[str, str]]]
) -> str:
    lines = [
        "# Generated by `medimg k8s render` from deploy/mesh.toml: do not edit.",
        "apiVersion: kustomize.config.k8s.io/v1alpha1",
        "kind: Component",
        "resources:",
        *(f"  - {path}" for path in resources),
        "patches:",
        *(f"  - path: {path}" for path in patches),
        "configMapGenerator:",
    ]
    for name, files in generators:
        lines += [f"  - name: {name}", "    files:"]
        lines += [f"      - {key}={path}" for key, path in files.items()]
    return "\n".join(lines) + "\n"


def write(rendered: Rendered, out_dir: Path) -> list[Path]:
    """Replaces out_dir's generated files with `rendered` (stale ones are removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for relative, text in rendered.files.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        written.append(path)
    for path in out_dir.rglob("*"):
        if path.is_file() and path not in written:
            path.unlink()
    return written


def differences(rendered: Rendered, out_dir: Path) -> list[str]:
    """The files under out_dir that differ from `rendered`, are missing, or are extra."""
    problems = []
    for relative, text in rendered.files.items():
        path = out_dir / relative
        if not path.is_file():
            problems.append(f"missing {path}")
        elif path.read_text() != text:
            problems.append(f"differs {path}")
    expected = {out_dir / relative for relative in rendered.files}
    problems += [
        f"extra {path}"
        for path in sorted(out_dir.rglob("*"))
        if path.is_file() and path not in expected
    ]
    return problems


# --- the `medimg k8s` command -----------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="k8s_command", required=True)
    render_parser = commands.add_parser(
        "render", help="write deploy/k8s/base/generated from deploy/mesh.toml"
    )
    render_parser.add_argument("--out", type=Path, default=None, help="default: the checkout's")
    render_parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the files differ"
    )
    render_parser.add_argument("--cluster-domain", default=CLUSTER_DOMAIN)


def command(args: argparse.Namespace, state: Path) -> int:
    from medimg_protos import DESCRIPTOR_SET_PATH

    out = args.out or default_out_dir()
    rendered = render(meshlib.load_mesh(), DESCRIPTOR_SET_PATH, cluster_domain=args.cluster_domain)
    if args.check:
        problems = differences(rendered, out)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `medimg k8s render` and commit the result", file=sys.stderr)
        return 1 if problems else 0
    for path in write(rendered, out):
        print(path)
    return 0
