"""Distillation with a seed lattice: teacher, students, growth, and seeds vs full fine-tuning.

Run from the repository root::

    .venv/bin/python benchmarks/distill.py [--config configs/distill.yaml] [--seeds 3]
        [--ft-epochs 30] [--policy runs/tamiyo-ppo/policy] [--out runs/bench-distill]

On the task, student and epoch budget of ``--config`` (default: MNIST-1D, a cnn1d [32, 64]
teacher, an MLP 40-64-64-10 student, 60 epochs), for each seed ``s`` in ``0..seeds-1``
(student init and data order, and the teacher's own seed, are ``s``):

- ``teacher``: the cnn1d teacher (trained ``distill.teacher_epochs``, best val epoch kept;
  cached on disk after the first run);
- ``student alone``: the student, cross-entropy only, no seeds (static controller);
- ``student distilled``: the KD loss, no seeds;
- ``distilled + heuristic``: the KD loss, seeds grown by the heuristic controller;
- ``distilled + tamiyo``: the same with the exported policy ``--policy`` (else "not given");
- ``big static``: the distilled student with the heuristic run's final seeds present,
  fossilized, from epoch 0 (``Trainer.graft_fossilized``): the grown size without growth;
- the fine-tuning protocol, both starting from the ``student distilled`` weights after its
  run, fresh Adam, KD loss, ``--ft-epochs`` E epochs:
  (a) ``fine-tune: full``: every student weight trains (static controller);
  (b) ``fine-tune: seeds only``: the student is frozen (``training.freeze_host: true``,
      its param group has lr 0) and the heuristic grows seeds; only seed weights train.
  For both: the accuracy gain (end - start test accuracy) and the trainable parameters
  (a: the student's; b: the seeds present at the end, culled ones not counted).

``--quick`` (1 seed, 30 student epochs, E=20, a 20-epoch teacher) and ``--json PATH`` (the
table and the ratios) are for benchmarks/run_all.py.

Printed: one table, mean ± 95% CI (Student t) over seeds of test accuracy, the share of
the teacher's test accuracy retained (per seed, student / its teacher), the gain for the
fine-tuning rows, trainable and total parameters, and wall seconds; then the parameter
ratio full / seeds-only and the parameters per point of accuracy gained. Written to
``--out``: ``distill_table.csv`` (the table) and ``distill_runs.csv`` (one row per run).

It takes a few minutes on 2 CPU cores once the teachers are cached. The measured table is in
BENCHMARKS.md (section 3, second figure), with an earlier run's readings for comparison.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    DISTILL_ROWS,
    Column,
    distill_arguments,
    grown_label,
    load_policy_arg,
    missing_row,
    play,
    pm,
    run_config,
    student_arms,
    text_table,
    write_csv,
    write_result,
)

from esper_ray.config import RunConfig
from esper_ray.simic.evaluate import mean_ci
from esper_ray.tamiyo.controllers import HeuristicController, StaticController
from esper_ray.tasks import load_task
from esper_ray.tolaria.distill import DistillConfig, load_distill_config, make_distillation
from esper_ray.tolaria.trainer import Trainer

ROWS = (*DISTILL_ROWS, "fine-tune: full", "fine-tune: seeds only")


def _row(name: str, seed: int, trainer: Trainer | None, started: float, **extra: Any) -> dict[str, Any]:
    row = {"row": name, "seed": seed, "seconds": round(time.perf_counter() - started, 2)}
    if trainer is not None:
        counts = trainer.host.param_count()
        trainable = counts["seeds"] if trainer.cfg.training.freeze_host else counts["total"]
        row |= {
            "test_acc": trainer.last["test_acc"],
            "trainable_params": trainable,
            "total_params": counts["total"],
            "seed_params": counts["seeds"],
            "germinations": sum(e.get("kind") == "germinate" for e in trainer.events),
            "grown": grown_label(trainer),
        }
    return row | extra


def one_seed(base: RunConfig, dcfg: DistillConfig, data, seed: int, ft_epochs: int, policy) -> list[dict]:
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    loss = make_distillation(dcfg.model_copy(update={"teacher_seed": seed}), data, base)
    teacher = loss.teacher
    rows.append(
        {
            "row": "teacher",
            "seed": seed,
            "seconds": teacher.meta["metrics"].get("train_seconds", round(time.perf_counter() - t0, 2)),
            "test_acc": teacher.test_acc,
            "trainable_params": teacher.host.param_count()["host"],
            "total_params": teacher.host.param_count()["host"],
            "seed_params": 0,
            "germinations": 0,
            "grown": f"({teacher.source})",
        }
    )

    arms, distilled = student_arms(base, data, loss, seed, policy, lambda name, tr, t: _row(name, seed, tr, t))
    rows += arms

    # Fine-tuning protocol: both arms start from the distilled student's final weights.
    start_weights = distilled.host.host_state_dict()
    start_acc = distilled.last["test_acc"]
    for name, frozen, kind in (("fine-tune: full", False, "static"), ("fine-tune: seeds only", True, "heuristic")):
        t = time.perf_counter()
        cfg = run_config(base, seed, kind, epochs=ft_epochs, freeze_host=frozen)
        ft = Trainer(cfg, data, loss_fn=loss)
        ft.host.load_host_state_dict(start_weights)
        ft.remember_good()  # the governor's rollback point is these weights, not the random init
        ctl = StaticController() if kind == "static" else HeuristicController(cfg.controller.plateau_patience)
        play(ft, ctl)
        rows.append(_row(name, seed, ft, t, start_acc=start_acc, gain=ft.last["test_acc"] - start_acc))
    for r in rows:
        r["retained"] = r["test_acc"] / teacher.test_acc
    return rows


def summarise(runs: list[dict[str, Any]], seeds: int, policy_given: bool) -> list[dict[str, Any]]:
    table = []
    for name in ROWS:
        rs = [r for r in runs if r["row"] == name]
        if not rs:
            table.append(missing_row(name, policy_given))
            continue
        acc, kept = mean_ci([r["test_acc"] for r in rs]), mean_ci([r["retained"] for r in rs])
        row = {
            "row": name,
            "n": len(rs),
            "test_acc": acc.mean,
            "test_acc_ci95": acc.half_width,
            "retained": kept.mean,
            "retained_ci95": kept.half_width,
            "gain": math.nan,
            "gain_ci95": math.nan,
            "trainable_params": sum(r["trainable_params"] for r in rs) / len(rs),
            "total_params": sum(r["total_params"] for r in rs) / len(rs),
            "germinations": sum(r["germinations"] for r in rs) / len(rs),
            "seconds": sum(r["seconds"] for r in rs) / len(rs),
            "note": "; ".join(sorted({r["grown"] for r in rs if r["grown"]})),
        }
        if "gain" in rs[0]:
            g = mean_ci([r["gain"] for r in rs])
            row["gain"], row["gain_ci95"] = g.mean, g.half_width
        table.append(row)
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    """The printed table: accuracy, share of the teacher's, gain, parameters, germinations, seconds."""
    columns = [
        Column("test acc", 15, lambda r: pm(r["test_acc"], r["test_acc_ci95"], ".4f")),
        Column("of teacher", 15, lambda r: f"{r['retained']:>6.1%} ± {r['retained_ci95']:>5.1%}"),
        Column("gain", 16, lambda r: pm(r["gain"], r["gain_ci95"], "+.4f")),
        Column("trainable", 9, lambda r: f"{r['trainable_params']:,.0f}"),
        Column("total", 7, lambda r: f"{r['total_params']:,.0f}"),
        Column("germ.", 5, lambda r: f"{r['germinations']:.2f}"),
        Column("sec", 5, lambda r: f"{r['seconds']:.1f}"),
    ]
    return text_table(table, columns, label_width=26)


def main(argv: list[str] | None = None) -> int:
    p = distill_arguments(
        __doc__,
        "configs/distill.yaml",
        "runs/bench-distill",
        quick="1 seed, 30 student epochs, E=20, a 20-epoch teacher",
        json="also write the table and the ratios to this JSON file",
    )
    p.add_argument("--ft-epochs", type=int, default=30, help="E: epochs of each fine-tuning arm")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.ft_epochs = 1, 20
        args.overrides = ["training.epochs=30", "distill.teacher_epochs=20", *args.overrides]
    torch.set_num_threads(1)

    base, dcfg = load_distill_config(args.config, args.overrides)
    policy = load_policy_arg(args.policy)
    data = load_task(base.task)
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        rs = one_seed(base, dcfg, data, seed, args.ft_epochs, policy)
        runs += rs
        print(
            f"seed {seed}: " + ", ".join(f"{r['row']} {r['test_acc']:.3f}" for r in rs),
            flush=True,
        )
    table = summarise(runs, args.seeds, policy is not None)
    print(
        f"\n{data.name}: teacher {dcfg.teacher.kind} {dcfg.teacher.hidden}, student {base.host.kind} "
        f"{base.host.hidden}, {base.training.epochs} epochs, T={dcfg.temperature}, w={dcfg.weight}, "
        f"fine-tuning E={args.ft_epochs}; mean ± 95% CI over {args.seeds} seeds\n"
    )
    print(format_table(table))
    by = {r["row"]: r for r in table}
    full, seeds_only = by["fine-tune: full"], by["fine-tune: seeds only"]
    ratio = full["trainable_params"] / max(seeds_only["trainable_params"], 1)
    per_point = {
        k: r["trainable_params"] / (100 * r["gain"]) if r["gain"] > 0 else math.inf
        for k, r in (("full", full), ("seeds", seeds_only))
    }
    print(
        f"\nfine-tuning: full trains {full['trainable_params']:,.0f} params for a gain of {full['gain']:+.4f}; "
        f"seeds only {seeds_only['trainable_params']:,.0f} params for {seeds_only['gain']:+.4f}.\n"
        f"trainable-parameter ratio full / seeds only: {ratio:.1f}x; params per accuracy point gained: "
        f"full {per_point['full']:,.0f}, seeds only {per_point['seeds']:,.0f}"
        + (f" ({per_point['full'] / per_point['seeds']:.1f}x)" if math.isfinite(per_point["full"]) else "")
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.json:
        write_result(
            args.json,
            __file__,
            {
                "seeds": args.seeds,
                "ft_epochs": args.ft_epochs,
                "epochs": base.training.epochs,
                "quick": args.quick,
                "table": table,
                "param_ratio": ratio,
                "params_per_point": per_point,
                "params_per_point_ratio": per_point["full"] / per_point["seeds"]
                if math.isfinite(per_point["full"]) and math.isfinite(per_point["seeds"])
                else None,
            },
            started,
            argv,
        )
    write_csv(table, out / "distill_table.csv")
    write_csv(runs, out / "distill_runs.csv")
    print(f"\nwritten: {out}/distill_table.csv, {out}/distill_runs.csv ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
