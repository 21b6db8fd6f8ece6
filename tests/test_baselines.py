"""Baselines that are hard to beat: fixed, best-fixed, replay and the trial heuristic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from esper_ray.config import BestFixedConfig, ControllerConfig, ScheduledAction, TrialConfig
from esper_ray.contracts import (
    ControllerAction,
    EsperError,
    GlobalTelemetry,
    HostContext,
    Observation,
    SeedStage,
    SlotTelemetry,
    TrialResult,
)
from esper_ray.simic.evaluate import (
    EpisodeRun,
    best_fixed_cache_key,
    evaluate_controllers,
    play_episode,
    search_best_fixed,
)
from esper_ray.tamiyo.baselines import (
    BestFixedController,
    BestFixedTable,
    ScheduleController,
    TrialHeuristic,
    modal_sequence,
    replay_schedule,
)
from esper_ray.tamiyo.controllers import HeuristicController, make_controller

G = ControllerAction.germinate
RUN = {
    "host": {"kind": "mlp", "hidden": [64, 64], "slots": "all"},
    "training": {"epochs": 6, "signal_every": 2},
    "lifecycle": {"min_training_epochs": 1, "min_holding_epochs": 1, "alpha": {"steps": 12}},
    "blueprints": {"names": ["residual_mlp", "lowrank"]},
    "lineage": {"enabled": False},
}
TASKS = [
    {"family": "bottleneck", "seed": 100, "bottleneck_slot": 0, "input_dim": 40, "n_samples": 1500},
    {"family": "mnist1d", "seed": 100, "n_train": 600},
]
ENV = {"run": RUN, "train_tasks": TASKS, "heldout_tasks": TASKS}


# ---- constructed observations -------------------------------------------------------------------
def _slot(name: str, index: int, stage: SeedStage = SeedStage.DORMANT, **kw) -> SlotTelemetry:
    base = dict(
        name=name, index=index, stage=stage, alpha=0.0, epochs_in_stage=0, blueprint=None, seed_params=0,
        act_mean=0.0, act_std=1.0, act_dead_frac=0.0, act_effective_rank=0.5, host_grad_norm=1.0,
        seed_grad_norm=0.0, contribution=0.0, grad_rms=1.0, grad_predictability=0.0, kind="vector", width=64,
    )  # fmt: skip
    base.update(kw)
    return SlotTelemetry(**base)


def _obs(slots, candidates=("residual_mlp", "lowrank", "norm"), epoch=1, plateau=0, params=None) -> Observation:
    glob = GlobalTelemetry(epoch, 30, 1.0, 1.0, 0.5, 0.5, plateau, 1000, 0)
    params = params or [[100] * len(candidates) for _ in slots]
    return Observation(glob, list(slots), list(candidates), candidate_params=params)


def _legal(obs: Observation) -> list[ControllerAction]:
    legal = [ControllerAction.wait()]
    for s in obs.slots:
        if s.stage is SeedStage.DORMANT:
            legal += [G(s.name, c) for c in obs.candidates]
        if s.stage is SeedStage.HOLDING:
            legal.append(ControllerAction.fossilize(s.name))
        if s.stage.is_live:
            legal.append(ControllerAction.cull(s.name))
    return legal


class FakeTrials:
    """Gains per (slot, blueprint) as given; records every call."""

    def __init__(self, gains: dict[tuple[str, str], float]):
        self.gain = gains
        self.calls: list[tuple[list, int]] = []

    def trial_candidates(self, candidates, steps, seed_lr_scale=1.0) -> TrialResult:
        self.calls.append((list(candidates), steps))
        return TrialResult(steps, 1.0, {c: 1.0 - self.gain.get(c, 0.0) for c in candidates})


THREE = [_slot("input", 0), _slot("hidden0", 1), _slot("hidden1", 2)]


def test_trial_heuristic_germinates_the_confirmed_best_and_ignores_catalogue_order() -> None:
    gains = {("hidden1", "norm"): 0.30, ("input", "lowrank"): 0.10, ("hidden0", "residual_mlp"): 0.12}
    for candidates in (("residual_mlp", "lowrank", "norm"), ("norm", "lowrank", "residual_mlp")):
        trials = FakeTrials(gains)
        c = TrialHeuristic(trials, TrialConfig(keep=1, screen_steps=5, steps=20, min_gain=0.05))
        obs = _obs(THREE, candidates)
        assert c.act(obs, _legal(obs)) == G("hidden1", "norm")
        (screened, s_steps), (confirmed, c_steps) = trials.calls
        assert (s_steps, c_steps) == (5, 20) and len(screened) == 9
        # keep=1: only each slot's best screened candidate is confirmed
        assert sorted(confirmed) == [("hidden0", "residual_mlp"), ("hidden1", "norm"), ("input", "lowrank")]


def test_trial_heuristic_waits_when_no_seed_removes_enough_loss_and_until_the_next_round() -> None:
    trials = FakeTrials({("hidden0", "lowrank"): 0.02})
    c = TrialHeuristic(trials, TrialConfig(every=3, min_gain=0.05, keep=3))
    obs = _obs(THREE)
    assert c.act(obs, _legal(obs)) == ControllerAction.wait()
    assert len(trials.calls) == 1  # keep >= candidates: no screen, one confirming call
    for epoch in (2, 3):  # decisions 1 and 2: not due, no trial run
        o = _obs(THREE, epoch=epoch)
        assert c.act(o, _legal(o)) == ControllerAction.wait()
    assert len(trials.calls) == 1
    o = _obs(THREE, epoch=4, plateau=0)
    trials.gain[("input", "norm")] = 0.2  # decision 3: a new round, and now a seed helps
    assert c.act(o, _legal(o)) == G("input", "norm")


def test_trial_heuristic_fossilizes_culls_and_waits_while_a_seed_is_live() -> None:
    trials = FakeTrials({("input", "norm"): 0.5})
    c = TrialHeuristic(trials, TrialConfig())
    holding = _slot("hidden0", 1, SeedStage.HOLDING, contribution=-0.005, blueprint="lowrank")
    obs = _obs([THREE[0], holding, THREE[2]])
    assert c.act(obs, _legal(obs)) == ControllerAction.fossilize("hidden0")  # kept: it does not clearly hurt
    useless = _slot("hidden0", 1, SeedStage.HOLDING, contribution=-0.02, blueprint="lowrank")
    obs = _obs([THREE[0], useless, THREE[2]], epoch=2)
    assert c.act(obs, _legal(obs)) == ControllerAction.cull("hidden0")
    assert c.failed == {"hidden0": ["lowrank"]}  # never retried there
    training = _slot("hidden0", 1, SeedStage.TRAINING, blueprint="norm")
    obs = _obs([THREE[0], training, THREE[2]], epoch=3)
    assert c.act(obs, _legal(obs)) == ControllerAction.wait() and not trials.calls
    late = _obs(THREE, epoch=28)  # 2 epochs left < min_epochs_left
    assert c.act(late, _legal(late)) == ControllerAction.wait() and not trials.calls


def test_trial_heuristic_top_slots_trials_the_slots_the_signals_rank_first() -> None:
    slots = [_slot("input", 0), _slot("hidden0", 1, grad_deficit=0.2), _slot("hidden1", 2, grad_predictability=0.5)]
    trials = FakeTrials({("input", "norm"): 0.9, ("hidden1", "lowrank"): 0.1})
    c = TrialHeuristic(trials, TrialConfig(top_slots=2, keep=3))
    obs = _obs(slots)
    assert c.act(obs, _legal(obs)) == G("hidden1", "lowrank")  # input was not trialled
    assert {s for s, _ in trials.calls[0][0]} == {"hidden0", "hidden1"}


# ---- schedules ----------------------------------------------------------------------------------
def test_schedule_resolves_positions_waits_until_due_and_legal_and_fossilizes() -> None:
    c = ScheduleController([ScheduledAction(decision=1, slot=2, blueprint="norm")])
    obs = _obs(THREE, epoch=1)
    assert c.act(obs, _legal(obs)) == ControllerAction.wait()  # decision 0: not due
    busy = [THREE[0], THREE[1], _slot("hidden1", 2, SeedStage.EMBARGOED)]
    obs = _obs(busy, epoch=2)
    assert c.act(obs, _legal(obs)) == ControllerAction.wait()  # due but the slot is not open
    obs = _obs(THREE, epoch=3)
    assert c.act(obs, _legal(obs)) == G("hidden1", "norm")  # played as soon as legal
    holding = _slot("hidden1", 2, SeedStage.HOLDING, blueprint="norm")
    obs = _obs([THREE[0], THREE[1], holding], epoch=4)
    assert c.act(obs, _legal(obs)) == ControllerAction.fossilize("hidden1")
    assert all(a.kind.name != "CULL" for a in [c.act(obs, _legal(obs))])
    c2 = ScheduleController(c.schedule)
    c2.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert c2.played == [True] and c2.counter.decision == c.counter.decision


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"slot": "hidden7", "blueprint": "norm"}, "unknown slot 'hidden7'"),
        ({"slot": 5, "blueprint": "norm"}, "no slot at position 5"),
        ({"slot": "input", "blueprint": "conv9d"}, "unknown blueprint 'conv9d'"),
        ({"slot": 0, "blueprint": "lowrank"}, "does not fit slot input"),
    ],
)
def test_a_schedule_naming_what_the_host_lacks_is_one_error(step, message) -> None:
    c = ScheduleController([ScheduledAction(**step)])
    obs = _obs(THREE, params=[[100, -1, 100], [100, 100, 100], [100, 100, 100]])
    with pytest.raises(EsperError, match=message):
        c.act(obs, _legal(obs))


def test_modal_sequence_and_replay_schedule() -> None:
    a, b = (0, G("input", "norm")), (3, ControllerAction.fossilize("input"))
    other = [(1, G("hidden0", "lowrank"))]
    assert modal_sequence([other, [a, b], [a, b], other[:0]]) == [a, b]
    assert modal_sequence([other, [a]]) == other  # a tie goes to the first seen
    steps = replay_schedule([a, b])
    assert [(s.decision, s.slot, s.blueprint, s.action) for s in steps] == [
        (0, "input", "norm", "germinate"),
        (3, "input", None, "fossilize"),
    ]


def test_best_fixed_table_takes_the_nearest_context_whose_schedule_fits() -> None:
    conv = {"schedule": [{"decision": 0, "slot": 0, "blueprint": "conv1d"}]}
    norm = {"schedule": [{"decision": 0, "slot": 2, "blueprint": "norm"}]}
    table = BestFixedTable({"mlp/2/vector": conv, "mlp/5/vector": norm, "cnn1d/3/seq": {"schedule": []}})
    obs = _obs(THREE)  # candidates: no conv1d
    assert table.choose(HostContext("vector", "mlp", 2), obs)[0] == "mlp/5/vector"  # nearest that fits
    obs = _obs(THREE, candidates=("conv1d", "norm"))
    assert table.choose(HostContext("vector", "mlp", 3), obs)[0] == "mlp/2/vector"
    assert table.choose(HostContext("seq", "cnn1d", 4), obs)[0] == "cnn1d/3/seq"
    with pytest.raises(EsperError, match="bad host context key"):
        HostContext.from_key("mlp-2")


def test_controllers_that_need_the_run_say_so() -> None:
    with pytest.raises(EsperError, match="needs the run"):
        make_controller(ControllerConfig(kind="trial"))
    with pytest.raises(EsperError, match="needs controller.schedule"):
        make_controller(ControllerConfig(kind="fixed"))
    with pytest.raises(EsperError, match="best_fixed.table"):
        make_controller(ControllerConfig(kind="best-fixed"), run=object())


# ---- on a two-task smoke run --------------------------------------------------------------------
def test_fixed_germinates_at_the_scheduled_decision_slot_and_blueprint() -> None:
    schedule = [{"decision": 1, "slot": 1, "blueprint": "lowrank"}]
    rows = evaluate_controllers({"fixed": lambda s: ScheduleController(schedule)}, ENV, seeds=[0])
    assert len(rows) == 2
    for r in rows:
        assert r["actions"][0] == (1, G("hidden0", "lowrank")), r["actions"]
        assert r["germinations"] == 1 and r["culls"] == 0 and r["seconds"] > 0
        assert all(a.kind.name in ("GERMINATE", "FOSSILIZE") for _, a in r["actions"])


def test_replay_reproduces_the_modal_sequence_on_the_same_episodes() -> None:
    controllers = {"heuristic": lambda s: HeuristicController(1, 0.0)}
    rows = evaluate_controllers(controllers, ENV, seeds=[0, 1], replay_of=["heuristic"])
    by = {}
    for r in rows:
        by.setdefault(r["controller"], []).append(r)
    assert set(by) == {"heuristic", "replay(heuristic)"}
    modal = modal_sequence([r["actions"] for r in by["heuristic"]])
    assert modal, "the heuristic grew nothing: the replay test would be empty"
    for h, r in zip(by["heuristic"], by["replay(heuristic)"], strict=True):
        assert (h["task"], h["seed"]) == (r["task"], r["seed"])
        if h["actions"] == modal:  # the episodes the modal sequence came from replay it exactly
            assert r["actions"] == modal
            assert r["final_test_acc"] == h["final_test_acc"]


@pytest.mark.slow
def test_best_fixed_chooses_the_argmax_of_the_grid_and_caches_it(tmp_path) -> None:
    grid = BestFixedConfig(decisions=[0], slots=[0, 1], blueprints=["lowrank"], pair_top=0)
    table, cached = search_best_fixed(ENV, grid, cache=tmp_path)
    assert not cached and list(table.entries) == ["mlp/2/vector"]
    entry = table.entries["mlp/2/vector"]
    # the grid, played independently: no growth, lowrank at the input, lowrank at hidden0
    import envs

    env = envs.MorphogenesisEnv({**ENV, "split": "train"})
    schedules = [[], [ScheduledAction(slot=0, blueprint="lowrank")], [ScheduledAction(slot=1, blueprint="lowrank")]]
    means = [
        np.mean([play_episode(env, ScheduleController(s), t, 0)["final_val_acc"] for t in range(2)]) for s in schedules
    ]
    assert [g["val_acc"] for g in entry["grid"]] == pytest.approx(means)
    best = schedules[int(np.argmax(means))]
    assert entry["schedule"] == [s.model_dump(mode="json") for s in best]
    tuned = {**ENV, "run": {**RUN, "controller": {"trial": {"steps": 7}}}}  # another baseline's settings
    again, cached = search_best_fixed(tuned, grid, cache=tmp_path)
    assert cached and again.entries == json.loads(table.to_json())["contexts"]
    other = {**ENV, "run": {**RUN, "controller": {"max_germinations": 0}}}  # changes what schedules do
    assert best_fixed_cache_key(other, grid) != best_fixed_cache_key(ENV, grid)
    # played on held-out tasks: the chosen schedule, at its slot and decision
    run = EpisodeRun()
    rows = evaluate_controllers({"best-fixed": lambda s: BestFixedController(table, run)}, ENV, [0], run=run)
    for r in rows:
        expected = [(0, G(["input", "hidden0"][s.slot], s.blueprint)) for s in best]
        assert [x for x in r["actions"] if x[1].kind.name == "GERMINATE"] == expected


def test_trainer_trials_leave_the_run_untouched_and_context_comes_from_the_host() -> None:
    import torch

    import envs

    env = envs.MorphogenesisEnv({**ENV, "split": "heldout"})
    env.reset(seed=0, options={"task_index": 1, "train_seed": 0})
    trainer = env.trainer
    assert trainer.host_context() == HostContext("vector", "mlp", 2)
    before = {k: v.clone() for k, v in trainer.host.state_dict().items()}
    gen_state = trainer.gen.get_state()
    result = trainer.trial_candidates([("input", "lowrank"), ("hidden1", "residual_mlp")], steps=5, seed_lr_scale=10)
    assert set(result.losses) == {("input", "lowrank"), ("hidden1", "residual_mlp")}
    assert np.isfinite(result.control_loss) and all(np.isfinite(v) for v in result.losses.values())
    after = trainer.host.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(gen_state, trainer.gen.get_state())
    again = trainer.trial_candidates([("input", "lowrank")], steps=5, seed_lr_scale=10)
    assert again.losses[("input", "lowrank")] == result.losses[("input", "lowrank")]  # deterministic
    with pytest.raises(EsperError, match="not a germination allowed now"):
        trainer.trial_candidates([("input", "conv9d")], steps=1)


def test_trial_and_fixed_run_inside_esper_ray_train(tmp_path) -> None:
    from esper_ray.config import load_config
    from esper_ray.tolaria.run import run_training

    base = [
        "task.family=mnist1d", "task.n_train=400", "training.epochs=6", "lineage.enabled=false",
        "lifecycle.min_training_epochs=1", "lifecycle.min_holding_epochs=1", "lifecycle.alpha.steps=8",
        "blueprints.names=[norm,lowrank]",
    ]  # fmt: skip
    cfg = load_config(
        None, [*base, "controller.kind=fixed", "controller.schedule=[{decision: 1, slot: 2, blueprint: norm}]"]
    )
    result = run_training(cfg, out=tmp_path / "fixed", progress=False)
    germinated = [e for e in result.trainer.events if e["kind"] == "germinate"]
    assert [(e["epoch"], e["slot"], e["blueprint"]) for e in germinated] == [(2, "hidden1", "norm")]  # decision 1
    cfg = load_config(None, [*base, "controller.kind=trial", "controller.trial.min_gain=-1", "controller.trial.steps=4",
                             "controller.trial.screen_steps=2", "controller.trial.min_epochs_left=1"])  # fmt: skip
    result = run_training(cfg, out=tmp_path / "trial", progress=False)
    assert result.summary["germinations"] >= 1  # min_gain -1: the first round always grows its best trial
