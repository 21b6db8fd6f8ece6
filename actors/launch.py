"""Start (or join) Ray and the blueprint pipeline, with every actor's resources from the config.

``start_pipeline(cfg)`` is idempotent: the actors are named and detached in
``cfg.namespace`` and created with ``get_if_exists=True``, so a second job finds the
running ones instead of starting new ones. Before creating anything it checks that the
cluster can hold what the config asks for, because Ray leaves an actor that asks for
more than exists pending forever, silently.

``wait_until_ready`` and ``wait_until_idle`` block; they are for startup, the CLI and
tests, never for a training loop (which polls ``pipeline.client`` and never waits).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray

from actors.client import KARN, TEZZERET, URABRASK, URZA, Peer, UrzaCatalogue
from actors.tezzeret import DEFAULT_MAX_PARAMS, Tezzeret
from actors.urabrask import Urabrask
from actors.urza import Urza
from esper_ray.blueprints import CatalogueEntry
from esper_ray.cluster import ensure_ray  # noqa: F401  (re-exported: launch.ensure_ray)
from esper_ray.config import ActorResources, ActorsConfig
from esper_ray.contracts import EsperError

log = logging.getLogger("esper_ray.actors.launch")


@dataclass
class Pipeline:
    """Handles of the running actors and the trainer's client."""

    cfg: ActorsConfig
    urza: Any
    tezzeret: Any
    urabrask: Any
    karn: Any | None
    client: UrzaCatalogue

    def handles(self) -> dict[str, Any]:
        """The actors that run, by name."""
        named = {URZA: self.urza, KARN: self.karn, TEZZERET: self.tezzeret, URABRASK: self.urabrask}
        return {name: h for name, h in named.items() if h is not None}


def check_resources(requests: dict[str, ActorResources]) -> None:
    """EsperError naming the actor when the cluster cannot hold what the config asks for.

    Each request must fit the cluster's total, and all of them together what is free now:
    an actor asking for more stays pending forever without a word from Ray.
    """
    total, free = ray.cluster_resources(), ray.available_resources()
    for resource, attr in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        for name, res in requests.items():
            want = getattr(res, attr)
            if want > total.get(resource, 0.0):
                raise EsperError(
                    f"actors.{name}.{attr}={want:g} but the Ray cluster has {total.get(resource, 0.0):g} "
                    f"{resource}s in all (an oversubscribed actor would hang)"
                )
        want = sum(getattr(res, attr) for res in requests.values())
        if want > free.get(resource, 0.0) + 1e-9:
            raise EsperError(
                f"the actors ({', '.join(requests)}) ask for {want:g} {resource}s together but only "
                f"{free.get(resource, 0.0):g} are free (of {total.get(resource, 0.0):g})"
            )


# ---- the pipeline ----------------------------------------------------------------------------------
def _existing(name: str, namespace: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def _karn_class() -> Any:
    try:
        from actors.karn import Karn
    except ImportError as err:
        raise EsperError(f"Karn is not available ({err}); start the pipeline with with_karn=False") from None
    return Karn


def _actor_class(cls: Any) -> Any:
    """``cls`` as what it is at run time: Ray's actor class (the stubs do not know the actor options
    it was declared with, such as ``max_concurrency``, so type checkers see the plain class)."""
    return cls


def _options(cfg: ActorsConfig, name: str) -> dict[str, Any]:
    res: ActorResources = getattr(cfg, name)
    return {
        "name": name,
        "namespace": cfg.namespace,
        "lifetime": "detached",  # outlives this job: the next job finds it by name
        "get_if_exists": True,
        "max_restarts": cfg.max_restarts,
        "max_task_retries": -1,  # calls in flight when it died are retried on the restarted actor
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
    }


def start_pipeline(
    cfg: ActorsConfig,
    with_karn: bool = True,
    *,
    seed: int = 0,
    max_seed_params: int = DEFAULT_MAX_PARAMS,
    slow_compile_s: float = 0.0,
    seed_standard: bool = True,
) -> Pipeline:
    """Start the actors (or find the running ones) in ``cfg.namespace``; Ray must be up.

    ``seed_standard``: an empty library sends the standard blueprints through the pipeline.
    ``slow_compile_s``: Tezzeret sleeps that long per compile (tests and benchmarks).
    Arguments only apply to actors created here; found actors keep theirs.
    """
    if not ray.is_initialized():
        raise EsperError("Ray is not running: call ensure_ray() first")
    cfg = cfg.model_copy(update={"storage": os.path.expanduser(cfg.storage)})
    names = [URZA, URABRASK, TEZZERET] + ([KARN] if with_karn else [])
    karn_cls = _karn_class() if with_karn else None
    missing = {n: getattr(cfg, n) for n in names if _existing(n, cfg.namespace) is None}
    check_resources(missing)
    created: list[tuple[str, Any]] = []
    try:
        urza = (
            _actor_class(Urza)
            .options(**_options(cfg, URZA))
            .remote(cfg.storage, seed_standard, cfg.urza_templates_in_memory)
        )
        created.append((URZA, urza))
        urabrask = _actor_class(Urabrask).options(**_options(cfg, URABRASK)).remote()
        created.append((URABRASK, urabrask))
        tezzeret = (
            _actor_class(Tezzeret)
            .options(**_options(cfg, TEZZERET))
            .remote(cfg, urza, urabrask, max_params=max_seed_params, slow_compile_s=slow_compile_s)
        )
        created.append((TEZZERET, tezzeret))
        karn = None
        if karn_cls is not None:
            # Peers, not bare handles: a Urza or Tezzeret killed and started again by a later job is
            # a new actor under the same name, and Karn looks it up again after ActorDiedError.
            karn = karn_cls.options(**_options(cfg, KARN)).remote(
                cfg, Peer(URZA, cfg.namespace, urza), Peer(TEZZERET, cfg.namespace, tezzeret), seed
            )
            karn.start.remote()  # non-blocking; Karn's loop runs in the actor
    except Exception:
        # Detached actors outlive this job: do not leave a half-started pipeline holding resources.
        for name, handle in created:
            if name in missing:  # created by this call, not found running
                ray.kill(handle, no_restart=True)
        raise
    client = UrzaCatalogue(urza, namespace=cfg.namespace, karn=karn)
    log.info("pipeline up in namespace %s (%s)", cfg.namespace, ", ".join(names))
    return Pipeline(cfg, urza, tezzeret, urabrask, karn, client)


def wait_until_ready(pipeline: Pipeline, n: int, timeout: float = 60.0) -> list[CatalogueEntry]:
    """Block until the catalogue holds at least ``n`` ready blueprints (startup, CLI, tests)."""
    deadline = time.monotonic() + timeout
    while True:
        _, rows = ray.get(pipeline.urza.catalogue.remote(), timeout=max(1.0, deadline - time.monotonic()))
        if len(rows) >= n:
            return pipeline.client.sync(timeout=max(1.0, deadline - time.monotonic()))
        if time.monotonic() > deadline:
            stats = ray.get(pipeline.urza.stats.remote(), timeout=10)
            raise EsperError(f"only {len(rows)} of {n} blueprints ready after {timeout:g} s ({stats})")
        time.sleep(0.2)


def wait_until_idle(pipeline: Pipeline, timeout: float = 60.0) -> dict[str, Any]:
    """Block until nothing is pending in Urza or queued in Tezzeret; returns Urza's stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = ray.get(pipeline.urza.stats.remote(), timeout=30)
        queued = ray.get(pipeline.tezzeret.queue_len.remote(), timeout=30)
        if stats["pending"] + stats["compiled"] == 0 and queued == 0:
            return stats
        if time.monotonic() > deadline:
            raise EsperError(f"pipeline still busy after {timeout:g} s ({stats}, {queued} queued)")
        time.sleep(0.2)


def stop_pipeline(pipeline: Pipeline, *, kill: bool = False) -> None:
    """Stop Karn's and Tezzeret's loops; with ``kill`` also end every actor for good.

    Without ``kill`` the detached actors stay up for the next job (the pending work is
    safe in Urza either way).
    """
    if kill:
        for handle in pipeline.handles().values():
            try:
                ray.kill(handle, no_restart=True)
            except Exception as err:  # already gone
                log.info("kill: %s", err)
        return
    for handle in (pipeline.karn, pipeline.tezzeret):
        if handle is not None:
            try:
                handle.stop.remote()
            except Exception as err:
                log.info("stop: %s", err)
