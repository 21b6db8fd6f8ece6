"""Tamiyo's view of a decision point as sets: the observation layout and the action codec.

A host has any number of slots (up to ``max_slots``) and the catalogue any number of ready
candidates (up to ``k``). The observation keeps them as sets, padded to those maxima, in one
flat float32 vector (RLlib's action-masking convention wants exactly ``observations`` and
``action_mask``); :class:`SetLayout` says where each block lives, and the policy network
(``esper_ray.tamiyo.setnet``) unflattens it::

    global                      GLOBAL_FEATURES           run-wide telemetry, no task identity
    slots      [max_slots, SLOT_FEATURES]                 one row per slot, host order; row[0] = present
    candidates [k, CANDIDATE_FEATURES]                    one row per candidate; row[0] = present
    pairs      [max_slots, k, PAIR_FEATURES]              what candidate c costs in slot s

Nothing in it names a task, a family, a blueprint or a slot: a slot is described by what is
measured there (stage, activations, gradient signals) and by its relative depth, a candidate
by its features (``esper_ray.blueprints.features``). So the same policy reads hosts of any
depth and blueprints it never saw, and its choice follows the candidates when they are
reordered.

The same encoding serves the Gymnasium environment (training with RLlib) and the exported
policy (inference inside ``esper-ray train``), so both see identical inputs.

Action indices, for ``S = max_slots`` slot positions and ``K`` candidate positions::

    0                         wait
    1 + s*K + k               germinate candidate k in slot s
    1 + S*K + s               fossilize slot s
    1 + S*K + S + s           cull slot s

Positions past the host's slots or the ready candidates are always masked out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from esper_ray.blueprints.features import FEATURE_NAMES as BLUEPRINT_FEATURES
from esper_ray.contracts import ActionKind, ControllerAction, EsperError, Observation, SeedStage, SlotTelemetry

TASK_STATS = 5
"""Generic task statistics taken from ``Observation.task_features`` (sizes and label balance)."""
GLOBAL_FEATURES = 10 + TASK_STATS
SLOT_FEATURES = 1 + len(SeedStage) + 20
CANDIDATE_FEATURES = 1 + len(BLUEPRINT_FEATURES)
PAIR_FEATURES = 3
_STAGE_ONE_HOT = {stage: tuple(1.0 if stage is st else 0.0 for st in SeedStage) for stage in SeedStage}
_SLOT_KINDS = ("vector", "seq", "image")
_KIND_ONE_HOT = {kind: tuple(1.0 if kind == k else 0.0 for k in _SLOT_KINDS) for kind in _SLOT_KINDS}


def _log(x: float) -> float:
    return math.log1p(max(x, 0.0))


@dataclass(frozen=True)
class SetLayout:
    """Sizes and offsets of the blocks of the flat observation vector."""

    max_slots: int
    k: int

    def __post_init__(self) -> None:
        if self.max_slots < 1 or self.k < 1:
            raise EsperError(f"a policy needs max_slots >= 1 and k >= 1, got {self.max_slots} and {self.k}")

    @property
    def slots_at(self) -> int:
        return GLOBAL_FEATURES

    @property
    def candidates_at(self) -> int:
        return self.slots_at + self.max_slots * SLOT_FEATURES

    @property
    def pairs_at(self) -> int:
        return self.candidates_at + self.k * CANDIDATE_FEATURES

    @property
    def size(self) -> int:
        return self.pairs_at + self.max_slots * self.k * PAIR_FEATURES

    @property
    def n_actions(self) -> int:
        return 1 + self.max_slots * self.k + 2 * self.max_slots

    def check_fits(self, n_slots: int, n_candidates: int, what: str = "the policy") -> None:
        """EsperError (one line) when a host or catalogue is beyond the maxima: never truncate."""
        if n_slots > self.max_slots:
            raise EsperError(f"the host has {n_slots} slots, more than {what} handles (max_slots={self.max_slots})")
        if n_candidates > self.k:
            raise EsperError(
                f"{n_candidates} candidate blueprints are in view, more than {what} handles (k={self.k}); "
                f"set blueprints.max_candidates <= {self.k}"
            )


@dataclass(frozen=True)
class ActionSpace:
    """Discrete actions over one host's ``slots`` (host order), padded to ``max_slots`` positions,
    and ``k`` candidate positions."""

    slots: tuple[str, ...]
    k: int
    max_slots: int | None = None

    def __post_init__(self) -> None:
        SetLayout(self.width, self.k).check_fits(len(self.slots), 0, "this action space")

    @property
    def width(self) -> int:
        """Slot positions in the index layout (``max_slots``, or the host's slots)."""
        return self.max_slots if self.max_slots is not None else len(self.slots)

    @property
    def n(self) -> int:
        return 1 + self.width * self.k + 2 * self.width

    def encode(self, action: ControllerAction, candidates: list[str]) -> int:
        """The index of ``action``; EsperError if it names a slot/blueprint not in view."""
        if action.kind is ActionKind.WAIT:
            return 0
        if action.slot not in self.slots:
            raise EsperError(f"action {action}: slot not in the action space {self.slots}")
        s, width = self.slots.index(action.slot), self.width
        if action.kind is ActionKind.GERMINATE:
            if action.blueprint not in candidates[: self.k]:
                raise EsperError(f"action {action}: blueprint is not among the {self.k} candidates")
            return 1 + s * self.k + candidates.index(action.blueprint)
        if action.kind is ActionKind.FOSSILIZE:
            return 1 + width * self.k + s
        return 1 + width * self.k + width + s

    def decode(self, index: int, candidates: list[str]) -> ControllerAction:
        """The action at ``index``; EsperError if the index is out of range or names nothing."""
        width = self.width
        if not 0 <= index < self.n:
            raise EsperError(f"action index {index} out of range [0, {self.n})")
        if index == 0:
            return ControllerAction.wait()
        index -= 1
        if index < width * self.k:
            s, c = divmod(index, self.k)
            if c >= len(candidates):
                raise EsperError(f"action index {index + 1}: no candidate blueprint at position {c}")
            return ControllerAction.germinate(self._slot(s, index + 1), candidates[c])
        index -= width * self.k
        if index < width:
            return ControllerAction.fossilize(self._slot(index, index + 1 + width * self.k))
        return ControllerAction.cull(self._slot(index - width, index + 1 + width * self.k))

    def _slot(self, s: int, index: int) -> str:
        if s >= len(self.slots):
            raise EsperError(f"action index {index}: the host has no slot at position {s}")
        return self.slots[s]

    def mask(self, legal: list[ControllerAction], candidates: list[str]) -> np.ndarray:
        """1 where the action is legal now, else 0 (wait is always legal)."""
        mask = np.zeros(self.n, dtype=np.int8)
        # Keyed by str | None: a wait action's slot and blueprint are None and look up nothing.
        # The first of repeated candidate names wins.
        slot_at: dict[str | None, int] = {name: i for i, name in enumerate(self.slots)}
        candidate_at: dict[str | None, int] = {name: c for c, name in reversed(list(enumerate(candidates[: self.k])))}
        width = self.width
        for action in legal:  # the indices of ``encode``, with both lookups done once
            kind = action.kind
            if kind is ActionKind.WAIT:
                mask[0] = 1
                continue
            s = slot_at.get(action.slot)
            if s is None:
                continue  # a slot outside this action space
            if kind is ActionKind.GERMINATE:
                c = candidate_at.get(action.blueprint)
                if c is not None:  # else beyond the K candidates in view
                    mask[1 + s * self.k + c] = 1
            elif kind is ActionKind.FOSSILIZE:
                mask[1 + width * self.k + s] = 1
            else:
                mask[1 + width * self.k + width + s] = 1
        return mask


@dataclass(frozen=True)
class ObsEncoder:
    """Observation -> the flat float32 vector of :class:`SetLayout` (sets padded to the maxima)."""

    layout: SetLayout

    @property
    def size(self) -> int:
        return self.layout.size

    def encode(self, obs: Observation) -> np.ndarray:
        lay = self.layout
        lay.check_fits(len(obs.slots), len(obs.candidates))
        vec = np.zeros(lay.size, dtype=np.float32)
        vec[: lay.slots_at] = _global(obs)
        n_slots = len(obs.slots)
        slots = vec[lay.slots_at : lay.candidates_at].reshape(lay.max_slots, SLOT_FEATURES)
        for i, s in enumerate(obs.slots):
            slots[i] = _slot(s, i, n_slots, obs.distill.get(s.name, 0.0))
        cands = vec[lay.candidates_at : lay.pairs_at].reshape(lay.k, CANDIDATE_FEATURES)
        for c, feats in enumerate(obs.candidate_features[: len(obs.candidates)]):
            cands[c, 0] = 1.0
            cands[c, 1:] = feats
        pairs = vec[lay.pairs_at :].reshape(lay.max_slots, lay.k, PAIR_FEATURES)
        host = max(obs.global_.host_params, 1)
        for i, row in enumerate(obs.candidate_params[:n_slots]):
            for c, cost in enumerate(row[: len(obs.candidates)]):
                if cost >= 0:
                    pairs[i, c] = (1.0, math.log10(1 + cost) / 5.0, min(cost / host, 4.0))
        if not np.isfinite(vec).all():  # rare (a diverging run): checking is cheaper than always mapping
            vec = np.nan_to_num(vec, nan=0.0, posinf=10.0, neginf=-10.0)
        return vec


def _global(obs: Observation) -> list[float]:
    g = obs.global_
    task = list(obs.task_features)[:TASK_STATS]
    return [
        g.epoch / max(g.max_epochs, 1),
        1.0 - g.epoch / max(g.max_epochs, 1),
        g.val_accuracy,
        g.best_val_accuracy,
        g.best_val_accuracy - g.val_accuracy,
        _log(g.train_loss),
        _log(g.val_loss),
        min(g.plateau_epochs, 20) / 10.0,
        g.seed_params / max(g.host_params, 1),
        math.log10(1 + g.host_params) / 6.0,
        *task,
        *[0.0] * (TASK_STATS - len(task)),
    ]


def _slot(s: SlotTelemetry, position: int, n_slots: int, distill_gap: float) -> list[float]:
    return [
        1.0,  # present
        *_STAGE_ONE_HOT[s.stage],
        s.alpha,
        min(s.epochs_in_stage, 20) / 10.0,
        position / max(n_slots - 1, 1),  # relative depth: 0 at the input, 1 at the last slot
        1.0 if position == n_slots - 1 else 0.0,
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
        math.tanh(distill_gap),  # 0 when not distilling
    ]
