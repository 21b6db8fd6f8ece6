"""Tamiyo's fixed-size view of a decision point: the observation vector and the action codec.

The same encoding serves the Gymnasium environment (training with RLlib) and the
exported policy (inference inside ``esper-ray train``), so both see identical inputs.

Action indices, for ``S`` slots and ``K`` candidate blueprints::

    0                         wait
    1 + s*K + k               germinate candidate k in slot s
    1 + S*K + s               fossilize slot s
    1 + S*K + S + s           cull slot s
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from esper_ray.blueprints.features import FEATURE_NAMES as BLUEPRINT_FEATURES
from esper_ray.contracts import ActionKind, ControllerAction, EsperError, Observation, SeedStage

GLOBAL_FEATURES = 9
SLOT_FEATURES = len(SeedStage) + 20
_STAGE_ONE_HOT = {stage: tuple(1.0 if stage is st else 0.0 for st in SeedStage) for stage in SeedStage}
_SLOT_KINDS = ("vector", "seq", "image")
_KIND_ONE_HOT = {kind: tuple(1.0 if kind == k else 0.0 for k in _SLOT_KINDS) for kind in _SLOT_KINDS}


def _log(x: float) -> float:
    return math.log1p(max(x, 0.0))


@dataclass(frozen=True)
class ActionSpace:
    """Discrete actions over a fixed slot order and ``k`` candidate positions."""

    slots: tuple[str, ...]
    k: int

    @property
    def n(self) -> int:
        s = len(self.slots)
        return 1 + s * self.k + 2 * s

    def encode(self, action: ControllerAction, candidates: list[str]) -> int:
        """The index of ``action``; EsperError if it names a slot/blueprint not in view."""
        if action.kind is ActionKind.WAIT:
            return 0
        if action.slot not in self.slots:
            raise EsperError(f"action {action}: slot not in the action space {self.slots}")
        s, n_slots = self.slots.index(action.slot), len(self.slots)
        if action.kind is ActionKind.GERMINATE:
            if action.blueprint not in candidates[: self.k]:
                raise EsperError(f"action {action}: blueprint is not among the {self.k} candidates")
            return 1 + s * self.k + candidates.index(action.blueprint)
        if action.kind is ActionKind.FOSSILIZE:
            return 1 + n_slots * self.k + s
        return 1 + n_slots * self.k + n_slots + s

    def decode(self, index: int, candidates: list[str]) -> ControllerAction:
        """The action at ``index``; EsperError if the index is out of range or names no candidate."""
        n_slots = len(self.slots)
        if not 0 <= index < self.n:
            raise EsperError(f"action index {index} out of range [0, {self.n})")
        if index == 0:
            return ControllerAction.wait()
        index -= 1
        if index < n_slots * self.k:
            s, c = divmod(index, self.k)
            if c >= len(candidates):
                raise EsperError(f"action index {index + 1}: no candidate blueprint at position {c}")
            return ControllerAction.germinate(self.slots[s], candidates[c])
        index -= n_slots * self.k
        if index < n_slots:
            return ControllerAction.fossilize(self.slots[index])
        return ControllerAction.cull(self.slots[index - n_slots])

    def mask(self, legal: list[ControllerAction], candidates: list[str]) -> np.ndarray:
        """1 where the action is legal now, else 0 (wait is always legal)."""
        mask = np.zeros(self.n, dtype=np.int8)
        slot_at = {name: i for i, name in enumerate(self.slots)}
        candidate_at = {name: c for c, name in reversed(list(enumerate(candidates[: self.k])))}  # first wins
        n_slots = len(self.slots)
        for action in legal:  # the indices of ``encode``, with both lookups done once
            kind = action.kind
            if kind is ActionKind.WAIT:
                mask[0] = 1
                continue
            s = slot_at.get(action.slot)
            if s is None:
                continue  # a slot this policy was not trained with
            if kind is ActionKind.GERMINATE:
                c = candidate_at.get(action.blueprint)
                if c is not None:  # else beyond the K candidates in view
                    mask[1 + s * self.k + c] = 1
            elif kind is ActionKind.FOSSILIZE:
                mask[1 + n_slots * self.k + s] = 1
            else:
                mask[1 + n_slots * self.k + n_slots + s] = 1
        return mask


@dataclass(frozen=True)
class ObsEncoder:
    """Observation -> a flat float32 vector of fixed size."""

    slots: tuple[str, ...]
    k: int
    task_dim: int

    @property
    def size(self) -> int:
        n_slots = len(self.slots)
        return (
            GLOBAL_FEATURES
            + self.task_dim
            + n_slots * SLOT_FEATURES
            + self.k * (len(BLUEPRINT_FEATURES) + 1)
            + n_slots * self.k
        )

    def encode(self, obs: Observation) -> np.ndarray:
        g = obs.global_
        host = max(g.host_params, 1)
        parts: list[float] = [
            g.epoch / max(g.max_epochs, 1),
            1.0 - g.epoch / max(g.max_epochs, 1),
            g.val_accuracy,
            g.best_val_accuracy,
            g.best_val_accuracy - g.val_accuracy,
            _log(g.train_loss),
            _log(g.val_loss),
            min(g.plateau_epochs, 20) / 10.0,
            g.seed_params / host,
        ]
        task = list(obs.task_features)[: self.task_dim]
        parts += task + [0.0] * (self.task_dim - len(task))
        by_name = {s.name: s for s in obs.slots}
        for name in self.slots:
            parts += self._slot(by_name.get(name))
            parts.append(math.tanh(obs.distill.get(name, 0.0)))  # distillation gap, 0 if not distilling
        for c in range(self.k):
            if c < len(obs.candidate_features):
                parts += [1.0, *obs.candidate_features[c]]
            else:
                parts += [0.0] * (len(BLUEPRINT_FEATURES) + 1)
        names = [s.name for s in obs.slots]
        for name in self.slots:
            row = obs.candidate_params[names.index(name)] if name in names and obs.candidate_params else []
            for c in range(self.k):
                cost = row[c] if c < len(row) else -1
                parts.append(math.log10(1 + cost) / 5.0 if cost >= 0 else -1.0)
        vec = np.asarray(parts, dtype=np.float32)
        assert vec.shape == (self.size,), (vec.shape, self.size)
        if not np.isfinite(vec).all():  # rare (a diverging run): checking is 5x cheaper than always mapping
            vec = np.nan_to_num(vec, nan=0.0, posinf=10.0, neginf=-10.0)
        return vec

    @staticmethod
    def _slot(s) -> list[float]:
        if s is None:
            return [0.0] * (SLOT_FEATURES - 1)
        return [
            *_STAGE_ONE_HOT[s.stage],
            1.0,  # present
            s.alpha,
            min(s.epochs_in_stage, 20) / 10.0,
            s.index / 4.0,
            math.log2(1 + s.width) / 10.0,
            *_KIND_ONE_HOT.get(s.kind, (0.0, 0.0, 0.0)),
            math.tanh(s.act_mean),
            math.tanh(s.act_std),
            s.act_dead_frac,
            s.act_effective_rank,
            _log(s.host_grad_norm),
            _log(s.seed_grad_norm),
            max(min(s.contribution * 10.0, 1.0), -1.0),
            _log(s.grad_rms),
            s.grad_predictability,
            math.tanh(10.0 * s.grad_deficit),  # typical |deficit| 0.005-0.1
            math.log10(1 + s.seed_params) / 5.0,
        ]
