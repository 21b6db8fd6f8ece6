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
    centered = rows.double() - rows.double().mean(0, keepdim=True)
    # Singular values from the (width x width) Gram matrix: 3x cheaper than an SVD of the rows.
    s = torch.linalg.eigvalsh(centered.T @ centered).clamp_min(0.0).sqrt()
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


SIGNAL_ROWS = 256
"""Rows (examples x positions) the kernel signals use. Measured on 78 bottleneck tasks (seeds 0-19
and 100-105 x 3 slots, damaged frozen host): 256 evenly spaced rows of the 512-example probe
give the same choices as all 512 (argmax 76/78, deficit rule 78/78) at a quarter of the cost
(~1.4 ms instead of ~6 ms per kernel fit, one CPU thread); a 128-landmark Nystrom or 128-256
random Fourier features were no faster at equal fidelity."""


def gradient_predictability(
    acts: torch.Tensor,
    grads: torch.Tensor,
    ridge: float = 0.3,
    bandwidth: float = 1.0,
    max_rows: int = SIGNAL_ROWS,
) -> float:
    """How much of the loss gradient at a slot a smooth nonlinear function of the slot's input
    predicts on examples it was not fitted on: the first-order loss reduction a small seed
    ``f(h)`` placed here could get, per unit of gradient. In [0, 1]; higher = better place.

    A seed at the slot adds ``f(h)``; to first order it lowers the loss by ``-<g, f(h)>``.
    The best such ``f`` is the regression of the gradient ``g`` on ``h``; what matters is how
    much of it carries over to examples it was not fitted on. Computed as:

    1. rows = examples (and positions, for conv slots; at most ``max_rows``, evenly spaced);
       ``h`` standardised per channel; each row's ``g`` scaled to unit norm (so confidently
       right and badly wrong examples count alike), then centred;
    2. kernel ridge regression of ``g`` on ``h`` with a Gaussian kernel
       ``exp(-|h_i - h_j|^2 / (2 bandwidth^2 width))`` (a smooth function class, the
       infinite-width limit of a random-feature MLP), ridge ``ridge``;
    3. leave-one-out predictions ``ĝ_-i`` in closed form (``g_i - a_i / C_ii`` with
       ``a = C g``, ``C = (K + ridge I)^-1``): every example is scored by a fit that never saw it;
    4. score ``sum_i <g_i, ĝ_-i> / sum_i |g_i|^2``, clipped to [0, 1].

    Measured on the bottleneck tasks with a damaged frozen host (``esper_ray.tasks.bottleneck_task``,
    seeds 0-9 x 3 ground-truth slots, probe of 960 examples), share of tasks whose argmax is the
    ground-truth slot: this 30/30 (107/108 over seeds 0-29 and 100-105; the miss is an input-slot
    task); the previous version (held-out R^2 of raw gradients on 32 random ReLU features) 14/30,
    reading exactly 0 on 70 of 90 slots, because label-driven per-example gradients dominate
    raw R^2; a cross-fitted linear-feature share 24/30; the heuristic's old consumer grad norm
    + activation collapse 5/15. The systematic part is small (values ~0.05-0.3), so compare slots
    with each other rather than against a fixed threshold. Cost: one Cholesky of an ``n x n``
    float32 matrix (see ``SIGNAL_ROWS``).
    """
    return KernelFit(_spread_rows(acts.detach(), max_rows), ridge, bandwidth).loo_share(_spread_rows(grads, max_rows))


def gradient_information_deficit(
    prev_acts: torch.Tensor,
    acts: torch.Tensor,
    grads: torch.Tensor,
    ridge: float = 0.3,
    bandwidth: float = 1.0,
    max_rows: int = SIGNAL_ROWS,
) -> float:
    """How much better the loss gradient at a slot is predicted from the *previous* slot's
    input than from its own: ``share(g_j | h_{j-1}) - share(g_j | h_j)`` with the
    leave-one-out kernel share of ``gradient_predictability``. In [-1, 1].

    Positive: the layer between the two slots threw away information the loss still needs,
    so a seed here cannot recover it and the missing capacity sits at or before the previous
    slot. Negative: the slot's own input explains its gradient better (a smooth function of
    it is simpler than one of the layer before). On the bottleneck tasks (damaged frozen host)
    the rule "germinate at the first slot whose *next* slot has a positive deficit, else at the
    last slot" picked the ground-truth slot on 108/108 tasks (seeds 0-29 and 100-105, 3 slots
    each), with every deficit at least 0.005 away from 0; argmax ``gradient_predictability``
    alone: 107/108, misses on the input slot. Needs both slots' rows to be the same examples
    (vector slots); returns 0.0 otherwise.
    """
    g = _spread_rows(grads, max_rows)
    before = KernelFit(_spread_rows(prev_acts.detach(), max_rows), ridge, bandwidth)
    if before.n != g.shape[0]:
        return 0.0
    return before.loo_share(g) - KernelFit(_spread_rows(acts.detach(), max_rows), ridge, bandwidth).loo_share(g)


def slot_signals(
    acts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], max_rows: int = SIGNAL_ROWS
) -> dict[str, tuple[float, float]]:
    """Per slot (in the host's order): ``(gradient_predictability, downstream deficit)``.

    The downstream deficit of slot ``j`` is ``gradient_information_deficit`` measured at the
    next slot: ``share(g_{j+1} | h_j) - share(g_{j+1} | h_{j+1})``; positive means the layer
    between ``j`` and ``j+1`` loses information the loss needs, so growth belongs at ``j``
    (0.0 for the last slot and where rows do not line up). One kernel factorisation per slot
    serves both its own share and its upstream neighbour's deficit: three fits for three slots.
    """
    names = list(acts)
    fits = {n: KernelFit(_spread_rows(acts[n].detach(), max_rows)) for n in names}
    g = {n: _spread_rows(grads[n], max_rows) for n in names}
    own = {n: fits[n].loo_share(g[n]) for n in names}
    out = {}
    for j, name in enumerate(names):
        deficit = 0.0
        if j + 1 < len(names):
            nxt = names[j + 1]
            if fits[name].n == g[nxt].shape[0]:
                deficit = fits[name].loo_share(g[nxt]) - own[nxt]
        out[name] = (own[name], deficit)
    return out


class KernelFit:
    """Gaussian kernel ridge regression on standardised rows ``h``, factorised once, scoring
    any target's leave-one-out share (``loo_share``); see ``gradient_predictability``."""

    def __init__(self, h: torch.Tensor, ridge: float = 0.3, bandwidth: float = 1.0):
        h = h.float().cpu()
        self.n, width = h.shape
        self.c: torch.Tensor | None = None
        if self.n < 8 or not bool(torch.isfinite(h).all()):
            return
        h = (h - h.mean(0)) / h.std(0).clamp_min(1e-6)
        sq = h.square().sum(1)
        dist = (sq[:, None] + sq[None, :] - 2.0 * (h @ h.T)).clamp_min(0.0)
        k = torch.exp(-dist / (2.0 * bandwidth**2 * width))
        k.diagonal().add_(ridge)
        chol, info = torch.linalg.cholesky_ex(k)
        if int(info) == 0:
            self.c = torch.cholesky_inverse(chol)
            self.c_diag = self.c.diagonal()[:, None]

    def loo_share(self, g: torch.Tensor) -> float:
        """Leave-one-out share of unit-normalised, centred ``g`` rows predicted, in [0, 1]."""
        g = g.detach().float().cpu()
        if self.c is None or g.shape[0] != self.n:
            return 0.0
        norms = g.norm(dim=1, keepdim=True)
        if float(norms.max()) == 0.0 or not bool(torch.isfinite(g).all()):
            return 0.0
        g = g / norms.clamp_min(1e-12)
        g = g - g.mean(0)
        total = float(g.square().sum())
        if total <= 0.0:
            return 0.0
        loo = g - (self.c @ g) / self.c_diag
        return min(max(float((g * loo).sum()) / total, 0.0), 1.0)


def _spread_rows(t: torch.Tensor, max_rows: int) -> torch.Tensor:
    """``as_rows`` without truncation, then at most ``max_rows`` evenly spaced rows (so conv
    slots sample many examples, not the first few examples' positions)."""
    rows = as_rows(t, max_rows=t.numel())
    if rows.shape[0] > max_rows:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, max_rows).long()]
    return rows
