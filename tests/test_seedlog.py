"""The seed log on its own: events, birth records and field reports of a host's seeds."""

from __future__ import annotations

import json

from esper_ray.contracts import EventKind, SeedOutcome, SeedStage
from esper_ray.hosts import HostConfig, build_host
from esper_ray.tolaria.seedlog import SeedLog


def _logged_host():
    host = build_host(HostConfig(kind="mlp", slots="all"), (40,), 10)
    log = SeedLog("run-1")
    clock = {"epoch": 0, "step": 0, "val_acc": 0.5}
    host.add_listener(lambda slot, t: log.transition(slot, t, task="task-a", **clock))
    return host, log, clock


def test_a_seed_leaves_events_and_one_field_report_when_it_ends() -> None:
    host, log, clock = _logged_host()
    seen: list = []
    log.hooks.append(seen.append)
    slot = host.germinate("hidden0", "residual_mlp", reason="controller")
    assert log.born_at_step("hidden0") == 0 and log.births["hidden0"]["blueprint"] == "residual_mlp"
    clock.update(epoch=3, step=30, val_acc=0.7)
    slot.transition(SeedStage.TRAINING)
    slot.transition(SeedStage.BLENDING)
    clock.update(epoch=5, step=50, val_acc=0.6)
    slot.cull("bad")
    assert [e["kind"] for e in log.events] == [
        EventKind.GERMINATE,
        EventKind.TRANSITION,
        EventKind.TRANSITION,
        EventKind.CULL,
    ]
    assert seen == log.events  # every event went to the hook as it was recorded
    assert [e["new"] for e in log.events] == ["GERMINATED", "TRAINING", "BLENDING", "CULLED"]
    assert all(e["blueprint"] == "residual_mlp" for e in log.events)
    (report,) = log.field_reports
    assert (report.outcome, report.stage_reached, report.slot, report.task) == (
        SeedOutcome.CULLED,
        "BLENDING",  # the furthest stage it reached
        "hidden0",
        "task-a",
    )
    assert (report.accuracy_before, report.accuracy_after, report.epochs_alive) == (0.5, 0.6, 5)
    assert report.run_id == "run-1" and report.extra["reason"] == "bad" and log.births == {}
    assert (log.count(EventKind.GERMINATE), log.count(EventKind.CULL), log.count(EventKind.FOSSILIZE)) == (1, 1, 0)


def test_rollbacks_and_the_state_round_trip() -> None:
    host, log, clock = _logged_host()
    slot = host.germinate("input", "residual_mlp")
    for stage in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.FOSSILIZED):
        slot.transition(stage)
    log.rollback("loss is nan", epoch=7, step=70, val_acc=0.4)
    assert log.events[-1] == {
        "epoch": 7,
        "step": 70,
        "val_acc": 0.4,
        "kind": EventKind.ROLLBACK,
        "slot": "",
        "reason": "loss is nan",
    }
    assert log.field_reports[0].outcome is SeedOutcome.FOSSILIZED
    assert log.field_reports[0].stage_reached == "FOSSILIZED"
    state = json.loads(json.dumps(log.state_dict()))
    again = SeedLog("run-1")
    again.load_state_dict(state)
    assert json.loads(json.dumps(again.state_dict())) == state
    assert again.field_reports == log.field_reports
    assert (again.count(EventKind.FOSSILIZE), again.count(EventKind.ROLLBACK)) == (1, 1)
