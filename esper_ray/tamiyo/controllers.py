"""Tamiyo's interface and the baseline controllers: static, random, heuristic (and, in
``baselines``, fixed, best-fixed, replay and the trial heuristic).

A controller maps an observation and the legal actions to one action. Baselines are
deliberately simple and documented, because a learned Tamiyo is only worth having
if it beats them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from esper_ray.contracts import ActionKind, ControllerAction, ControllerKind, EsperError, Observation, SeedStage

if TYPE_CHECKING:
    from esper_ray.config import ControllerConfig
    from esper_ray.tamiyo.baselines import BestFixedTable


@runtime_checkable
class Controller(Protocol):
    """observation + legal actions -> one of the legal actions."""

    name: str

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _Stateless:
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class StaticController(_Stateless):
    """Never grows anything: the host as it was built."""

    name = "static"

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        return ControllerAction.wait()


class RandomController:
    """With probability ``p_act``, a uniformly random legal non-wait action; else wait."""

    name = "random"

    def __init__(self, p_act: float = 0.2, seed: int = 0):
        self.p_act = p_act
        self.rng = np.random.default_rng(seed)

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        moves = [a for a in legal if a.kind is not ActionKind.WAIT]
        if not moves or self.rng.random() >= self.p_act:
            return ControllerAction.wait()
        return moves[int(self.rng.integers(len(moves)))]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class HeuristicController:
    """Hand-written rules, in order:

    1. Fossilize any seed whose fossilize gate is open and whose ablation contribution
       is above ``cull_below``; cull a HOLDING seed at or below it.
    2. If no seed is live and validation accuracy has not improved for
       ``plateau_patience`` epochs, germinate at the open slot ``choose_slot`` names:
       the first open slot (in host order) whose downstream ``grad_deficit`` is above
       ``DEFICIT_FLOOR`` (the layer after it loses information the loss needs), else the
       open slot with the strongest bottleneck signal (``bottleneck_scores``).
       The blueprint is the first candidate in catalogue order that fits the slot and
       has not been tried there yet (so repeated plateaus try alternatives).
    3. Otherwise wait.
    """

    name = "heuristic"

    def __init__(self, plateau_patience: int = 3, cull_below: float = 0.0):
        self.plateau_patience = plateau_patience
        self.cull_below = cull_below
        self.tried: dict[str, list[str]] = {}

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        by_slot = {s.name: s for s in obs.slots}
        # A fossilize or cull action always names a slot (ControllerAction checks it).
        for a in legal:
            s = by_slot.get(a.slot) if a.slot else None
            if a.kind is ActionKind.FOSSILIZE and s is not None and s.contribution > self.cull_below:
                return a
        for a in legal:
            s = by_slot.get(a.slot) if a.slot else None
            if (
                a.kind is ActionKind.CULL
                and s is not None
                and s.stage is SeedStage.HOLDING
                and s.contribution <= self.cull_below
            ):
                return a
        if any(s.stage.is_live for s in obs.slots) or obs.global_.plateau_epochs < self.plateau_patience:
            return ControllerAction.wait()
        germinations = [a for a in legal if a.kind is ActionKind.GERMINATE]
        if not germinations:
            return ControllerAction.wait()
        open_slots = {a.slot for a in germinations}
        slot = self.choose_slot([s for s in obs.slots if s.name in open_slots])
        options = [a for a in germinations if a.slot == slot]
        tried = self.tried.setdefault(slot, [])
        fresh = [a for a in options if a.blueprint not in tried] or options
        choice = fresh[0]
        tried.append(choice.blueprint or "")  # a germination always names its blueprint
        return choice

    DEFICIT_FLOOR = 0.0
    """A downstream ``grad_deficit`` above this marks the slot before an information-losing layer."""

    @classmethod
    def choose_slot(cls, open_slots: list) -> str:
        """Where to germinate among ``open_slots`` (SlotTelemetry, in host order).

        The first slot with a positive downstream deficit, else ``bottleneck_scores``' argmax.
        On the bottleneck tasks (damaged frozen host, ``benchmarks/bottleneck_study.py
        --signal-only``; the counts are in BENCHMARKS.md) the deficit rule alone picks the
        ground-truth slot on every task and the argmax of ``grad_predictability`` on nearly every
        one (its misses are input-slot tasks, where
        the next layer has already dropped what the loss needs, so the gradient further down
        is best explained from the input). On a host training from scratch (MNIST-1D) the
        deficit is mostly negative and the rule falls through to the scores.
        """
        for s in open_slots:
            if s.grad_deficit > cls.DEFICIT_FLOOR:
                return s.name
        scores = cls.bottleneck_scores(open_slots)
        return max(sorted(scores), key=lambda n: scores[n])

    SIGNAL_FLOOR = 0.02
    """Below this everywhere, ``grad_predictability`` is noise and the old proxy ranks slots."""

    @staticmethod
    def bottleneck_scores(slots: list) -> dict[str, float]:
        """Per slot name, higher = germinate there (only the ranking matters).

        ``grad_predictability`` when some slot reaches ``SIGNAL_FLOOR``: on the bottleneck
        tasks (damaged frozen host) its argmax is the ground-truth slot on every task of
        ``benchmarks/bottleneck_study.py``. Otherwise (e.g. a host still training from
        scratch, where gradients are mostly label noise) the older proxy: relative consumer
        gradient norm + activation collapse (1 - effective rank), which picked the
        ground-truth slot on only about a third of those tasks.
        """
        if slots and max(s.grad_predictability for s in slots) >= HeuristicController.SIGNAL_FLOOR:
            return {s.name: s.grad_predictability for s in slots}
        mean_grad = sum(s.host_grad_norm for s in slots) / max(len(slots), 1) or 1.0
        return {s.name: s.host_grad_norm / mean_grad + (1.0 - s.act_effective_rank) for s in slots}

    def state_dict(self) -> dict[str, Any]:
        return {"tried": {k: list(v) for k, v in self.tried.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tried = {k: list(v) for k, v in state.get("tried", {}).items()}


ControllerFactory = Callable[[int], Controller]
"""``factory(seed)``: a fresh controller for one episode seeded ``seed``."""


def make_controller(
    cfg: ControllerConfig,
    seed: int = 0,
    run: Any = None,
    *,
    table: BestFixedTable | None = None,
    source: str = "controller",
) -> Controller:
    """A controller from a ControllerConfig (``policy`` loads an exported Tamiyo).

    ``run`` is the collaborator the ``trial`` and ``best-fixed`` kinds need (the Trainer, or an
    evaluation's ``EpisodeRun``, which implement ``baselines.CandidateTrials`` and
    ``baselines.HostContextSource``); EsperError without it. ``best-fixed`` plays ``table`` when
    given, else reads ``cfg.best_fixed.table``. ``source`` names where ``cfg`` came from in error
    messages (``controller`` in a run config, ``env.run.controller`` in an evaluation).
    """
    from esper_ray.tamiyo import baselines

    kind = ControllerKind(cfg.kind)
    if kind is ControllerKind.STATIC:
        return StaticController()
    if kind is ControllerKind.RANDOM:
        return RandomController(cfg.p_act, seed)
    if kind is ControllerKind.HEURISTIC:
        return HeuristicController(cfg.plateau_patience, cfg.cull_below)
    if kind in (ControllerKind.FIXED, ControllerKind.REPLAY):
        if not cfg.schedule:
            raise EsperError(f"{source}.kind={kind} needs {source}.schedule (a list of steps)")
        return baselines.ScheduleController(cfg.schedule, fossilize=kind is ControllerKind.FIXED, name=kind.value)
    if kind in (ControllerKind.TRIAL, ControllerKind.BEST_FIXED) and run is None:
        raise EsperError(f"{source}.kind={kind} needs the run it plays in (make_controller(..., run=trainer))")
    if kind is ControllerKind.TRIAL:
        return baselines.TrialHeuristic(run, cfg.trial, cfg.plateau_patience)
    if kind is ControllerKind.BEST_FIXED:
        if table is None:
            if not cfg.best_fixed.table:
                raise EsperError(
                    f"{source}.kind=best-fixed needs {source}.best_fixed.table "
                    "(the best_fixed.json that esper-ray evaluate --baselines best-fixed writes)"
                )
            table = baselines.BestFixedTable.read(cfg.best_fixed.table)
        return baselines.BestFixedController(table, run)
    from esper_ray.tamiyo.policy import load_policy  # torch-only inference, no RLlib

    return load_policy(cfg.path, sample=cfg.sample, seed=seed)


def controller_factory(
    cfg: ControllerConfig,
    run: Any = None,
    *,
    table: BestFixedTable | None = None,
    source: str = "controller",
) -> ControllerFactory:
    """``factory(seed)`` building ``cfg``'s controller per episode (see ``make_controller``).

    What ``make_controller`` would refuse is refused now, once, not at the first episode.
    A ``policy`` is loaded once; each episode draws with its own generator seeded ``seed``.
    """
    from esper_ray.tamiyo.baselines import BestFixedController

    kind = ControllerKind(cfg.kind)
    if kind is ControllerKind.POLICY:
        policy = make_controller(cfg, run=run, table=table, source=source)
        return policy.episode if isinstance(policy, EpisodeFactory) else (lambda seed: policy)
    first = make_controller(cfg, 0, run, table=table, source=source)  # fail now, with one line
    if isinstance(first, BestFixedController):
        table = first.table  # read once, not per episode
    return lambda seed: make_controller(cfg, seed, run, table=table, source=source)


@runtime_checkable
class EpisodeFactory(Protocol):
    """A controller that makes one fresh, seeded copy of itself per episode (a learned policy)."""

    def episode(self, seed: int) -> Controller: ...


def policy_label(path: str | Path) -> str:
    """A policy's name in tables: its run's name for ``<run>/policy``, else the folder's own name."""
    path = Path(path).resolve()
    return path.parent.name if path.name == "policy" else path.name


def policy_factory(path: str | Path) -> tuple[str, ControllerFactory]:
    """(``policy:<label>``, factory) for the exported policy folder ``path``, loaded now (one-line
    EsperError when it is missing or unreadable); each episode draws with its own generator."""
    from esper_ray.tamiyo.policy import load_policy

    return f"policy:{policy_label(path)}", load_policy(path).episode
