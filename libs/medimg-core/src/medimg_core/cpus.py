"""How many CPUs this process may keep busy: its affinity mask, capped by the CPU quota of
its cgroup and the cgroups above it (a Kubernetes CPU limit, `docker --cpus`).

`os.cpu_count()` and the affinity mask both report the node's cores: a pod limited to 8 CPUs
on a 96-core node that sized its thread pools from them would run 96 threads on a quota of 8
and spend most of each period throttled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: Where the cgroup file systems are mounted (cgroup v2 alone, or v1 with v2 beside it).
CGROUP_ROOT = Path("/sys/fs/cgroup")
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
_V2_MOUNTS = (".", "unified")


def available(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs of the affinity mask, capped by the smallest cgroup quota (rounded up);
    at least 1."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_quota(root, membership)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cgroup_quota(
    root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")
) -> float | None:
    """CPUs' worth of quota (quota / period) of the tightest cgroup from this process's own
    up to its hierarchy's root, cgroup v2 and v1 alike; None without any quota."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: "0::/path"
            mounts = [root / m for m in _V2_MOUNTS if (root / m / "cgroup.controllers").exists()]
            quotas += [_v2_quota(d) for m in mounts for d in _up_from(m, path)]
        elif "cpu" in controllers.split(","):
            mounts = [root / m for m in _V1_CPU_MOUNTS if (root / m).is_dir()]
            quotas += [_v1_quota(d) for m in mounts for d in _up_from(m, path)]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _up_from(mount: Path, path: str) -> list[Path]:
    """The cgroup's directory and its parents up to the mount. In a container's cgroup
    namespace its own path may not exist under the mount: the mount is its cgroup then."""
    here = mount / path.strip("/")
    if not here.is_dir():
        return [mount]
    chain = [here]
    while chain[-1] != mount:
        chain.append(chain[-1].parent)
    return chain


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
