"""Per-slot signals measured on a probe batch: what a controller uses to find bottlenecks."""

from __future__ import annotations

import math

import torch
from torch import nn


def as_rows(act: torch.Tensor, max_rows: int = 1024) -> torch.Tensor:
    """(B, C, *spatial) -> (rows, C): one row per example and position, channels last."""
    if act.dim() > 2:
        act = act.movedim(1, -1).reshape(-1, act.shape[1])
    return act[:max_rows]


def effective_rank(rows: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) / width, in (0, 1].

    Low values mean the layer's activations span few directions: a capacity or
    representation bottleneck (the signal NORTH* grows on).
    """
    width = rows.shape[1]
    if width == 1 or rows.shape[0] < 2:
        return 1.0
    centered = rows - rows.mean(0, keepdim=True)
    s = torch.linalg.svdvals(centered.float())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return float(math.exp(entropy) / width)


def activation_stats(act: torch.Tensor) -> dict[str, float]:
    """Mean, std, share of dead units and effective rank of one slot's activation."""
    rows = as_rows(act.detach(), max_rows=512)
    dead = (rows <= 0).all(dim=0).float().mean()
    return {
        "act_mean": float(rows.mean()),
        "act_std": float(rows.std()) if rows.numel() > 1 else 0.0,
        "act_dead_frac": float(dead),
        "act_effective_rank": effective_rank(rows),
    }


def grad_norm(module: nn.Module | None) -> float:
    """L2 norm of the gradients currently held by ``module``'s parameters (0 if none)."""
    if module is None:
        return 0.0
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def gradient_predictability(
    acts: torch.Tensor, grads: torch.Tensor, n_features: int = 32, ridge: float = 1e-2, seed: int = 0
) -> float:
    """Share of the loss gradient at a slot that a small nonlinear function of the slot's
    input can reproduce (R^2 of a ridge fit on random ReLU features), in [0, 1].

    A seed at the slot adds ``f(h)``; to first order it lowers the loss by ``-<g, f(h)>``,
    so a slot whose gradient ``g`` is well predicted by nonlinear features of ``h`` is one
    where a small seed can help (the idea behind GradMax and Firefly's growth scores).
    """
    h = as_rows(acts.detach(), max_rows=512).double().cpu()
    g = as_rows(grads.detach(), max_rows=512).double().cpu()
    n, width = h.shape
    if n < 8 or float(g.square().sum()) == 0.0:
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    h = (h - h.mean(0)) / h.std(0).clamp_min(1e-6)
    proj = torch.randn(width, n_features, generator=gen, dtype=torch.float64) / math.sqrt(width)
    feats = torch.relu(h @ proj + torch.randn(n_features, generator=gen, dtype=torch.float64))
    feats = torch.cat([feats, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    # Fit on one half, score on the other: in-sample R^2 with ~n/2 features would flatter.
    fit, test = slice(0, n // 2), slice(n // 2, n)
    gram = feats[fit].T @ feats[fit] + ridge * n * torch.eye(feats.shape[1], dtype=torch.float64)
    coef = torch.linalg.solve(gram, feats[fit].T @ g[fit])
    resid = g[test] - feats[test] @ coef
    total = (g[test] - g[fit].mean(0)).square().sum().clamp_min(1e-30)
    return float((1.0 - resid.square().sum() / total).clamp(0.0, 1.0))
