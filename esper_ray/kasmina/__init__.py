"""Kasmina: seed slots, the seed lifecycle, alpha schedules and gradient isolation."""

from esper_ray.kasmina.lifecycle import AlphaSchedule, LifecycleConfig
from esper_ray.kasmina.slot import GateClosed, SeedSlot, Transition

__all__ = ["AlphaSchedule", "GateClosed", "LifecycleConfig", "SeedSlot", "Transition"]
