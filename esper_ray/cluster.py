"""Ray itself: join a cluster or start an embedded local one, failing fast with one line.

Used by the CLI, Simic and the actors' launcher, so every command joins Ray the same way;
``require_free`` checks that work fits what the cluster has free before it is submitted.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from esper_ray.contracts import EsperError
from esper_ray.util import error_line

CONNECT_TIMEOUT_S = 5.0


def _probe(address: str, timeout: float) -> None:
    """Fail fast when nothing listens at ``address`` (ray.init itself can wait for minutes)."""
    if address in ("auto", "local"):
        return
    url = urlparse(address if "://" in address else f"ray://{address}")
    if url.hostname is None or url.port is None:
        raise EsperError(f"Ray address {address!r} is not host:port (or ray://host:port, or auto)")
    try:
        socket.create_connection((url.hostname, url.port), timeout=timeout).close()
    except OSError as err:
        raise EsperError(f"no Ray cluster answers at {address}: {err.strerror or err}") from None


def ensure_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool = False,
    log_to_driver: bool = False,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``) if given, else start an embedded local Ray.

    A local Ray gets ``num_cpus`` (default: this machine's cores). Nothing happens when
    Ray is already up in this process. EsperError (one line) if the address does not answer.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _probe(address, connect_timeout_s)
        try:
            ray.init(address=address, log_to_driver=log_to_driver)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise EsperError(f"could not join Ray at {address}: {error_line(err)}") from None
        return
    ray.init(
        num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
        num_gpus=num_gpus,
        include_dashboard=include_dashboard,
        log_to_driver=log_to_driver,
    )


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU") and v) or "nothing"


def require_free(need: Mapping[str, float], what: str, hint: str = "") -> None:
    """EsperError (one line, with the numbers) unless the cluster has ``need`` free *now*.

    Checked after whatever already holds resources (the detached service actors Urza, Karn,
    Tezzeret and Urabrask hold theirs for as long as they live): Ray would otherwise leave the
    work PENDING forever without a word.
    """
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    short = [k for k in ("CPU", "GPU") if need.get(k, 0.0) > free.get(k, 0.0) + 1e-9]
    if not short:
        return
    held = {k: total.get(k, 0.0) - free.get(k, 0.0) for k in short}
    raise EsperError(
        f"{what} needs {_fmt(need)} but the Ray cluster has {_fmt({k: free.get(k, 0.0) for k in short}) or '0 CPU'} "
        f"free of {_fmt({k: total.get(k, 0.0) for k in short})} ({_fmt(held)} held by running actors and jobs, "
        f"e.g. the esper-ray service actors)" + (f"; {hint}" if hint else "")
    )


# The least CPU fitting gives one process (an env runner, a trial's driver): below it a
# reservation means nothing, and fitting fails in one line instead.
MIN_CPU_PER_PROCESS = 0.1


def free_cpus() -> float:
    """CPUs the Ray cluster has free now (after whatever holds some, e.g. the service actors)."""
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def wait_for_cpus(cpus: float, timeout_s: float = 30.0, poll_s: float = 0.2) -> bool:
    """Wait (at most ``timeout_s``) until the cluster has ``cpus`` CPUs free; whether it has.

    Ray hands a killed actor's resources back a moment after the kill returns: a run that just
    stopped its actors (simic's env runners) waits here, so the next run's ``require_free`` sees them.
    """
    import time

    deadline = time.monotonic() + timeout_s
    while free_cpus() < cpus - 1e-9:
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def fit_cpus(per_process: float, processes: int, free: float, what: str, hint: str = "") -> float:
    """The CPUs each of ``processes`` may ask for so that together they fit ``free``.

    ``per_process`` when they fit as asked; else scaled down (to 1e-4, Ray's resource precision,
    rounding down). EsperError (one line, with the numbers) when that is under MIN_CPU_PER_PROCESS.
    Ray does not cap a process at its request: a scaled process runs on less of a reservation.
    """
    if processes <= 0 or per_process * processes <= free + 1e-9:
        return per_process
    scaled = math.floor(free / processes * 1e4) / 1e4
    if scaled < MIN_CPU_PER_PROCESS:
        raise EsperError(
            f"{what} ({processes} x {per_process:g} CPU) cannot fit the {free:g} CPU free even scaled down "
            f"(fit_to_cluster): each needs at least {MIN_CPU_PER_PROCESS:g} CPU" + (f"; {hint}" if hint else "")
        )
    return scaled


def rllib_trial_resources(algo_config: Any) -> dict[str, float]:
    """What one RLlib trial (driver, env runners, learners) asks Ray for, summed over its bundles."""
    import logging

    from ray.rllib.algorithms.ppo import PPO
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    quiet = logging.getLogger("ray.rllib")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # validate() warns about the new API stack on every call
    try:
        config = algo_config if isinstance(algo_config, dict) else algo_config.to_dict()
        request = PPO.default_resource_request(config)
        if not isinstance(request, PlacementGroupFactory):  # tune.Resources: deprecated, never built now
            raise EsperError(f"RLlib asked for resources as {type(request).__name__}, not a placement group")
        return dict(request.required_resources)
    finally:
        quiet.setLevel(level)


JOB_HOME_ENV = "ESPER_RAY_HOME"
DEFAULT_JOB_HOME = "~/esper-ray"


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a ``ray job submit`` (Ray sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def persistent_path(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute in a place that outlives this process.

    As a Ray job the working directory is a temporary copy Ray deletes later, so a relative
    path resolves under ``$ESPER_RAY_HOME`` (default ``~/esper-ray``) instead; otherwise under
    the current directory. ``~`` expands either way.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    if in_ray_job():
        return Path(os.environ.get(JOB_HOME_ENV) or DEFAULT_JOB_HOME).expanduser().absolute() / path
    return path.absolute()
