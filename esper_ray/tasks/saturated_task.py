"""Saturated tasks: well-separated Gaussian classes that any host already solves.

**What the task is.** ``num_classes`` class centres drawn at random in ``input_dim`` features
and scaled so that neighbouring centres are about ``separation`` noise standard deviations
apart; each example is its class centre plus ``N(0, I)`` noise. The classes are (almost)
linearly separable.

**Which growth should help and why.** None: the host reaches (almost) perfect accuracy alone,
so every seed only adds parameters and compute. A controller that grows here pays for nothing;
the right decision is to wait and never germinate. This is the family that tells a controller
that reads the run from one that always grows.

**Sampled parameters** (``TaskConfig.params``, :class:`esper_ray.tasks.params.SaturatedParams`):
``input_dim``, ``num_classes``, ``n_samples``, ``separation``.
"""

from __future__ import annotations

import torch

from esper_ray.tasks.base import TaskConfig, TaskData, synthetic_task
from esper_ray.tasks.params import SaturatedParams, parse_params


def load_saturated(cfg: TaskConfig) -> TaskData:
    """A saturated task drawn from one generator seeded with ``cfg.seed`` (see the module doc)."""
    p = parse_params("saturated", cfg.params)
    assert isinstance(p, SaturatedParams)
    gen = torch.Generator().manual_seed(cfg.seed)
    f64 = torch.float64
    d, k = p.input_dim, p.num_classes
    centres = torch.randn(k, d, generator=gen, dtype=f64)
    # Scale so the closest pair of centres is `separation` apart: every pair at least that.
    gaps = torch.cdist(centres, centres) + torch.eye(k, dtype=f64) * 1e9
    centres = centres * (p.separation / float(gaps.min()))
    y = torch.randint(0, k, (p.n_samples,), generator=gen)
    x = centres[y] + torch.randn(p.n_samples, d, generator=gen, dtype=f64)
    meta = {"family": "saturated", "num_classes": k, "input_dim": d, "params": p.model_dump()}
    return synthetic_task(cfg, f"saturated/sep{p.separation:g}", x, y, gen, meta)
