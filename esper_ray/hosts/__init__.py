"""Host models with seed slots."""

from esper_ray.hosts.base import HostConfig, MorphoHost, slot_names
from esper_ray.hosts.builders import build_host

__all__ = ["HostConfig", "MorphoHost", "build_host", "slot_names"]
