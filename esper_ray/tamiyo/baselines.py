"""Baselines that are hard to beat: open-loop schedules and a heuristic that runs trials.

- ``ScheduleController`` (kinds ``fixed`` and ``replay``): an open-loop schedule of actions by
  decision index, blind to everything the run shows.
- ``BestFixedController`` (``best-fixed``): the schedule a search over a grid of open-loop schedules
  found best on the training tasks for the run's static context (``HostContext``: input kind,
  host kind, depth), looked up in a ``BestFixedTable``. A policy that only maps the static context
  to a memorised schedule ties it; beating it means reading the run.
- ``TrialHeuristic`` (``trial``): germinates what short isolated what-if trials show removes the
  most validation loss, when that is enough to matter.

Controllers that need more than (Observation, legal actions) get their collaborator at
construction through a typed Protocol (``HostContextSource``, ``CandidateTrials``), which the
Trainer implements with public methods; ``esper-ray evaluate`` hands them the episode's trainer.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from esper_ray.config import ScheduledAction, TrialConfig
from esper_ray.contracts import (
    ActionKind,
    ControllerAction,
    EsperError,
    HostContext,
    Observation,
    SeedStage,
    TrialResult,
)
from esper_ray.util import atomic_write_text, error_line


@runtime_checkable
class HostContextSource(Protocol):
    """Whatever can say which static context the current run is in (``Trainer.host_context``)."""

    def host_context(self) -> HostContext: ...


@runtime_checkable
class CandidateTrials(Protocol):
    """Whatever can run short what-if trials of blueprints at a slot (``Trainer.trial_candidates``)."""

    def trial_candidates(
        self, candidates: list[tuple[str, str]], steps: int, seed_lr_scale: float = 1.0
    ) -> TrialResult: ...


_KIND = {"germinate": ActionKind.GERMINATE, "fossilize": ActionKind.FOSSILIZE, "cull": ActionKind.CULL}


def resolve_step(step: ScheduledAction, obs: Observation) -> ControllerAction:
    """The ControllerAction a schedule step means on the host of ``obs``: a slot position becomes
    that slot's name. EsperError (one line) for a slot or blueprint this host or catalogue lacks,
    or a blueprint that does not fit the slot."""
    names = [s.name for s in obs.slots]
    if isinstance(step.slot, int):
        at = [i for i, s in enumerate(obs.slots) if s.index == step.slot]
        if not at:
            positions = ", ".join(f"{s.index} ({s.name})" for s in obs.slots)
            raise EsperError(f"schedule: no slot at position {step.slot} on this host (slots: {positions})")
        i = at[0]
    elif step.slot in names:
        i = names.index(step.slot)
    else:
        raise EsperError(f"schedule: unknown slot {step.slot!r} on this host (slots: {', '.join(names)})")
    slot = obs.slots[i].name
    if step.action != "germinate":
        return ControllerAction(_KIND[step.action], slot)
    if step.blueprint not in obs.candidates:
        raise EsperError(
            f"schedule: unknown blueprint {step.blueprint!r} (candidates: {', '.join(obs.candidates) or 'none'})"
        )
    j = obs.candidates.index(step.blueprint)
    if obs.candidate_params and obs.candidate_params[i][j] < 0:
        raise EsperError(f"schedule: blueprint {step.blueprint} does not fit slot {slot} ({obs.slots[i].kind})")
    return ControllerAction.germinate(slot, step.blueprint)


def schedule_fits(schedule: Sequence[ScheduledAction], obs: Observation) -> bool:
    """Whether every step of ``schedule`` names a slot, blueprint and fit this host has."""
    try:
        for step in schedule:
            resolve_step(step, obs)
    except EsperError:
        return False
    return True


class _EpisodeCounter:
    """Counts decisions within a run; a new run (the epoch went back) starts again at 0."""

    def __init__(self) -> None:
        self.decision = -1
        self.last_epoch = -1

    def tick(self, obs: Observation) -> bool:
        """Advance to this decision; True when it is the first of a new run."""
        epoch = obs.global_.epoch
        fresh = epoch < self.last_epoch or self.decision < 0
        if epoch < self.last_epoch:
            self.decision = -1
        self.last_epoch = epoch
        self.decision += 1
        return fresh

    def state_dict(self) -> dict[str, int]:
        return {"decision": self.decision, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decision = int(state.get("decision", -1))
        self.last_epoch = int(state.get("last_epoch", -1))


class ScheduleController:
    """An open-loop schedule: each step's action at its decision index, or at the first decision
    after it where the action is legal (a slot still busy, a gate not yet open); steps in
    schedule order. With ``fossilize`` (the ``fixed`` kind), any seed whose fossilize gate is
    open is fossilized when no scheduled step is due; it never culls. ``replay`` plays a
    recorded sequence exactly (its own fossilizes and culls included, nothing added).

    Slots may be named (``hidden0``) or given by position from the input (``0`` = input), so a
    schedule transfers across host depths. A slot or blueprint the host or catalogue lacks is
    one EsperError at the run's first decision.
    """

    def __init__(self, schedule: Sequence[ScheduledAction], *, fossilize: bool = True, name: str = "fixed"):
        self.name = name
        self.schedule = [s if isinstance(s, ScheduledAction) else ScheduledAction(**s) for s in schedule]
        self.fossilize = fossilize
        self.counter = _EpisodeCounter()
        self.played = [False] * len(self.schedule)
        self._actions: list[ControllerAction] | None = None

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        if self.counter.tick(obs):
            self.played = [False] * len(self.schedule)
            self._actions = None
        if self._actions is None:
            self._actions = [resolve_step(step, obs) for step in self.schedule]
        d = self.counter.decision
        allowed = set(legal)
        for i, (step, action) in enumerate(zip(self.schedule, self._actions, strict=True)):
            if not self.played[i] and step.decision <= d and action in allowed:
                self.played[i] = True
                return action
        if self.fossilize:
            for a in legal:
                if a.kind is ActionKind.FOSSILIZE:
                    return a
        return ControllerAction.wait()

    def state_dict(self) -> dict[str, Any]:
        return {**self.counter.state_dict(), "played": list(self.played)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counter.load_state_dict(state)
        self.played = [bool(p) for p in state.get("played", self.played)]


def modal_sequence(sequences: Sequence[Sequence[tuple[int, ControllerAction]]]) -> list[tuple[int, ControllerAction]]:
    """The most frequent of per-episode sequences of (decision index, non-wait action); ties go
    to the one seen first."""
    if not sequences:
        return []
    keys = [tuple((d, str(a)) for d, a in seq) for seq in sequences]
    best = Counter(keys).most_common(1)[0][0]
    return list(sequences[keys.index(best)])


def replay_schedule(sequence: Sequence[tuple[int, ControllerAction]]) -> list[ScheduledAction]:
    """A (decision, action) sequence as schedule steps for a ``replay`` ScheduleController."""
    return [
        ScheduledAction(decision=d, slot=a.slot, blueprint=a.blueprint, action=a.kind.name.lower())
        for d, a in sequence
        if a.kind is not ActionKind.WAIT
    ]


def context_distance(a: HostContext, b: HostContext) -> float:
    """How far apart two static contexts are: a different host or input kind outweighs any
    difference in depth."""
    return 100.0 * (a.host_kind != b.host_kind) + 100.0 * (a.input_kind != b.input_kind) + abs(a.depth - b.depth)


@dataclass
class BestFixedTable:
    """Per static context (``HostContext.key``), the open-loop schedule with the best mean
    validation accuracy on the training tasks, and the grid it was chosen from."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def schedule(self, key: str) -> list[ScheduledAction]:
        return [ScheduledAction(**s) for s in self.entries[key]["schedule"]]

    def choose(self, context: HostContext, obs: Observation) -> tuple[str, list[ScheduledAction]]:
        """The schedule for ``context``: its own entry, else the nearest seen context's whose
        schedule fits this host (slots and blueprints). EsperError when none fits."""
        order = sorted(self.entries, key=lambda k: (context_distance(context, HostContext.from_key(k)), k))
        for key in order:
            schedule = self.schedule(key)
            if schedule_fits(schedule, obs):
                return key, schedule
        raise EsperError(f"best-fixed table: no schedule fits this host ({context.key}; table has {', '.join(order)})")

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "contexts": self.entries}, indent=2, sort_keys=True)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, self.to_json())

    @classmethod
    def read(cls, path: str | Path) -> BestFixedTable:
        """A table written by ``write``; EsperError (one line) when missing or malformed."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            entries = raw["contexts"]
            for key, entry in entries.items():
                HostContext.from_key(key)
                [ScheduledAction(**s) for s in entry["schedule"]]
        except FileNotFoundError:
            raise EsperError(f"best-fixed table not found: {path}") from None
        except (ValueError, KeyError, TypeError) as err:
            raise EsperError(f"{path}: not a best-fixed table ({error_line(err)})") from None
        if not entries:
            raise EsperError(f"{path}: the best-fixed table has no contexts")
        return cls(entries=entries, meta=raw.get("meta", {}))


class BestFixedController:
    """Plays the best open-loop schedule for the run's static context (``BestFixedTable.choose``)
    as a ``fixed`` schedule. ``context`` says which context the current run is in."""

    name = "best-fixed"

    def __init__(self, table: BestFixedTable, context: HostContextSource):
        self.table = table
        self.context = context
        self.counter = _EpisodeCounter()
        self.chosen: str | None = None
        self.inner: ScheduleController | None = None

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        if self.counter.tick(obs) or self.inner is None:
            self.chosen, schedule = self.table.choose(self.context.host_context(), obs)
            self.inner = ScheduleController(schedule, fossilize=True, name=self.name)
        return self.inner.act(obs, legal)

    def state_dict(self) -> dict[str, Any]:
        inner = self.inner.state_dict() if self.inner else None
        return {**self.counter.state_dict(), "chosen": self.chosen, "inner": inner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counter.load_state_dict(state)
        self.chosen = state.get("chosen")
        if self.chosen is not None and state.get("inner") is not None:
            self.inner = ScheduleController(self.table.schedule(self.chosen), fossilize=True, name=self.name)
            self.inner.load_state_dict(state["inner"])


class TrialHeuristic:
    """The strongest hand-written rule here: grow what a short trial shows helps, as soon as it does.

    At each decision, in order:

    1. Fossilize a seed whose fossilize gate is open and whose ablation contribution is at least
       ``trial.cull_below`` (slightly negative by default: a seed the trials chose is kept unless it
       clearly hurts); cull a HOLDING seed below it.
    2. While a seed is live (its trial is the run itself), wait.
    3. Every ``trial.every`` decisions from the run's first (and at once when the host's accuracy
       has plateaued for ``plateau_patience`` epochs), with a slot open and the germination budget
       not spent, run a trial round at the open slots (all of them, or the ``trial.top_slots`` the
       slot signals rank highest: a positive downstream ``grad_deficit`` first, then
       ``HeuristicController.bottleneck_scores``):

       - screen: every fitting candidate (up to ``trial.max_candidates`` per slot) grows for
         ``trial.screen_steps`` batches in a what-if copy of the run (``CandidateTrials``; the seed
         fully in the slot, its learning rate times ``trial.lr_scale`` so a few batches show what
         it can do), against the host trained alone on the same batches;
       - confirm: the best ``trial.keep`` candidates of each slot again, for ``trial.steps`` batches
         (short trials favour capacity near the output, which fits fast; longer ones show what
         generalises, e.g. a conv at the input of an MLP on 1-D signals).

       Germinate the confirmed (slot, blueprint) that removed the largest share of the host's
       validation loss, if that share exceeds ``trial.min_gain`` (capacity is missing there);
       otherwise wait for the next round. A (slot, blueprint) whose seed was culled is not tried
       again in that slot; nothing new is grown with fewer than ``trial.min_epochs_left``
       epochs left (a seed needs its lifecycle to pay off), and a run has at most
       ``trial.max_rounds`` rounds (later ones rarely pass ``min_gain`` and each costs a few epochs).
    4. Otherwise wait.

    The blueprint is chosen by evidence, never by catalogue order; slot signals only order the
    slots when ``top_slots`` limits them. Costs ``(slots x candidates + 1) x screen_steps +
    (slots x keep + 1) x steps`` training steps per round (all trials of a stage share one
    control run of the host alone).
    """

    name = "trial"

    def __init__(
        self,
        trials: CandidateTrials,
        settings: TrialConfig | None = None,
        plateau_patience: int = 3,
    ):
        self.trials = trials
        self.settings = settings or TrialConfig()
        self.cull_below = self.settings.cull_below
        self.plateau_patience = plateau_patience
        self.counter = _EpisodeCounter()
        self.last_round = -(10**9)
        self.failed: dict[str, list[str]] = {}
        self.rounds: list[dict[str, Any]] = []  # what each trial round measured (for inspection)

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        if self.counter.tick(obs):
            self.last_round, self.failed, self.rounds = -(10**9), {}, []
        by_slot = {s.name: s for s in obs.slots}
        for s in obs.slots:  # remember what the run culled (governor or us) so it is not retried
            if s.stage is SeedStage.CULLED and s.blueprint and s.blueprint not in self.failed.get(s.name, []):
                self.failed.setdefault(s.name, []).append(s.blueprint)
        for a in legal:
            slot = by_slot.get(a.slot) if a.slot else None  # a fossilize always names its slot
            if a.kind is ActionKind.FOSSILIZE and slot is not None and slot.contribution >= self.cull_below:
                return a
        for a in legal:
            if a.kind is ActionKind.CULL and a.slot is not None:
                s = by_slot[a.slot]
                if s.stage is SeedStage.HOLDING and s.contribution < self.cull_below:
                    self.failed.setdefault(s.name, []).append(s.blueprint or "")
                    return a
        if any(s.stage.is_live for s in obs.slots):
            return ControllerAction.wait()
        germinations = [
            a for a in legal if a.kind is ActionKind.GERMINATE and a.blueprint not in self.failed.get(a.slot or "", [])
        ]
        d = self.counter.decision
        due = d - self.last_round >= self.settings.every or obs.global_.plateau_epochs >= self.plateau_patience
        late = obs.global_.max_epochs - obs.global_.epoch < self.settings.min_epochs_left
        spent = len(self.rounds) >= self.settings.max_rounds
        if not germinations or not due or late or spent:
            return ControllerAction.wait()
        self.last_round = d
        best = self.trial_round(obs, germinations)
        return best if best is not None else ControllerAction.wait()

    def trial_round(self, obs: Observation, germinations: list[ControllerAction]) -> ControllerAction | None:
        """Screen, confirm, and return the germination that passed ``min_gain`` (or None)."""
        from esper_ray.tamiyo.controllers import HeuristicController

        t = self.settings
        slots = [s for s in obs.slots if any(a.slot == s.name for a in germinations)]
        if t.top_slots is not None and len(slots) > t.top_slots:
            scores = HeuristicController.bottleneck_scores(slots)
            floor = HeuristicController.DEFICIT_FLOOR
            slots = sorted(slots, key=lambda s: (s.grad_deficit <= floor, -scores[s.name]))[: t.top_slots]
        named = [(a.slot, a.blueprint) for a in germinations if a.blueprint is not None]  # a germination names one
        per_slot = {s.name: [b for slot, b in named if slot == s.name][: t.max_candidates] for s in slots}
        record: dict[str, Any] = {"decision": self.counter.decision}
        pairs = [(slot, name) for slot, names in per_slot.items() for name in names]
        if t.screen_steps < t.steps and any(len(names) > t.keep for names in per_slot.values()):
            screen = self.trials.trial_candidates(pairs, t.screen_steps, t.lr_scale).gains()
            record["screen"] = {f"{k[0]}/{k[1]}": g for k, g in screen.items()}
            pairs = [
                (slot, name)
                for slot, names in per_slot.items()
                for name in sorted(names, key=lambda n: -screen[(slot, n)])[: t.keep]
            ]
        confirm = self.trials.trial_candidates(pairs, t.steps, t.lr_scale).gains()
        record["confirm"] = {f"{k[0]}/{k[1]}": g for k, g in confirm.items()}
        self.rounds.append(record)
        best = None  # ties: the first slot in host order, then the screen's order
        for key in pairs:
            if best is None or confirm[key] > confirm[best]:
                best = key
        if best is None or confirm[best] <= t.min_gain:
            return None
        return ControllerAction.germinate(*best)

    def state_dict(self) -> dict[str, Any]:
        return {**self.counter.state_dict(), "last_round": self.last_round, "failed": dict(self.failed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counter.load_state_dict(state)
        self.last_round = int(state.get("last_round", -(10**9)))
        self.failed = {k: list(v) for k, v in state.get("failed", {}).items()}
