"""The blueprint pipeline idles when no trainer wants blueprints, and wakes when one asks.

Karn proposes only while a client has asked Urza for the catalogue within
``actors.idle_after_s``; idle, each service actor uses next to no CPU.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pipeline_support import small_pipeline_config

pytestmark = pytest.mark.ray


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def pipeline(ray_session, tmp_path_factory: pytest.TempPathFactory):
    from actors.launch import start_pipeline, stop_pipeline, wait_until_ready

    cfg = small_pipeline_config(tmp_path_factory.mktemp("urza"), "test-idle", karn_interval_s=0.25, idle_after_s=2.0)
    p = start_pipeline(cfg)
    wait_until_ready(p, 3, timeout=120)
    yield p
    stop_pipeline(p, kill=True)


def _karn(p) -> dict:
    import ray

    return ray.get(p.karn.stats.remote(), timeout=30)


def test_karn_idles_without_demand_and_wakes_on_a_catalogue_request(pipeline) -> None:
    import ray

    # No client polls: after idle_after_s Karn's rounds are idle ones and it submits nothing more.
    _wait(lambda: _karn(pipeline)["idle_rounds"] >= 3, 30, "Karn to idle")
    before = _karn(pipeline)
    time.sleep(4.5)  # idle rounds come every IDLE_POLL_S (2 s)
    after = _karn(pipeline)
    assert after["submitted"] == before["submitted"], (before, after)
    assert after["idle_rounds"] > before["idle_rounds"]
    assert ray.get(pipeline.urza.stats.remote(), timeout=30)["demand_age_s"] > 2.0
    # A trainer asks for the catalogue: Karn proposes again within a few rounds.
    ray.get(pipeline.urza.catalogue_if_newer.remote(-1), timeout=30)
    _wait(lambda: _karn(pipeline)["submitted"] > after["submitted"], 20, "Karn to propose again")


@pytest.mark.slow
def test_idle_actors_use_under_two_percent_of_a_core(pipeline) -> None:
    import ray

    from actors.client import ACTOR_NAMES

    handles = {name: h for name, h in pipeline.handles().items() if name in ACTOR_NAMES}
    pids = {name: ray.get(h.__ray_call__.remote(lambda self: os.getpid()), timeout=30) for name, h in handles.items()}
    # Idle now (fresh idle rounds: the counter also holds the earlier test's), and the work queued
    # before idling done: Tezzeret's queue empty (a spec being benchmarked counts as queued).
    idle_rounds = _karn(pipeline)["idle_rounds"]
    _wait(lambda: _karn(pipeline)["idle_rounds"] >= idle_rounds + 2, 60, "Karn to idle")
    _wait(lambda: ray.get(pipeline.tezzeret.queue_len.remote(), timeout=30) == 0, 120, "Tezzeret's queue to drain")
    submitted = _karn(pipeline)["submitted"]
    start = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(20.0)
    elapsed = time.monotonic() - t0
    share = {name: (_cpu_seconds(pid) - start[name]) / elapsed for name, pid in pids.items()}
    print("idle CPU over 20 s, % of a core:", {name: round(100 * v, 2) for name, v in share.items()})
    assert _karn(pipeline)["submitted"] == submitted  # it was idle all along
    # The target: under 2% of a core each (a proposing Karn or a compiling Tezzeret costs far more).
    assert all(s < 0.02 for s in share.values()), share
