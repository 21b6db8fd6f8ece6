"""Chaos: each service actor killed for good during a training run; the run completes and blueprints flow again.

A training run (its client polls Urza at every decision point) runs in a thread. Meanwhile Tezzeret,
Urza, Urabrask and Karn are each killed for good (``no_restart=True``) in turn, and started again by
``start_pipeline`` as the next job would (it finds the living actors and creates the dead one under
the same name). Every actor that calls the new one, and the trainer's client, must find it
(``actors.client.Peer`` looks the name up again after ``ActorDiedError``). For each kill: a new
blueprint *first proposed after the kill* is accepted into Urza within 60 s (so it went through
the replaced actor), every blueprint ready on disk before it is still ready after it, and the
trainer went on training through it. The run then completes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import small_pipeline_config

from esper_ray.util import read_parquet

pytestmark = pytest.mark.ray

EPOCHS = 300
# While the chaos lasts each epoch takes at least this much longer (a slower trainer), so that the
# run outlasts the four kills however fast this box trains; afterwards it runs at full speed.
PACE_S = 0.3


def _ready(p) -> int:
    import ray

    return ray.get(p.urza.stats.remote(), timeout=30)["ready"]


def _ready_since(p, since: float) -> int:
    """Ready blueprints first registered after ``since`` (wall clock): proposed after a kill, so they
    went through every actor alive then, the replaced one included."""
    import ray

    return sum(e.submitted_at > since for e in ray.get(p.urza.entries.remote("ready"), timeout=30))


def _ready_on_disk(storage: Path) -> set[str]:
    """Keys of the blueprints Urza's catalogue file records as ready."""
    table = read_parquet(storage / "catalogue.parquet", columns=["key", "status"]).to_pylist()
    return {row["key"] for row in table if row["status"] == "ready"}


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


class _GatedClient:
    """The pipeline's client as the trainer sees it, counting epochs. While the chaos lasts, epochs
    are paced (PACE_S) and the run's last epoch waits for it to end, so every kill lands while the
    run is training."""

    def __init__(self, client: Any, last_epoch: int):
        self._client = client
        self._last_epoch = last_epoch
        self.epochs = 0
        self.polls = 0
        self.chaos_done = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def poll(self) -> Any:
        self.polls += 1
        return self._client.poll()

    def record_accuracy(self, accuracy: float) -> None:
        self.epochs += 1  # the run calls this once per epoch
        if self.epochs >= self._last_epoch:
            self.chaos_done.wait(timeout=600)
        else:
            self.chaos_done.wait(timeout=PACE_S)
        self._client.record_accuracy(accuracy)


@pytest.mark.slow
def test_each_actor_killed_during_a_training_run(ray_session, tmp_path: Path, monkeypatch) -> None:
    import ray

    from actors.launch import start_pipeline, stop_pipeline
    from esper_ray.config import RunConfig
    from esper_ray.tolaria.run import run_training

    monkeypatch.setenv("ESPER_RAY_LINEAGE_KEY", str(tmp_path / "key.pem"))
    storage = tmp_path / "urza"
    cfg = small_pipeline_config(
        storage,
        "test-chaos",
        karn_interval_s=0.25,
        idle_after_s=0.0,  # never idle: blueprints must keep coming
    )
    # Actors an earlier module killed give their CPUs back a moment later; start once they are free.
    need = sum(r.num_cpus for r in (cfg.urza, cfg.karn, cfg.tezzeret, cfg.urabrask))
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0.0) < need and time.monotonic() < deadline:
        time.sleep(0.5)
    p = start_pipeline(cfg)
    run_cfg = RunConfig(
        name="chaos",
        training={"epochs": EPOCHS, "eval_test": False, "checkpoint_every_s": 5.0},
        task={"n_train": 200},
        blueprints={"source": "urza"},
        actors=cfg,
    )
    client = _GatedClient(p.client, EPOCHS)
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            outcome["result"] = run_training(run_cfg, out=tmp_path / "run", catalogue=client, progress=False)
        except BaseException as err:  # surfaced by the main thread
            outcome["error"] = err

    trainer = threading.Thread(target=train, name="chaos-train", daemon=True)
    timings: dict[str, float] = {}
    at_epoch: dict[str, int] = {}
    try:
        _wait(lambda: _ready(p) >= 3, 120, "the first blueprints")
        trainer.start()
        _wait(lambda: client.epochs >= 2, 120, "the run to train")
        for victim in ("tezzeret", "urza", "urabrask", "karn"):
            stored = _ready_on_disk(storage)
            epoch_at_kill, polls_at_kill = client.epochs, client.polls
            at_epoch[victim] = epoch_at_kill
            killed_at, killed_wall = time.monotonic(), time.time()
            ray.kill(p.handles()[victim], no_restart=True)
            _wait(lambda v=victim: _gone(v, cfg.namespace), 30, f"{victim} to die")
            p = start_pipeline(cfg)  # the next job: finds the living actors, creates the dead one
            _wait(lambda t=killed_wall, q=p: _ready_since(q, t) > 0, 60, f"a new blueprint after killing {victim}")
            timings[victim] = time.monotonic() - killed_at
            assert timings[victim] < 60, timings
            assert stored <= _ready_on_disk(storage), f"ready blueprints lost on disk after killing {victim}"
            live = {e.key for e in ray.get(p.urza.entries.remote("ready"), timeout=30)}
            assert stored <= live, f"ready blueprints lost in Urza after killing {victim}"
            assert "error" not in outcome, outcome
            # The run went on through the kill: it trained and asked the catalogue meanwhile.
            _wait(
                lambda e=epoch_at_kill: client.epochs > e,
                60,
                f"the run to train on after killing {victim} (epoch {client.epochs} of {EPOCHS}, {timings})",
            )
            assert client.polls > polls_at_kill
        stats = _wait(lambda q=p: (s := ray.get(q.karn.stats.remote(), timeout=30))["submitted"] > 0 and s, 60, "Karn")
        assert stats["healthy"], stats
    finally:
        client.chaos_done.set()
        if trainer.is_alive():
            trainer.join(timeout=600)
        stop_pipeline(p, kill=True)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.trainer.epoch == EPOCHS
    assert (result.run_dir / "checkpoint").is_dir()
    print(f"chaos: seconds from kill to a new ready blueprint {timings}; killed at epochs {at_epoch} of {EPOCHS}")


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
