"""Ray itself: join a cluster or start an embedded local one, failing fast with one line.

Used by the CLI, Simic and the actors' launcher, so every command joins Ray the same way.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from esper_ray.contracts import EsperError

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
    num_cpus: float | None = None,
    num_gpus: float | None = None,
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
            raise EsperError(f"could not join Ray at {address}: {str(err).splitlines()[0]}") from None
        return
    ray.init(
        num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
        num_gpus=num_gpus,
        include_dashboard=include_dashboard,
        log_to_driver=log_to_driver,
    )
