"""The candidate book: which blueprints a run may grow now, where, at what cost, and why not.

A ``CandidateBook`` holds the up to K ready blueprints the trainer polled from its catalogue
and everything derived from them that is worth keeping between decision points: each
(blueprint, slot) parameter cost (``None`` where the blueprint does not fit the slot's shape),
each blueprint's feature vector, and the per-slot table of allowed germinations. Specs are
immutable, so these stay valid while the candidates are the same.

It reads the host's slots and the run's germination count as arguments (the ``Trainer``
passes them), so it holds no reference back to the trainer: ``why_illegal`` and
``legal_actions`` are the same checks, and a property test holds them together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from esper_ray.blueprints import BlueprintCatalogue, BlueprintShapeError, count_params
from esper_ray.blueprints.catalogue import CatalogueEntry
from esper_ray.blueprints.features import blueprint_features
from esper_ray.config import BlueprintsConfig
from esper_ray.contracts import ActionKind, ControllerAction, EsperError, SeedStage
from esper_ray.kasmina import SeedSlot
from esper_ray.kasmina.gate import GateShapeError, check_gate_fits


class Slots(Protocol):
    """A host's slots by name (``MorphoHost.slots``, or a plain dict of them)."""

    def __getitem__(self, key: str) -> SeedSlot: ...
    def __contains__(self, key: str) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...
    def values(self) -> Iterable[SeedSlot]: ...


class CandidateBook:
    """The ready blueprints of one run, their costs and the legality of controller actions."""

    def __init__(self, catalogue: BlueprintCatalogue, blueprints: BlueprintsConfig, max_germinations: int | None):
        self.catalogue = catalogue
        self.max_candidates = blueprints.max_candidates
        self.max_seed_params = blueprints.max_seed_params
        self.max_germinations = max_germinations
        self.entries: list[CatalogueEntry] = []
        self._fits: dict[tuple[str, str], int | None] = {}
        self._features: dict[str, list[float]] = {}
        # (candidate hashes, per-slot costs, per-slot allowed germinations): see ``table``
        self._table: tuple[tuple[str | None, ...], list[list[int]], dict[str, list[ControllerAction]]] = (
            (None,),
            [],
            {},
        )

    # ---- the candidates ------------------------------------------------------------------------
    def refresh(self) -> None:
        """Poll the catalogue (never blocks) and keep up to K ready blueprints, in its order."""
        self.entries = self.catalogue.poll()[: self.max_candidates]

    def order(self, key: Callable[[CatalogueEntry], Any]) -> None:
        """Put the candidates in the order of ``key`` (stable); observations list them so."""
        self.entries.sort(key=key)

    def find(self, name_or_hash: str | None) -> CatalogueEntry | None:
        """The ready candidate with this name or content hash, or None."""
        return next((e for e in self.entries if name_or_hash in (e.name, e.content_hash)), None)

    def resolve(self, name_or_hash: str | None) -> CatalogueEntry:
        """The catalogue's own entry for the ready candidate with this name or content hash, about to
        grow: looked up by its content hash through the catalogue's ``resolve`` (a remote catalogue
        checks the spec's hash again there). EsperError if it is not a ready candidate."""
        entry = self.find(name_or_hash)
        if entry is None:
            raise EsperError(f"blueprint {name_or_hash!r} is not among the ready candidates")
        return self.catalogue.resolve(entry.content_hash)

    # ---- costs ---------------------------------------------------------------------------------
    def seed_cost(self, entry: CatalogueEntry, slot: SeedSlot) -> int | None:
        """Parameters of ``entry`` in ``slot``, or None when it does not fit (cached)."""
        key = (entry.content_hash, slot.name)
        if key not in self._fits:
            try:
                check_gate_fits(entry.spec, slot.name, slot.shape)  # a gated blend reads vector slots only
                self._fits[key] = count_params(entry.spec, slot.shape)
            except (BlueprintShapeError, GateShapeError):
                self._fits[key] = None
        return self._fits[key]

    def features(self, entry: CatalogueEntry) -> list[float]:
        """``blueprint_features`` of a candidate, cached by content hash (specs are immutable)."""
        if entry.content_hash not in self._features:
            self._features[entry.content_hash] = blueprint_features(entry.spec)
        return self._features[entry.content_hash]

    def why_unfit(self, entry: CatalogueEntry, slot: SeedSlot) -> str:
        """Why ``entry`` cannot grow in ``slot`` ('' if it can): its gate, its shape or its size."""
        try:
            check_gate_fits(entry.spec, slot.name, slot.shape)
        except GateShapeError as err:
            return str(err)
        cost = self.seed_cost(entry, slot)
        if cost is None:
            return f"blueprint {entry.name} ({entry.spec.kind}) does not fit slot {slot.name} {slot.shape}"
        budget = self.max_seed_params
        if cost > budget:
            return f"blueprint {entry.name} costs {cost} params, over the budget {budget}"
        return ""

    def table(self, slots: Slots) -> tuple[list[list[int]], dict[str, list[ControllerAction]]]:
        """For the candidates in their current order: each slot's parameter cost of each (-1 where
        it does not fit the slot's shape), and per slot the germinations ``why_unfit`` allows.
        Kept while the candidates are the same (specs are immutable; a host's slots never change)."""
        key = tuple(e.content_hash for e in self.entries)
        if key != self._table[0]:
            costs, germinations = [], {}
            for slot in slots.values():
                costs.append([-1 if (c := self.seed_cost(e, slot)) is None else c for e in self.entries])
                germinations[slot.name] = [
                    ControllerAction.germinate(slot.name, e.name) for e in self.entries if not self.why_unfit(e, slot)
                ]
            self._table = (key, costs, germinations)
        return self._table[1], self._table[2]

    # ---- legality ------------------------------------------------------------------------------
    def budget_spent(self, germinations: int) -> str:
        """Why no germination is allowed any more in this run ('' while the budget lasts)."""
        budget = self.max_germinations
        if budget is not None and germinations >= budget:
            return f"the run's germination budget ({budget}) is spent"
        return ""

    def why_illegal(self, action: ControllerAction, slots: Slots, germinations: int) -> str:
        """'' if ``action`` may be applied now to a host with these ``slots`` (a run that has
        germinated ``germinations`` seeds so far), else the reason."""
        if action.kind is ActionKind.WAIT:
            return ""
        if action.slot is None or action.slot not in slots:
            return f"unknown slot {action.slot!r} (slots: {', '.join(slots)})"
        slot = slots[action.slot]
        if action.kind is ActionKind.GERMINATE:
            if not slot.is_open:
                return f"slot {slot.name} is {slot.stage.name}, not DORMANT"
            spent = self.budget_spent(germinations)
            if spent:
                return spent
            entry = self.find(action.blueprint)
            if entry is None:
                return f"blueprint {action.blueprint!r} is not among the ready candidates"
            return self.why_unfit(entry, slot)
        if action.kind is ActionKind.FOSSILIZE:
            if slot.stage is not SeedStage.HOLDING:
                return f"slot {slot.name} is {slot.stage.name}, not HOLDING"
            return slot.gate(SeedStage.FOSSILIZED)
        if not slot.stage.is_live:
            return f"slot {slot.name} has no live seed ({slot.stage.name})"
        return ""

    def legal_actions(self, slots: Slots, germinations: int) -> list[ControllerAction]:
        """Every action ``why_illegal`` allows right now; WAIT is always first.

        The run-wide germination budget is looked at once instead of once per (slot, candidate),
        and which candidates fit which slot is kept while the candidates stay the same (``table``).
        """
        actions = [ControllerAction.wait()]
        may_germinate = not self.budget_spent(germinations)
        allowed = self.table(slots)[1]
        for slot in slots.values():
            if slot.is_open:
                if may_germinate:
                    actions.extend(allowed[slot.name])
            elif slot.stage is SeedStage.HOLDING and not slot.gate(SeedStage.FOSSILIZED):
                actions.append(ControllerAction.fossilize(slot.name))
            if slot.stage.is_live:
                actions.append(ControllerAction.cull(slot.name))
        return actions
