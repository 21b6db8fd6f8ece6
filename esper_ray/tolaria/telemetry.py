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
    s = torch.linalg.svdvals(centered.double())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return float(math.exp(entropy) / width)


def activation_stats(act: torch.Tensor) -> dict[str, float]:
    """Mean, std, share of dead units and effective rank of one slot's activation."""
    rows = as_rows(act.detach())
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
