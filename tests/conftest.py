"""Shared pytest fixtures. Pure torch here; no Ray."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def torch_seed() -> Iterator[int]:
    """Seed torch's global RNG and run torch single-threaded for one test; restore both after.

    One thread: the tiny tensors in unit tests run several times faster than with intra-op
    threads fighting over shared CPU cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            yield 0
    finally:
        torch.set_num_threads(threads)


# ---- Ray: one shared local session for every test that needs it ---------------------------------
import os  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray for the whole run, started by the first test that asks for it.

    2 CPUs (what the machine has: more would make Ray wait silently for CPUs that do not
    exist) and 4 logical GPUs, which need no hardware, for placement tests. Actors ask
    for fractional CPUs. Tests that do not use this fixture never start Ray.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False, namespace="esper-ray-tests")
    yield
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _no_services_outlive_their_module() -> Iterator[None]:
    """After each test module, kill any esper service actor still alive in the shared Ray.

    The services are detached (they outlive jobs by design), so one a test forgot, or a
    half-failed start left behind, would keep computing and holding CPUs for the rest of
    the session. Module-scoped pipelines are torn down before this runs (set up after it).
    """
    yield
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"] in ("urza", "karn", "tezzeret", "urabrask"):
            with contextlib.suppress(ValueError):  # gone meanwhile
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
