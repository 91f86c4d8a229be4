"""CPUs a process may use: the affinity mask capped by cgroup quotas, read from cgroup file
systems laid out as the kernel lays them out (v2, v1 beside v2, a container's namespace)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medimg_core import cpus


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    """cgroup v2 alone: the pod's slice limited to 4 CPUs, the container below it to 2.5."""
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    write(root / "cpu.max", "max 100000\n")
    write(root / "kubepods" / "pod1" / "cpu.max", "400000 100000\n")
    write(root / "kubepods" / "pod1" / "app" / "cpu.max", "250000 100000\n")
    write(tmp_path / "membership", "0::/kubepods/pod1/app\n")
    return tmp_path


def test_the_tightest_quota_from_the_cgroup_up_counts(v2: Path) -> None:
    assert cpus.cgroup_quota(v2 / "cgroup", v2 / "membership") == 2.5
    write(v2 / "cgroup" / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    assert cpus.cgroup_quota(v2 / "cgroup", v2 / "membership") == 1.5


def test_no_quota_anywhere_is_none(v2: Path) -> None:
    for level in ("kubepods/pod1", "kubepods/pod1/app"):
        write(v2 / "cgroup" / level / "cpu.max", "max 100000\n")
    assert cpus.cgroup_quota(v2 / "cgroup", v2 / "membership") is None


def test_inside_a_cgroup_namespace_the_mount_is_the_cgroup(tmp_path: Path) -> None:
    # A container sees its own cgroup at the mount's root, and its path in
    # /proc/self/cgroup names a directory the mount does not have.
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu\n")
    write(root / "cpu.max", "200000 100000\n")
    write(tmp_path / "membership", "0::/../kubepods/pod1/app\n")
    assert cpus.cgroup_quota(root, tmp_path / "membership") == 2.0


def test_cgroup_v1_beside_v2(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "unified" / "cgroup.controllers", "")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    write(root / "cpu,cpuacct" / "docker" / "c1" / "cpu.cfs_quota_us", "300000\n")
    write(root / "cpu,cpuacct" / "docker" / "c1" / "cpu.cfs_period_us", "100000\n")
    write(
        tmp_path / "membership",
        "4:memory:/docker/c1\n2:cpu,cpuacct:/docker/c1\n0::/docker/c1\n",
    )
    assert cpus.cgroup_quota(root, tmp_path / "membership") == 3.0
    write(root / "cpu,cpuacct" / "docker" / "c1" / "cpu.cfs_quota_us", "-1\n")
    assert cpus.cgroup_quota(root, tmp_path / "membership") is None


def test_available_is_the_affinity_capped_by_the_quota_rounded_up(v2: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    write(v2 / "cgroup" / "kubepods" / "pod1" / "app" / "cpu.max", "50000 100000\n")
    assert cpus.available(v2 / "cgroup", v2 / "membership") == 1
    write(v2 / "cgroup" / "kubepods" / "pod1" / "app" / "cpu.max", "max 100000\n")
    write(v2 / "cgroup" / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    assert cpus.available(v2 / "cgroup", v2 / "membership") == cores
    write(v2 / "cgroup" / "cpu.max", f"{(cores + 8) * 100000} 100000\n")
    assert cpus.available(v2 / "cgroup", v2 / "membership") == cores
    assert cpus.available(v2 / "cgroup", v2 / "missing") == cores


def test_this_machine_answers() -> None:
    assert 1 <= cpus.available() <= len(os.sched_getaffinity(0))
