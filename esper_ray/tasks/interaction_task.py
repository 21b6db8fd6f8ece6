"""Low-rank feature interactions: labels from products of a few projections of the input.

**What the task is.** ``x ~ N(0, I)`` in ``input_dim`` features. ``rank`` pairs of random unit
directions ``(a_j, b_j)`` give products ``p_j = (a_j . x) (b_j . x)``; class scores are a random
mix ``M p`` of them (plus ``linear_share`` times a random linear score), z-scored per class so
the classes are balanced; the label is the argmax. The scores are quadratic in ``x`` and live
in a ``2 * rank``-dimensional subspace.

**Which growth should help and why.** A ReLU host builds products out of many piecewise-linear
units; a narrow host has too few to spare. A nonlinear vector seed adds exactly that:
``residual_mlp`` (a 64-wide ReLU layer with a skip) at the ``input`` slot, where the
projections are still available, can form the squares that make up each product; a
``lowrank`` seed (a linear rank-4 adapter) adds no nonlinearity and ``norm`` removes nothing
that is a nuisance here (the input is already standard), so both should help little. With
``linear_share`` near 1 the task becomes almost linear and saturates the host.

**Sampled parameters** (``TaskConfig.params``, :class:`esper_ray.tasks.params.InteractionParams`):
``input_dim``, ``num_classes``, ``n_samples``, ``rank``, ``linear_share``.
"""

from __future__ import annotations

import torch

from esper_ray.tasks.base import TaskConfig, TaskData, balanced_argmax, synthetic_task
from esper_ray.tasks.params import InteractionParams, parse_params

_N_CALIBRATION = 4000


def load_interaction(cfg: TaskConfig) -> TaskData:
    """An interaction task drawn from one generator seeded with ``cfg.seed`` (see the module doc)."""
    p = parse_params("interaction", cfg.params)
    assert isinstance(p, InteractionParams)
    gen = torch.Generator().manual_seed(cfg.seed)
    f64 = torch.float64
    d, k, r = p.input_dim, p.num_classes, p.rank
    a = torch.nn.functional.normalize(torch.randn(r, d, generator=gen, dtype=f64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(r, d, generator=gen, dtype=f64), dim=1)
    mix = torch.randn(k, r, generator=gen, dtype=f64)
    lin = torch.randn(k, d, generator=gen, dtype=f64) / d**0.5

    def scores(x: torch.Tensor) -> torch.Tensor:
        products = (x @ a.T) * (x @ b.T)
        return (1.0 - p.linear_share) * products @ mix.T + p.linear_share * x @ lin.T

    x_cal = torch.randn(_N_CALIBRATION, d, generator=gen, dtype=f64)
    x = torch.randn(p.n_samples, d, generator=gen, dtype=f64)
    y = balanced_argmax(scores(x), scores(x_cal))
    meta = {"family": "interaction", "num_classes": k, "input_dim": d, "params": p.model_dump()}
    return synthetic_task(cfg, f"interaction/r{r}", x, y, gen, meta)
