"""CPU time of processes, read from /proc (Linux), by group: the per-process CPU tables of
the benchmarks in bench/.

A group is a callable that lists its pids at each sample, so processes that come and go
(PostgreSQL backends, worker processes) are counted while they live; what a process spent
in children it has reaped is counted with it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3 onwards)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and of its children it has reaped; 0 once gone."""
    try:
        fields = _stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return sum(int(x) for x in fields[11:15]) / CLOCK_TICKS


def tree(pid: int | None) -> list[int]:
    """`pid` and its live descendants ([] for None)."""
    if pid is None:
        return []
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


class CpuMeter:
    """CPU seconds used so far by each group of processes."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups

    def sample(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(pid) for pid in pids()) for name, pids in self.groups.items()}
