"""Pytest fixtures over real servers: PostgreSQL, Redis, an S3 API, and the whole platform
with its mesh.

Loaded for every test run (`-p medimg_cli.testing` in the root pyproject.toml). Nothing
here is a mock: the fixtures start the same embedded PostgreSQL, Redis, Envoy and
service processes as `medimg up`, on ports shifted clear of a running `medimg up`.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import boto3
import grpc
import httpx
import pytest
from botocore.config import Config
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from medimg_cli import mesh as meshlib
from medimg_cli.platform import (
    REDIS_PORT,
    EmbeddedPostgres,
    Platform,
    create_databases,
    redis_server,
    with_database,
)
from medimg_core.errors import ERROR_DOMAIN
from medimg_core.server import Server, ServiceDefinition
from medimg_core.settings import ServiceSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a rich gRPC error."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status in {error}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == ERROR_DOMAIN
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {status}")


def port_is_free(port: int) -> bool:
    """Whether nothing listens on the loopback port (this process could bind it)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(done: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
    """Polls `done` every 50 ms; fails with `why()` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(why())
        time.sleep(0.05)


def envoy_counter(admin_url: str, name: str) -> int:
    """One counter of an Envoy's admin `/stats` (`admin_url`: http://host:port), 0 while it
    has never counted."""
    text = httpx.get(f"{admin_url}/stats?filter=^{name}$", timeout=5).text
    for line in text.splitlines():
        stat, _, value = line.partition(": ")
        if stat == name:
            return int(value)
    return 0


def free_port_offset(mesh: meshlib.Mesh, start: int = 20000, step: int = 700) -> int:
    """The first offset at which every port of the mesh (and Redis) is free."""
    ports = [mesh.gateway.port, mesh.gateway.admin_port, REDIS_PORT]
    for spec in mesh.services.values():
        ports += [spec.sidecar_port, spec.service_port, spec.admin_port, spec.metrics_port]
        ports += list(spec.upstreams.values())
    for offset in range(start, 65535 - max(ports), step):
        if all(port_is_free(port + offset) for port in ports):
            return offset
    raise RuntimeError("no free range of ports for a test platform")


#: start_server(definition, *, ready=True, **settings) -> (server, channel).
StartServer = Callable[..., Awaitable[tuple[Server, grpc.aio.Channel]]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """start_server(definition, **settings): a Server on 127.0.0.1:0 and a channel to it."""
    running: list[tuple[Server, grpc.aio.Channel]] = []

    async def start(
        definition: ServiceDefinition, *, ready: bool = True, **settings: Any
    ) -> tuple[Server, grpc.aio.Channel]:
        values: dict[str, Any] = {
            "port": 0,
            "grace_seconds": 2.0,
            "drain_delay_seconds": 0.0,
            **settings,
        }
        server = Server(ServiceSettings(**values), definition)
        port = await server.start()
        assert port > 0
        if ready:
            await server.ready()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        running.append((server, channel))
        return server, channel

    yield start
    for server, channel in running:
        await channel.close(None)
        await server.grpc.stop(None)


@pytest.fixture(scope="session")
def medimg_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("medimg")


@pytest.fixture(scope="session")
def port_offset() -> int:
    return free_port_offset(meshlib.load_mesh())


@pytest.fixture(scope="session")
def postgres_url(medimg_state: Path) -> Iterator[str]:
    """The URL of a real PostgreSQL server (embedded), shared by the session."""
    server = EmbeddedPostgres(medimg_state / "postgres")
    yield server.url
    server.stop()


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """A new, empty database of its own for one test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    asyncio.run(create_databases(postgres_url, [name]))
    return with_database(postgres_url, name)


@pytest.fixture(scope="session")
def redis_url(medimg_state: Path, port_offset: int) -> Iterator[str]:
    """The URL of a real Redis server, shared by the session."""
    port = REDIS_PORT + port_offset
    server = redis_server(medimg_state / "redis", port)
    server.start()
    wait_until(lambda: not port_is_free(port), 10, lambda: f"Redis is not listening on {port}")
    yield f"redis://127.0.0.1:{port}/0"
    server.stop(grace=5)


@pytest.fixture(scope="session")
def platform(
    medimg_state: Path, port_offset: int, postgres_url: str, redis_url: str
) -> Iterator[Platform]:
    """The whole platform, started once per session: services, sidecars and gateway."""
    running = Platform(
        medimg_state / "platform",
        port_offset=port_offset,
        database_url=postgres_url,
        redis_url=redis_url,
    )
    running.start()
    yield running
    running.stop()


#: The region of the test buckets.
S3_REGION: Final = "eu-west-1"


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of a real S3 API on a socket (moto's server, a test-only package),
    shared by the session: each test makes buckets of its own (`new_bucket`)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Credentials through the standard AWS chain (the environment), and nothing from this
    machine's own AWS configuration; returns the variables set, for a child process."""
    variables = {
        "AWS_ACCESS_KEY_ID": "medimg-test",
        "AWS_SECRET_ACCESS_KEY": "medimg-test-secret",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return variables


def s3_client(endpoint: str, **config: Any) -> S3Client:
    """A client of the test's own, to write to buckets and look at them."""
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=S3_REGION, config=Config(**config)
    )


def new_bucket(client: S3Client, *, versioned: bool) -> str:
    """A new bucket with a name of its own."""
    name = f"medimg-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": S3_REGION})
    if versioned:
        client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name
