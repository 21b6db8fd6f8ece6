"""Karn on Ray: proposes blueprint specs to Tezzeret every ``karn_interval_s`` seconds.

The actor is a thin shell around :class:`esper_ray.karn.KarnBreeder` (generator,
reward model, spec table). It runs its rounds in a background thread, so its methods
(``stats``, ``ingest_field_reports``, ``stop``) answer while a round is under way.

One round: unless Tezzeret's queue already holds ``MAX_BACKLOG_ROUNDS`` rounds' worth of specs
(backpressure) or no trainer asked for blueprints lately (idle), ask Urza for its best specs (the
parents) and its field reports, refit the reward model if new reports can be used, generate a
pool, and submit the chosen ``karn_batch`` specs to Tezzeret without waiting for the answers. Any failure of the
other actors (not up yet, restarting, raising) is recorded in ``stats()`` and the
round is retried at the next tick: the loop never dies, and nothing here waits on the
training side.

Started by the launcher as::

    Karn.options(name="karn", namespace=cfg.namespace, lifetime="detached", get_if_exists=True,
                 max_restarts=cfg.max_restarts, num_cpus=cfg.karn.num_cpus,
                 num_gpus=cfg.karn.num_gpus).remote(cfg, urza_handle, tezzeret_handle, seed)
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.metrics import Counter, Gauge

from actors import Peer
from esper_ray.config import ActorsConfig
from esper_ray.karn import KarnBreeder
from esper_ray.util import error_line


def _handle(target: Any) -> Any:
    """The actor handle behind a handle or a Peer."""
    return target.handle if isinstance(target, Peer) else target


# Backpressure, in rounds' worth of specs (x karn_batch): when Tezzeret's queue (specs waiting or
# being compiled) or Karn's unanswered submissions reach this, Karn skips the round (Tezzeret is
# behind; a longer queue would only hold stale proposals).
MAX_BACKLOG_ROUNDS = 4
# While idle (no demand), how often Karn looks for demand again: a wake-up takes at most this long.
IDLE_POLL_S = 2.0


@ray.remote(num_cpus=0.25)
class Karn:
    """The blueprint generator actor (see the module docstring)."""

    def __init__(self, cfg: ActorsConfig, urza: Any, tezzeret: Any, seed: int = 0):
        """``urza`` and ``tezzeret`` are actor handles or :class:`actors.Peer` (looked up again
        when the actor behind them was replaced)."""
        self.cfg = cfg
        self._urza = urza
        self._tezzeret = tezzeret
        self._breeder = KarnBreeder(seed)
        self._lock = threading.Lock()  # the breeder is shared by the loop and method calls
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[ray.ObjectRef] = []
        # An Urza call that hangs must not stall the loop for long.
        self._call_timeout_s = max(2.0 * cfg.karn_interval_s, 5.0)
        self._top_k = max(8, 2 * cfg.karn_batch)
        self._counts = {
            "rounds": 0,
            "submitted": 0,
            "accepted": 0,  # submissions Tezzeret answered without an error
            "submit_errors": 0,
            "errors": 0,  # failed calls to Urza and failed rounds
            "backlog_skips": 0,
            "idle_rounds": 0,  # rounds skipped because no trainer asked for blueprints lately
        }
        self._last_error = ""
        self._idle_now = False
        self._proposals_metric = Counter(
            "esper_karn_proposals", description="Valid blueprint specs Karn generated (before choosing)."
        )
        self._submitted_metric = Counter(
            "esper_karn_submitted", description="Blueprint specs Karn submitted to Tezzeret."
        )
        # 1 while Karn's last calls to Urza and Tezzeret got answers, 0 after a failed one (a dead
        # or replaced actor): the dashboard's signal that blueprints are not flowing.
        self._healthy = True
        self._health_metric = Gauge(
            "esper_pipeline_healthy", description="1: Karn's last calls to Urza and Tezzeret succeeded; 0: one failed."
        )
        self._health_metric.set(1)
        # After a crash Ray rebuilds the actor by calling __init__ again; nobody will call
        # start() a second time, so a reconstructed Karn resumes its loop by itself.
        self._reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        if self._reconstructed:
            self.start()

    # ---- control ------------------------------------------------------------------------------

    def start(self) -> bool:
        """Start the proposal loop (no-op if it runs); True when it is running."""
        if self._thread is not None and self._thread.is_alive():
            return True
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="karn-loop", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> bool:
        """Stop the loop after its current round; True when the thread has ended."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout=self._call_timeout_s * 2 + 5.0)
        return not self._thread.is_alive()

    def ingest_field_reports(self, reports: list[dict[str, Any]]) -> int:
        """Feed field reports directly (FieldReport fields as dicts); returns how many were new."""
        with self._lock:
            return self._breeder.ingest(reports)

    def stats(self) -> dict[str, Any]:
        """Counters of the loop, the generator and the reward model."""
        with self._lock:
            gen = self._breeder.generator.stats
            return {
                **self._counts,
                "running": self._thread is not None and self._thread.is_alive(),
                "reconstructed": self._reconstructed,  # restarted by Ray after a crash
                "proposals": gen.valid,
                "invalid": gen.invalid,
                "invalid_reasons": dict(gen.reasons),
                "valid_share": gen.valid_share,
                "reports": len(self._breeder.reports),
                "specs_known": len(self._breeder.specs),
                "model_trained_on": self._breeder.model.trained_on,
                "pending_submits": len(self._pending),
                "contract_failures": self._breeder.contract_failures,
                "last_error": self._last_error,
                "healthy": self._healthy,
            }

    def gpu_ids(self) -> list:
        """The GPUs Ray gave this actor (empty on the CPU default)."""
        return ray.get_gpu_ids()

    # ---- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._round()
            except Exception as err:  # a bug in one round must not end the loop
                self._record("round", err)
            # Rounds start every interval, whatever a round took (if it took less); idle, Karn only
            # checks for demand, and no more often than every IDLE_POLL_S.
            interval = self.cfg.karn_interval_s
            if self._idle_now:
                interval = max(interval, IDLE_POLL_S)
            self._stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def _set_health(self, healthy: bool) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            self._health_metric.set(1 if healthy else 0)

    def _round(self) -> None:
        self._counts["rounds"] += 1
        errors = self._counts["errors"] + self._counts["submit_errors"]
        self._run_round()
        if self._counts["errors"] + self._counts["submit_errors"] == errors:
            self._set_health(True)  # a whole round without a failed call

    def _run_round(self) -> None:
        self._collect_answers()
        self._idle_now = self._idle()
        if self._idle_now:
            self._counts["idle_rounds"] += 1
            return
        bound = MAX_BACKLOG_ROUNDS * self.cfg.karn_batch
        if len(self._pending) >= bound or self._tezzeret_queue() >= bound:
            self._counts["backlog_skips"] += 1
            return
        try:
            ref = _handle(self._urza).top_specs.remote(self._top_k)
            spec_jsons = ray.get(ref, timeout=self._call_timeout_s)
            with self._lock:
                self._breeder.set_parents(self._breeder.add_specs(spec_jsons))
        except Exception as err:  # Urza down or restarting: breed from the last parents
            self._record("urza.top_specs", err)
        try:
            reports = ray.get(_handle(self._urza).field_reports.remote(), timeout=self._call_timeout_s)
            with self._lock:
                self._breeder.ingest(reports)
        except Exception as err:
            self._record("urza.field_reports", err)
        with self._lock:
            self._breeder.retrain_if_needed()
            before = self._breeder.generator.stats.valid
            chosen = self._breeder.round(self.cfg.karn_batch)
            generated = self._breeder.generator.stats.valid - before
        if generated:
            self._proposals_metric.inc(generated)
        for spec in chosen:
            # Fire and forget: answers are collected at the next round, never waited for.
            try:
                self._pending.append(_handle(self._tezzeret).submit.remote(spec.to_json()))
            except Exception as err:  # no Tezzeret by that name right now
                self._record("tezzeret.submit", err)
                return
            self._counts["submitted"] += 1
            self._submitted_metric.inc()

    def _idle(self) -> bool:
        """No trainer asked Urza for blueprints for ``idle_after_s``: propose nothing (one small call)."""
        idle_after = self.cfg.idle_after_s
        if not idle_after:
            return False
        try:
            age = ray.get(_handle(self._urza).demand_age_s.remote(), timeout=self._call_timeout_s)
        except Exception as err:  # Urza down or restarting: keep working as before
            self._record("urza.demand_age_s", err)
            return False
        return age > idle_after

    def _tezzeret_queue(self) -> int:
        """Specs waiting in Tezzeret's queue or being compiled (0 when it does not answer: the
        submissions then fail and are counted, and the Peer is looked up again)."""
        try:
            return int(ray.get(_handle(self._tezzeret).queue_len.remote(), timeout=self._call_timeout_s))
        except Exception as err:
            self._record("tezzeret.queue_len", err)
            return 0

    def _collect_answers(self) -> None:
        """Count Tezzeret's answers that have arrived, without waiting for the others."""
        if not self._pending:
            return
        ready, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
                self._counts["accepted"] += 1
            except Exception as err:
                self._counts["submit_errors"] += 1
                self._record("tezzeret.submit", err, count=False)

    def _record(self, where: str, err: BaseException, *, count: bool = True) -> None:
        if where.startswith(("urza", "tezzeret")):
            self._set_health(False)
        if isinstance(err, RayActorError):
            # The actor behind a Peer may have been replaced: look it up again for next time.
            for peer in (self._urza, self._tezzeret):
                if isinstance(peer, Peer) and where.startswith(peer.name):
                    with contextlib.suppress(Exception):  # GCS busy: the next round tries again
                        peer.refresh()
        if count:
            self._counts["errors"] += 1
        # A remote exception arrives wrapped; its own message is what says what went wrong.
        cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
        self._last_error = f"{where}: {type(cause).__name__}: {error_line(str(cause))}"[:500]
