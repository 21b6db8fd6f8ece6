"""The probe signals' arithmetic: effective rank, the kernel leave-one-out share, and SlotProbe's
kept factorisations (identical numbers, fewer fits)."""

from __future__ import annotations

import math

import pytest
import torch

from esper_ray.tolaria.telemetry import (
    KernelFit,
    SlotProbe,
    activation_stats,
    all_finite,
    effective_rank,
    grad_norms,
    slot_signals,
)


def _reference_effective_rank(rows: torch.Tensor) -> float:
    s = torch.linalg.svdvals(rows.double() - rows.double().mean(0))
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()) / rows.shape[1])


@pytest.mark.parametrize("rank", [1, 3, 16, 64])
def test_effective_rank_matches_the_svd_definition(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    rows = torch.randn(512, rank, generator=gen) @ torch.randn(rank, 64, generator=gen)
    assert effective_rank(rows) == pytest.approx(_reference_effective_rank(rows), abs=1e-5)
    if rank == 1:
        assert effective_rank(rows) == pytest.approx(1 / 64, abs=1e-3)


def test_activation_stats_of_a_known_activation() -> None:
    act = torch.zeros(100, 4)
    act[:, 0] = torch.arange(100.0)  # units 1-3 never fire
    stats = activation_stats(act)
    assert stats["act_dead_frac"] == 0.75
    assert stats["act_mean"] == pytest.approx(float(act.mean()))
    assert stats["act_effective_rank"] == pytest.approx(0.25, abs=1e-6)  # one direction of four


def test_dead_units_are_those_never_above_zero_nan_included() -> None:
    act = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    act[:, 1] = -act[:, 1].abs()  # never fires
    act[:, 2] = 0.0  # never fires
    act[:, 3] = -act[:, 3].abs()
    act[7, 3] = math.nan  # unknown: not counted as dead
    definition = float((act <= 0).all(dim=0).float().mean())
    stats = activation_stats(act)
    assert stats["act_dead_frac"] == definition == pytest.approx(2 / 6)
    assert math.isnan(stats["act_effective_rank"])  # not computable (it used to raise from eigvalsh)


def _brute_force_loo_share(h: torch.Tensor, g: torch.Tensor, ridge: float = 0.3) -> float:
    """Refit kernel ridge without row i, predict row i: the definition the closed form replaces."""
    h = h.double()
    h = (h - h.mean(0)) / h.std(0)
    g = g.double()
    g = g / g.norm(dim=1, keepdim=True)
    g = g - g.mean(0)
    k = torch.exp(-torch.cdist(h, h).square() / (2.0 * h.shape[1]))
    n = len(h)
    predicted = torch.empty_like(g)
    for i in range(n):
        keep = torch.tensor([j != i for j in range(n)])
        alpha = torch.linalg.solve(k[keep][:, keep] + ridge * torch.eye(n - 1, dtype=h.dtype), g[keep])
        predicted[i] = k[i, keep] @ alpha
    return min(max(float((g * predicted).sum() / g.square().sum()), 0.0), 1.0)


def test_kernel_leave_one_out_share_equals_refitting_without_each_row() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(48, 6, generator=gen)
    g = torch.stack([torch.sin(h[:, 0]), h[:, 1] * h[:, 2]], 1) + 0.3 * torch.randn(48, 2, generator=gen)
    share = KernelFit(h).loo_share(g)
    assert share == pytest.approx(_brute_force_loo_share(h, g), abs=1e-4)
    assert 0.1 < share < 1.0  # a smooth function of h: much of it carries over to unseen rows
    noise = torch.randn(48, 2, generator=gen)
    assert KernelFit(h).loo_share(noise) < 0.05  # no structure: nothing carries over


def test_loo_shares_scores_several_targets_as_loo_share_does_each() -> None:
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(256, 64, generator=gen)
    fit = KernelFit(h)
    a, b = torch.tanh(h[:, :10]), torch.randn(256, 64, generator=gen) + h
    both = fit.loo_shares([a, b, torch.zeros(256, 3), torch.randn(100, 3)])
    assert both[:2] == pytest.approx([fit.loo_share(a), fit.loo_share(b)], abs=1e-6)
    assert both[2:] == [0.0, 0.0]  # all-zero gradients and rows that do not line up score 0


def test_kernel_fit_of_too_few_or_non_finite_rows_scores_zero() -> None:
    assert KernelFit(torch.randn(4, 3)).loo_share(torch.randn(4, 2)) == 0.0
    bad = torch.randn(64, 3)
    bad[5, 1] = math.nan
    assert KernelFit(bad).loo_share(torch.randn(64, 2)) == 0.0
    assert KernelFit(torch.randn(64, 3)).loo_share(bad) == 0.0


def _acts_and_grads(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A 3-slot MLP's activations and loss gradients on a 512-row probe."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 40, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w0, w1 = torch.randn(40, 64, generator=gen) / 6, torch.randn(64, 64, generator=gen) / 8
    h0 = torch.relu(x @ w0)
    h1 = torch.relu(h0 @ w1)
    logits = h1 @ (torch.randn(64, 10, generator=gen) / 8)
    loss = torch.nn.functional.cross_entropy(logits, torch.randint(0, 10, (512,), generator=gen))
    acts = {"input": x, "hidden0": h0, "hidden1": h1}
    grads = dict(zip(acts, torch.autograd.grad(loss, list(acts.values())), strict=True))
    return {n: a.detach() for n, a in acts.items()}, grads


def test_slot_probe_keeps_unchanged_fits_and_gives_the_numbers_of_a_fresh_measurement() -> None:
    probe = SlotProbe()
    first_acts, first_grads = _acts_and_grads(1)
    first = probe.measure(first_acts, first_grads)
    kept = {n: probe._kept[n][1] for n in first_acts}
    acts, grads = _acts_and_grads(2)  # the hidden layers moved; the input (the probe rows) did not
    second = probe.measure(acts, grads)
    assert probe._kept["input"][1] is kept["input"]  # reused, not refitted
    assert probe._kept["hidden0"][1] is not kept["hidden0"]
    fresh = slot_signals(acts, grads)
    for name in acts:
        assert second[name]["grad_predictability"] == pytest.approx(fresh[name][0], abs=1e-6)
        assert second[name]["grad_deficit"] == pytest.approx(fresh[name][1], abs=1e-6)
        for key, value in activation_stats(acts[name]).items():
            assert second[name][key] == value
    assert second["hidden0"]["grad_predictability"] != first["hidden0"]["grad_predictability"]
    assert fresh["hidden1"][1] == 0.0  # the last slot has no downstream deficit


def test_all_finite_agrees_with_isfinite_on_every_kind_of_value():
    base = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    big = torch.full((64, 16), torch.finfo(torch.float32).max)  # finite, and its float32 sum overflows
    cases = {"normal": base, "big": big, "-big": -big, "empty": torch.empty(0, 16)}
    for bad in (math.nan, math.inf, -math.inf):
        t = base.clone()
        t[3, 5] = bad
        cases[f"one {bad}"] = t
    both = base.clone()
    both[0, 0], both[1, 1] = math.inf, -math.inf  # they cancel to NaN in the sum: still caught
    cases["inf and -inf"] = both
    for name, t in cases.items():
        assert all_finite(t) == bool(torch.isfinite(t).all()), name


def test_grad_norms_is_each_groups_gradient_norm_with_zero_for_no_gradients() -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    b = torch.nn.Linear(3, 2)
    untouched = torch.nn.Linear(2, 2)
    b(a(torch.randn(16, 5, generator=gen))).square().sum().backward()
    definition = [float(torch.cat([p.grad.flatten() for p in m.parameters()]).norm()) for m in (a, b)]
    groups = [list(a.parameters()), [], list(b.parameters()), list(untouched.parameters())]
    assert grad_norms(groups) == pytest.approx([definition[0], 0.0, definition[1], 0.0], rel=1e-6)
    assert grad_norms([]) == [] and grad_norms([[], list(untouched.parameters())]) == [0.0, 0.0]
    b.weight.grad[0, 0] = math.nan
    norms = grad_norms([list(a.parameters()), list(b.parameters())])
    assert norms[0] == pytest.approx(definition[0], rel=1e-6) and math.isnan(norms[1])
