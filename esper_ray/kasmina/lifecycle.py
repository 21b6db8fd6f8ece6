"""Lifecycle configuration: alpha schedules and the gates between seed stages."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AlphaSchedule(BaseModel):
    """How alpha rises while a seed blends, as a function of blending steps ``t``.

    ``linear``: ``alpha = t / steps``. ``sigmoid``: ``alpha = sigmoid((t - t_mid) / temperature)``
    with ``t_mid`` defaulting to ``steps / 2`` and ``temperature`` to ``steps / 10``.
    Either way alpha is exactly 1 from ``t = steps`` on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["linear", "sigmoid"] = "sigmoid"
    steps: int = Field(160, ge=1, description="optimizer steps from the start of blending to alpha 1")
    t_mid: float | None = Field(None, description="sigmoid midpoint in steps (default steps/2)")
    temperature: float | None = Field(None, gt=0, description="sigmoid temperature in steps")

    @model_validator(mode="after")
    def _check_mid(self) -> AlphaSchedule:
        if self.t_mid is not None and not 0 <= self.t_mid <= self.steps:
            raise ValueError(f"t_mid must lie in [0, steps={self.steps}], got {self.t_mid}")
        return self

    def __call__(self, t: int) -> float:
        if t >= self.steps:
            return 1.0
        if t <= 0 and self.kind == "linear":
            return 0.0
        if self.kind == "linear":
            return t / self.steps
        t_mid = self.steps / 2 if self.t_mid is None else self.t_mid
        temperature = self.steps / 10 if self.temperature is None else self.temperature
        z = (t - t_mid) / temperature
        # Numerically stable logistic: exp of a large positive number would overflow.
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


class LifecycleConfig(BaseModel):
    """Gates between stages. Epoch counts are host epochs spent in the stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_training_epochs: int = Field(3, ge=0, description="isolated training before blending")
    max_seed_grad_norm: float = Field(
        1e3, gt=0, description="gradient health: a seed's grad norm must be finite, > 0 and below this"
    )
    min_holding_epochs: int = Field(1, ge=0, description="evaluation at full alpha before fossilizing")
    min_improvement: float = Field(
        0.0, description="ablation contribution (val accuracy, fraction) needed to fossilize"
    )
    embargo_epochs: int = Field(5, ge=0, description="a culled slot stays closed this long")
    alpha: AlphaSchedule = AlphaSchedule()
