"""Chaos: each service actor killed for good and started again by the next job; blueprints flow again.

A killed-for-good actor (``no_restart=True``) is gone; the next ``start_pipeline`` (what the next
``esper-ray train`` does) creates a new one under the same name. Every actor that calls it must
find the new one (``actors.client.Peer`` looks the name up again after ``ActorDiedError``): within
60 s of each kill a new blueprint is accepted into Urza, and no ready blueprint is lost.
"""

from __future__ import annotations

import time
import uuid

import pytest

from esper_ray.config import ActorResources, ActorsConfig

pytestmark = pytest.mark.ray

SMALL = ActorResources(num_cpus=0.1)


def _ready(p) -> int:
    import ray

    return ray.get(p.urza.stats.remote(), timeout=30)["ready"]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # an actor being replaced answers nothing for a moment
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_each_actor_killed_for_good_and_restarted_blueprints_flow_again(ray_session, tmp_path) -> None:
    import ray

    from actors.launch import start_pipeline, stop_pipeline

    cfg = ActorsConfig(
        namespace=f"test-chaos-{uuid.uuid4().hex[:8]}",
        storage=str(tmp_path / "urza"),
        compile=False,
        urza=SMALL,
        karn=SMALL,
        tezzeret=SMALL,
        urabrask=SMALL,
        karn_interval_s=0.25,
        idle_after_s=0.0,  # no trainer polls here: Karn must not idle
    )
    # Actors an earlier module killed give their CPUs back a moment later; start once they are free.
    need = sum(r.num_cpus for r in (cfg.urza, cfg.karn, cfg.tezzeret, cfg.urabrask))
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0.0) < need and time.monotonic() < deadline:
        time.sleep(0.5)
    p = start_pipeline(cfg)
    try:
        _wait(lambda: _ready(p) >= 3, 120, "the first blueprints")
        for victim in ("tezzeret", "urza", "urabrask", "karn"):
            before = _ready(p)
            killed_at = time.monotonic()
            ray.kill(p.handles()[victim], no_restart=True)
            _wait(lambda v=victim: _gone(v, cfg.namespace), 30, f"{victim} to die")
            p = start_pipeline(cfg)  # the next job: finds the living actors, creates the dead one
            grown = _wait(lambda b=before, q=p: (n := _ready(q)) > b and n, 60, f"a new blueprint after {victim}")
            assert time.monotonic() - killed_at < 60
            assert grown > before  # nothing ready was lost, and a new one came in
            if victim == "karn":  # the new Karn proposes through its Peers, and says it is healthy
                stats = _wait(
                    lambda q=p: (s := ray.get(q.karn.stats.remote(), timeout=30))["submitted"] > 0 and s, 60, "Karn"
                )
                assert stats["healthy"], stats
    finally:
        stop_pipeline(p, kill=True)


def _gone(name: str, namespace: str) -> bool:
    import ray

    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return True
    try:
        ray.get(handle.__ray_call__.remote(lambda self: None), timeout=2)
    except Exception:
        return True
    return False
