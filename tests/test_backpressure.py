"""Backpressure: Karn proposes only while Tezzeret's queue holds less than MAX_BACKLOG_ROUNDS rounds' worth.

Fake Urza and Tezzeret actors: Tezzeret's queue length is set by the test. While it is at the bound
Karn submits nothing (its rounds count as backlog skips); below it, Karn proposes again.
"""

from __future__ import annotations

import time

import pytest

from esper_ray.blueprints import STANDARD_BLUEPRINTS, BlueprintSpec
from esper_ray.config import ActorsConfig

pytestmark = pytest.mark.ray


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_karn_skips_rounds_while_tezzerets_queue_is_at_the_bound(ray_session) -> None:
    import ray

    from actors.karn import MAX_BACKLOG_ROUNDS, Karn

    @ray.remote(num_cpus=0.02)
    class FakeUrza:
        def top_specs(self, k: int) -> list[str]:
            return [s.to_json() for s in STANDARD_BLUEPRINTS.values()][:k]

        def field_reports(self) -> list:
            return []

        def demand_age_s(self) -> float:  # a trainer asked just now: not idle
            return 0.0

    @ray.remote(num_cpus=0.02)
    class FakeTezzeret:
        def __init__(self) -> None:
            self.received = 0
            self.queued = 0

        def submit(self, spec_json: str) -> str:
            self.received += 1
            return BlueprintSpec.from_json(spec_json).content_hash

        def queue_len(self) -> int:
            return self.queued

        def set_queue(self, n: int) -> None:
            self.queued = n

        def count(self) -> int:
            return self.received

    cfg = ActorsConfig(karn_interval_s=0.1, karn_batch=2, namespace="backpressure-test", idle_after_s=0.0)
    bound = MAX_BACKLOG_ROUNDS * cfg.karn_batch
    urza, tez = FakeUrza.remote(), FakeTezzeret.remote()
    ray.get(tez.set_queue.remote(bound))  # Tezzeret is behind from the start
    karn = Karn.options(num_cpus=0.02).remote(cfg, urza, tez, 0)
    try:
        ray.get(karn.start.remote(), timeout=60)
        _wait(lambda: ray.get(karn.stats.remote())["backlog_skips"] >= 5, 30, "Karn to skip rounds")
        stats = ray.get(karn.stats.remote())
        assert ray.get(tez.count.remote()) == 0 and stats["submitted"] == 0, stats
        assert stats["errors"] == 0 and stats["healthy"], stats

        ray.get(tez.set_queue.remote(bound - 1))  # one below the bound: Karn proposes again
        _wait(lambda: ray.get(tez.count.remote()) >= 2 * cfg.karn_batch, 30, "Karn to propose again")
        ray.get(tez.set_queue.remote(bound))  # behind again: submissions stop after the round in flight
        time.sleep(0.5)
        stopped = ray.get(tez.count.remote())
        skips = ray.get(karn.stats.remote())["backlog_skips"]
        time.sleep(1.0)
        assert ray.get(tez.count.remote()) == stopped
        assert ray.get(karn.stats.remote())["backlog_skips"] > skips
    finally:
        for actor in (karn, urza, tez):
            ray.kill(actor)
