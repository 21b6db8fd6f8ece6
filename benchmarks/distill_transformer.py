"""Distillation into a byte-level transformer with a seed lattice, in bits per byte.

Run from the repository root::

    .venv/bin/python benchmarks/distill_transformer.py [--config configs/distill_transformer.yaml]
        [--seeds 3] [--policy runs/tamiyo-ppo/policy] [--out runs/bench-distill-transformer] [KEY=VALUE ...]

On the task, student, teacher and epoch budget of ``--config`` (default: English text, 64-byte
windows; a 4-block d_model 128 transformer teacher; a 2-block d_model 64 student with three slots on
its residual stream), for each seed ``s`` in ``0..seeds-1`` (student init and data order; the teacher
is trained once, seed ``distill.teacher_seed``, and cached):

- ``teacher``: the teacher (``distill.teacher_epochs``, best validation epoch kept), trained on the
  task's whole training split (``--teacher-windows all``, the default) or its first N windows, while
  the students see ``task.n_train`` of them: the setting where distillation carries what the teacher
  learned from data the student never saw. It is saved to ``--out``/teacher and distilled from
  there (``distill.teacher_checkpoint``); ``--teacher-windows 0`` trains it on the student's windows;
- ``student alone (CE)``: the student, cross-entropy only, no seeds;
- ``student distilled``: the KD loss (per byte), no seeds;
- ``distilled + heuristic``: the KD loss, seeds grown by the heuristic controller;
- ``distilled + tamiyo``: the same with the exported policy ``--policy`` (else "not given");
- ``big static (grown size)``: the distilled student with the heuristic run's final seeds present,
  fossilized, from epoch 0: the grown size without growth.

Printed: mean ± 95% CI (Student t) over seeds of test bits per byte (lower is better) and next-byte
accuracy, the share of the teacher's bits-per-byte advantage over the student alone that each arm
closes, parameters and wall seconds. Written to ``--out``: ``table.csv`` and ``runs.csv``.
``--quick`` (1 seed; a tiny teacher on 400 windows and student on 96, 32-byte windows, a few epochs)
and ``--json PATH`` are for CI and benchmarks/run_all.py. Measured figures are in BENCHMARKS.md.
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
    pm,
    student_arms,
    text_table,
    write_csv,
    write_result,
)

from esper_ray.config import RunConfig
from esper_ray.simic.evaluate import mean_ci
from esper_ray.tasks import load_task
from esper_ray.tolaria.distill import get_teacher, load_distill_config, make_distillation
from esper_ray.tolaria.trainer import Trainer

ROWS = DISTILL_ROWS
QUICK = [
    "task.n_train=96",
    "task.params.context=32",
    "host.hidden=[32,32]",
    "host.context=32",
    "distill.teacher.hidden=[64,64]",
    "distill.teacher.context=32",
    "distill.teacher_epochs=3",
    "distill.gap_probe=32",
    "training.epochs=4",
    "training.probe_size=32",
    "blueprints.max_seed_params=20000",
]
LN2 = math.log(2.0)


def _row(name: str, seed: int, trainer: Trainer, started: float) -> dict[str, Any]:
    loss, acc = trainer.evaluate(trainer.data.x_test, trainer.data.y_test)
    counts = trainer.host.param_count()
    return {
        "row": name,
        "seed": seed,
        "test_bpb": loss / LN2,
        "test_acc": acc,
        "params": counts["total"],
        "seed_params": counts["seeds"],
        "germinations": sum(e.get("kind") == "germinate" for e in trainer.events),
        "grown": grown_label(trainer),
        "seconds": round(time.perf_counter() - started, 2),
    }


def one_seed(base: RunConfig, loss, data, seed: int, policy) -> list[dict[str, Any]]:
    """Every student arm for one seed (the teacher's row is added by the caller)."""
    rows, _ = student_arms(base, data, loss, seed, policy, lambda name, tr, t: _row(name, seed, tr, t))
    return rows


def summarise(runs: list[dict[str, Any]], policy_given: bool) -> list[dict[str, Any]]:
    """One row per arm: mean ± 95% CI of bits per byte and accuracy, and the share of the teacher's
    advantage over the student alone that the arm closes (per seed, then averaged)."""
    teacher = next(r for r in runs if r["row"] == "teacher")
    alone = {r["seed"]: r["test_bpb"] for r in runs if r["row"] == "student alone (CE)"}
    table = []
    for name in ROWS:
        rs = [r for r in runs if r["row"] == name]
        if not rs:
            table.append(missing_row(name, policy_given))
            continue
        bpb, acc = mean_ci([r["test_bpb"] for r in rs]), mean_ci([r["test_acc"] for r in rs])
        closed = [
            (alone[r["seed"]] - r["test_bpb"]) / (alone[r["seed"]] - teacher["test_bpb"])
            for r in rs
            if r["seed"] in alone and alone[r["seed"]] > teacher["test_bpb"]
        ]
        gap = mean_ci(closed) if closed and name != "teacher" else None
        table.append(
            {
                "row": name,
                "n": len(rs),
                "test_bpb": bpb.mean,
                "test_bpb_ci95": bpb.half_width,
                "test_acc": acc.mean,
                "test_acc_ci95": acc.half_width,
                "gap_closed": gap.mean if gap else math.nan,
                "gap_closed_ci95": gap.half_width if gap else math.nan,
                "params": sum(r["params"] for r in rs) / len(rs),
                "germinations": sum(r["germinations"] for r in rs) / len(rs),
                "seconds": sum(r["seconds"] for r in rs) / len(rs),
                "note": "; ".join(sorted({r["grown"] for r in rs if r["grown"]})),
            }
        )
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    """The printed table: bits per byte, accuracy, gap closed, parameters, germinations, seconds."""
    columns = [
        Column("test bits/byte", 15, lambda r: pm(r["test_bpb"], r["test_bpb_ci95"], ".4f")),
        Column("next-byte acc", 15, lambda r: pm(r["test_acc"], r["test_acc_ci95"], ".4f")),
        Column(
            "gap closed",
            15,
            lambda r: "" if math.isnan(r["gap_closed"]) else f"{r['gap_closed']:>6.1%} ± {r['gap_closed_ci95']:>5.1%}",
        ),
        Column("params", 8, lambda r: f"{r['params']:,.0f}"),
        Column("germ.", 5, lambda r: f"{r['germinations']:.2f}"),
        Column("sec", 6, lambda r: f"{r['seconds']:.1f}"),
    ]
    return text_table(table, columns, label_width=25)


def main(argv: list[str] | None = None) -> int:
    p = distill_arguments(
        __doc__,
        "configs/distill_transformer.yaml",
        "runs/bench-distill-transformer",
        quick="1 seed, a tiny teacher and student, a few epochs",
        json="also write the table to this JSON file",
    )
    p.add_argument(
        "--teacher-windows",
        default="all",
        help="training windows the teacher sees: all (the whole training split), N, or 0 (the student's)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = 1
        args.overrides = [*QUICK, *args.overrides]
        args.teacher_windows = "400" if args.teacher_windows == "all" else args.teacher_windows
    torch.set_num_threads(1)
    started = time.perf_counter()
    base, dcfg = load_distill_config(args.config, args.overrides)
    policy = load_policy_arg(args.policy)
    data = load_task(base.task)
    out = Path(args.out)
    if args.teacher_windows != "0":
        n = None if args.teacher_windows == "all" else int(args.teacher_windows)
        teacher_task = base.task.model_copy(update={"n_train": n})
        own = get_teacher(dcfg, load_task(teacher_task))  # trained once, then from the disk cache
        folder = own.save(out / "teacher")
        dcfg = dcfg.model_copy(update={"teacher_checkpoint": str(folder)})
    loss = make_distillation(dcfg, data, base)
    teacher = loss.teacher
    runs: list[dict[str, Any]] = [
        {
            "row": "teacher",
            "seed": dcfg.teacher_seed,
            "test_bpb": teacher.meta["metrics"]["test_loss"] / LN2,
            "test_acc": teacher.test_acc,
            "params": teacher.host.param_count()["host"],
            "seed_params": 0,
            "germinations": 0,
            "grown": f"({teacher.source})",
            "seconds": teacher.meta["metrics"].get("train_seconds", 0.0),
        }
    ]
    print(
        f"teacher ({teacher.source}): test {runs[0]['test_bpb']:.4f} bits/byte, acc {teacher.test_acc:.4f}", flush=True
    )
    for seed in range(args.seeds):
        rs = one_seed(base, loss, data, seed, policy)
        runs += rs
        print(f"seed {seed}: " + ", ".join(f"{r['row']} {r['test_bpb']:.4f}" for r in rs), flush=True)
    table = summarise(runs, policy is not None)
    print(
        f"\n{data.name}: teacher {dcfg.teacher.kind} {dcfg.teacher.hidden} ({runs[0]['params']:,} weights), "
        f"student {base.host.kind} {base.host.hidden}, {base.training.epochs} epochs, T={dcfg.temperature}, "
        f"w={dcfg.weight}; mean ± 95% CI over {args.seeds} seeds; bits per byte on the test split\n"
    )
    print(format_table(table))
    seconds = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(table, out / "table.csv")
    write_csv(runs, out / "runs.csv")
    if args.json:
        write_result(
            args.json,
            __file__,
            {
                "seeds": args.seeds,
                "quick": args.quick,
                "task": data.name,
                "context": data.input_shape[0],
                "epochs": base.training.epochs,
                "student_windows": len(data.x_train),
                "teacher_windows": args.teacher_windows,
                "teacher": dcfg.teacher.model_dump(mode="json"),
                "student": base.host.model_dump(mode="json"),
                "table": table,
                "runs": runs,
                "seconds": seconds,
            },
            started,
            argv,
        )
    print(f"\nwritten: {out}/table.csv, {out}/runs.csv ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
