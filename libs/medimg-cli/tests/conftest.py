"""Fixtures for the mesh tests: a dev PKI, rendered Envoy configs and real Envoy processes."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from medimg_cli import mesh as meshlib
from medimg_cli.pki import Pki, ensure_pki

REPO = Path(__file__).resolve().parents[3]
DESCRIPTOR_SET = REPO / "libs" / "medimg-protos" / "src" / "medimg_protos" / "descriptor_set.binpb"
MESH_TOML = REPO / "deploy" / "mesh.toml"


def _all_free(ports: list[int]) -> bool:
    for value in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", value))
            except OSError:
                return False
    return True


@pytest.fixture(scope="session")
def base_mesh() -> meshlib.Mesh:
    return meshlib.load_mesh(MESH_TOML)


@pytest.fixture(scope="session")
def mesh_port_offset(base_mesh: meshlib.Mesh) -> int:
    # Far above the launcher's ports, so the tests run beside a `medimg up`; random, so two
    # test runs on one machine rarely meet; checked, since this lies in the ephemeral range.
    top = max(value for _, value in base_mesh.ports())
    for _ in range(50):
        offset = random.randrange(40000, 65535 - top, 10)
        if _all_free([value + offset for _, value in base_mesh.ports()]):
            return offset
    raise RuntimeError("no free block of ports for the test mesh")


@pytest.fixture(scope="session")
def mesh(base_mesh: meshlib.Mesh, mesh_port_offset: int) -> meshlib.Mesh:
    """The mesh as the rendered configs see it: every port moved by mesh_port_offset."""
    return base_mesh.with_offset(mesh_port_offset)


@pytest.fixture(scope="session")
def pki(base_mesh: meshlib.Mesh, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return ensure_pki(
        tmp_path_factory.mktemp("pki"),
        base_mesh.trust_domain,
        base_mesh.namespace,
        base_mesh.all_identities(),
    )


@pytest.fixture(scope="session")
def config_paths(
    base_mesh: meshlib.Mesh,
    pki: Pki,
    mesh_port_offset: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    configs = meshlib.render(base_mesh, pki, DESCRIPTOR_SET, port_offset=mesh_port_offset)
    return meshlib.write_configs(configs, tmp_path_factory.mktemp("envoy"))


class Envoys:
    """Starts Envoys and stops every one of them at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, config: Path, admin_port: int, timeout: float = 10.0) -> None:
        log = (self.log_dir / f"{config.stem}.log").open("ab")
        process = subprocess.Popen(
            meshlib.envoy_command(config, concurrency=1),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.processes.append(process)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"envoy {config.name} exited: {self.log(config)}")
            try:
                if httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy {config.name} not ready: {self.log(config)}")
            time.sleep(0.02)

    def log(self, config: Path) -> str:
        return (self.log_dir / f"{config.stem}.log").read_text()

    def stop_all(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def start_envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Path, int], None]]:
    """start_envoy(config, admin_port) starts an Envoy and waits until it is ready; every
    Envoy started is stopped when the module's tests are done."""
    envoys = Envoys(tmp_path_factory.mktemp("envoy-logs"))
    try:
        yield envoys.start
    finally:
        envoys.stop_all()


@pytest.fixture(scope="session")
def mesh_toml() -> Path:
    return MESH_TOML


@pytest.fixture(scope="session")
def descriptor_set() -> Path:
    return DESCRIPTOR_SET
