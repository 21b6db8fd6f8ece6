"""A run's seed log: what happened to its seeds, as records.

Every lifecycle transition and governor rollback becomes a ``SeedEvent`` row (``events``; the
run writes them to ``seed_events.parquet`` and hooks such as the lineage ledger see each one as
it happens). Each live seed has a birth record from its germination until it fossilizes or is
culled; then it leaves a ``FieldReport`` (``field_reports``) for the blueprint pipeline.

The ``Trainer`` passes what it knows at that moment (epoch, step, validation accuracy, task);
the log holds no reference back to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypedDict

from esper_ray.blueprints.builder import slot_channels
from esper_ray.contracts import EventKind, FieldReport, SeedEvent, SeedOutcome, SeedStage
from esper_ray.kasmina import SeedSlot, Transition

EventHook = Callable[[SeedEvent], None]

_KIND = {
    SeedStage.GERMINATED: EventKind.GERMINATE,
    SeedStage.FOSSILIZED: EventKind.FOSSILIZE,
    SeedStage.CULLED: EventKind.CULL,
}


class Birth(TypedDict):
    """What the log keeps of a live seed from its germination to its field report (JSON in a
    checkpoint's ``births``)."""

    epoch: int
    step: int
    val_acc: float
    blueprint: str
    params: int
    stage_reached: str  # the furthest stage it reached before fossilizing or being culled


class SeedLog:
    """The events, birth records and field reports of one run."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.events: list[SeedEvent] = []
        self.field_reports: list[FieldReport] = []
        self.hooks: list[EventHook] = []  # called with each event as it is recorded
        self.births: dict[str, Birth] = {}  # per slot with a live seed

    def record(self, event: SeedEvent) -> None:
        """Append ``event`` and show it to every hook."""
        self.events.append(event)
        for hook in self.hooks:
            hook(event)

    def rollback(self, why: str, *, epoch: int, step: int, val_acc: float) -> None:
        """The governor rolled the run back (no seed involved)."""
        self.record(SeedEvent(epoch=epoch, step=step, val_acc=val_acc, kind=EventKind.ROLLBACK, slot="", reason=why))

    def transition(self, slot: SeedSlot, t: Transition, *, epoch: int, step: int, val_acc: float, task: str) -> None:
        """``slot`` went through ``t`` at this point of the run: a birth record starts (germinated)
        or advances, the event is recorded, and a seed that ended (fossilized or culled) leaves its
        field report."""
        name = slot.name
        if t.new is SeedStage.GERMINATED:
            self.births[name] = Birth(
                epoch=epoch,
                step=step,
                val_acc=val_acc,
                blueprint=slot.blueprint_name,
                params=slot.seed_params,
                stage_reached=SeedStage.GERMINATED.name,
            )
        elif name in self.births and t.new in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING):
            self.births[name]["stage_reached"] = t.new.name
        birth = self.births.get(name)
        self.record(
            SeedEvent(
                epoch=epoch,
                step=step,
                val_acc=val_acc,
                kind=_KIND.get(t.new, EventKind.TRANSITION),
                slot=name,
                old=t.old.name,
                new=t.new.name,
                blueprint=birth["blueprint"] if birth is not None else "",
                blueprint_hash=t.blueprint_hash,
                reason=t.reason,
                alpha=slot.alpha,
                seed_params=slot.seed_params,
            )
        )
        if t.new in (SeedStage.FOSSILIZED, SeedStage.CULLED):
            self._field_report(slot, t, epoch=epoch, val_acc=val_acc, task=task)

    def _field_report(self, slot: SeedSlot, t: Transition, *, epoch: int, val_acc: float, task: str) -> None:
        birth = self.births.pop(slot.name)
        fossilized = t.new is SeedStage.FOSSILIZED
        self.field_reports.append(
            FieldReport(
                run_id=self.run_id,
                blueprint_hash=t.blueprint_hash,
                blueprint_name=birth["blueprint"],
                slot=slot.name,
                slot_kind=slot.kind,
                slot_width=slot_channels(slot.shape),
                task=task,
                stage_reached=t.new.name if fossilized else birth["stage_reached"],
                outcome=SeedOutcome.FOSSILIZED if fossilized else SeedOutcome.CULLED,
                accuracy_before=birth["val_acc"],
                accuracy_after=val_acc,
                seed_params=birth["params"],
                epochs_alive=epoch - birth["epoch"],
                extra={"contribution": slot.contribution, "reason": t.reason},
            )
        )

    def count(self, kind: EventKind) -> int:
        """Events of ``kind`` so far (rows read back from a checkpoint hold the kind as a string)."""
        return sum(e["kind"] == kind for e in self.events)

    def born_at_step(self, slot: str) -> int:
        """The training step at which the live seed in ``slot`` germinated."""
        return self.births[slot]["step"]

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Events, field reports and birth records (JSON-able)."""
        return {
            "events": self.events,
            "field_reports": [asdict(r) for r in self.field_reports],
            "births": self.births,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to ``state_dict``'s state (hooks stay)."""
        self.events = state["events"]
        self.field_reports = [FieldReport(**r) for r in state["field_reports"]]
        self.births = state["births"]
