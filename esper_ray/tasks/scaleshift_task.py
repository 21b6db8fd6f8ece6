"""Covariate scale and shift: labels from a pattern, hidden under per-example gains and offsets.

**What the task is.** A base vector ``z ~ N(0, I)`` of ``input_dim`` features is labelled by a
random one-hidden-layer teacher that reads only its *standardised* form
``u = (z - mean(z)) / std(z)`` (mean and std over the features of that one example). The host
sees ``x = g * (z + c)``: a per-example gain ``g = 10 ** U(-gain_decades / 2, gain_decades / 2)``
and a per-example offset ``c ~ N(0, shift ** 2)`` shared by all features. The label depends
only on the direction of the pattern, which the gain and the offset do not change.

**Which growth should help and why.** A ``norm`` seed at the ``input`` slot (a LayerNorm over
the features of each example) computes ``u`` exactly: ``LayerNorm(x) = u`` for every gain and
offset. Without it the host sees inputs whose size spans ``gain_decades`` orders of magnitude:
examples with a small gain all look alike (near zero, where the biases decide), large ones
drive the first layer far outside its range, and an offset adds a large common component. A
wider or deeper host (``residual_mlp``) does not remove the nuisance; a convolution has no
locality to use (the features are unordered). With ``gain_decades: 0`` and ``shift: 0`` the
nuisance is gone and the norm seed should stop helping.

**Sampled parameters** (``TaskConfig.params``, :class:`esper_ray.tasks.params.ScaleShiftParams`):
``input_dim``, ``num_classes``, ``n_samples``, ``gain_decades``, ``shift``, ``teacher_width``.
"""

from __future__ import annotations

import math

import torch

from esper_ray.tasks.base import TaskConfig, TaskData, balanced_argmax, synthetic_task
from esper_ray.tasks.params import ScaleShiftParams, parse_params

_N_CALIBRATION = 4000  # inputs that set the teacher's biases and class z-scores


def standardise(z: torch.Tensor) -> torch.Tensor:
    """Each row z-scored over its own features (what a LayerNorm without affine computes)."""
    return (z - z.mean(1, keepdim=True)) / z.std(1, unbiased=False, keepdim=True).clamp_min(1e-12)


def load_scaleshift(cfg: TaskConfig) -> TaskData:
    """A scale/shift task drawn from one generator seeded with ``cfg.seed`` (see the module doc)."""
    p = parse_params("scaleshift", cfg.params)
    assert isinstance(p, ScaleShiftParams)
    gen = torch.Generator().manual_seed(cfg.seed)
    f64 = torch.float64
    d, k, width = p.input_dim, p.num_classes, p.teacher_width
    w1 = torch.randn(width, d, generator=gen, dtype=f64) * math.sqrt(2.0 / d)
    w2 = torch.randn(k, width, generator=gen, dtype=f64) * math.sqrt(2.0 / width)
    u_cal = standardise(torch.randn(_N_CALIBRATION, d, generator=gen, dtype=f64))
    b1 = -(u_cal @ w1.T).mean(0)  # kinks at each unit's mean: every unit on for about half the inputs

    def scores(u: torch.Tensor) -> torch.Tensor:
        return torch.relu(u @ w1.T + b1) @ w2.T

    z = torch.randn(p.n_samples, d, generator=gen, dtype=f64)
    y = balanced_argmax(scores(standardise(z)), scores(u_cal))
    exponent = -torch.rand(p.n_samples, 1, generator=gen, dtype=f64) * p.gain_decades
    offset = p.shift * torch.randn(p.n_samples, 1, generator=gen, dtype=f64)
    x = 10.0**exponent * (z + offset)
    meta = {"family": "scaleshift", "num_classes": k, "input_dim": d, "params": p.model_dump()}
    return synthetic_task(cfg, f"scaleshift/g{p.gain_decades:g}/c{p.shift:g}", x, y, gen, meta)
