"""Which growth helps which task family: test accuracy gain of hand-placed seeds over no growth.

For the first few tasks drawn per family from ``configs/task_families.yaml`` (train
distribution first, then the held-out one for the families only it has; each task with its own
host), the host is trained with no growth and with each of a few seeds
placed at a fixed slot as already FOSSILIZED from the first step (``Trainer.graft_fossilized``,
so what is measured is the capacity, not the lifecycle): ``conv1d@input``, ``norm@input``,
``lowrank@input``, ``residual_mlp@input``, ``residual_mlp@hidden0``, ``residual_mlp@last`` (the
last hidden slot), ``residual_mlp@true`` (the ground-truth slot of a bottleneck task) and
``conv2d@input``. Every run uses the family's training overrides
(``esper_ray.tasks.training_overrides``: bottleneck tasks start from the task's damaged host,
frozen) and short RL-sized episodes (``--epochs`` epochs, batch ``--batch-size``, Adam 1e-3). A seed that
does not fit a task's slot is left blank. Each (task, growth) is trained with ``--repeats``
training seeds and averaged.

It prints, per family, the accuracy with no growth and the mean gain (± the standard deviation
over tasks) of every growth, the best growth and how many tasks it wins, and writes the rows to
``benchmarks/results/task_families.csv`` (one row per family and growth; rows of families not
run this time, e.g. with ``--families``, are kept).

Run (258 short training runs: about ten minutes on the shared 2-core machine; under the shared lock)::

    flock /tmp/esper-heavy.lock .venv/bin/python benchmarks/task_families.py
    .venv/bin/python benchmarks/task_families.py --tasks 1 --repeats 1 --families saturated --out /tmp/tf.csv

What to expect: the best growth differs by family: ``conv1d@input`` on MNIST-1D signals (MLP and
cnn1d hosts), ``norm@input`` on scaleshift (little on its nuisance-free tasks, ``gain_decades``
0), ``residual_mlp@true`` on bottleneck (other slots gain less), a nonlinear input seed
(``residual_mlp@input``) on interaction played on narrow hosts; on digits ``conv2d@input``, a
per-pixel ``residual_mlp`` and ``norm`` at the input all help by a few points (not a clean
conv2d family); on saturated no growth gains anything. The measured table is in
``benchmarks/results/task_families.csv``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import write_result

from esper_ray.blueprints import BlueprintShapeError
from esper_ray.blueprints.library import STANDARD_BLUEPRINTS
from esper_ray.config import RunConfig
from esper_ray.hosts import HostConfig
from esper_ray.tasks import (
    TaskConfig,
    TaskData,
    load_distribution,
    load_task,
    sample_tasks,
    training_overrides,
)
from esper_ray.tolaria.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
GROWTHS = (
    "none",
    "conv1d@input",
    "norm@input",
    "lowrank@input",
    "residual_mlp@input",
    "residual_mlp@hidden0",
    "residual_mlp@last",
    "residual_mlp@true",
    "conv2d@input",
)


def _slot(growth: str, data: TaskData, host: HostConfig) -> str | None:
    """The slot name a growth places its seed at on this task, or None if it has no such slot."""
    where = growth.split("@")[1]
    if where == "true":
        return data.meta.get("ground_truth_slot")
    if where == "last":
        return f"hidden{len(host.hidden) - 1}"
    return where


def train_once(
    task: TaskConfig, data: TaskData, growth: str, epochs: int, seed: int, batch_size: int = 50
) -> float | None:
    """Final test accuracy of the task's host with ``growth`` grafted from the start (None: it does not fit)."""
    host = task.host or HostConfig()
    training = {
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "eval_test": False,
        "threads": 1,
        **training_overrides(task),
    }
    cfg = RunConfig.model_validate({"task": task.model_dump(), "host": host.model_dump(), "training": training})
    trainer = Trainer(cfg, data)
    if growth != "none":
        blueprint, _ = growth.split("@")
        slot = _slot(growth, data, host)
        if slot is None or slot not in trainer.host.slots:
            return None
        try:
            trainer.graft_fossilized(slot, STANDARD_BLUEPRINTS[blueprint])
        except BlueprintShapeError:
            return None
    for _ in range(epochs):
        trainer.train_epoch()
    return float(trainer.last["test_acc"])


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "task_families.yaml"))
    parser.add_argument(
        "--split", default="train,heldout", help="the config's distributions to draw from (comma-separated)"
    )
    parser.add_argument("--tasks", type=int, default=3, help="tasks per family (the first ones drawn)")
    parser.add_argument("--repeats", type=int, default=2, help="training seeds per (task, growth)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--families", nargs="*", help="only these families")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "task_families.csv"))
    parser.add_argument("--json", help="also write the rows as a result file (benchmarks/common.py)")
    return parser.parse_args()


def _tasks_by_family(args: argparse.Namespace) -> dict[str, list[TaskConfig]]:
    """The first ``args.tasks`` tasks of each family (train before held-out)."""
    drawn = [t for key in args.split.split(",") for t in sample_tasks(load_distribution(args.config, key=key))]
    by_family: dict[str, list[TaskConfig]] = {}
    for task in drawn:
        if args.families and task.family not in args.families:
            continue
        by_family.setdefault(task.family, [])
        if len(by_family[task.family]) < args.tasks:
            by_family[task.family].append(task)
    return by_family


def _family_rows(family: str, acc: dict[str, list[float | None]]) -> list[dict[str, Any]]:
    """One row per growth: its gain over no growth across the family's tasks; prints the best."""
    rows = []
    base = acc["none"]
    best, best_gain = "none", 0.0
    for growth in GROWTHS:
        pairs = [(a, b) for a, b in zip(acc[growth], base, strict=True) if a is not None and b is not None]
        if not pairs:
            continue
        gains = [a - b for a, b in pairs]
        mean = statistics.fmean(gains)
        if growth != "none" and mean > best_gain:
            best, best_gain = growth, mean
        rows.append(
            {
                "family": family,
                "growth": growth,
                "tasks": len(pairs),
                "mean_acc": round(statistics.fmean(a for a, _ in pairs), 4),
                "mean_gain": round(mean, 4),
                "sd_gain": round(statistics.stdev(gains) if len(gains) > 1 else 0.0, 4),
                "tasks_gaining": sum(g > 0 for g in gains),
            }
        )
    print(f"{family}: best growth {best} ({best_gain:+.3f})", flush=True)
    return rows


def _print_table(rows: list[dict[str, Any]], fams: list[str]) -> None:
    print(f"{'growth':<22}" + "".join(f"{f:>16}" for f in fams))
    for growth in GROWTHS:
        cells = []
        for f in fams:
            row = next((r for r in rows if r["family"] == f and r["growth"] == growth), None)
            if row is None:
                cells.append(f"{'-':>16}")
            elif growth == "none":
                cells.append(f"{'acc ' + format(row['mean_acc'], '.3f'):>16}")
            else:
                cells.append(f"{format(row['mean_gain'], '+.3f') + ' ±' + format(row['sd_gain'], '.3f'):>16}")
        print(f"{growth:<22}" + "".join(cells))


def _write_csv(out: Path, rows: list[dict[str, Any]], run: set[str]) -> list[dict[str, Any]]:
    """Write ``rows``, keeping the rows of families not in ``run`` (e.g. after --families)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        with out.open(newline="") as f:
            kept = [r for r in csv.DictReader(f) if r["family"] not in run]
        rows = kept + rows
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main() -> None:
    args = _arguments()
    torch.set_num_threads(1)
    by_family = _tasks_by_family(args)
    rows = []
    started, cpu_started = time.perf_counter(), time.process_time()
    runs = 0
    print(f"{args.tasks} tasks per family, {args.repeats} training seeds, {args.epochs} epochs")
    for family, tasks in by_family.items():
        acc: dict[str, list[float | None]] = {g: [] for g in GROWTHS}
        for task in tasks:
            data = load_task(task)
            for growth in GROWTHS:
                scores = [
                    train_once(task, data, growth, args.epochs, seed, args.batch_size) for seed in range(args.repeats)
                ]
                runs += sum(s is not None for s in scores)
                acc[growth].append(None if scores[0] is None else statistics.fmean(scores))
            host = task.host or HostConfig()
            print(
                f"  {data.name:<44} host {host.kind} {host.hidden}: none {acc['none'][-1]:.3f}  "
                + "  ".join(f"{g} {acc[g][-1] - acc['none'][-1]:+.3f}" for g in GROWTHS[1:] if acc[g][-1] is not None),
                flush=True,
            )
        rows += _family_rows(family, acc)

    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    per_run = f"{elapsed / max(runs, 1):.2f} s wall, {cpu / max(runs, 1):.2f} s CPU per run, data loading included"
    print(f"\n{runs} runs in {elapsed:.0f} s ({per_run})\n")
    _print_table(rows, list(by_family))
    out = Path(args.out)
    rows = _write_csv(out, rows, set(by_family))
    print(f"\nwrote {out}")
    if args.json:
        write_result(args.json, __file__, {"rows": rows}, started)


if __name__ == "__main__":
    main()
