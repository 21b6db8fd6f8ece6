"""Parameter efficiency: trainable parameters needed for the same accuracy gain, seeds vs full fine-tuning.

Run from the repository root::

    .venv/bin/python benchmarks/param_efficiency.py [--seeds 3] [--scenarios shift,permuted] [--json PATH]
    .venv/bin/python benchmarks/param_efficiency.py --quick     # 1 seed, "shift", fewer epochs: < 1 minute

The design's target: "for the same accuracy gain, 10-100x fewer trainable
parameters with seeds than with full fine-tuning". Protocol, per seed ``s``:

1. Original task: MNIST-1D generated with seed ``s`` (3,200 train / 800 val / 1,000 test). The
   host, an MLP 40-256-256-256-10 (144,650 weights; slots ``input``, ``hidden0``-``hidden2``,
   dormant), trains ``--pretrain`` epochs (default 40, Adam 1e-3, batch 100) with no seeds.
2. New task: fresh MNIST-1D samples (generation seed 101) seen through the fixed input shift of
   ``benchmarks/stability.py`` (``shifted_task``, task 1 of seed ``s``): per-feature gain and
   offset, input noise, and a permutation of 10 of the 40 features (scenario ``shift``) or of all
   40 (``permuted``). ``before`` = the pretrained host's test accuracy on the new task.
3. Every arm starts from the pretrained weights and trains ``--epochs`` epochs (default 20) on
   the new task's training split, batch 100, the same data order, Adam with a learning rate
   picked per arm and seed from ``--lrs`` (default 1e-3, 3e-3, 1e-2) by the new task's
   *validation* accuracy at the end (every arm gets the same tuning budget; the test split is
   only reported). Arms:

   * ``full``: full fine-tuning, every host weight trains (144,650).
   * ``head``: only the output layer trains (2,570); ``bias``: only the biases (BitFit, 778).
   * ``seeds: ...``: the host frozen (``training.freeze_host: true``) and seeds germinated at
     epoch 0 with ``trainer.apply(ControllerAction.germinate(slot, blueprint))``: a low-rank
     adapter (``lowrank``, the library's blueprint with rank r: ``h + gamma * W2 W1 h``; rank
     40 at the 40-wide input is a full linear map), the library's ``conv1d`` (two 16-channel
     convs over the 40 samples) or ``residual_mlp`` (64 hidden units), at the input slot, at the
     three hidden slots, or both. Each seed goes through the lifecycle: one epoch isolated
     (TRAINING), one epoch of alpha ramp (BLENDING), then HOLDING at alpha 1 for the rest; at
     the end it is fossilized if its measured contribution on the new task's validation split
     is positive, else culled (its gain is then 0: the host is what it was). Its trainable
     parameters are the seeds' weights, whether they were kept or not.

4. Gain = test accuracy on the new task after - before. Trainable parameters are counted from
   the optimizer: every parameter in a param group with a learning rate > 0 (``trainable``).
   "Same accuracy gain": the matched seed configuration is the smallest one whose mean gain is
   at least 90% of full fine-tuning's (also reported: at least 100%), judged on the new task's
   *validation* split (so that choosing among configurations does not peek at the test split);
   the ratio is full fine-tuning's trainable parameters over its. Its *test* gain is reported
   with the per-seed gain ratio (seeds / full) and their 95% CI (Student t), so that "matched"
   can be checked, not taken on trust.

Printed: per scenario a table, mean ± 95% CI over seeds, and a SUMMARY line; ``--json PATH``
also writes the figures. It takes several minutes on 2 CPU cores (``--quick``: seconds). The
measured table and how to read it are in BENCHMARKS.md, section 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

import torch
from common import SCENARIOS, seed_runs, shifted_task, write_result

from esper_ray.blueprints.catalogue import LocalCatalogue
from esper_ray.blueprints.library import STANDARD_BLUEPRINTS
from esper_ray.blueprints.spec import BlueprintSpec, Node
from esper_ray.config import RunConfig
from esper_ray.contracts import ControllerAction, SeedStage
from esper_ray.simic.evaluate import mean_ci
from esper_ray.tasks import TaskConfig, TaskData, load_task
from esper_ray.tolaria.trainer import Trainer

TARGET = 10.0  # "10-100x fewer trainable parameters"
MATCH = 0.9  # a seed configuration "matches" when its mean gain is at least this share of full fine-tuning's
HIDDEN = [256, 256, 256]
BATCH = 100
ALPHA_STEPS = 32  # one epoch of the 3,200 training examples: alpha reaches 1 after one epoch of blending
LIFECYCLE = {
    "min_training_epochs": 1,
    "min_holding_epochs": 1,
    "min_improvement": 1e-6,  # fossilize when the seeds' contribution on the new task's val split is > 0
    "embargo_epochs": 1,
}


def lowrank(rank: int) -> BlueprintSpec:
    """The library's ``lowrank`` blueprint (``h + gamma * W2 W1 h``, W1 down to ``rank``) with another rank."""
    base = STANDARD_BLUEPRINTS["lowrank"]
    down = Node(id="n0", op="linear", inputs=("input",), args={"width": rank})
    return BlueprintSpec(name=f"lowrank{rank}", kind=base.kind, nodes=(down, *base.nodes[1:]))


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way of adapting the pretrained host to the new task."""

    name: str
    trains: str  # "all", "head", "bias": which host weights train; "seeds": the host is frozen
    seeds: tuple[tuple[str, BlueprintSpec], ...] = ()  # (slot, blueprint) germinated at epoch 0


HIDDEN_SLOTS = ("hidden0", "hidden1", "hidden2")
ARMS = [
    Arm("full", "all"),
    Arm("head", "head"),
    Arm("bias", "bias"),
    Arm("seeds: lowrank2 @input", "seeds", (("input", lowrank(2)),)),
    Arm("seeds: lowrank8 @input", "seeds", (("input", lowrank(8)),)),
    Arm("seeds: lowrank16 @input", "seeds", (("input", lowrank(16)),)),
    Arm("seeds: conv1d @input", "seeds", (("input", STANDARD_BLUEPRINTS["conv1d"]),)),
    Arm("seeds: lowrank40 @input (full rank)", "seeds", (("input", lowrank(40)),)),
    Arm("seeds: residual_mlp @input", "seeds", (("input", STANDARD_BLUEPRINTS["residual_mlp"]),)),
    Arm("seeds: lowrank4 @hidden0-2", "seeds", tuple((s, lowrank(4)) for s in HIDDEN_SLOTS)),
    Arm(
        "seeds: lowrank8 @input + lowrank4 @hidden0-2",
        "seeds",
        (("input", lowrank(8)), *((s, lowrank(4)) for s in HIDDEN_SLOTS)),
    ),
]


# ---- counting ------------------------------------------------------------------------------------
def trainable(opt: torch.optim.Optimizer) -> int:
    """Weights the optimizer can move: every parameter in a param group whose lr is > 0, once."""
    seen: dict[int, int] = {}
    for group in opt.param_groups:
        if group["lr"] > 0:
            seen.update({id(p): p.numel() for p in group["params"]})
    return sum(seen.values())


# ---- one arm ---------------------------------------------------------------------------------------
def config(seed: int, epochs: int, lr: float, freeze: bool, hidden: list[int] = HIDDEN) -> RunConfig:
    return RunConfig(
        name="param-efficiency",
        host={"kind": "mlp", "hidden": hidden, "slots": "all"},
        training={
            "epochs": epochs,
            "seed": seed,
            "threads": 1,
            "lr": lr,
            "seed_lr": lr,
            "batch_size": BATCH,
            "freeze_host": freeze,
        },
        lifecycle={**LIFECYCLE, "alpha": {"steps": ALPHA_STEPS}},
        controller={"kind": "static"},
        blueprints={"max_seed_params": 1_000_000},
        lineage={"enabled": False},
    )


def prepare(arm: Arm, cfg: RunConfig, data: TaskData, weights: dict[str, torch.Tensor]) -> Trainer:
    """A trainer on ``data`` from the pretrained ``weights``, with only ``arm``'s weights trainable."""
    catalogue = LocalCatalogue([spec for _, spec in arm.seeds])
    trainer = Trainer(cfg, data, catalogue=catalogue, run_id=f"param-efficiency-{arm.name}")
    trainer.host.load_host_state_dict(weights)
    host = trainer.host
    if arm.trains in ("head", "bias"):
        if arm.trains == "head":
            params = list(host.head.parameters())
        else:
            params = [p for n, p in host.named_parameters() if n.endswith("bias") and not n.startswith("slots.")]
        trainer.train_only(params)  # the governor's rollback point follows the new optimizer
    for slot, spec in arm.seeds:
        trainer.apply(ControllerAction.germinate(slot, spec.name))
    trainer.remember_good()  # the governor's rollback point is the pretrained host (+ newborn seeds)
    return trainer


def run_arm(arm: Arm, cfg: RunConfig, data: TaskData, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Train ``arm`` for the configured epochs; its val/test accuracy at the end and what trained."""
    trainer = prepare(arm, cfg, data, weights)
    n_trainable = trainable(trainer.opt)
    while not trainer.done:
        trainer.train_epoch()
        trainer.end_epoch(ControllerAction.wait())
    kept = 0
    for slot, _ in arm.seeds:
        s = trainer.host.slots[slot]
        fossilize = ControllerAction.fossilize(slot)
        if s.stage is SeedStage.HOLDING and not trainer.why_illegal(fossilize):
            trainer.apply(fossilize)
            kept += 1
        elif s.stage.is_live:
            trainer.apply(ControllerAction.cull(slot))
    return {
        "val": trainer.evaluate(data.x_val, data.y_val)[1],
        "test": trainer.evaluate(data.x_test, data.y_test)[1],
        "trainable": n_trainable,
        "kept": kept,
        "rollbacks": trainer.summary()["rollbacks"],
    }


# ---- one seed --------------------------------------------------------------------------------------
def pretrain(seed: int, epochs: int) -> tuple[dict[str, torch.Tensor], TaskData, int]:
    """The host trained on the original task: its weights, the task, its weight count."""
    original = load_task(TaskConfig(family="mnist1d", seed=seed))
    base = Trainer(config(seed, epochs, 1e-3, freeze=False), original, run_id="param-efficiency-pretrain")
    while not base.done:
        base.train_epoch()
        base.end_epoch(ControllerAction.wait())
    return base.host.host_state_dict(), original, sum(p.numel() for p in base.host.host_parameters())


def one_seed(seed: int, scenario: str, args: argparse.Namespace, arms: list[Arm]) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    weights, original, host_params = pretrain(seed, args.pretrain)
    new = shifted_task(load_task(TaskConfig(family="mnist1d", seed=101)), seed, 1, SCENARIOS[scenario])
    probe = Trainer(config(seed, 1, 1e-3, freeze=True), new, run_id="param-efficiency-probe")
    probe.host.load_host_state_dict(weights)
    before = probe.evaluate(new.x_test, new.y_test)[1]
    val_before = probe.evaluate(new.x_val, new.y_val)[1]
    original_acc = probe.evaluate(original.x_test, original.y_test)[1]
    rows = []
    for arm in arms:
        started = time.perf_counter()
        tried = {
            lr: run_arm(arm, config(seed, args.epochs, lr, freeze=arm.trains == "seeds"), new, weights)
            for lr in args.lrs
        }
        lr, best = max(tried.items(), key=lambda kv: kv[1]["val"])  # chosen on the val split, never on test
        rows.append(
            {
                "scenario": scenario,
                "arm": arm.name,
                "seed": seed,
                "host_params": host_params,
                "original_acc": original_acc,
                "before": before,
                "after": best["test"],
                "gain": best["test"] - before,
                "val": best["val"],
                "val_gain": best["val"] - val_before,
                "lr": lr,
                "trainable": best["trainable"],
                "kept": best["kept"],
                "rollbacks": best["rollbacks"],
                "by_lr": {str(k): {"val": v["val"], "test": v["test"]} for k, v in tried.items()},
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
    rows[0]["pretrain_seconds"] = round(time.perf_counter() - t0 - sum(r["seconds"] for r in rows), 2)
    return rows


# ---- summary ---------------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]], arms: list[Arm]) -> dict[str, Any]:
    """Per arm: gain and trainable weights (mean ± CI); then the matched seed configuration and its ratio."""
    full = {r["seed"]: r for r in runs if r["arm"] == "full"}
    table: dict[str, dict[str, Any]] = {}
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm.name]
        if not rs:
            continue
        row: dict[str, Any] = {"kind": arm.trains, "n": len(rs)}
        for key in ("before", "after", "gain", "val_gain"):
            s = mean_ci([r[key] for r in rs])
            row[key], row[key + "_ci95"] = s.mean, s.half_width
        row["trainable"] = rs[0]["trainable"]
        assert all(r["trainable"] == row["trainable"] for r in rs)  # the count does not depend on the seed
        row["kept"] = sum(r["kept"] for r in rs) / len(rs)
        row["seeds"] = len(arm.seeds)
        row["lrs"] = [r["lr"] for r in rs]
        if full and arm.name != "full":
            ratios = [r["gain"] / full[r["seed"]]["gain"] for r in rs if full[r["seed"]]["gain"] > 0]
            s = mean_ci(ratios)
            row["gain_vs_full"], row["gain_vs_full_ci95"] = s.mean, s.half_width
            row["param_ratio"] = full[rs[0]["seed"]]["trainable"] / row["trainable"]
        table[arm.name] = row
    out: dict[str, Any] = {"arms": table}
    if "full" in table:
        # The match is decided on the validation gains (so that picking among configurations does not
        # peek at the test split); the test gains of the chosen one are what is reported.
        g = table["full"]["val_gain"]
        seeds = sorted((r["trainable"], name) for name, r in table.items() if r["kind"] == "seeds")
        for share, key in ((MATCH, "matched"), (1.0, "matched_100")):
            hit = next((name for _, name in seeds if g > 0 and table[name]["val_gain"] >= share * g), None)
            out[key] = None if hit is None else {"arm": hit, "share": share, **_ratio(table, hit)}
        if seeds:  # for contrast when nothing matches: the seed configuration that gained most (val)
            best = max((name for _, name in seeds), key=lambda n: table[n]["val_gain"])
            out["best_seeds"] = {"arm": best, **_ratio(table, best)}
    return out


def _ratio(table: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    full, r = table["full"], table[name]
    return {
        "param_ratio": full["trainable"] / r["trainable"],
        "trainable": r["trainable"],
        "full_trainable": full["trainable"],
        "gain": r["gain"],
        "gain_ci95": r["gain_ci95"],
        "full_gain": full["gain"],
        "full_gain_ci95": full["gain_ci95"],
        "val_gain": r["val_gain"],
        "full_val_gain": full["val_gain"],
        "gain_vs_full": r.get("gain_vs_full"),
        "gain_vs_full_ci95": r.get("gain_vs_full_ci95"),
    }


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"{'arm':<46} {'trainable':>9} {'ratio':>7}  {'before -> after':>15}  {'gain':>15}  {'gain / full':>14}"]
    for name, r in summary["arms"].items():
        ratio = f"{r['param_ratio']:6.1f}x" if "param_ratio" in r else f"{'1.0x':>7}"
        vs = f"{r['gain_vs_full']:.2f} ± {r['gain_vs_full_ci95']:.2f}" if "gain_vs_full" in r else ""
        lines.append(
            f"{name:<46} {r['trainable']:>9,} {ratio}  {r['before']:.3f} -> {r['after']:.3f}  "
            f"{r['gain']:+.3f} ± {r['gain_ci95']:.3f}  {vs:>14}"
        )
    return "\n".join(lines)


def verdict(summary: dict[str, Any]) -> str:
    m = summary.get("matched")
    if m is None:
        b = summary.get("best_seeds")
        extra = (
            f"; the best seeds ({b['arm']}) gain {b['gain']:+.3f} vs {b['full_gain']:+.3f} with "
            f"{b['param_ratio']:.1f}x fewer"
            if b
            else ""
        )
        return f"no seed configuration reaches {MATCH:.0%} of full fine-tuning's gain{extra}: not met"
    ok = m["param_ratio"] >= TARGET
    return (
        f"{m['param_ratio']:.1f}x fewer trainable parameters ({m['full_trainable']:,} / {m['trainable']:,}, "
        f"{m['arm']}) for gain {m['gain']:+.3f} ± {m['gain_ci95']:.3f} vs full fine-tuning's "
        f"{m['full_gain']:+.3f} ± {m['full_gain_ci95']:.3f} (per-seed gain ratio {m['gain_vs_full']:.2f} ± "
        f"{m['gain_vs_full_ci95']:.2f}): {'met' if ok else 'not met'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    p.add_argument("--pretrain", type=int, default=40, help="epochs on the original task")
    p.add_argument("--epochs", type=int, default=20, help="epochs on the new task, every arm")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning rates tried per arm (picked on the val split)")
    p.add_argument("--quick", action="store_true", help="1 seed, scenario shift, 15 + 8 epochs, lr 3e-3 only")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.scenarios, args.pretrain, args.epochs, args.lrs = 1, "shift", 15, 8, "3e-3"
    args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if bad := [s for s in scenarios if s not in SCENARIOS]:
        p.error(f"unknown scenario(s) {bad}; choose from {list(SCENARIOS)}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    figures: dict[str, Any] = {
        "target": TARGET,
        "match": MATCH,
        "host": f"mlp 40-{'-'.join(map(str, HIDDEN))}-10",
        "seeds": args.seeds,
        "pretrain_epochs": args.pretrain,
        "epochs": args.epochs,
        "lrs": args.lrs,
        "quick": args.quick,
        "scenarios": {},
    }
    for scenario in scenarios:
        runs = seed_runs(
            scenario,
            args.seeds,
            lambda seed: one_seed(seed, scenario, args, ARMS),  # noqa: B023 (called before the loop moves on)
            lambda r: (
                f"{r['arm']:<46} {r['trainable']:>8,} trainable, lr {r['lr']:g}: {r['before']:.3f} -> "
                f"{r['after']:.3f} ({r['gain']:+.3f}), seeds kept {r['kept']} ({r['seconds']:.1f} s)"
            ),
        )
        summary = summarise(runs, ARMS)
        print(
            f"\nscenario {scenario} ({SCENARIOS[scenario]} of 40 features permuted, gain/offset/noise): "
            f"{figures['host']} host ({runs[0]['host_params']:,} weights), {args.pretrain} epochs on MNIST-1D, "
            f"then {args.epochs} epochs on the shifted task; mean ± 95% CI over {args.seeds} seed(s)\n"
        )
        print(format_table(summary) + "\n")
        print(f"SUMMARY {scenario}: {verdict(summary)}\n", flush=True)
        figures["scenarios"][scenario] = {**summary, "verdict": verdict(summary), "runs": runs}
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print(f"total {figures['seconds']:.0f} s")
    if args.json:
        write_result(args.json, __file__, figures, started, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
