"""Deadline propagation: a call to another service gets at most the time the caller has left."""

from __future__ import annotations

import contextvars
import time

from medimg_core.errors import DeadlineExceeded

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


def set_from_remaining(remaining: float | None) -> None:
    """Records the incoming call's deadline (seconds left, or None for no deadline)."""
    _deadline.set(None if remaining is None else time.monotonic() + remaining)


def timeout(default: float) -> float:
    """Seconds an outgoing call may take: the caller's time left, capped at `default`."""
    deadline = _deadline.get()
    if deadline is None:
        return default
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("DEADLINE_EXCEEDED", "the caller's deadline has passed")
    return min(left, default)
