"""Karn's reward model: predicts how much a blueprint improves a host, per parameter.

Target (what Karn maximises), from each :class:`~esper_ray.contracts.FieldReport`::

    reward = (accuracy_after - accuracy_before) / ln(1 + seed_params)

so a seed is worth more when it helps more, and a seed ten times larger must help
more, but not ten times more, to be worth as much.

Model: Bayesian ridge regression on a fixed feature map of (spec, slot): the spec
features, the slot context, their products with the slot-kind one-hot (one linear
model per slot kind on top of a shared one: "conv helps in a seq slot" is an
interaction) and a few squares (an optimum inside a range of sizes). Closed form,
deterministic, and good with the tens to hundreds of reports a run produces; the
ridge strength is picked by exact leave-one-out error on each fit. The posterior
gives an uncertainty, used as an upper-confidence bonus when choosing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from esper_ray.blueprints.spec import BlueprintSpec
from esper_ray.contracts import FieldReport
from esper_ray.karn.features import (
    DEFAULT_CONTEXTS,
    KINDS,
    SPEC_FEATURES,
    SQUARED_FEATURES,
    SlotContext,
    fits_slot,
    spec_features,
)

_SQUARED_INDEX = [SPEC_FEATURES.index(name) for name in SQUARED_FEATURES]


def reward_target(report: FieldReport) -> float:
    """Improvement per parameter: ``accuracy_delta / ln(1 + seed_params)`` (see module doc)."""
    return report.accuracy_delta / math.log1p(max(int(report.seed_params), 1))


def feature_map(spec_x: np.ndarray, context: SlotContext) -> np.ndarray:
    """The regression's input for one (spec, slot) pair: main effects, slot interactions, squares."""
    slot = np.array([float(context.kind == k) for k in KINDS])
    interactions = np.outer(slot, spec_x).ravel()
    return np.concatenate([spec_x, context.features(), interactions, spec_x[_SQUARED_INDEX] ** 2])


@dataclass(frozen=True)
class FitSummary:
    """What one fit used and found."""

    rows: int  # reports used
    skipped: int  # reports whose blueprint spec is unknown
    ridge: float  # the chosen regularisation strength
    loo_rmse: float  # leave-one-out error in standardised target units (1.0 = no better than the mean)


class RewardModel:
    """Learns ``reward_target`` from field reports and ranks candidate specs by it.

    Args:
        ridges: regularisation strengths tried at each fit (chosen by leave-one-out error).
        beta: weight of the posterior standard deviation in the ranking score (UCB).
        epsilon: chance that each pick of ``choose`` is a uniformly random candidate instead.
        seed: seed of the exploration draws.
        min_rows: reports needed before the model is trusted; fewer and ``choose`` is random.
        max_rows: only the most recent reports are fitted.
        max_contexts: distinct slot contexts (most recent) a prediction is averaged over.
    """

    def __init__(
        self,
        *,
        ridges: Sequence[float] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
        beta: float = 0.5,
        epsilon: float = 0.1,
        seed: int | np.random.Generator = 0,
        min_rows: int = 8,
        max_rows: int = 5000,
        max_contexts: int = 32,
    ):
        self.ridges = tuple(ridges)
        self.beta = beta
        self.epsilon = epsilon
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.min_rows = min_rows
        self.max_rows = max_rows
        self.max_contexts = max_contexts
        self.contexts: list[SlotContext] = []
        self.trained_on = 0
        self.summary: FitSummary | None = None
        self._features: dict[str, np.ndarray] = {}
        self._w: np.ndarray | None = None

    @property
    def trained(self) -> bool:
        return self._w is not None

    def features(self, spec: BlueprintSpec) -> np.ndarray:
        """``spec_features`` of ``spec``, cached by content hash (it builds on the meta device)."""
        key = spec.content_hash
        if key not in self._features:
            self._features[key] = spec_features(spec)
        return self._features[key]

    # ---- fitting ------------------------------------------------------------------------------

    def fit(self, reports: Sequence[FieldReport], specs: Mapping[str, BlueprintSpec]) -> FitSummary:
        """Fit on ``reports`` whose ``blueprint_hash`` is in ``specs`` (hash -> spec).

        Below ``min_rows`` usable reports the model stays (or becomes) untrained.
        """
        rows, targets, contexts, skipped = [], [], [], 0
        for report in list(reports)[-self.max_rows :]:
            spec = specs.get(report.blueprint_hash)
            if spec is None:
                skipped += 1
                continue
            context = SlotContext.of(report)
            rows.append(feature_map(self.features(spec), context))
            targets.append(reward_target(report))
            contexts.append(context)
        # Most recent distinct contexts: the slots candidates will meet next.
        self.contexts = list(dict.fromkeys(reversed(contexts)))[: self.max_contexts]
        if len(rows) < self.min_rows:
            self._w = None
            self.trained_on = 0
            self.summary = FitSummary(len(rows), skipped, float("nan"), float("nan"))
            return self.summary
        x, y = np.array(rows), np.array(targets)
        self._x_mean, self._x_std = x.mean(0), x.std(0)
        self._x_std[self._x_std < 1e-9] = 1.0  # constant columns carry nothing; keep them finite
        self._y_mean, self._y_std = y.mean(), max(y.std(), 1e-12)
        z = (x - self._x_mean) / self._x_std
        t = (y - self._y_mean) / self._y_std
        u, s, vt = np.linalg.svd(z, full_matrices=False)
        uty = u.T @ t
        best: tuple[float, float] | None = None
        for lam in self.ridges:
            shrink = s**2 / (s**2 + lam)
            hat_diag = (u**2) @ shrink
            resid = t - u @ (shrink * uty)
            loo = float(np.sqrt(np.mean((resid / np.maximum(1 - hat_diag, 1e-6)) ** 2)))
            if best is None or loo < best[1]:
                best = (lam, loo)
        assert best is not None
        lam, loo = best
        self._w = vt.T @ (s / (s**2 + lam) * uty)
        dof = float(np.sum(s**2 / (s**2 + lam)))
        resid = t - z @ self._w
        self._noise = float(np.sum(resid**2) / max(len(t) - dof, 1.0))
        # Posterior precision Z'Z + lam I, inverted through the SVD; directions outside Z's
        # row space keep the prior's 1/lam (unseen feature combinations stay uncertain).
        self._v, self._inv_s = vt.T, 1.0 / (s**2 + lam)
        self._lam = lam
        self.trained_on = len(rows)
        self.summary = FitSummary(len(rows), skipped, lam, loo)
        return self.summary

    # ---- prediction ---------------------------------------------------------------------------

    def predict_pairs(
        self, specs: Sequence[BlueprintSpec], contexts: Sequence[SlotContext]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predicted reward and its posterior std for each (spec, context) pair, in target units."""
        if self._w is None:
            raise RuntimeError("the reward model is not trained yet")
        x = np.array([feature_map(self.features(s), c) for s, c in zip(specs, contexts, strict=True)])
        z = (x - self._x_mean) / self._x_std
        mean = z @ self._w * self._y_std + self._y_mean
        proj = z @ self._v
        quad = (proj**2) @ self._inv_s + (np.sum(z**2, 1) - np.sum(proj**2, 1)) / self._lam
        std = np.sqrt(self._noise * np.maximum(quad, 0.0)) * self._y_std
        return mean, std

    def contexts_for(self, spec: BlueprintSpec) -> list[SlotContext]:
        """The recent slot contexts ``spec`` can grow in, or its kind's default slot."""
        fitting = [c for c in self.contexts if fits_slot(spec.kind, c.kind)]
        return fitting or [DEFAULT_CONTEXTS[spec.kind]]

    def predict(self, specs: Sequence[BlueprintSpec]) -> tuple[np.ndarray, np.ndarray]:
        """Per spec: predicted reward and std, averaged over the slots it can meet."""
        pairs = [(i, c) for i, s in enumerate(specs) for c in self.contexts_for(s)]
        mean, std = self.predict_pairs([specs[i] for i, _ in pairs], [c for _, c in pairs])
        owner = np.array([i for i, _ in pairs])
        counts = np.bincount(owner, minlength=len(specs))
        return (
            np.bincount(owner, mean, minlength=len(specs)) / counts,
            np.bincount(owner, std, minlength=len(specs)) / counts,
        )

    def choose(self, candidates: Sequence[BlueprintSpec], k: int) -> list[BlueprintSpec]:
        """The ``k`` candidates to send on: best by ``mean + beta * std``, some at random.

        Untrained, the choice is uniformly random (nothing is known yet).
        """
        k = min(k, len(candidates))
        if k == 0:
            return []
        if self._w is None:
            return [candidates[i] for i in self.rng.permutation(len(candidates))[:k]]
        mean, std = self.predict(candidates)
        order = list(np.argsort(-(mean + self.beta * std), kind="stable"))
        picks: list[int] = []
        for _ in range(k):
            explore = self.rng.random() < self.epsilon
            i = order[int(self.rng.integers(len(order)))] if explore else order[0]
            order.remove(i)
            picks.append(int(i))
        return [candidates[i] for i in picks]
