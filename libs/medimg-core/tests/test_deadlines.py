"""Deadline propagation: outgoing calls get at most the time the incoming call has left."""

from __future__ import annotations

import contextvars
import time

import pytest

from medimg_core import deadlines
from medimg_core.errors import DeadlineExceeded


def in_own_context(remaining: float | None, default: float) -> float:
    def run() -> float:
        deadlines.set_from_remaining(remaining)
        return deadlines.timeout(default)

    return contextvars.copy_context().run(run)


def test_no_incoming_deadline_gives_the_default() -> None:
    assert in_own_context(None, 4.0) == 4.0


def test_time_left_caps_the_default() -> None:
    assert 0.4 < in_own_context(0.5, 10.0) <= 0.5


def test_default_caps_a_long_deadline() -> None:
    assert in_own_context(60.0, 3.0) == 3.0


def test_passed_deadline_is_deadline_exceeded() -> None:
    def run() -> None:
        deadlines.set_from_remaining(0.01)
        time.sleep(0.02)
        deadlines.timeout(10.0)

    with pytest.raises(DeadlineExceeded) as caught:
        contextvars.copy_context().run(run)
    assert caught.value.reason == "DEADLINE_EXCEEDED"


def test_zero_time_left_is_deadline_exceeded() -> None:
    with pytest.raises(DeadlineExceeded):
        in_own_context(0.0, 10.0)


def test_deadline_does_not_leak_out_of_its_context() -> None:
    in_own_context(0.1, 10.0)
    assert in_own_context(None, 10.0) == 10.0
    assert contextvars.copy_context().run(deadlines.timeout, 5.0) == 5.0
