"""Kasmina: seed slots, the seed lifecycle, alpha schedules and gradient isolation."""

from esper_ray.kasmina.gate import GateShapeError, gate_logits, gated_blueprint, is_gated, set_gate
from esper_ray.kasmina.lifecycle import AlphaSchedule, LifecycleConfig
from esper_ray.kasmina.slot import GateClosed, SeedSlot, Transition

__all__ = [
    "AlphaSchedule",
    "GateClosed",
    "GateShapeError",
    "LifecycleConfig",
    "SeedSlot",
    "Transition",
    "gate_logits",
    "gated_blueprint",
    "is_gated",
    "set_gate",
]
