"""The governor: notices a non-finite or exploding loss so the trainer can roll back."""

from __future__ import annotations

import math

from esper_ray.config import GovernorConfig


class Governor:
    """Judges each step's loss against a running mean of the healthy ones."""

    def __init__(self, cfg: GovernorConfig):
        self.cfg = cfg
        self.mean = 0.0
        self.count = 0
        self.trips = 0

    def check(self, loss: float) -> str:
        """'' if ``loss`` is healthy, else why not. Healthy losses update the running mean."""
        if not self.cfg.enabled:
            return ""
        if not math.isfinite(loss):
            self.trips += 1
            return f"non-finite loss {loss}"
        if self.count >= self.cfg.warmup_steps and loss > self.cfg.explosion_factor * self.mean:
            self.trips += 1
            return f"loss explosion: {loss:.4g} > {self.cfg.explosion_factor:g} x running mean {self.mean:.4g}"
        self.count += 1
        # Slow EMA after a short plain average, so early steps set a sane scale.
        beta = min(0.98, 1.0 - 1.0 / self.count)
        self.mean = beta * self.mean + (1.0 - beta) * loss
        return ""

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count, "trips": self.trips}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count, self.trips = float(state["mean"]), int(state["count"]), int(state["trips"])
