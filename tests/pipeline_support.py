"""What the tests that start a service pipeline share: small actor resources, a config built from
them, and polling until something holds."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from esper_ray.config import ActorResources, ActorsConfig

SMALL = ActorResources(num_cpus=0.1)  # several pipelines fit on the test session's 2 CPUs
T = TypeVar("T")


def small_pipeline_config(storage: str | Path, prefix: str = "test", **kw: Any) -> ActorsConfig:
    """An ActorsConfig with every actor on ``SMALL``, compile off, a fresh namespace, ``kw`` on top."""
    base: dict[str, Any] = {
        "namespace": f"{prefix}-{uuid.uuid4().hex[:8]}",
        "storage": str(storage),
        "compile": False,
        "urza": SMALL,
        "karn": SMALL,
        "tezzeret": SMALL,
        "urabrask": SMALL,
    }
    return ActorsConfig(**{**base, **kw})


def wait_for(predicate: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that (a test helper, not a
    timed assert)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
