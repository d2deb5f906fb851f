"""Helpers the twin tests share: waiting for a condition, and the scheduler's refusal of a pod."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait(predicate: Callable[[], T], timeout: float = 60.0, interval: float = 0.25) -> T:
    """``predicate()`` once it is truthy, or its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def assert_refused_for_gpus(core: Any, pod: str, namespace: str = "default") -> None:
    """``pod`` stays Pending with the scheduler's ``Insufficient nvidia.com/gpu`` event."""

    def refusals() -> list[Any]:
        events = core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={pod}"
        ).items
        return [e for e in events if e.reason == "FailedScheduling"]

    events = wait(refusals)
    assert events, f"no FailedScheduling event for {pod}"
    assert "Insufficient nvidia.com/gpu" in events[0].message
    assert core.read_namespaced_pod(pod, namespace).status.phase == "Pending"
