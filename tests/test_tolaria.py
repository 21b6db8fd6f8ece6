"""Tests of Tolaria: seed param groups, cull rollback, checkpoint / exact resume, the governor,
illegal actions, the run folder, and the baseline controllers (Tamiyo's heuristics).

Everything runs on small MNIST-1D configs (one epoch = 32 steps of batch 100, ~0.1 s).
The lineage key lives under a temporary folder, never in ~/.config.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from esper_ray.config import GovernorConfig, RunConfig, load_config
from esper_ray.contracts import (
    ActionKind,
    ControllerAction,
    EsperError,
    EventKind,
    GlobalTelemetry,
    Observation,
    SeedOutcome,
    SeedStage,
    SlotTelemetry,
)
from esper_ray.lineage import verify_run
from esper_ray.tamiyo.controllers import (
    HeuristicController,
    RandomController,
    StaticController,
    make_controller,
)
from esper_ray.tasks import TaskData, load_task
from esper_ray.tolaria import optim
from esper_ray.tolaria.checkpoint import FORMAT, load_checkpoint
from esper_ray.tolaria.governor import Governor
from esper_ray.tolaria.run import run_training
from esper_ray.tolaria.trainer import Trainer

WAIT = ControllerAction.wait()
# Columns of a metrics row that measure wall time and so differ between identical runs.
WALL_TIME = {"epoch_seconds"}

# Small, fast lifecycle: one epoch of isolated training, a one-epoch alpha ramp, short embargo.
FAST = [
    "lifecycle.min_training_epochs=1",
    "lifecycle.min_holding_epochs=1",
    "lifecycle.embargo_epochs=1",
    "lifecycle.alpha.steps=32",
    "training.epochs=8",
]


# ---- fixtures and helpers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def key_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lineage-key") / "lineage_ed25519.pem"


@pytest.fixture(autouse=True)
def _private_key(monkeypatch: pytest.MonkeyPatch, key_path: Path) -> None:
    """The lineage signing key is created under tmp, never in ~/.config."""
    monkeypatch.setenv("ESPER_RAY_LINEAGE_KEY", str(key_path))


@pytest.fixture(scope="module")
def data() -> TaskData:
    """MNIST-1D (default split) shared by every trainer here; trainers only read it."""
    return load_task(RunConfig().task)


def make_cfg(*overrides: str) -> RunConfig:
    return load_config(None, [*FAST, *overrides])


def epoch(trainer: Trainer, action: ControllerAction = WAIT) -> dict[str, Any]:
    """Apply ``action`` (at the current decision point), then train one epoch and record it."""
    if action.kind is not ActionKind.WAIT:
        trainer.apply(action)
    trainer.train_epoch()
    return trainer.end_epoch(action)


def host_opt_state(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """Cloned Adam state of every host parameter, in host-group order."""
    group = trainer.opt.param_groups[0]
    assert group["name"] == optim.HOST_GROUP
    return [{k: v.clone() for k, v in trainer.opt.state.get(p, {}).items()} for p in group["params"]]


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k} dtype/shape"
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def assert_opt_states_equal(a: list[dict], b: list[dict], what: str) -> None:
    assert len(a) == len(b), what
    for i, (sa, sb) in enumerate(zip(a, b, strict=True)):
        assert_tensors_equal(sa, sb, f"{what}[param {i}]")


def tensors_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


class Scripted:
    """A controller that plays ``plan[epoch]`` (an action, or a function of obs and legal)."""

    name = "scripted"

    def __init__(self, plan: dict[int, ControllerAction | Callable[..., ControllerAction]]):
        self.plan = plan
        self.calls = 0
        self.taken: list[str] = []

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        self.calls += 1
        step = self.plan.get(obs.global_.epoch, WAIT)
        action = step(obs, legal) if callable(step) else step
        self.taken.append(str(action))
        return action

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "taken": list(self.taken)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls, self.taken = state["calls"], list(state["taken"])


def fossilize_or_cull(slot: str) -> Callable[..., ControllerAction]:
    def choose(obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        fossilize = ControllerAction.fossilize(slot)
        return fossilize if fossilize in legal else ControllerAction.cull(slot)

    return choose


def read_rows(path: Path, drop: set[str] = frozenset()) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in drop} for r in pq.read_table(path).to_pylist()]


# ---- 1. seed param groups ----------------------------------------------------------------------
def test_seed_param_group_added_and_removed_without_touching_host_state(data: TaskData) -> None:
    cfg = make_cfg("training.seed_lr=0.0037", "lifecycle.min_training_epochs=5")
    tr = Trainer(cfg, data)
    epoch(tr)
    epoch(tr)
    assert optim.group_names(tr.opt) == ["host"]
    before = host_opt_state(tr)
    assert all({"exp_avg", "exp_avg_sq", "step"} <= s.keys() for s in before)
    assert float(before[0]["step"]) == 64.0  # two epochs of 32 steps

    tr.apply(ControllerAction.germinate("input", "conv1d"))
    slot = tr.host.slots["input"]
    assert slot.stage is SeedStage.TRAINING
    assert optim.group_names(tr.opt) == ["host", "seed:input"]
    group = tr.opt.param_groups[1]
    seed_params = list(slot.seed.parameters())
    assert len(group["params"]) == len(seed_params) > 0
    assert all(p is q for p, q in zip(group["params"], seed_params, strict=True))
    assert group["lr"] == 0.0037
    assert tr.opt.param_groups[0]["lr"] == cfg.training.lr
    # No host parameter is in the seed's group and vice versa.
    host_ids = {id(p) for p in tr.opt.param_groups[0]["params"]}
    assert host_ids.isdisjoint(id(p) for p in seed_params)
    assert_opt_states_equal(before, host_opt_state(tr), "host Adam state after germination")

    # Train while the seed is isolated: it gets Adam state of its own.
    epoch(tr)
    assert slot.stage is SeedStage.TRAINING
    assert all(p in tr.opt.state for p in seed_params)
    assert all(float(tr.opt.state[p]["step"]) == 32.0 for p in seed_params)
    trained = host_opt_state(tr)
    weights = tr.host.host_state_dict()
    assert float(trained[0]["step"]) == 96.0

    tr.apply(ControllerAction.cull("input"))
    assert slot.stage is SeedStage.CULLED and slot.seed is None
    assert optim.group_names(tr.opt) == ["host"]
    assert not any(p in tr.opt.state for p in seed_params)
    assert len(tr.opt.state) == len(tr.opt.param_groups[0]["params"])
    assert_opt_states_equal(trained, host_opt_state(tr), "host Adam state after cull from TRAINING")
    assert_tensors_equal(weights, tr.host.host_state_dict(), "host weights after cull from TRAINING")
    # And the optimizer still steps the host correctly afterwards.
    epoch(tr)
    assert float(host_opt_state(tr)[0]["step"]) == 128.0


# ---- 2. cull rollback --------------------------------------------------------------------------
def test_cull_from_blending_restores_host_and_adam_state_at_blend_start(data: TaskData) -> None:
    tr = Trainer(make_cfg("lifecycle.alpha.steps=96"), data)
    epoch(tr)
    epoch(tr, ControllerAction.germinate("hidden0", "residual_mlp"))  # TRAINING -> BLENDING at its end
    slot = tr.host.slots["hidden0"]
    assert slot.stage is SeedStage.BLENDING and slot.blend_steps == 0
    snap_weights = tr.host.host_state_dict()
    snap_opt = host_opt_state(tr)

    epoch(tr)
    epoch(tr)
    assert slot.stage is SeedStage.BLENDING and 0.0 < slot.alpha < 1.0
    assert tensors_differ(snap_weights, tr.host.host_state_dict()), "the host should have trained"
    assert float(host_opt_state(tr)[0]["step"]) == float(snap_opt[0]["step"]) + 64

    tr.apply(ControllerAction.cull("hidden0"))
    assert slot.stage is SeedStage.CULLED
    assert_tensors_equal(snap_weights, tr.host.host_state_dict(), "host weights after cull from BLENDING")
    assert_opt_states_equal(snap_opt, host_opt_state(tr), "host Adam state after cull from BLENDING")
    assert optim.group_names(tr.opt) == ["host"]
    assert tr.state_dict()["blend_snapshots"] == {}
    report = tr.field_reports[-1]
    assert (report.outcome, report.stage_reached, report.slot) == ("culled", "BLENDING", "hidden0")
    # The restored host computes what it computed at blend start (the seed is gone).
    epoch(tr)
    assert math.isfinite(tr.last["train_loss"]) and tr.last["train_loss"] > 0


def test_cull_from_holding_also_restores_and_cull_from_training_does_not(data: TaskData) -> None:
    tr = Trainer(make_cfg("lifecycle.min_training_epochs=3"), data)
    epoch(tr)
    before_germination = tr.host.host_state_dict()
    epoch(tr, ControllerAction.germinate("input", "lowrank"))
    epoch(tr)
    assert tr.host.slots["input"].stage is SeedStage.TRAINING
    trained = tr.host.host_state_dict()
    trained_opt = host_opt_state(tr)
    assert tensors_differ(before_germination, trained)
    tr.apply(ControllerAction.cull("input"))
    # Culling an isolated seed keeps the host's training (it never saw the seed).
    assert_tensors_equal(trained, tr.host.host_state_dict(), "host after cull from TRAINING")
    assert_opt_states_equal(trained_opt, host_opt_state(tr), "host Adam after cull from TRAINING")

    # HOLDING (alpha 1) is past blend start too: culling there rolls back.
    tr2 = Trainer(make_cfg(), data)
    epoch(tr2, ControllerAction.germinate("hidden1", "residual_mlp"))
    assert tr2.host.slots["hidden1"].stage is SeedStage.BLENDING
    snap = tr2.host.host_state_dict()
    snap_opt = host_opt_state(tr2)
    epoch(tr2)
    epoch(tr2)
    assert tr2.host.slots["hidden1"].stage is SeedStage.HOLDING
    tr2.apply(ControllerAction.cull("hidden1"))
    assert_tensors_equal(snap, tr2.host.host_state_dict(), "host after cull from HOLDING")
    assert_opt_states_equal(snap_opt, host_opt_state(tr2), "host Adam after cull from HOLDING")


# ---- 3. checkpoint and exact resume -------------------------------------------------------------
RESUME_OVERRIDES = [
    "training.epochs=12",
    "lifecycle.alpha.steps=96",  # three epochs of blending: a checkpoint at epoch 6 lands mid-ramp
    "lifecycle.min_improvement=-1.0",  # fossilizing is always allowed from HOLDING
]


def scripted_plan() -> dict[int, Any]:
    return {
        3: ControllerAction.germinate("input", "conv1d"),  # BLENDING from epoch 4, HOLDING at 7
        5: ControllerAction.germinate("hidden0", "residual_mlp"),  # BLENDING from epoch 6
        8: ControllerAction.cull("hidden0"),  # cull from BLENDING: rollback to its blend snapshot
        9: fossilize_or_cull("input"),
    }


def _compare_runs(a, b, a_dir: Path, b_dir: Path) -> None:
    rows_a = read_rows(a_dir / "metrics.parquet", WALL_TIME)
    rows_b = read_rows(b_dir / "metrics.parquet", WALL_TIME)
    assert len(rows_a) == 12 and [r["epoch"] for r in rows_b] == list(range(1, 13))
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra == rb, f"epoch {ra['epoch']} differs after resume"
    assert read_rows(a_dir / "seed_events.parquet") == read_rows(b_dir / "seed_events.parquet")
    assert read_rows(a_dir / "field_reports.parquet", {"run_id"}) == read_rows(
        b_dir / "field_reports.parquet", {"run_id"}
    )
    assert_tensors_equal(a.trainer.host.state_dict(), b.trainer.host.state_dict(), "final model after resume")
    sa, sb = a.trainer.opt.state_dict(), b.trainer.opt.state_dict()
    # (JSON turns Adam's betas tuple into a list; the values are what matters)
    assert json.loads(json.dumps(sa["param_groups"])) == json.loads(json.dumps(sb["param_groups"]))
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert_tensors_equal(sa["state"][i], sb["state"][i], f"final Adam state of param {i}")
    summary_a = {k: v for k, v in a.summary.items() if k != "field_reports"}
    summary_b = {k: v for k, v in b.summary.items() if k != "field_reports"}
    assert summary_a == summary_b


def test_resume_with_scripted_controller_is_exact(tmp_path: Path, data: TaskData, key_path) -> None:
    cfg = make_cfg(*RESUME_OVERRIDES)
    a = run_training(cfg, out=tmp_path / "a", controller=Scripted(scripted_plan()), progress=False)
    assert a.summary["germinations"] == 2 and a.summary["culls"] >= 1

    first = run_training(cfg, out=tmp_path / "b", controller=Scripted(scripted_plan()), progress=False, stop_after=6)
    assert first.trainer.epoch == 6
    # The checkpoint is taken mid-blend: seeds, blend snapshots and Adam state all exist.
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["format"] == FORMAT and state["epoch"] == 6
    assert state["slots"]["input"]["stage"] == "BLENDING"
    assert 0 < state["slots"]["input"]["blend_steps"] < 96
    assert state["slots"]["hidden0"]["stage"] == "BLENDING"
    assert state["blend_slots"] == ["hidden0", "input"]
    assert [g["name"] for g in state["param_groups"]] == ["host", "seed:input", "seed:hidden0"]
    assert state["controller"]["calls"] == 6
    assert state["controller"]["taken"][2] == "germinate(input, conv1d)"

    resumed_controller = Scripted(scripted_plan())
    b = run_training(RunConfig(), resume=tmp_path / "b", controller=resumed_controller, progress=False)
    assert b.trainer.epoch == 12
    assert resumed_controller.calls == 12  # its state came back from the checkpoint
    _compare_runs(a, b, tmp_path / "a", tmp_path / "b")
    assert verify_run(tmp_path / "b", key_path).ok


def test_resume_with_random_controller_is_exact(tmp_path: Path, data: TaskData, key_path) -> None:
    cfg = make_cfg(*RESUME_OVERRIDES, "controller.kind=random", "controller.p_act=0.6")
    a = run_training(cfg, out=tmp_path / "a", progress=False)
    actions = [r["action"] for r in a.trainer.history]
    # The controller must act after the checkpoint too, or its RNG state would not matter.
    assert sum(x != "wait" for x in actions[:6]) >= 1, actions
    assert sum(x != "wait" for x in actions[6:]) >= 2, actions

    run_training(cfg, out=tmp_path / "b", progress=False, stop_after=6)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert "rng" in state["controller"]
    b = run_training(RunConfig(), resume=tmp_path / "b", progress=False)
    assert [r["action"] for r in b.trainer.history] == actions
    _compare_runs(a, b, tmp_path / "a", tmp_path / "b")
    assert verify_run(tmp_path / "b", key_path).ok


def test_resume_with_cached_probe_signals_is_exact(tmp_path: Path, data: TaskData, key_path) -> None:
    # signal_every=4: observations between refreshes reuse signals measured epochs ago; a resume at
    # epoch 6 must reuse the same ones (they travel in the checkpoint), or decisions would differ.
    cfg = make_cfg(*RESUME_OVERRIDES, "controller.kind=heuristic", "training.signal_every=4")
    a = run_training(cfg, out=tmp_path / "a", progress=False)
    run_training(cfg, out=tmp_path / "b", progress=False, stop_after=6)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["probe_epoch"] in (4, 5) and set(state["probe_signals"]) == {"input", "hidden0", "hidden1"}
    b = run_training(RunConfig(), resume=tmp_path / "b", device="cpu", progress=False)  # as saved
    assert [r["action"] for r in b.trainer.history] == [r["action"] for r in a.trainer.history]
    _compare_runs(a, b, tmp_path / "a", tmp_path / "b")


def test_probe_refits_only_slots_whose_activations_moved(data: TaskData) -> None:
    # The input slot sees the fixed probe rows: its kernel fit is kept for the whole run. A frozen
    # host keeps every slot's fit; a training host refits its hidden slots at each refresh.
    trainer = Trainer(make_cfg(), data)
    frozen = Trainer(make_cfg("training.freeze_host=true"), data)
    for tr in (trainer, frozen):
        tr.train_epoch()
        tr.observe()
    first = {tr: {n: kept[1] for n, kept in tr.observer.slot_probe._kept.items()} for tr in (trainer, frozen)}
    for tr in (trainer, frozen):
        tr.train_epoch()
        tr.observe()
    assert [trainer.observer.slot_probe._kept[n][1] is first[trainer][n] for n in ("input", "hidden0", "hidden1")] == [
        True,
        False,
        False,
    ]
    assert all(frozen.observer.slot_probe._kept[n][1] is first[frozen][n] for n in ("input", "hidden0", "hidden1"))


def test_probe_signals_are_refreshed_every_signal_every_epochs(data: TaskData) -> None:
    trainer = Trainer(make_cfg("training.signal_every=3"), data)
    measured = []
    for _ in range(8):
        trainer.train_epoch()
        trainer.end_epoch(WAIT)
        before = trainer.observer.epoch
        obs = trainer.observe()
        if trainer.observer.epoch != before:
            measured.append(trainer.epoch)
        by = {s.name: s for s in obs.slots}
        assert by["hidden1"].grad_deficit == 0.0  # the last slot has no downstream layer to judge
        assert 0.0 <= by["hidden0"].grad_predictability <= 1.0 and -1.0 <= by["input"].grad_deficit <= 1.0
    assert measured == [1, 4, 7]
    every = Trainer(make_cfg(), data)  # the default: fresh at every observation
    for _ in range(3):
        every.train_epoch()
        every.observe()
        assert every.observer.epoch == every.epoch


def test_probe_signals_are_refreshed_at_once_after_a_lifecycle_transition(data: TaskData) -> None:
    # signal_every=100: only the first observation and a changed network (a transition or a
    # rollback since the last measurement) measure again; a seed's life is seen stage by stage.
    trainer = Trainer(make_cfg("training.signal_every=100", "training.epochs=12"), data)
    measured: list[tuple[int, str]] = []
    measure = trainer.observer.measure

    def counting(host, epoch, events) -> None:
        measured.append((trainer.epoch, trainer.host.slots["hidden0"].stage.name))
        measure(host, epoch, events)

    trainer.observer.measure = counting
    actions = {2: ControllerAction.germinate("hidden0", "residual_mlp")}
    for e in range(12):
        trainer.observe()
        epoch(trainer, actions.get(e, WAIT))
    trainer.observe()
    # Germinated at epoch 2 and blending by the end of that epoch (one isolated epoch), holding one
    # epoch later; nothing changes after that, so nothing is measured again up to epoch 12.
    assert [(e["epoch"], e["new"]) for e in trainer.events] == [
        (2, "GERMINATED"),
        (2, "TRAINING"),
        (3, "BLENDING"),
        (4, "HOLDING"),
    ]
    assert measured == [(0, "DORMANT"), (3, "BLENDING"), (4, "HOLDING")]
    assert trainer.observer.events == len(trainer.events)


def test_resume_from_a_mid_run_checkpoint_after_a_crash_keeps_a_valid_lineage(
    tmp_path: Path, data: TaskData, key_path
) -> None:
    """A run dies after its last checkpoint; events of the lost epochs are already in the ledger.

    Resuming continues from the checkpoint; the lineage must still verify (lineage.replay
    documents a ``resume`` event for exactly this).
    """

    class Crash(RuntimeError):
        pass

    def crash(obs, legal):
        raise Crash("simulated crash")

    cfg = make_cfg("training.epochs=9", "training.checkpoint_every=3")
    plan = {4: ControllerAction.germinate("hidden1", "lowrank"), 5: crash}
    with pytest.raises(Crash):
        run_training(cfg, out=tmp_path / "run", controller=Scripted(plan), progress=False)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 3
    result = run_training(RunConfig(), resume=tmp_path / "run", controller=StaticController(), progress=False)
    assert [r["epoch"] for r in read_rows(tmp_path / "run" / "metrics.parquet")] == list(range(1, 10))
    assert result.trainer.host.slots["hidden1"].stage is SeedStage.DORMANT
    report = verify_run(tmp_path / "run", key_path)
    assert report.ok, report.message


# ---- 4. corrupt or mismatched checkpoints -------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory, data: TaskData) -> Path:
    """A finished 3-epoch run whose checkpoint holds a live seed."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ESPER_RAY_LINEAGE_KEY", str(tmp_path_factory.mktemp("key2") / "k.pem"))
    out = tmp_path_factory.mktemp("saved") / "run"
    plan = {1: ControllerAction.germinate("input", "conv1d")}
    run_training(make_cfg("training.epochs=3"), out=out, controller=Scripted(plan), data=data, progress=False)
    mp.undo()
    return out


def _damaged_copy(saved_run: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(saved_run / "checkpoint", ckpt)
    damage(ckpt)
    return ckpt


def _truncate_model(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _edit_state(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        edit(state)
        (ckpt / "state.json").write_text(json.dumps(state))

    return damage


def _set(path: list[str], value: Any) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def _drop(key: str) -> Callable[[dict], None]:
    return lambda state: state.pop(key)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        pytest.param(_truncate_model, "unreadable", id="truncated-model"),
        pytest.param(lambda c: (c / "optimizer.safetensors").write_bytes(b"junk"), "unreadable", id="junk-opt"),
        pytest.param(lambda c: (c / "trainer.safetensors").unlink(), "unreadable", id="missing-trainer"),
        pytest.param(lambda c: (c / "state.json").write_text("{not json"), "unreadable", id="state-not-json"),
        pytest.param(_edit_state(_set(["format"], "esper-ray-checkpoint/0")), "format", id="wrong-format"),
        pytest.param(_edit_state(_set(["config", "host", "hidden"], [32, 32])), "", id="host-widths"),
        pytest.param(_edit_state(_set(["config", "host", "kind"], "cnn1d")), "", id="host-kind"),
        pytest.param(_edit_state(_set(["config", "training", "epochs"], -1)), "training.epochs", id="bad-cfg"),
    ],
)
def test_damaged_checkpoint_is_one_line_esper_error_naming_it(
    saved_run: Path, tmp_path: Path, data: TaskData, damage, says: str
) -> None:
    ckpt = _damaged_copy(saved_run, tmp_path, damage)
    with pytest.raises(EsperError) as info:
        load_checkpoint(ckpt, data)
    message = str(info.value)
    assert "\n" not in message
    assert str(ckpt) in message
    assert says in message


def test_checkpoint_of_a_host_with_other_slots_names_the_checkpoint(
    saved_run: Path, tmp_path: Path, data: TaskData
) -> None:
    ckpt = _damaged_copy(saved_run, tmp_path, _edit_state(_set(["config", "host", "hidden"], [64])))
    with pytest.raises(EsperError) as info:
        load_checkpoint(ckpt, data)
    assert str(ckpt) in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_state_missing_a_key_is_esper_error(saved_run: Path, tmp_path: Path, data: TaskData) -> None:
    ckpt = _damaged_copy(saved_run, tmp_path, _edit_state(_drop("config")))
    with pytest.raises(EsperError) as info:
        load_checkpoint(ckpt, data)
    assert str(ckpt) in str(info.value)


def test_missing_checkpoint_and_resume_of_damaged_run(saved_run: Path, tmp_path: Path) -> None:
    with pytest.raises(EsperError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    _truncate_model(run / "checkpoint")
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(EsperError) as info:
        run_training(RunConfig(), resume=run, progress=False)
    assert str(run / "checkpoint") in str(info.value)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


# ---- 5. governor ---------------------------------------------------------------------------------
def test_governor_unit() -> None:
    gov = Governor(GovernorConfig(warmup_steps=5, explosion_factor=10.0))
    assert "non-finite" in gov.check(float("nan"))
    assert "non-finite" in gov.check(float("inf"))
    assert "non-finite" in gov.check(float("-inf"))
    assert gov.count == 0 and gov.trips == 3
    assert gov.check(1000.0) == ""  # warm-up: big values set the scale, never trip
    gov = Governor(GovernorConfig(warmup_steps=5, explosion_factor=10.0))
    for _ in range(5):
        assert gov.check(1.0) == ""
    assert gov.mean == pytest.approx(1.0)
    why = gov.check(10.5)
    assert why.startswith("loss explosion") and gov.trips == 1
    assert gov.count == 5 and gov.mean == pytest.approx(1.0)  # a tripped loss does not count
    assert gov.check(9.5) == ""  # below factor x mean
    # A healthy, decreasing loss curve never trips.
    gov = Governor(GovernorConfig(warmup_steps=5, explosion_factor=3.0))
    assert all(gov.check(2.3 * math.exp(-i / 50) + 0.05 * (i % 3)) == "" for i in range(500))
    assert gov.trips == 0
    state = gov.state_dict()
    other = Governor(GovernorConfig(warmup_steps=5, explosion_factor=3.0))
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.state_dict() == state
    off = Governor(GovernorConfig(enabled=False))
    assert off.check(float("nan")) == "" and off.trips == 0


def _poison(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_a_training_seed_gone_non_finite_is_culled_at_epoch_end_without_touching_the_host(data: TaskData) -> None:
    tr = Trainer(make_cfg("lifecycle.min_training_epochs=5", "training.epochs=10"), data)
    epoch(tr)
    epoch(tr, ControllerAction.germinate("hidden0", "residual_mlp"))
    slot = tr.host.slots["hidden0"]
    assert slot.stage is SeedStage.TRAINING and not slot.seed_diverged
    _poison(slot.seed, float("nan"))
    assert slot.seed_diverged
    # Isolated, a seed gone NaN cannot touch the host: the loss stays finite, no rollback ...
    row = epoch(tr)
    assert row["rolled_back"] == 0.0 and math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    assert all(torch.isfinite(p).all() for p in tr.host.host_state_dict().values())
    # ... and it is culled at the epoch's end, not left to linger until it would blend.
    assert slot.seed is None and slot.stage is SeedStage.CULLED
    cull = next(e for e in tr.events if e["kind"] == "cull")
    assert cull["slot"] == "hidden0" and cull["reason"].startswith("diverged")
    assert optim.group_names(tr.opt) == ["host"]
    assert tr.field_reports[-1].outcome == "culled" and tr.summary()["rollbacks"] == 0


def test_governor_rolls_back_nan_and_culls_the_seed(data: TaskData) -> None:
    tr = Trainer(make_cfg("lifecycle.min_training_epochs=5", "training.epochs=10"), data)
    epoch(tr)
    epoch(tr, ControllerAction.germinate("hidden0", "residual_mlp"))
    slot = tr.host.slots["hidden0"]
    assert slot.stage is SeedStage.TRAINING
    # Blending, a NaN seed reaches the host's output: the governor rolls back and culls it.
    slot.transition(SeedStage.BLENDING)
    _poison(slot.seed, float("nan"))
    good_weights = tr.host.host_state_dict()
    good_opt = host_opt_state(tr)
    step = tr.step

    row = epoch(tr)
    assert row["rolled_back"] == 1.0
    kinds = [e["kind"] for e in tr.events if e["epoch"] >= 1]
    assert "rollback" in kinds and "cull" in kinds
    rollback = next(e for e in tr.events if e["kind"] == "rollback")
    assert "non-finite" in rollback["reason"]
    cull = next(e for e in tr.events if e["kind"] == "cull")
    assert cull["slot"] == "hidden0" and cull["reason"].startswith("governor:")
    assert slot.seed is None and slot.stage in (SeedStage.CULLED, SeedStage.EMBARGOED)
    assert optim.group_names(tr.opt) == ["host"]
    # Nothing trained after the rollback in that epoch: the host is the last good state.
    assert tr.step == step
    assert_tensors_equal(good_weights, tr.host.host_state_dict(), "host after governor rollback")
    assert_opt_states_equal(good_opt, host_opt_state(tr), "host Adam after governor rollback")
    assert tr.field_reports[-1].outcome == "culled"

    for _ in range(2):
        row = epoch(tr)
        assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
        assert math.isfinite(row["val_loss"]) and row["rolled_back"] == 0.0
    assert tr.step == step + 2 * 32
    assert tensors_differ(good_weights, tr.host.host_state_dict())  # later training happened
    assert tr.summary()["rollbacks"] == 1


def test_train_only_restricts_the_host_and_the_rollback_point_follows(data: TaskData) -> None:
    tr = Trainer(make_cfg("training.epochs=10"), data)
    head = list(tr.host.head.parameters())
    frozen = {n: p.detach().clone() for n, p in tr.host.named_parameters() if not n.startswith("head")}
    tr.train_only(head)
    epoch(tr)
    for n, p in tr.host.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} trained although only the head should"
    good_head = [p.detach().clone() for p in head]
    good_opt = host_opt_state(tr)
    assert len(good_opt) == len(head) and all(s for s in good_opt)  # the new optimizer's moments
    tr.train_epoch()  # moves the head and its moments past the rollback point (taken at the epoch end)
    assert not all(torch.equal(a, b) for a, b in zip(good_head, head, strict=True))
    tr.governor_rollback("test")  # back to that point: the new optimizer's state, not the old one's
    assert all(torch.equal(a, b) for a, b in zip(good_head, head, strict=True))
    assert_opt_states_equal(good_opt, host_opt_state(tr), "host Adam after rollback")
    # A seed with its own group, or parameters that are not the host's: one line.
    tr.apply(ControllerAction.germinate("hidden0", "residual_mlp"))
    with pytest.raises(EsperError, match="seeds already train"):
        tr.train_only(head)
    other = Trainer(make_cfg(), data)
    with pytest.raises(EsperError, match="this host's own parameters"):
        other.train_only(head)
    with pytest.raises(EsperError, match="non-empty"):
        other.train_only([])


def test_governor_explosion_in_holding_culls_and_rolls_back_blend(data: TaskData) -> None:
    tr = Trainer(make_cfg("governor.warmup_steps=40", "training.epochs=10"), data)
    epoch(tr)
    epoch(tr, ControllerAction.germinate("hidden1", "residual_mlp"))
    slot = tr.host.slots["hidden1"]
    assert slot.stage is SeedStage.BLENDING
    blend_start = tr.host.host_state_dict()
    epoch(tr)
    epoch(tr)
    assert slot.stage is SeedStage.HOLDING and tr.governor.count >= 40
    with torch.no_grad():  # a seed gone huge: the logits, and the loss, explode
        last = [m for m in slot.seed.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(1e4)
        last.bias.add_(1e4)
    row = epoch(tr)
    assert row["rolled_back"] == 1.0
    rollback = next(e for e in tr.events if e["kind"] == "rollback")
    assert rollback["reason"].startswith("loss explosion")
    assert slot.seed is None and tr.summary()["culls"] == 1
    # The governor cull of a blended seed also undoes the host's adaptation to it.
    assert_tensors_equal(blend_start, tr.host.host_state_dict(), "host after explosion")
    row = epoch(tr)
    assert row["rolled_back"] == 0.0 and 0 < row["train_loss"] < 5


def test_governor_culls_the_seed_whose_weights_went_bad_not_the_youngest(data: TaskData) -> None:
    tr = Trainer(make_cfg("lifecycle.min_training_epochs=5", "training.epochs=10"), data)
    epoch(tr, ControllerAction.germinate("input", "conv1d"))  # the older seed
    epoch(tr, ControllerAction.germinate("hidden1", "lowrank"))  # the youngest seed
    tr.host.slots["input"].transition(SeedStage.BLENDING)  # blending, its output reaches the host
    _poison(tr.host.slots["input"].seed, float("nan"))
    row = epoch(tr)
    assert row["rolled_back"] == 1.0
    assert tr.host.slots["input"].seed is None, "the poisoned seed should be culled"
    assert tr.host.slots["hidden1"].stage is SeedStage.TRAINING, "the healthy seed should live on"


# ---- 6. illegal actions ---------------------------------------------------------------------------
def _expect_illegal(tr: Trainer, action: ControllerAction, *says: str) -> None:
    groups, events = optim.group_names(tr.opt), len(tr.events)
    stages = {n: s.stage for n, s in tr.host.slots.items()}
    assert action not in tr.legal_actions()
    with pytest.raises(EsperError) as info:
        tr.apply(action)
    message = str(info.value)
    assert "\n" not in message and message.startswith("illegal action")
    for word in says:
        assert word in message, message
    # A refused action changes nothing.
    assert optim.group_names(tr.opt) == groups and len(tr.events) == events
    assert {n: s.stage for n, s in tr.host.slots.items()} == stages


def test_illegal_actions_are_refused_with_the_reason(data: TaskData) -> None:
    tr = Trainer(make_cfg("lifecycle.min_improvement=0.5", "lifecycle.alpha.steps=32"), data)
    epoch(tr)
    _expect_illegal(tr, ControllerAction.germinate("hidden9", "norm"), "unknown slot", "hidden9")
    _expect_illegal(tr, ControllerAction.germinate("input", "nope"), "'nope'", "candidates")
    _expect_illegal(tr, ControllerAction.germinate("input", "conv2d"), "does not fit", "conv2d")
    _expect_illegal(tr, ControllerAction.fossilize("input"), "DORMANT", "not HOLDING")
    _expect_illegal(tr, ControllerAction.cull("hidden0"), "no live seed")
    _expect_illegal(tr, ControllerAction.cull("nowhere"), "unknown slot")
    tr.apply(ControllerAction.germinate("hidden1", "residual_mlp"))
    _expect_illegal(tr, ControllerAction.germinate("hidden1", "lowrank"), "TRAINING", "not DORMANT")
    _expect_illegal(tr, ControllerAction.fossilize("hidden1"), "TRAINING", "not HOLDING")
    epoch(tr)
    epoch(tr)
    epoch(tr)
    assert tr.host.slots["hidden1"].stage is SeedStage.HOLDING
    # The fossilize gate: contribution must reach lifecycle.min_improvement (0.5: never here).
    _expect_illegal(tr, ControllerAction.fossilize("hidden1"), "contribution", "below")

    tight = Trainer(make_cfg("blueprints.max_seed_params=50"), data)
    _expect_illegal(tight, ControllerAction.germinate("input", "residual_mlp"), "over the budget", "50")
    offered = [a for a in tight.legal_actions() if a.kind is ActionKind.GERMINATE]
    costs = [tight.seed_cost(tight.catalogue.resolve(a.blueprint), tight.host.slots[a.slot]) for a in offered]
    assert all(c is not None and c <= 50 for c in costs), costs  # only what fits the budget is offered

    only = Trainer(make_cfg("blueprints.names=[norm,lowrank]"), data)
    _expect_illegal(only, ControllerAction.germinate("input", "conv1d"), "conv1d", "candidates")


def test_a_gated_blueprint_is_offered_only_where_its_gate_can_read(data: TaskData) -> None:
    """legal_actions and apply agree on the gate's vector-slot rule: no gated germination is offered
    in a sequence slot, and asking for one is refused with the reason."""
    from esper_ray.blueprints import LocalCatalogue, named_blueprint
    from esper_ray.kasmina.gate import gated_blueprint

    gated = gated_blueprint(named_blueprint("residual_mlp"))
    catalogue = LocalCatalogue([gated, named_blueprint("conv1d")])
    mlp = Trainer(make_cfg(), data, catalogue=catalogue)
    mlp.refresh_candidates()
    assert {a.slot for a in mlp.legal_actions() if a.blueprint == gated.name} == set(mlp.host.slots)
    cnn = Trainer(make_cfg("host.kind=cnn1d", "host.hidden=[8,8]"), data, catalogue=catalogue)
    cnn.refresh_candidates()
    seq_slots = [s.name for s in cnn.host.slots.values() if len(s.shape) > 1]
    assert seq_slots
    offered = {a.slot for a in cnn.legal_actions() if a.blueprint == gated.name}
    assert not offered & set(seq_slots)
    _expect_illegal(cnn, ControllerAction.germinate(seq_slots[0], gated.name), "a gated blend reads one vector")


def test_germination_budget_is_spent_by_germinations_and_not_refunded_by_culls(data: TaskData) -> None:
    tr = Trainer(make_cfg("controller.max_germinations=2"), data)
    epoch(tr, ControllerAction.germinate("input", "conv1d"))
    epoch(tr, ControllerAction.cull("input"))
    assert tr.germinations == 1
    epoch(tr, ControllerAction.germinate("hidden0", "residual_mlp"))
    assert not any(a.kind is ActionKind.GERMINATE for a in tr.legal_actions())  # open slots, no budget
    _expect_illegal(tr, ControllerAction.germinate("hidden1", "lowrank"), "germination budget (2) is spent")
    assert ControllerAction.cull("hidden0") in tr.legal_actions()  # the budget limits only germination


def test_every_legal_action_applies(data: TaskData) -> None:
    """For a few epochs, every action legal_actions() offers applies cleanly (on a copy)."""
    tr = Trainer(make_cfg("training.epochs=10", "lifecycle.min_improvement=-1.0"), data)
    rng = random.Random(0)
    seen: set[ActionKind] = set()
    for _ in range(10):
        legal = tr.legal_actions()
        assert legal[0] == WAIT and len(set(legal)) == len(legal)
        for action in legal:
            assert tr.why_illegal(action) == ""
            trial = copy.deepcopy(tr)
            trial.apply(action)
            seen.add(action.kind)
            if action.kind is not ActionKind.WAIT:
                stage = trial.host.slots[action.slot].stage
                expected = {
                    ActionKind.GERMINATE: SeedStage.TRAINING,
                    ActionKind.FOSSILIZE: SeedStage.FOSSILIZED,
                    ActionKind.CULL: SeedStage.CULLED,
                }[action.kind]
                assert stage is expected, f"{action}: slot is {stage.name}"
                n_groups = len(trial.opt.param_groups)
                live = sum(s.seed is not None for s in trial.host.slots.values())
                assert n_groups == 1 + live
        moves = [a for a in legal if a.kind is not ActionKind.WAIT]
        choice = rng.choice(moves) if moves and rng.random() < 0.7 else WAIT
        epoch(tr, choice)
    assert seen == set(ActionKind), f"the walk never offered {set(ActionKind) - seen}"


def test_random_controller_walk_only_takes_legal_actions(data: TaskData) -> None:
    cfg = make_cfg("training.epochs=12", "controller.kind=random", "controller.p_act=1.0")
    tr = Trainer(cfg, data)
    controller = make_controller(cfg.controller, seed=3)
    taken = []
    while not tr.done:
        tr.train_epoch()
        legal = tr.legal_actions()
        action = tr.apply_decision(controller)
        assert action in legal
        taken.append(action)
        tr.end_epoch(action)
    assert sum(a.kind is not ActionKind.WAIT for a in taken) >= 6
    assert all(math.isfinite(r["val_loss"]) for r in tr.history)


# ---- 7. the run folder ---------------------------------------------------------------------------
def test_run_folder_contents(tmp_path: Path, data: TaskData, key_path: Path) -> None:
    cfg = make_cfg("training.epochs=8", "lifecycle.min_improvement=-1.0")
    plan = {
        1: ControllerAction.germinate("input", "conv1d"),
        2: ControllerAction.germinate("hidden0", "lowrank"),
        3: ControllerAction.cull("hidden0"),
        4: fossilize_or_cull("input"),
    }
    out = tmp_path / "run"
    result = run_training(cfg, out=out, controller=Scripted(plan), data=data, progress=False)
    assert result.run_dir == out
    names = {p.name for p in out.iterdir()}
    assert {
        "config.yaml",
        "metrics.parquet",
        "seed_events.parquet",
        "field_reports.parquet",
        "lineage.parquet",
        "lineage.sig.json",
        "checkpoint",
        "report.png",
        "summary.json",
    } <= names
    assert not [n for n in names if n.endswith((".tmp", ".old"))]
    assert load_config(out / "config.yaml") == cfg

    metrics = read_rows(out / "metrics.parquet")
    assert [r["epoch"] for r in metrics] == list(range(1, 9))
    for r in metrics:
        assert {"epoch", "val_acc", "test_acc", "total_params", "action"} <= r.keys()
        assert 0.0 <= r["val_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
        assert r["total_params"] == r["host_params"] + r["seed_params"]
    assert [r["action"] for r in metrics[:4]] == [
        "germinate(input, conv1d)",
        "germinate(hidden0, lowrank)",
        "cull(hidden0)",
        "fossilize(input)",
    ]
    assert metrics[-1]["total_params"] > metrics[0]["host_params"]  # the fossil stays

    events = read_rows(out / "seed_events.parquet")
    kinds = [e["kind"] for e in events]
    assert kinds.count("germinate") == 2 and kinds.count("cull") == 1 and kinds.count("fossilize") == 1
    reports = read_rows(out / "field_reports.parquet")
    assert sorted((r["slot"], r["outcome"]) for r in reports) == [
        ("hidden0", "culled"),
        ("input", "fossilized"),
    ]
    assert all(r["run_id"] == result.trainer.run_id for r in reports)

    ckpt = out / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} == {
        "model.safetensors",
        "optimizer.safetensors",
        "trainer.safetensors",
        "state.json",
    }
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 8
    assert (summary["germinations"], summary["culls"], summary["fossilizations"]) == (2, 1, 1)
    assert summary["final_test_acc"] == metrics[-1]["test_acc"]
    assert summary["architecture"]["input"]["stage"] == "FOSSILIZED"

    report = verify_run(out, key_path)
    assert report.ok, report.message

    # A second run into the same folder is refused and leaves every file as it was.
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    with pytest.raises(EsperError, match="not empty"):
        run_training(cfg, out=out, data=data, progress=False)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before


# ---- 8. baseline controllers --------------------------------------------------------------------
def _slot(name: str, index: int, stage: SeedStage = SeedStage.DORMANT, **kw: Any) -> SlotTelemetry:
    values = dict(
        name=name,
        index=index,
        stage=stage,
        alpha=1.0 if stage is SeedStage.HOLDING else 0.0,
        epochs_in_stage=2,
        blueprint=None if stage is SeedStage.DORMANT else "lowrank",
        seed_params=0 if stage is SeedStage.DORMANT else 100,
        act_mean=0.5,
        act_std=1.0,
        act_dead_frac=0.0,
        act_effective_rank=0.9,
        host_grad_norm=1.0,
        seed_grad_norm=0.0,
        contribution=0.0,
        grad_rms=0.1,
        grad_predictability=0.0,
        kind="vector",
        width=64,
    )
    values.update(kw)
    return SlotTelemetry(**values)


def _obs(slots: list[SlotTelemetry], plateau: int = 5) -> Observation:
    glob = GlobalTelemetry(
        epoch=10,
        max_epochs=60,
        train_loss=1.0,
        val_loss=1.1,
        val_accuracy=0.6,
        best_val_accuracy=0.61,
        plateau_epochs=plateau,
        host_params=7000,
        seed_params=sum(s.seed_params for s in slots),
    )
    return Observation(glob, slots, ["residual_mlp", "lowrank"])


def _germinations(*slots: str) -> list[ControllerAction]:
    return [ControllerAction.germinate(s, b) for s in slots for b in ("residual_mlp", "lowrank")]


def test_heuristic_germinates_at_the_strongest_bottleneck_on_a_plateau() -> None:
    slots = [
        _slot("input", 0, host_grad_norm=1.0, act_effective_rank=0.9),  # score 0.6 + 0.1
        _slot("hidden0", 1, host_grad_norm=3.0, act_effective_rank=0.5),  # score 1.8 + 0.5
        _slot("hidden1", 2, host_grad_norm=1.0, act_effective_rank=0.2),  # score 0.6 + 0.8
    ]
    scores = HeuristicController.bottleneck_scores(slots)
    assert scores == pytest.approx({"input": 0.7, "hidden0": 2.3, "hidden1": 1.4})
    legal = [WAIT, *_germinations("input", "hidden0", "hidden1")]
    ctl = HeuristicController(plateau_patience=3, cull_below=0.0)
    assert ctl.act(_obs(slots, plateau=2), legal) == WAIT  # not a plateau yet
    assert ctl.act(_obs(slots), legal) == ControllerAction.germinate("hidden0", "residual_mlp")
    # Same plateau again (say the seed was culled): the next untried blueprint.
    assert ctl.act(_obs(slots), legal) == ControllerAction.germinate("hidden0", "lowrank")
    assert ctl.state_dict() == {"tried": {"hidden0": ["residual_mlp", "lowrank"]}}
    # Only open slots count: hidden0 closed -> the next best score (hidden1).
    legal_no_h0 = [WAIT, *_germinations("input", "hidden1")]
    fresh = HeuristicController(3, 0.0)
    assert fresh.act(_obs(slots), legal_no_h0) == ControllerAction.germinate("hidden1", "residual_mlp")
    # Collapse alone decides when gradients are equal.
    flat = [_slot("input", 0, act_effective_rank=0.1), _slot("hidden0", 1, act_effective_rank=0.95)]
    assert HeuristicController(3, 0.0).act(_obs(flat), [WAIT, *_germinations("input", "hidden0")]) == (
        ControllerAction.germinate("input", "residual_mlp")
    )
    # A live seed anywhere: wait for it.
    busy = [*slots[:2], _slot("hidden1", 2, SeedStage.TRAINING)]
    assert HeuristicController(3, 0.0).act(_obs(busy), [WAIT, *_germinations("input", "hidden0")]) == WAIT
    # Nothing can germinate: wait.
    assert HeuristicController(3, 0.0).act(_obs(slots), [WAIT]) == WAIT


def test_heuristic_grows_before_the_first_layer_that_loses_information() -> None:
    # input's downstream deficit > 0: the layer after it drops what the loss needs, so the seed
    # belongs at input even though hidden1's predictability reads highest (the input-slot case).
    slots = [
        _slot("input", 0, grad_predictability=0.05, grad_deficit=0.02),
        _slot("hidden0", 1, grad_predictability=0.08, grad_deficit=0.03),
        _slot("hidden1", 2, grad_predictability=0.09),
    ]
    legal = [WAIT, *_germinations("input", "hidden0", "hidden1")]
    assert HeuristicController.choose_slot(slots) == "input"
    assert HeuristicController(3, 0.0).act(_obs(slots), legal) == ControllerAction.germinate("input", "residual_mlp")
    # input closed: the first *open* slot with a positive deficit.
    assert HeuristicController(3, 0.0).act(_obs(slots), [WAIT, *_germinations("hidden0", "hidden1")]) == (
        ControllerAction.germinate("hidden0", "residual_mlp")
    )
    # No positive deficit anywhere: the strongest predictability (above the signal floor).
    flat = [_slot(s.name, s.index, grad_predictability=s.grad_predictability, grad_deficit=-0.01) for s in slots]
    assert HeuristicController.choose_slot(flat) == "hidden1"


def test_heuristic_fossilizes_or_culls_holding_seeds() -> None:
    ctl = HeuristicController(plateau_patience=3, cull_below=0.01)
    good = [_slot("input", 0), _slot("hidden0", 1, SeedStage.HOLDING, contribution=0.05)]
    legal = [WAIT, ControllerAction.fossilize("hidden0"), ControllerAction.cull("hidden0")]
    assert ctl.act(_obs(good), legal) == ControllerAction.fossilize("hidden0")
    # Fossilize not legal yet (gate closed): a contributing seed is kept, not culled.
    assert ctl.act(_obs(good), [WAIT, ControllerAction.cull("hidden0")]) == WAIT
    for contribution in (0.01, 0.0, -0.2):  # at or below cull_below: cull
        weak = [_slot("input", 0), _slot("hidden0", 1, SeedStage.HOLDING, contribution=contribution)]
        assert ctl.act(_obs(weak), legal) == ControllerAction.cull("hidden0")
        assert ctl.act(_obs(weak), [WAIT, ControllerAction.cull("hidden0")]) == ControllerAction.cull("hidden0")
    # A weak seed still blending is given time.
    blending = [_slot("input", 0), _slot("hidden0", 1, SeedStage.BLENDING, contribution=-0.1)]
    assert ctl.act(_obs(blending), [WAIT, ControllerAction.cull("hidden0")]) == WAIT


def test_static_and_random_controllers() -> None:
    slots = [_slot("input", 0), _slot("hidden0", 1)]
    legal = [WAIT, *_germinations("input", "hidden0")]
    static = StaticController()
    assert all(static.act(_obs(slots, plateau=p), legal) == WAIT for p in range(10))
    never = RandomController(p_act=0.0, seed=1)
    assert all(never.act(_obs(slots), legal) == WAIT for _ in range(200))
    always = RandomController(p_act=1.0, seed=1)
    picks = [always.act(_obs(slots), legal) for _ in range(200)]
    assert all(p != WAIT and p in legal for p in picks)
    assert len(set(picks)) == len(legal) - 1  # uniform over the moves: all of them show up
    assert always.act(_obs(slots), [WAIT]) == WAIT  # no move: wait
    # Same seed, same choices; the RNG state round-trips through JSON.
    a, b = RandomController(0.5, seed=7), RandomController(0.5, seed=7)
    assert [a.act(_obs(slots), legal) for _ in range(20)] == [b.act(_obs(slots), legal) for _ in range(20)]
    state = json.loads(json.dumps(a.state_dict()))
    c = RandomController(0.5, seed=99)
    c.load_state_dict(state)
    assert [a.act(_obs(slots), legal) for _ in range(20)] == [c.act(_obs(slots), legal) for _ in range(20)]


def test_evaluate_gives_the_cross_entropy_and_accuracy_of_their_definitions() -> None:
    trainer = Trainer(RunConfig(task={"family": "mnist1d", "seed": 0, "n_train": 400}, lineage={"enabled": False}))
    trainer.train_epoch()
    x, y = trainer.data.x_val, trainer.data.y_val
    with torch.no_grad():
        trainer.host.eval()
        logits = trainer.host(x)
        trainer.host.train()
    loss, acc = trainer.evaluate(x, y, chunk=128)  # several chunks
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert acc == int((logits.argmax(1) == y).sum()) / len(y)
    assert trainer.host.training  # evaluate leaves the host in train mode


def _full_state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """What a rollback point must hold: fresh clones of the model's and the optimizer's state."""
    opt = trainer.opt.state_dict()
    model = {k: v.clone() for k, v in trainer.host.state_dict().items()}
    return model, optim.clone_opt_state(opt)


def _assert_point_holds(point: optim.RollbackPoint, model: dict, opt: dict, what: str) -> None:
    assert_tensors_equal(point.model, model, f"{what}: model")
    assert point.opt_state["state"].keys() == opt["state"].keys(), what
    for i in opt["state"]:
        assert_tensors_equal(point.opt_state["state"][i], opt["state"][i], f"{what}: optimizer state {i}")
    assert point.opt_state["param_groups"] == opt["param_groups"], what


def test_rollback_point_refills_in_place_and_follows_every_change_of_layout(data: TaskData) -> None:
    trainer = Trainer(make_cfg("training.epochs=20"), data)
    point = trainer._good
    epoch(trainer)
    copies = list(point._copies)
    for step in range(2):  # nothing changed shape: the same copies, refilled with the new values
        epoch(trainer)
        _assert_point_holds(point, *_full_state(trainer), f"wait {step}")
        assert all(a is b for a, b in zip(point._copies, copies, strict=True))
    for p in trainer.opt.param_groups[0]["params"]:  # the copies never alias the live tensors
        assert all(c.data_ptr() != p.data_ptr() for c in point._copies)
    trainer.opt.param_groups[0]["lr"] = 5e-4  # a hyperparameter moved: the point follows
    trainer.remember_good()
    assert point.opt_state["param_groups"][0]["lr"] == 5e-4
    # A seed's whole life: it joins (a new group, no state yet), takes its first steps (new
    # moments), blends, and is culled (its group leaves; the host is restored from its snapshot).
    epoch(trainer, ControllerAction.germinate("hidden0", "residual_mlp"))
    _assert_point_holds(point, *_full_state(trainer), "germinated")
    assert any(k.startswith("slots.hidden0.") for k in point.model)
    for step in range(4):
        epoch(trainer)
        _assert_point_holds(point, *_full_state(trainer), f"seed epoch {step} ({trainer.host.slots['hidden0'].stage})")
    epoch(trainer, ControllerAction.cull("hidden0"))
    _assert_point_holds(point, *_full_state(trainer), "culled")
    assert not any(k.startswith("slots.hidden0.") for k in point.model)
    # Restoring gives back exactly what was taken, after more training moved everything.
    model, opt = _full_state(trainer)
    trainer.train_epoch()
    point.restore()
    _assert_point_holds(point, *_full_state(trainer), "restored")
    assert_tensors_equal({k: v.clone() for k, v in trainer.host.state_dict().items()}, model, "restored model")
    trainer.remember_good()  # the restore replaced the optimizer's state: a full take again
    _assert_point_holds(point, *_full_state(trainer), "after restore")


def test_gradient_norms_are_those_of_the_last_batch_and_follow_the_seeds(data: TaskData) -> None:
    trainer = Trainer(make_cfg(), data)

    def norm(module: torch.nn.Module) -> float:
        return float(torch.cat([p.grad.flatten() for p in module.parameters()]).norm())

    for action in (WAIT, ControllerAction.germinate("hidden0", "residual_mlp"), WAIT):
        epoch(trainer, action)  # the gradients of the epoch's last batch are still held
        reported = {s.name: s.host_grad_norm for s in trainer.observe().slots}  # the probe leaves .grad alone
        for slot in trainer.host.slots.values():
            assert reported[slot.name] == pytest.approx(norm(trainer.host.consumer(slot)), rel=1e-5)
    seeded = trainer.host.slots["hidden0"]
    assert seeded.stage.is_live and seeded.seed_grad_norm == pytest.approx(norm(seeded.seed), rel=1e-5)
    epoch(trainer, ControllerAction.cull("hidden0"))
    assert seeded.seed is None and seeded.seed_grad_norm == 0.0


# ---- the public boundary ------------------------------------------------------------------------
def test_state_dict_round_trips_the_trainers_own_state(data: TaskData) -> None:
    a = Trainer(make_cfg(), data)
    for action in (WAIT, ControllerAction.germinate("hidden0", "residual_mlp"), WAIT):
        a.observe()
        epoch(a, action)
    a.observe()
    assert a.host.slots["hidden0"].stage in (SeedStage.BLENDING, SeedStage.HOLDING)  # blended: a snapshot is kept
    state = a.state_dict()
    blend = state.pop("blend_snapshots")
    assert list(blend) == ["hidden0"] and isinstance(blend["hidden0"], optim.HostSnapshot)
    text = json.dumps(state)  # everything but the snapshots is JSON
    assert state["probe_epoch"] == a.epoch and set(state["probe_signals"]) == {"input", "hidden0", "hidden1"}
    b = Trainer(make_cfg(), data)
    b.load_state_dict({**json.loads(text), "blend_snapshots": blend})
    again = b.state_dict()
    assert again.pop("blend_snapshots")["hidden0"] is blend["hidden0"]
    assert json.loads(json.dumps(again)) == json.loads(text)
    assert (b.epoch, b.step, b.germinations) == (a.epoch, a.step, 1)
    assert not b.observer.is_stale(b.epoch, len(b.events))  # the signals carried over are used as they are
    # A state from before the probe fields (older checkpoints): the next observation measures them.
    old = Trainer(make_cfg(), data)
    old.load_state_dict({k: v for k, v in json.loads(text).items() if not k.startswith("probe_")})
    assert old.observer.is_stale(old.epoch, len(old.events)) and old.state_dict()["blend_snapshots"] == {}


def test_set_task_points_the_run_at_new_data_of_the_same_shape(data: TaskData) -> None:
    trainer = Trainer(make_cfg("training.probe_size=64"), data)
    epoch(trainer)
    trainer.observe()
    flipped = dataclasses.replace(  # another task of the same shape: fewer examples, validation reversed
        data,
        name="flipped",
        x_train=data.x_train[:500],
        y_train=data.y_train[:500],
        x_val=data.x_val.flip(0),
        y_val=data.y_val.flip(0),
    )
    trainer.set_task(flipped)
    assert trainer.data is flipped and torch.equal(trainer.probe_x, flipped.x_val[:64])
    assert torch.equal(trainer.probe_y, flipped.y_val[:64])
    assert (trainer.best_val, trainer.plateau, trainer.last) == (0.0, 0, {})
    assert trainer.observer.is_stale(trainer.epoch, len(trainer.events))  # measured again on the new probe batch
    assert trainer.observe().task_features == flipped.features() != data.features()
    fewer = dataclasses.replace(data, num_classes=data.num_classes - 1)
    with pytest.raises(EsperError, match="does not fit this host"):
        trainer.set_task(fewer)
    assert trainer.data is flipped


def test_absorb_and_seed_lr_through_the_trainer(data: TaskData) -> None:
    trainer = Trainer(make_cfg("lifecycle.alpha.steps=1"), data)
    epoch(trainer, ControllerAction.germinate("hidden0", "residual_mlp"))
    with pytest.raises(EsperError, match="live seed"):
        trainer.absorb_fossilized()
    trainer.set_seed_lr("hidden0", 0.0)
    seed_group = next(g for g in trainer.opt.param_groups if g["name"] == optim.seed_group_name("hidden0"))
    assert seed_group["lr"] == 0.0
    with pytest.raises(EsperError, match="no seed"):
        trainer.set_seed_lr("hidden1", 0.1)
    while trainer.why_illegal(ControllerAction.fossilize("hidden0")):
        epoch(trainer)
    epoch(trainer, ControllerAction.fossilize("hidden0"))
    seed = trainer.host.slots["hidden0"].seed
    x = data.x_val[:32]
    with torch.no_grad():
        before = trainer.host.eval()(x)
    trainer.host.train()
    assert trainer.absorb_fossilized() == 1
    with torch.no_grad():
        assert torch.equal(trainer.host.eval()(x), before)
    trainer.host.train()
    assert optim.group_names(trainer.opt) == ["host"]
    host_params = trainer.opt.param_groups[0]["params"]
    assert all(any(p is q for q in host_params) for p in seed.parameters())
    assert trainer.host.slots["hidden0"].is_open and trainer.absorb_fossilized() == 0
    assert ControllerAction.germinate("hidden0", "residual_mlp") in trainer.legal_actions()


def test_order_candidates_reorders_what_observations_show(data: TaskData) -> None:
    trainer = Trainer(make_cfg(), data)
    names = [e.name for e in trainer.candidates]
    trainer.order_candidates(key=lambda e: e.name)
    assert trainer.observe().candidates == sorted(names)
    trainer.order_candidates(key=lambda e: [-ord(c) for c in e.name])
    obs = trainer.observe()
    assert obs.candidates == sorted(names, reverse=True)
    # The cost table follows the order: column j is candidate j.
    by_name = {e.name: e for e in trainer.candidates}
    slot = trainer.host.slots["hidden0"]
    assert obs.candidate_params[slot.index] == [
        -1 if (c := trainer.seed_cost(by_name[n], slot)) is None else c for n in obs.candidates
    ]


def test_germinating_goes_through_the_catalogues_resolve(data: TaskData) -> None:
    from esper_ray.blueprints import LocalCatalogue

    class Checked(LocalCatalogue):
        """A catalogue whose resolve refuses one blueprint (as a client does on a hash mismatch)."""

        resolved: list[str] = []

        def resolve(self, name_or_hash: str):
            entry = super().resolve(name_or_hash)
            if entry.name == "lowrank":
                raise EsperError("blueprint 'lowrank': content hash does not match its spec")
            self.resolved.append(name_or_hash)
            return entry

    catalogue = Checked()
    trainer = Trainer(make_cfg(), data, catalogue=catalogue)
    entry = next(e for e in trainer.candidates if e.name == "residual_mlp")
    trainer.apply(ControllerAction.germinate("hidden0", "residual_mlp"))
    assert catalogue.resolved == [entry.content_hash]
    with pytest.raises(EsperError, match="content hash"):
        trainer.apply(ControllerAction.germinate("hidden1", "lowrank"))
    assert trainer.host.slots["hidden1"].is_open


def test_probe_puts_the_host_back_in_train_mode_when_it_fails(data: TaskData) -> None:
    trainer = Trainer(make_cfg(), data)

    def broken(x: torch.Tensor):
        raise RuntimeError("boom")

    trainer.host.forward_with_activations = broken
    with pytest.raises(RuntimeError, match="boom"):
        trainer.observe()
    assert trainer.host.training


def test_event_rows_carry_their_kind_as_an_enum_and_count_the_same_read_back(data: TaskData) -> None:
    trainer = Trainer(make_cfg(), data)
    epoch(trainer, ControllerAction.germinate("hidden0", "residual_mlp"))
    epoch(trainer, ControllerAction.cull("hidden0"))
    kinds = [e["kind"] for e in trainer.events]  # germinated, training, ..., culled, embargoed
    assert kinds[0] is EventKind.GERMINATE and kinds.count(EventKind.CULL) == 1
    assert {k for k in kinds if k not in (EventKind.GERMINATE, EventKind.CULL)} == {EventKind.TRANSITION}
    assert all(isinstance(e["kind"], EventKind) for e in trainer.events)
    assert trainer.field_reports[-1].outcome is SeedOutcome.CULLED
    state = trainer.state_dict()
    state.pop("blend_snapshots")
    state = json.loads(json.dumps(state))  # as a checkpoint reads it back: kinds are plain strings
    assert [e["kind"] for e in state["events"]] == [str(k) for k in kinds]
    assert all(type(e["kind"]) is str for e in state["events"])
    again = Trainer(make_cfg(), data)
    again.load_state_dict(state)
    summary = again.summary()
    assert (again.germinations, summary["culls"], summary["fossilizations"]) == (1, 1, 0)
    assert summary["field_reports"][-1]["outcome"] == "culled"
