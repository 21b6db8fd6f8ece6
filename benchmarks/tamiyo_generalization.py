"""Tamiyo on tasks, families, host depths and blueprints it never saw, against the hardest baselines.

Every controller plays the same held-out episodes of ``configs/tamiyo.yaml`` (its
``heldout_distribution``: two whole families never trained on, hosts of an unseen depth and
widths) with a catalogue training never showed: the standard blueprints plus two that Karn
invents from another seed, in a shuffled order. Then:

- pooled paired differences in final test accuracy: Tamiyo minus best-fixed (the best open-loop
  schedule per static host context, searched on the training tasks), minus the trial heuristic
  and the plateau heuristic, minus its own open-loop replay, minus no growth;
- per held-out family, Tamiyo minus the strongest heuristic;
- Tamiyo on the same episodes with the catalogue reversed (its mean accuracy should not move);
- germination fidelity on the held-out bottleneck tasks (depth 5, never trained on).

Run:     .venv/bin/python benchmarks/tamiyo_generalization.py --policy policies/tamiyo --seeds 2
         (--quick: one seed and the first two tasks of each held-out family, to try it out)
Expect:  the whole comparison takes roughly an hour on 2 cores (the trial heuristic and the
         best-fixed search dominate); figures in BENCHMARKS.md. Writes
         benchmarks/results/tamiyo_generalization.json (the figures) and
         tamiyo_generalization_episodes.csv (one row per controller x episode).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BASELINES = ("static", "heuristic", "trial", "best-fixed", "replay")
TAMIYO = "policy:tamiyo"


@dataclass
class Paired:
    """Mean ± 95% CI of a paired difference in final test accuracy over the same episodes."""

    versus: str
    mean: float
    ci95: float
    episodes: int


@dataclass
class Figures:
    """What this benchmark measures (the JSON it writes)."""

    policy: str
    seeds: list[int]
    heldout_tasks: int
    controllers: dict[str, dict[str, float]]  # name -> test_acc, ci95, germinations, culls, seconds
    pooled: list[Paired]
    strongest_heuristic: str
    per_family: dict[str, Paired]
    reversed_catalogue_change: float
    heldout_bottleneck_fidelity: float | None
    seconds: float


def family(task: str) -> str:
    return task.split("/")[0]


def paired(rows: list[dict[str, Any]], a: str, b: str, keep=lambda r: True) -> Paired:
    from esper_ray.simic.evaluate import mean_ci

    by = {(r["controller"], r["task"], r["seed"]): r["final_test_acc"] for r in rows if keep(r)}
    diffs = [v - by[(b, t, s)] for (c, t, s), v in by.items() if c == a and (b, t, s) in by]
    stat = mean_ci(diffs)
    return Paired(b, stat.mean, stat.half_width, stat.n)


def heldout_env(env: dict[str, Any], *, reverse: bool = False, quick: bool = False) -> dict[str, Any]:
    """The recipe's env with the evaluation catalogue (unseen Karn inventions, shuffled)."""
    run = dict(env.get("run", {}))
    blueprints = {**run.get("blueprints", {}), "karn_seed": 1000, "shuffle_seed": 7, "reverse": reverse}
    out = {**env, "run": {**run, "blueprints": blueprints}}
    if quick:
        dist = env["heldout_distribution"]
        out["heldout_distribution"] = {
            **dist,
            "families": [{**f, "count": min(2, f["count"])} for f in dist["families"]],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, default=REPO / "policies" / "tamiyo")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tamiyo.yaml")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from esper_ray.config import load_config
    from esper_ray.simic.config import SimicConfig
    from esper_ray.simic.evaluate import evaluate_controllers, format_table, run_evaluation
    from esper_ray.tamiyo.policy import load_policy
    from esper_ray.tasks import cache_dir

    start = time.perf_counter()
    cfg = load_config(args.config, model=SimicConfig)
    policy = load_policy(args.policy)
    seeds = list(range(1 if args.quick else args.seeds))
    env = heldout_env(cfg.env, quick=args.quick)
    work = Path(cfg.out_dir) / "tamiyo-generalization"
    rows, table, _ = run_evaluation(
        env, BASELINES, {TAMIYO: policy}, seeds, work, progress=print, cache=cache_dir() / "best_fixed"
    )
    rows += evaluate_controllers(
        {f"{TAMIYO}(reversed)": lambda seed: policy}, heldout_env(cfg.env, reverse=True, quick=args.quick), seeds
    )
    print(format_table(table))

    acc = {t["controller"]: t for t in table}
    others = [n for n in acc if n != TAMIYO and not n.startswith("big-static")]
    pooled = [paired(rows, TAMIYO, n) for n in others]
    strongest = max(("heuristic", "trial"), key=lambda n: acc[n]["test_acc"])
    families = sorted({family(r["task"]) for r in rows})
    per_family = {f: paired(rows, TAMIYO, strongest, keep=lambda r, f=f: family(r["task"]) == f) for f in families}
    reversed_acc = [r["final_test_acc"] for r in rows if r["controller"] == f"{TAMIYO}(reversed)"]
    mine = [r for r in rows if r["controller"] == TAMIYO]
    bottleneck = [r for r in mine if r["fidelity_hits"] is not None and r["germinations"]]
    fidelity = sum(r["fidelity_hits"] for r in bottleneck) / sum(r["germinations"] for r in bottleneck) if bottleneck else None
    figures = Figures(
        policy=str(args.policy),
        seeds=seeds,
        heldout_tasks=len({r["task"] for r in mine}),
        controllers={
            n: {k: acc[n][k] for k in ("test_acc", "test_acc_ci95", "germinations", "culls", "seconds")} for n in acc
        },
        pooled=pooled,
        strongest_heuristic=strongest,
        per_family=per_family,
        reversed_catalogue_change=sum(reversed_acc) / len(reversed_acc) - acc[TAMIYO]["test_acc"],
        heldout_bottleneck_fidelity=fidelity,
        seconds=time.perf_counter() - start,
    )
    print(f"\nTamiyo minus (pooled, {figures.heldout_tasks} held-out tasks x {len(seeds)} seeds):")
    for p in pooled:
        print(f"  {p.versus:<26} {p.mean:+.4f} ± {p.ci95:.4f}  (n={p.episodes})")
    print(f"per held-out family, Tamiyo minus the strongest heuristic ({strongest}):")
    for f, p in per_family.items():
        print(f"  {f:<26} {p.mean:+.4f} ± {p.ci95:.4f}  (n={p.episodes})")
    print(f"reversed catalogue: mean accuracy changes by {figures.reversed_catalogue_change:+.4f}")
    if fidelity is not None:
        print(f"germination fidelity on held-out bottleneck tasks: {fidelity:.1%}")
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"tamiyo_generalization{suffix}.json").write_text(json.dumps(asdict(figures), indent=1))
    with (args.out / f"tamiyo_generalization{suffix}_episodes.csv").open("w", newline="") as f:
        keys = ["controller", "task", "seed", "final_test_acc", "seed_params", "germinations", "culls", "seconds"]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: r.get(k, math.nan) for k in keys} for r in rows)
    print(f"written: {args.out}/tamiyo_generalization{suffix}.json and _episodes.csv ({figures.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
