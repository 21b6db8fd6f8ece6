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
    representation bottleneck (the signal NORTH* grows on). NaN if a value is not finite.
    """
    width = rows.shape[1]
    if width == 1 or rows.shape[0] < 2:
        return 1.0
    if not all_finite(rows):  # unknown (the observation encoder reads NaN as 0); eigvalsh would raise
        return math.nan
    rows = rows.double()
    centered = rows - rows.mean(0, keepdim=True)
    # Singular values from the (width x width) Gram matrix: cheaper than an SVD of the rows.
    # (In float64: a float32 Gram puts ~1e-7 * the largest eigenvalue of noise on every null
    # direction, which lifts the rank of a collapsed layer by a few tenths of a percent.)
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
    dead = (rows.amax(0) <= 0).float().mean()  # == (rows <= 0).all(0), NaN included, 8x cheaper
    return {
        "act_mean": float(rows.mean()),
        "act_std": float(rows.std()) if rows.numel() > 1 else 0.0,
        "act_dead_frac": float(dead),
        "act_effective_rank": effective_rank(rows),
    }


def grad_norms(groups: list[list[nn.Parameter]]) -> list[float]:
    """L2 norm of the gradients each group of parameters holds (0.0 for none).

    One fused norm over every gradient and one read back, instead of a norm, a stack and a
    read per group, at the end of every epoch (the saving: BENCHMARKS.md, "Measurements behind the code").
    """
    grads, sizes = [], []
    for params in groups:
        own = [p.grad for p in params if p.grad is not None]
        grads += own
        sizes.append(len(own))
    # torch has no public per-tensor fused norm (torch.nn.utils.get_total_norm calls this one too).
    squares = torch.stack(torch._foreach_norm(grads)).double().square_().tolist() if grads else []  # noqa: SLF001
    norms, start = [], 0
    for size in sizes:
        norms.append(math.sqrt(math.fsum(squares[start : start + size])))
        start += size
    return norms


SIGNAL_ROWS = 256
"""Rows (examples x positions) the kernel signals use: 256 evenly spaced rows of the 512-example
probe give the same slot choices as all 512 on the bottleneck tasks at a fraction of the cost per
kernel fit; a Nystrom or random-Fourier approximation was no faster at equal fidelity, and fewer
rows cost fidelity (``bottleneck_study.py --signal-only``). The trials and timings are in
BENCHMARKS.md, "Measurements behind the code"."""


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

    On the bottleneck tasks with a damaged frozen host (``esper_ray.tasks.bottleneck_task``) its
    argmax finds the ground-truth slot far more often than the earlier signals (held-out R^2 of
    raw gradients on random ReLU features, which label-driven per-example gradients swamp; a
    cross-fitted linear-feature share; the old consumer grad norm + activation collapse): the
    counts are in BENCHMARKS.md, "Measurements behind the code". The systematic part is small,
    so compare slots with each other rather than against a fixed threshold. Cost: one Cholesky of an ``n x n``
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
    last slot" picked the ground-truth slot on every task measured, clear of 0, and did better
    than argmax ``gradient_predictability`` alone, which misses on the input slot (the counts:
    BENCHMARKS.md, "Measurements behind the code"). Needs both slots' rows to be the same examples
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
    ``SlotProbe`` computes the same numbers and keeps the factorisations of slots whose
    activations did not change.
    """
    return SlotProbe(max_rows).signals(acts, grads)


class SlotProbe:
    """The probe signals of every slot, measured again and again over a run.

    ``measure(acts, grads)`` gives, per slot, ``grad_predictability``, the downstream
    ``grad_deficit`` (``slot_signals``) and the ``activation_stats``. A slot's kernel
    factorisation and activation statistics depend only on its input activation on the probe
    batch, so they are kept and reused, bit for bit, while that activation stays exactly the
    same: the input slot's always (the probe inputs never change), and every slot of a frozen
    host upstream of its first seed (the bottleneck tasks). On the default MNIST-1D env that
    saves one of three fits per refresh; on a frozen host, all of them until a seed blends in.
    """

    def __init__(self, max_rows: int = SIGNAL_ROWS):
        self.max_rows = max_rows
        # slot -> (the activation it was measured on, its fit, its activation statistics)
        self._kept: dict[str, tuple[torch.Tensor, KernelFit, dict[str, float] | None]] = {}

    def measure(self, acts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        """Per slot: ``grad_predictability``, ``grad_deficit`` and ``activation_stats``."""
        signals = self.signals(acts, grads, with_stats=True)
        return {
            name: {"grad_predictability": own, "grad_deficit": deficit, **(self._kept[name][2] or {})}
            for name, (own, deficit) in signals.items()
        }

    def signals(
        self, acts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], with_stats: bool = False
    ) -> dict[str, tuple[float, float]]:
        """``slot_signals`` with the kept factorisations."""
        names = list(acts)
        fits = {n: self._fit(n, acts[n].detach(), with_stats) for n in names}
        g = {n: _spread_rows(grads[n], self.max_rows) for n in names}
        nxt = dict(zip(names, names[1:], strict=False))  # each slot's downstream neighbour
        own, across = {}, {}  # share(g_j | h_j); share(g_j+1 | h_j), from the same fit
        for name in names:
            if name in nxt and fits[name].n == g[nxt[name]].shape[0]:
                own[name], across[name] = fits[name].loo_shares([g[name], g[nxt[name]]])
            else:
                (own[name],) = fits[name].loo_shares([g[name]])
        return {n: (own[n], across[n] - own[nxt[n]] if n in across else 0.0) for n in names}

    def _fit(self, name: str, act: torch.Tensor, with_stats: bool) -> KernelFit:
        kept = self._kept.get(name)
        if kept is not None and kept[0].shape == act.shape and torch.equal(kept[0], act):
            fit, stats = kept[1], kept[2]
        else:
            fit, stats = KernelFit(_spread_rows(act, self.max_rows)), None
        if with_stats and stats is None:
            stats = activation_stats(act)
        self._kept[name] = (act, fit, stats)
        return fit


class KernelFit:
    """Gaussian kernel ridge regression on standardised rows ``h``, factorised once, scoring
    any target's leave-one-out share (``loo_share``); see ``gradient_predictability``."""

    def __init__(self, h: torch.Tensor, ridge: float = 0.3, bandwidth: float = 1.0):
        h = h.float().cpu()
        self.n, width = h.shape
        self.c: torch.Tensor | None = None
        if self.n < 8 or not all_finite(h):
            return
        h = h - h.mean(0)  # then the unbiased std by its definition: 4x cheaper than torch.std_mean(h, 0)
        h = h / (h.square().sum(0) / max(self.n - 1, 1)).sqrt_().clamp_min_(1e-6)
        sq = h.square().sum(1)
        # exp(-|h_i - h_j|^2 / (2 b^2 w)), built in place: |h_i|^2 + |h_j|^2 - 2 <h_i, h_j>
        k = torch.addmm(sq[:, None] + sq[None, :], h, h.T, alpha=-2.0)
        k.clamp_(min=0.0).mul_(-1.0 / (2.0 * bandwidth**2 * width)).exp_()
        k.diagonal().add_(ridge)
        chol, info = torch.linalg.cholesky_ex(k)
        if int(info) == 0:
            self.c = torch.cholesky_inverse(chol)
            self.c_diag = self.c.diagonal()[:, None]

    def loo_share(self, g: torch.Tensor) -> float:
        """Leave-one-out share of unit-normalised, centred ``g`` rows predicted, in [0, 1]."""
        return self.loo_shares([g])[0]

    def loo_shares(self, targets: list[torch.Tensor]) -> list[float]:
        """``loo_share`` of each target, with one product ``C @ [g_1 | g_2 | ...]`` for all."""
        prepared = [self._prepare(g) for g in targets]
        ready = [p[0] for p in prepared if p is not None]
        if not ready or self.c is None:  # (_prepare gave None for all when there is no factor)
            return [0.0] * len(targets)
        stacked = torch.cat(ready, 1) if len(ready) > 1 else ready[0]
        loo = stacked - (self.c @ stacked) / self.c_diag
        shares, col = [], 0
        for p in prepared:
            if p is None:
                shares.append(0.0)
                continue
            g, total = p
            width = g.shape[1]
            share = float((g * loo[:, col : col + width]).sum()) / total
            shares.append(min(max(share, 0.0), 1.0))
            col += width
        return shares

    def _prepare(self, g: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """Rows scaled to unit norm, then centred, and their sum of squares; None where there is
        nothing to score (all-zero rows stay zero, so they end here too)."""
        g = g.detach().float().cpu()
        if self.c is None or g.shape[0] != self.n or not all_finite(g):
            return None
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = g - g.mean(0)
        total = float(g.square().sum())
        return None if total <= 0.0 else (g, total)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of a float32 (or narrower) tensor is finite, from one float64 sum:
    NaN and inf propagate into it, and no float32 values can overflow it. Several times cheaper
    than ``torch.isfinite(t).all()`` (which builds three temporaries; BENCHMARKS.md, "Measurements
    behind the code"), and called seven times per probe refresh."""
    return math.isfinite(float(t.sum(dtype=torch.float64)))


def _spread_rows(t: torch.Tensor, max_rows: int) -> torch.Tensor:
    """``as_rows`` without truncation, then at most ``max_rows`` evenly spaced rows (so conv
    slots sample many examples, not the first few examples' positions)."""
    rows = as_rows(t, max_rows=t.numel())
    if rows.shape[0] > max_rows:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, max_rows).long()]
    return rows
