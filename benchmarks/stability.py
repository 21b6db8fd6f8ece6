"""Stability: the original task's accuracy after 20+ germinations spent adapting to new tasks.

Run from the repository root::

    .venv/bin/python benchmarks/stability.py [--seeds 3] [--scenarios shift,permuted] [--json PATH]
    .venv/bin/python benchmarks/stability.py --quick        # 1 seed, "shift" only: about a minute

The design's target: "performance degradation on original tasks of less than
5% after numerous (20+) successful germination events". Protocol, per seed ``s`` (host
weights, data order and the task shifts all follow ``s``):

1. Original task: MNIST-1D generated with seed ``s`` (3,200 train / 800 val / 1,000 test).
   An MLP 40-64-64-10 host (slots ``input``, ``hidden0``, ``hidden1``) trains ``--pretrain``
   epochs (default 40, Adam 1e-3, batch 100) with no seeds. A0 = its test accuracy on the
   original task, V0 = its validation accuracy.
2. A sequence of adaptation tasks t = 1, 2, ...: fresh MNIST-1D samples (generation seed
   ``100 + t``, its own train/val/test split, the same 10 labels) seen through a fixed,
   task-specific input shift drawn from ``(s, t)``: a permutation of some of the 40 features,
   a per-feature gain in [0.75, 1.25] and offset ~ N(0, 0.25), and Gaussian noise (std 0.25,
   drawn once per example). Two scenarios: ``shift`` permutes 10 of the 40 features (a
   moderate domain shift), ``permuted`` all 40 (permuted-MNIST style, where full fine-tuning is
   known to forget); BENCHMARKS.md gives the pretrained host's accuracy on both. The Trainer's
   data is swapped in place (``trainer.data``; the probe batch, task features and best-val /
   plateau counters are reset with it).
3. Each task gets up to ``--epochs-per-task`` epochs (default 8). A scripted controller drives
   the lifecycle with ``trainer.apply``: at the first decision point of a task a seed
   germinates in every open slot (``residual_mlp`` at ``input`` and ``hidden0``, ``lowrank``
   at ``hidden1``); one epoch isolated (TRAINING), one epoch of alpha ramp (BLENDING), then
   HOLDING at alpha 1. A holding seed is fossilized as soon as the gate is open (its measured
   contribution on the *new task's validation split*, val accuracy with it minus with it
   ablated, is > 0), and culled if the gate is still closed after 3 epochs of holding or
   when the task ends. Seeds train only on the new task's training split. At the end of the
   task every fossilized seed is *absorbed* into the host (the host block before its slot
   becomes ``Sequential(block, seed)``, its weights join the host's param group), so its slot
   is open again on the next task. The sequence goes on until the arm has fossilized
   ``--min-fossils`` seeds (default 20) and seen at least ``--tasks`` tasks (default 8), at
   most ``--max-tasks`` (default 20). Arms:

   * ``frozen`` (the design's protocol, no replay): ``training.freeze_host: true`` (the host's
     param group has lr 0), and a seed freezes too when it fossilizes: only live seeds ever
     train. Nothing in this arm sees the original task's data after step 1.
   * ``guarded``: the same, plus a do-no-harm check at fossilization: the original task's
     *validation* accuracy with this seed (live seeds in other slots ablated) must be at
     least V0 - 0.02, else the seed is not fossilized (and is culled after 3 epochs). The
     original task's test split is never used for a decision.
   * ``replay_only``: ``frozen`` plus rehearsal. The run keeps a bounded sample of the original
     task's *training* split (``--sample``, default 160 examples = 5%, drawn once from ``s`` by
     ``esper_ray.tolaria.continual.BoundedSample``, a reservoir that never grows past its bound
     and never sees the validation or test split; it lives in memory inside the loss function);
     every training step on a new task uses the new task's batch of 100 concatenated with 100
     examples drawn from the sample (``continual.Rehearsal``, the Trainer's ``loss_fn``: one
     cross-entropy over the 200), so live seeds are trained not to disturb the original
     mapping. The lifecycle, gates and epochs are those of ``frozen``.
   * ``gated`` (the summary's figure): ``replay_only`` with *gated* seeds
     (``residual_mlp.gated``, ``lowrank.gated``; ``esper_ray.kasmina.gate``): each seed's change
     is multiplied by a learned per-example gate ``g(h) = sigmoid(MLP(h))`` of the slot's input
     (hidden width 16), so the slot gives ``h + g(h) * alpha * (seed(h) - h)``. The loss
     (``continual.GateRehearsal``) adds the gates' objective, weight ``--gate-weight`` (5):
     binary cross-entropy pushing each gate to 1 on the new task's batch and to 0 on the
     sample's batch (the slot's input read without gradient). A fossilized seed trains on until
     its task ends (it freezes when absorbed). At test time nothing tells the network which
     task an input comes from: the gates read the activations.
   * ``replay``: ``replay_only`` plus the guard of ``guarded``. This arm
     uses original-task data twice: 160 training examples for rehearsal, the validation split
     for the guard; never its test split.
   * ``routed`` (an upper bound, trivial by construction): ``frozen``, but the task identity is
     given at test time (the task-incremental setting of adapters and progressive nets): an
     absorbed seed acts only on its own task's inputs (``Routed``: the identity otherwise). On
     the original task no absorbed seed acts, so A_end = A0 exactly; its new-task gain is what
     this lifecycle can learn with no interference at all.
   * ``trainable``: seeds as in ``frozen``, but the host (and the seeds absorbed into it,
     and fossilized seeds) train on each new task too (lr 1e-3): esper's default mode.
   * ``replay_trainable``: ``trainable`` with the rehearsal of ``replay_only``.
   * ``finetune``: no seeds; every host weight trains on each new task, same epochs per task,
     as many tasks as the ``frozen`` arm needed for this seed: the classic forgetting baseline.
   * ``ewc``: ``finetune`` plus elastic weight consolidation (``continual.FisherPenalty``):
     ``lambda / 2 * sum F_i (theta_i - theta*_i)^2`` over the host's weights, ``F`` the diagonal
     empirical Fisher of the original task measured right after pretraining on 1,000 of its
     training examples (only ``F`` and ``theta*`` are kept), ``--ewc-lambda`` 100 (chosen in trial
     runs between a lambda that learnt nothing new and one that forgot; BENCHMARKS.md, section 2).

4. The accuracy matrix (``continual.AccuracyMatrix``): after every task, the test accuracy on
   every task seen so far (the original one included), and each new task's test accuracy just
   before its adaptation. From it: A_end = the original task's accuracy after the last task
   (the same 1,000 test examples as A0); degradation = (A0 - A_end) / A0 (backward transfer on
   the original task, relative); average accuracy over every task seen after the last one;
   backward transfer on the earlier new tasks (accuracy after the last task - accuracy right
   after its own adaptation, mean over tasks); new-task gain (accuracy after - before each
   adaptation, mean over tasks: a stable arm that learned nothing shows up here). Also
   reported: tasks, germinations, fossilizations (= successful germinations) and culls, and
   the parameters added to the host. The gated arm's targets: degradation < 5% after 20+
   fossilizations on both scenarios, a new-task gain at least half of ``finetune``'s, at most a
   quarter of its seeds culled.

Printed: per scenario, one table, mean ± 95% CI (Student t) over seeds; ``--json PATH`` also
writes the figures (the full matrix of every run included) as a JSON dict. Bad input (an unknown
arm or scenario, a sample size out of range) is one line on stderr, exit status 2.

It takes about 20 minutes on 2 CPU cores with the defaults (``--quick``: a couple of minutes).
The measured table, the accuracy matrices' figures and how to read them are in BENCHMARKS.md,
section 2 (the matrices themselves: ``benchmarks/results/stability_matrices.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from typing import Any

import torch
from common import SCENARIOS, seed_runs, shifted_task, write_result
from torch import nn

from esper_ray.blueprints import STANDARD_BLUEPRINTS, LocalCatalogue
from esper_ray.config import RunConfig
from esper_ray.contracts import LIVE_STAGES, ControllerAction, EsperError, SeedStage
from esper_ray.kasmina import SeedSlot, gated_blueprint
from esper_ray.simic.evaluate import mean_ci
from esper_ray.tasks import TaskConfig, TaskData, load_task
from esper_ray.tolaria.continual import (
    AccuracyMatrix,
    BoundedSample,
    FisherPenalty,
    GateRehearsal,
    Rehearsal,
    absorb_fossilized,
)
from esper_ray.tolaria.trainer import Trainer

TARGET = 0.05  # relative degradation on the original task
MIN_FOSSILS = 20  # "20+ successful germination events"
BLUEPRINT_FOR = {"input": "residual_mlp", "hidden0": "residual_mlp", "hidden1": "lowrank"}
GATED_FOR = {slot: gated_blueprint(STANDARD_BLUEPRINTS[name]).name for slot, name in BLUEPRINT_FOR.items()}
MAX_HOLD_EPOCHS = 3  # a holding seed whose gate stays closed this long is culled
GUARD_BUDGET = 0.02  # guarded: the original task's val accuracy may not fall more than this below V0
SAMPLE_SIZE = 160  # the original-task sample (replay, gate): 5% of its training split, drawn once per seed
REPLAY_BATCH = 100  # replay: examples from the sample appended to each new-task batch (1:1, as in ER)
GATE_WEIGHT = 5.0  # gated: weight of the gates' binary objective (new batch -> 1, sample batch -> 0)
EWC_LAMBDA = 100.0  # ewc: strength of the Fisher penalty
EWC_EXAMPLES = 1000  # ewc: original-task training examples the Fisher information is measured on
SEED_LR = 1e-3  # the default; 3e-3 overshoots when three seeds train isolated at once
LIFECYCLE = {
    "min_training_epochs": 1,
    "min_holding_epochs": 1,
    "min_improvement": 1e-6,  # "helps": contribution > 0 on the new task's validation split
    "embargo_epochs": 1,
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way of adapting to the task sequence (the module docstring describes each)."""

    label: str
    freeze: bool  # the host (and a seed, once absorbed) never moves
    grow: bool  # seeds germinate; False: no seeds, every host weight trains
    guarded: bool = False  # fossilize only if the original task's val accuracy stays within GUARD_BUDGET of V0
    replay: bool = False  # each training batch = the new task's batch + a batch from the original-task sample
    routed: bool = False  # an absorbed seed acts only on its own task's inputs (task identity given)
    gated: bool = False  # gated seeds, their gates trained on the new task vs the original-task sample
    train_fossils: bool = False  # a fossilized seed trains on until its task ends (frozen once absorbed)
    ewc: bool = False  # the Fisher penalty of the original task on every host weight


ARMS = {
    "frozen": Arm("seeds, frozen host, no replay", freeze=True, grow=True),
    "guarded": Arm("seeds, frozen host, guarded", freeze=True, grow=True, guarded=True),
    "replay_only": Arm("seeds, frozen host, replay", freeze=True, grow=True, replay=True),
    "replay": Arm("seeds, frozen host, replay + guard", freeze=True, grow=True, guarded=True, replay=True),
    "gated": Arm(
        "gated seeds, frozen host, sample", freeze=True, grow=True, replay=True, gated=True, train_fossils=True
    ),
    "routed": Arm("seeds, frozen host, routed (bound)", freeze=True, grow=True, routed=True),
    "trainable": Arm("seeds + trainable host", freeze=False, grow=True),
    "replay_trainable": Arm("seeds + trainable host, replay", freeze=False, grow=True, replay=True),
    "finetune": Arm("full fine-tuning (no seeds)", freeze=False, grow=False),
    "ewc": Arm("EWC (trainable host, Fisher penalty)", freeze=False, grow=False, ewc=True),
}
MAIN_ARM = "gated"  # the summary's figure; the no-replay miss ("frozen") is reported beside it
REFERENCE_ARM = "frozen"  # finetune and ewc run as many tasks as this arm needed
FULL_ARM = "finetune"  # the gated arm's new-task gain is compared with this arm's


# ---- tasks -------------------------------------------------------------------------------------
def use_task(trainer: Trainer, data: TaskData) -> None:
    """Point ``trainer`` at ``data`` (same input shape), resetting what it derived from the old data."""
    trainer.set_task(data)


# ---- routing ---------------------------------------------------------------------------------------
class TaskRouter:
    """Which task's inputs the network is seeing now (the routed arm's given task identity); 0 = original."""

    def __init__(self) -> None:
        self.active = 0


class Routed(nn.Module):
    """An absorbed seed that acts only while its own task is active; otherwise the identity
    (a seed is ``h + gamma * body(h)``, so the identity is exactly the host without it)."""

    def __init__(self, seed: nn.Module, task: int, router: TaskRouter):
        super().__init__()
        self.seed, self.task, self.router = seed, task, router

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.seed(h) if self.router.active == self.task else h


def original_sample(original: TaskData, seed: int, size: int = SAMPLE_SIZE) -> BoundedSample:
    """The run's bounded sample of the original task: ``size`` examples of its training split."""
    return BoundedSample.from_task(original, size, seed=seed)


# ---- seeds -------------------------------------------------------------------------------------
def _guard_ok(trainer: Trainer, slot: SeedSlot, guard: tuple[TaskData, float]) -> bool:
    """Do no harm: the original task's val accuracy with this seed (and the fossilized ones; live
    seeds in other slots ablated) must stay within GUARD_BUDGET of V0, its value before adapting."""
    original, v0 = guard
    with contextlib.ExitStack() as stack:
        for other in trainer.host.slots.values():
            if other is not slot and other.stage.is_live:
                stack.enter_context(other.ablated())
        _, acc = trainer.evaluate(original.x_val, original.y_val)
    return acc >= v0 - GUARD_BUDGET


def _decide(
    trainer: Trainer,
    epochs_left: int,
    done: set[str],
    guard: tuple[TaskData, float] | None,
    final: bool = False,
    blueprints: dict[str, str] | None = None,
    train_fossils: bool = False,
) -> ControllerAction:
    """One decision point of the scripted controller; returns the last action applied."""
    blueprints = blueprints or BLUEPRINT_FOR
    lc = trainer.cfg.lifecycle
    steps_per_epoch = -(-len(trainer.data.x_train) // trainer.cfg.training.batch_size)
    lifecycle_epochs = lc.min_training_epochs + -(-lc.alpha.steps // steps_per_epoch) + lc.min_holding_epochs
    action = ControllerAction.wait()
    for slot in trainer.host.slots.values():
        if slot.stage is SeedStage.HOLDING:
            fossilize = ControllerAction.fossilize(slot.name)
            ok = not trainer.why_illegal(fossilize)
            if ok and guard is not None:
                ok = _guard_ok(trainer, slot, guard)
            if ok:
                action = fossilize
                trainer.apply(action)
                done.add(slot.name)
                if trainer.cfg.training.freeze_host and not train_fossils:  # part of the (frozen) host from now on
                    trainer.set_seed_lr(slot.name, 0.0)
            elif final or slot.epochs_in_stage >= MAX_HOLD_EPOCHS:
                action = ControllerAction.cull(slot.name)
                trainer.apply(action)
        elif final and slot.stage.is_live:
            action = ControllerAction.cull(slot.name)  # the task ends before its lifecycle does
            trainer.apply(action)
        elif not final and slot.is_open and slot.name not in done and epochs_left >= lifecycle_epochs:
            action = ControllerAction.germinate(slot.name, blueprints[slot.name])
            trainer.apply(action)
    return action


def adapt(
    trainer: Trainer,
    epochs: int,
    grow: bool,
    guard: tuple[TaskData, float] | None,
    router: TaskRouter | None = None,
    blueprints: dict[str, str] | None = None,
    train_fossils: bool = False,
) -> None:
    """Up to ``epochs`` epochs on the trainer's current data, running the seed lifecycle; at the
    end the fossilized seeds are absorbed (routed by ``router``'s active task if given)."""
    done: set[str] = set()  # slots whose seed fossilized on this task
    training = {*LIVE_STAGES, SeedStage.CULLED, SeedStage.EMBARGOED} | (
        {SeedStage.FOSSILIZED} if train_fossils else set()
    )
    for epoch in range(epochs):
        action = (
            _decide(trainer, epochs - epoch, done, guard, blueprints=blueprints, train_fossils=train_fossils)
            if grow
            else ControllerAction.wait()
        )
        stages = {s.stage for s in trainer.host.slots.values()}
        if trainer.cfg.training.freeze_host and not stages & training:
            break  # nothing trains and nothing can germinate again: more epochs would change nothing
        trainer.train_epoch()
        trainer.end_epoch(action)
    if grow:
        _decide(trainer, 0, done, guard, final=True, blueprints=blueprints, train_fossils=train_fossils)
        absorb_fossilized(trainer, None if router is None else lambda seed: Routed(seed, router.active, router))


# ---- one seed ------------------------------------------------------------------------------------
def run_config(seed: int, freeze: bool, alpha_steps: int, epochs: int = 10_000) -> RunConfig:
    """The host and lifecycle every arm uses (MLP 40-64-64-10, all slots); ``freeze``: host lr 0."""
    return RunConfig(
        name="stability",
        host={"kind": "mlp", "hidden": [64, 64], "slots": "all"},
        training={"epochs": epochs, "seed": seed, "threads": 1, "freeze_host": freeze, "seed_lr": SEED_LR},
        lifecycle={**LIFECYCLE, "alpha": {"steps": alpha_steps}},
        blueprints={"names": sorted(set(BLUEPRINT_FOR.values()))},
        controller={"kind": "static"},
        lineage={"enabled": False},
    )


def catalogue(gated: bool) -> LocalCatalogue:
    """The arms' blueprints (``BLUEPRINT_FOR``), their gated forms when ``gated``."""
    specs = [STANDARD_BLUEPRINTS[n] for n in sorted(set(BLUEPRINT_FOR.values()))]
    return LocalCatalogue([gated_blueprint(s) for s in specs] if gated else specs)


def pretrain(seed: int, steps: int, epochs: int, original: TaskData) -> Trainer:
    """The host every arm starts from: ``epochs`` epochs on the original task, no seeds."""
    base = Trainer(run_config(seed, False, steps, epochs), original, run_id="stability-pretrain")
    while not base.done:
        base.train_epoch()
        base.end_epoch(ControllerAction.wait())
    return base


def arm_trainer(
    name: str,
    seed: int,
    steps: int,
    weights: dict[str, torch.Tensor],
    original: TaskData,
    sample: BoundedSample,
    args: argparse.Namespace,
) -> Trainer:
    """A trainer from the pretrained ``weights`` with arm ``name``'s catalogue and loss."""
    arm = ARMS[name]
    trainer = Trainer(
        run_config(seed, arm.freeze, steps), original, run_id=f"stability-{name}", catalogue=catalogue(arm.gated)
    )
    trainer.host.load_host_state_dict(weights)
    trainer.remember_good()  # the governor's rollback point is the pretrained host
    if arm.gated:
        trainer.loss_fn = GateRehearsal(
            trainer, sample, batch=REPLAY_BATCH, gate_weight=args.gate_weight, replay=arm.replay, seed=seed
        )
    elif arm.replay:
        trainer.loss_fn = Rehearsal(trainer.host, sample, batch=REPLAY_BATCH, seed=seed)
    elif arm.ewc:  # measured now, on the training split the host was just trained on; no example is kept
        n = min(EWC_EXAMPLES, len(original.x_train))
        params = trainer.opt.param_groups[0]["params"]
        trainer.loss_fn = FisherPenalty(
            trainer.host, params, original.x_train[:n], original.y_train[:n], args.ewc_lambda
        )
    return trainer


def one_seed(seed: int, scenario: str, args: argparse.Namespace, arms: list[str]) -> list[dict[str, Any]]:
    original = load_task(TaskConfig(family="mnist1d", seed=seed))
    tasks: list[TaskData] = []

    def task(t: int) -> TaskData:  # made on first use: most arms need ~8 of the up to 20 tasks
        while len(tasks) <= t:
            n = len(tasks) + 1
            fresh = load_task(TaskConfig(family="mnist1d", seed=100 + n))
            tasks.append(shifted_task(fresh, seed, n, SCENARIOS[scenario]))
        return tasks[t]

    steps = -(-len(original.x_train) // 100)  # alpha reaches 1 after one epoch of blending
    t0 = time.perf_counter()
    base = pretrain(seed, steps, args.pretrain, original)
    weights = base.host.host_state_dict()
    a0 = base.evaluate(original.x_test, original.y_test)[1]
    v0 = base.evaluate(original.x_val, original.y_val)[1]
    original_params = sum(p.numel() for p in base.host.host_parameters())
    pretrain_s = time.perf_counter() - t0
    sample = original_sample(original, seed, args.sample)
    rows: list[dict[str, Any]] = []
    reference_tasks = None
    for name in sorted(arms, key=lambda a: a != REFERENCE_ARM):  # the reference first: finetune copies its length
        arm = ARMS[name]
        started = time.perf_counter()
        trainer = arm_trainer(name, seed, steps, weights, original, sample, args)
        assert trainer.evaluate(original.x_test, original.y_test)[1] == a0
        router = TaskRouter() if arm.routed else None
        guard = (original, v0) if arm.guarded else None
        matrix = AccuracyMatrix()
        matrix.start(a0)
        seen = [original]

        def accuracy(j: int, trainer: Trainer = trainer, router: TaskRouter | None = router, seen=seen) -> float:
            if router is not None:
                router.active = j  # the task identity, given (0: the original task, no absorbed seed acts)
            return trainer.evaluate(seen[j].x_test, seen[j].y_test)[1]

        t = 0
        while True:
            data = task(t)
            seen.append(data)
            use_task(trainer, data)
            before = accuracy(t + 1)
            if router is not None:
                router.active = t + 1
            blueprints = GATED_FOR if arm.gated else BLUEPRINT_FOR
            adapt(trainer, args.epochs_per_task, arm.grow, guard, router, blueprints, arm.train_fossils)
            matrix.adapt(before, [accuracy(j) for j in range(t + 2)])
            t += 1
            fossils = trainer.summary()["fossilizations"]
            if not arm.grow and t >= (reference_tasks or args.tasks):
                break
            if arm.grow and ((t >= args.tasks and fossils >= args.min_fossils) or t >= args.max_tasks):
                break
        if name == REFERENCE_ARM:
            reference_tasks = t
        summary = trainer.summary()
        final_params = sum(p.numel() for p in trainer.host.host_parameters())  # absorbed seeds included
        m = matrix.metrics()
        rows.append(
            {
                "scenario": scenario,
                "arm": name,
                "seed": seed,
                "a0": a0,
                "v0": v0,
                "a_end": matrix.rows[-1][0],
                **m,
                "min_along_the_way": min(r[0] for r in matrix.rows),
                "curve": [r[0] for r in matrix.rows[1:]],
                "matrix": matrix.to_json(),
                "tasks": t,
                **{k: summary[k] for k in ("germinations", "fossilizations", "culls", "rollbacks")},
                "epochs": trainer.epoch,
                "added_params": final_params - original_params,
                "replay_examples": len(sample) if arm.replay or arm.gated else 0,
                "final_params": final_params,
                "seconds": round(time.perf_counter() - started, 2),
                "pretrain_seconds": round(pretrain_s, 2),
            }
        )
    return sorted(rows, key=lambda r: list(ARMS).index(r["arm"]))


METRICS = (
    "a0",
    "a_end",
    "degradation",
    "average_accuracy",
    "bwt_original",
    "bwt_new",
    "new_before",
    "new_after",
    "new_gain",
)


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: mean ± 95% CI of every accuracy-matrix figure over seeds, counts, and whether the
    targets are met (``met``: degradation < 5% after 20+ fossilizations in every run; for the gated
    arm also ``met_gated``: that, a new-task gain of at least half of full fine-tuning's, and at most
    a quarter of its seeds culled)."""
    out = {}
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        row: dict[str, Any] = {"label": ARMS[arm].label, "n": len(rs)}
        for key in METRICS:
            values = [r[key] for r in rs if not math.isnan(r[key])]
            s = mean_ci(values) if values else None
            row[key], row[key + "_ci95"] = (s.mean, s.half_width) if s else (math.nan, math.nan)
        for key in ("tasks", "germinations", "fossilizations", "culls", "rollbacks", "added_params", "seconds"):
            row[key] = sum(r[key] for r in rs) / len(rs)
        row["replay_examples"] = max(r["replay_examples"] for r in rs)
        row["min_fossilizations"] = min(r["fossilizations"] for r in rs)
        row["cull_share"] = sum(r["culls"] for r in rs) / max(1, sum(r["germinations"] for r in rs))
        grew = ARMS[arm].grow
        row["met"] = bool(row["degradation"] < TARGET and (not grew or row["min_fossilizations"] >= MIN_FOSSILS))
        row["bound"] = ARMS[arm].routed  # A_end = A0 by construction: a bound, not a result
        out[arm] = row
    if "gated" in out and FULL_ARM in out:
        g, full = out["gated"], out[FULL_ARM]
        g["gain_vs_full"] = g["new_gain"] / full["new_gain"] if full["new_gain"] > 0 else math.nan
        g["met_gated"] = bool(g["met"] and g["gain_vs_full"] >= 0.5 and g["cull_share"] <= 0.25)
    return out


def format_table(table: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'arm':<38} {'A0':>5} {'A_end':>13} {'degradation':>15} {'avg acc':>13} {'BWT new':>14} "
        f"{'tasks':>5} {'germ':>5} {'foss':>5} {'cull':>5}  {'new tasks: before -> after (gain)':>34} {'added':>7}"
    ]
    for r in table.values():
        lines.append(
            f"{r['label']:<38} {r['a0']:.3f} {r['a_end']:.3f}±{r['a_end_ci95']:.3f} "
            f"{100 * r['degradation']:+6.1f}%±{100 * r['degradation_ci95']:5.1f}% "
            f"{r['average_accuracy']:.3f}±{r['average_accuracy_ci95']:.3f} "
            f"{r['bwt_new']:+.3f}±{r['bwt_new_ci95']:.3f} {r['tasks']:5.1f} "
            f"{r['germinations']:5.1f} {r['fossilizations']:5.1f} {r['culls']:5.1f}  "
            f"{r['new_before']:.3f} -> {r['new_after']:.3f} ({r['new_gain']:+.3f}±{r['new_gain_ci95']:.3f}) "
            f"{r['added_params']:>7,.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--pretrain", type=int, default=40, help="epochs on the original task")
    p.add_argument("--epochs-per-task", type=int, default=8)
    p.add_argument("--tasks", type=int, default=8, help="at least this many adaptation tasks")
    p.add_argument("--max-tasks", type=int, default=20, help="at most this many adaptation tasks")
    p.add_argument("--min-fossils", type=int, default=MIN_FOSSILS, help="go on until this many fossilizations")
    p.add_argument("--sample", type=int, default=SAMPLE_SIZE, help="original-task training examples kept by the run")
    p.add_argument("--gate-weight", type=float, default=GATE_WEIGHT, help="gated: weight of the gate objective")
    p.add_argument("--ewc-lambda", type=float, default=EWC_LAMBDA, help="ewc: strength of the Fisher penalty")
    p.add_argument("--quick", action="store_true", help="1 seed, scenario shift, 20 pretraining epochs, 7-8 tasks")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.scenarios, args.pretrain, args.tasks, args.max_tasks = 1, "shift", 20, 7, 8
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if bad := [a for a in arms if a not in ARMS] + [s for s in scenarios if s not in SCENARIOS]:
        return _fail(f"unknown arm(s) or scenario(s) {bad}; arms: {list(ARMS)}, scenarios: {list(SCENARIOS)}")
    try:
        BoundedSample(args.sample)  # the range check, before anything runs
    except EsperError as err:
        return _fail(str(err))
    torch.set_num_threads(1)
    started = time.perf_counter()
    figures: dict[str, Any] = {
        "target": TARGET,
        "min_fossils": args.min_fossils,
        "main_arm": MAIN_ARM,
        "seeds": args.seeds,
        "pretrain_epochs": args.pretrain,
        "epochs_per_task": args.epochs_per_task,
        "tasks": args.tasks,
        "max_tasks": args.max_tasks,
        "quick": args.quick,
        "reference_arm": REFERENCE_ARM,
        "full_arm": FULL_ARM,
        "guard_budget": GUARD_BUDGET,
        "replay": {"sample": args.sample, "batch": REPLAY_BATCH},  # examples: per run, "replay_examples"
        "gate": {"weight": args.gate_weight, "blueprints": GATED_FOR},
        "ewc": {"lambda": args.ewc_lambda, "examples": EWC_EXAMPLES},
        "blueprints": BLUEPRINT_FOR,
        "scenarios": {},
    }
    for scenario in scenarios:
        runs = seed_runs(
            scenario,
            args.seeds,
            lambda seed: one_seed(seed, scenario, args, arms),  # noqa: B023 (called before the loop moves on)
            lambda r: (
                f"{ARMS[r['arm']].label:<38} A0 {r['a0']:.3f} -> A_end {r['a_end']:.3f} "
                f"({100 * r['degradation']:+.1f}%), avg acc {r['average_accuracy']:.3f}, BWT new "
                f"{r['bwt_new']:+.3f}, {r['tasks']} tasks, germ {r['germinations']} foss {r['fossilizations']} "
                f"cull {r['culls']}; new tasks {r['new_before']:.3f} -> {r['new_after']:.3f}; original after "
                f"each task {' '.join(f'{a:.2f}' for a in r['curve'])} ({r['seconds']:.0f} s)"
            ),
        )
        table = summarise(runs)
        print(
            f"\nscenario {scenario} ({SCENARIOS[scenario]} of 40 features permuted per task, gain/offset/noise): "
            f"MNIST-1D MLP 40-64-64-10, {args.pretrain} epochs on the original task, then adaptation tasks of "
            f"<= {args.epochs_per_task} epochs until {args.min_fossils} fossilizations (tasks {args.tasks}-"
            f"{args.max_tasks}); mean ± 95% CI over {args.seeds} seed(s)\n"
        )
        print(format_table(table) + "\n", flush=True)
        figures["scenarios"][scenario] = {"permuted_features": SCENARIOS[scenario], "arms": table, "runs": runs}
    total = time.perf_counter() - started
    figures["seconds"] = round(total, 1)
    for arm in dict.fromkeys([MAIN_ARM, REFERENCE_ARM]):  # the headline and the no-replay protocol beside it
        rows = {s: v["arms"][arm] for s, v in figures["scenarios"].items() if arm in v["arms"]}
        if not rows:
            continue
        parts = [
            f"{s}: {100 * r['degradation']:+.1f}% ± {100 * r['degradation_ci95']:.1f}% after "
            f"{r['fossilizations']:.1f} fossilized (min {r['min_fossilizations']}), "
            f"culled {100 * r['cull_share']:.0f}%, "
            f"new tasks {r['new_gain']:+.3f}"
            + (f" ({r['gain_vs_full']:.2f} of full fine-tuning's)" if "gain_vs_full" in r else "")
            for s, r in rows.items()
        ]
        met = all(r.get("met_gated", r["met"]) for r in rows.values())
        print(
            f"SUMMARY: {ARMS[arm].label}: degradation of the original task {'; '.join(parts)} "
            f"(target < 5% after 20+{', gain >= 1/2 of full, <= 1/4 culled' if arm == 'gated' else ''}): "
            f"{'met' if met else 'not met'}"
        )
    print(f"total {total:.0f} s")
    if args.json:
        write_result(args.json, __file__, figures, started, argv)
    return 0


def _fail(message: str) -> int:
    print(f"stability.py: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
