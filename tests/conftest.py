"""Shared pytest fixtures. Pure torch here; no Ray."""

from __future__ import annotations

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
        ray.init(
            num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False, namespace="esper-ray-tests"
        )
    yield
    ray.shutdown()
