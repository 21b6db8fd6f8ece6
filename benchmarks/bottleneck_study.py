"""Germination fidelity study on the synthetic bottleneck tasks (issues 4 and 8).

For each ground-truth slot k in {input, hidden0, hidden1} and each task seed, the host is the
task's damaged pre-trained host (``training.host_init: task``: the teacher with its wide map
at slot k cut out; frozen unless ``--trainable-host``). Runs, all with the Trainer and the
standard ``residual_mlp`` blueprint (width 64):

(a) ``none``: the host as given, no seed;
(b) one run per slot j: train 1 epoch, ``apply(germinate(j, residual_mlp))`` at that first
    decision point, small lifecycle gates (1 epoch isolated, alpha ramp of one epoch, 1 epoch
    holding), then fossilize at HOLDING as soon as the gate (ablation contribution >= 0) is
    open; never cull (right after blending a seed's contribution is often still negative for
    an epoch: isolated training follows the first-order direction with no feedback and
    overshoots, so a cull-at-once rule would measure the lifecycle, not the slot);
(c) ``ref``: the unbottlenecked reference: the same seed at the ground-truth slot present
    from the start (``trainer.graft_fossilized``).

It prints, per task, the final test accuracy of each run and the telemetry at the first
decision point (``grad_predictability`` per slot), then the summary: the share of tasks where
the true slot gives the best run and by what margin over the best other slot, the share
"resolved" (the germinated true-slot run ends within 1 point of the reference), and the share
where the slot chosen from telemetry is the ground truth: HeuristicController.choose_slot (the
slot the heuristic germinates at), and as diagnostics argmax(grad_predictability), the old
heuristic score (consumer grad norm + activation collapse) and the deficit rule alone (first
slot with a positive downstream ``grad_deficit``, else the last).

Run (a few minutes on one CPU thread with the defaults; ``--signal-only`` takes seconds)::

    .venv/bin/python benchmarks/bottleneck_study.py            # 5 seeds x 3 slots, frozen host
    .venv/bin/python benchmarks/bottleneck_study.py --seeds 3 --trainable-host
    .venv/bin/python benchmarks/bottleneck_study.py --signal-only --seeds 30

What it measured (the defaults, and the diagnostics of ``--signal-only``, ``--trainable-host`` and a
larger seed_lr) is in BENCHMARKS.md, section 1; ``--json PATH`` writes the shares for run_all.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_result

from esper_ray.blueprints.library import STANDARD_BLUEPRINTS
from esper_ray.config import RunConfig
from esper_ray.contracts import ControllerAction, SeedStage
from esper_ray.tamiyo.controllers import HeuristicController
from esper_ray.tasks import TaskConfig, TaskData, load_task
from esper_ray.tolaria.trainer import Trainer

BLUEPRINT = "residual_mlp"
SLOTS = ("input", "hidden0", "hidden1")


def run_config(task: TaskConfig, seed: int, epochs: int, freeze: bool, seed_lr: float, steps: int) -> RunConfig:
    """The run settings the study uses (what the env should use for bottleneck tasks)."""
    return RunConfig(
        name="bottleneck-study",
        task=task,
        training={
            "epochs": epochs,
            "seed": seed,
            "threads": 1,
            "host_init": "task",
            "freeze_host": freeze,
            "seed_lr": seed_lr,
        },
        lifecycle={"min_training_epochs": 1, "min_holding_epochs": 1, "alpha": {"steps": steps}},
        blueprints={"names": [BLUEPRINT]},
        lineage={"enabled": False},
    )


def old_heuristic_scores(slots: list) -> dict[str, float]:
    """The heuristic's score before this study: relative consumer grad norm + (1 - eff. rank)."""
    mean_grad = sum(s.host_grad_norm for s in slots) / max(len(slots), 1) or 1.0
    return {s.name: s.host_grad_norm / mean_grad + (1.0 - s.act_effective_rank) for s in slots}


def deficit_choice(slots: list) -> str:
    """The first slot whose downstream ``grad_deficit`` is positive (the layer after it lost
    information the loss needs), else the last slot."""
    return next((s.name for s in slots if s.grad_deficit > 0), slots[-1].name)


def germinated_run(cfg: RunConfig, data: TaskData, slot: str | None) -> tuple[float, dict | None]:
    """Train; at the first decision point (after epoch 1) germinate at ``slot`` (None: never).

    Returns the final test accuracy and, for ``slot=None``, the observation's per-slot signals.
    """
    trainer = Trainer(cfg, data, run_id="study")
    trainer.train_epoch()
    signals = None
    if slot is None:
        obs = trainer.observe()
        signals = {
            "signal": {s.name: s.grad_predictability for s in obs.slots},
            "heuristic": HeuristicController.choose_slot(obs.slots),
            "old": old_heuristic_scores(obs.slots),
            "deficit_choice": deficit_choice(obs.slots),
        }
        if cfg.training.freeze_host:  # nothing can change any more: skip the remaining epochs
            return trainer.last["test_acc"], signals
        action = ControllerAction.wait()
    else:
        action = ControllerAction.germinate(slot, BLUEPRINT)
        trainer.apply(action)
    trainer.end_epoch(action)
    while not trainer.done:
        trainer.train_epoch()
        action = ControllerAction.wait()
        for s in trainer.host.slots.values():
            if s.stage is SeedStage.HOLDING and not s.gate(SeedStage.FOSSILIZED):
                action = ControllerAction.fossilize(s.name)
                trainer.apply(action)
        trainer.end_epoch(action)
    return trainer.last["test_acc"], signals


def reference_run(cfg: RunConfig, data: TaskData, slot: str) -> float:
    trainer = Trainer(cfg, data, run_id="study-ref")
    trainer.graft_fossilized(slot, STANDARD_BLUEPRINTS[BLUEPRINT])
    while not trainer.done:
        trainer.train_epoch()
        trainer.end_epoch(ControllerAction.wait())
    return trainer.last["test_acc"]


def argmax(d: dict[str, float]) -> str:
    return max(SLOTS, key=lambda n: d[n])


def signal_only(args: argparse.Namespace) -> int:
    """Slot choice at the first decision point on many tasks, without training any seed."""
    torch.set_num_threads(1)
    hits = {"signal": 0, "deficit": 0, "old": 0, "heuristic": 0}
    misses: list[str] = []
    n = 0
    for k, truth in enumerate(SLOTS):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            task = TaskConfig(family="bottleneck", seed=seed, bottleneck_slot=k, input_dim=40, n_samples=args.n_samples)
            cfg = run_config(task, seed, 2, not args.trainable_host, args.seed_lr, 39)
            trainer = Trainer(cfg, load_task(task), run_id="study-signal")
            trainer.train_epoch()
            obs = trainer.observe()
            signal = {s.name: s.grad_predictability for s in obs.slots}
            hits["signal"] += argmax(signal) == truth
            hits["old"] += argmax(old_heuristic_scores(obs.slots)) == truth
            hits["deficit"] += deficit_choice(obs.slots) == truth
            hits["heuristic"] += HeuristicController.choose_slot(obs.slots) == truth
            n += 1
            if argmax(signal) != truth:
                misses.append(f"{trainer.data.name} {signal}")
    print(
        f"{n} tasks: argmax(grad_predictability) {hits['signal']}/{n}, deficit rule {hits['deficit']}/{n}, "
        f"HeuristicController.choose_slot {hits['heuristic']}/{n}, old heuristic score {hits['old']}/{n}"
    )
    for line in misses:
        print("  argmax miss:", line)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="task seeds per ground-truth slot")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed-lr", type=float, default=1e-3)
    p.add_argument("--n-samples", type=int, default=6000)
    p.add_argument("--trainable-host", action="store_true", help="host trains too (lr 1e-3)")
    p.add_argument("--signal-only", action="store_true", help="only the first-decision telemetry (fast)")
    p.add_argument("--quick", action="store_true", help="1 task seed per slot, 12 epochs (CI: a smoke value)")
    p.add_argument("--json", help="also write the shares to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 12
    if args.signal_only:
        return signal_only(args)
    torch.set_num_threads(1)
    freeze = not args.trainable_host
    started = time.perf_counter()
    rows = []
    head = f"{'task':>16} {'none':>6} " + " ".join(f"{s:>7}" for s in SLOTS) + f" {'ref':>6}"
    head += "  best  margin resolved | signal " + " ".join(f"{s:>7}" for s in SLOTS) + "  argmax"
    print(
        f"host: {'trainable' if args.trainable_host else 'frozen'}, epochs {args.epochs}, "
        f"seed_lr {args.seed_lr}, n_samples {args.n_samples}, blueprint {BLUEPRINT}"
    )
    print(head)
    for k, truth in enumerate(SLOTS):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            task = TaskConfig(family="bottleneck", seed=seed, bottleneck_slot=k, input_dim=40, n_samples=args.n_samples)
            data = load_task(task)
            steps = -(-len(data.x_train) // 100)  # alpha reaches 1 after one epoch of blending
            cfg = run_config(task, seed, args.epochs, freeze, args.seed_lr, steps)
            none, sig = germinated_run(cfg, data, None)
            acc = {slot: germinated_run(cfg, data, slot)[0] for slot in SLOTS}
            ref = reference_run(cfg, data, truth)
            best = argmax(acc)
            margin = acc[truth] - max(acc[s] for s in SLOTS if s != truth)
            resolved = acc[truth] >= ref - 0.01
            row = {
                "task": data.name,
                "k": truth,
                "none": none,
                "acc": acc,
                "ref": ref,
                "best_is_truth": best == truth,
                "margin": margin,
                "resolved": resolved,
                "signal_hit": argmax(sig["signal"]) == truth,
                "heuristic_hit": sig["heuristic"] == truth,
                "old_hit": argmax(sig["old"]) == truth,
                "deficit_hit": sig["deficit_choice"] == truth,
            }
            rows.append(row)
            print(
                f"{data.name:>16} {none:6.3f} "
                + " ".join(f"{acc[s]:7.3f}" for s in SLOTS)
                + f" {ref:6.3f} {best:>7} {margin:+6.3f} {'yes' if resolved else 'no':>8} | "
                + "       "
                + " ".join(f"{sig['signal'][s]:7.4f}" for s in SLOTS)
                + f"  {argmax(sig['signal'])}",
                flush=True,
            )
    n = len(rows)
    print()
    for k in SLOTS:
        sub = [r for r in rows if r["k"] == k]
        print(
            f"k={k:>7}: mean acc none {statistics.mean(r['none'] for r in sub):.3f}, "
            + ", ".join(f"{s} {statistics.mean(r['acc'][s] for r in sub):.3f}" for s in SLOTS)
            + f", ref {statistics.mean(r['ref'] for r in sub):.3f}; "
            f"margin min {min(r['margin'] for r in sub):+.3f} mean {statistics.mean(r['margin'] for r in sub):+.3f}"
        )
    share = lambda key: sum(r[key] for r in rows) / n  # noqa: E731
    margins = [r["margin"] for r in rows]
    print(
        f"true slot best:            {share('best_is_truth'):.0%} of {n} tasks "
        f"(margin over the best other slot: min {min(margins):+.3f}, "
        f"median {statistics.median(margins):+.3f})"
    )
    print(f"resolved (within 1 point): {share('resolved'):.0%}")
    print(
        f"argmax(grad_predictability) == truth: {share('signal_hit'):.0%}; "
        f"HeuristicController.choose_slot: {share('heuristic_hit'):.0%}; "
        f"old heuristic score: {share('old_hit'):.0%}; "
        f"deficit rule (gradient_information_deficit): {share('deficit_hit'):.0%}"
    )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        figures = {
            "tasks": n,
            "placed": share("heuristic_hit"),
            "resolved": share("resolved"),
            "true_slot_best": share("best_is_truth"),
            "signal": share("signal_hit"),
            "epochs": args.epochs,
            "seeds": args.seeds,
            "trainable_host": args.trainable_host,
            "quick": args.quick,
        }
        write_result(args.json, __file__, figures, started, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
