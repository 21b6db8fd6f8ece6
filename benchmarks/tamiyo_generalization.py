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
         (--policy is repeatable; --quick: one seed and two tasks of each held-out family;
         --trial-seeds 1 --trial-top-slots 2: the trial heuristic, whose trials cost most, on the
         first seed only and at the two open slots its signals rank highest; --policy-seeds 1:
         the policies on the first seed only. Each
         group of controllers keeps its rows under runs/tamiyo-generalization, keyed by the config
         and seeds, so a second policy replays none of the baselines.)
Expect:  the whole comparison takes roughly an hour on 2 cores (the trial heuristic and the
         best-fixed search dominate); figures in BENCHMARKS.md. Writes
         benchmarks/results/tamiyo_generalization.json (the figures) and
         tamiyo_generalization_episodes.csv (one row per controller x episode).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import write_result

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
    return task.split("/")[0].split("[")[0]


def episode_key(task: str) -> str:
    """A task's name without its settings in brackets: the data seed after it identifies the task, and
    names written by earlier versions rounded the settings differently."""
    return re.sub(r"\[.*?\]", "", task)


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


SCALARS = ("controller", "task", "seed", "final_test_acc", "final_val_acc", "seed_params", "germinations")
SCALARS += ("culls", "seconds", "fidelity_hits", "ground_truth_slot")


def cached_rows(work: Path, name: str, key: str, play) -> list[dict[str, Any]]:
    """The rows of one group of controllers: from ``work/<name>-<key>.json`` when an earlier run
    with the same config and seeds wrote it (episodes are deterministic), else played now and kept."""
    path = work / f"{name}-{key}.json"
    if path.exists():
        print(f"{name}: rows from {path}")
        rows = json.loads(path.read_text())
    else:
        rows = [{k: r.get(k) for k in SCALARS} for r in play()]
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    # Paired on the episode (task seed and training seed), whatever precision the name's settings had.
    return [{**r, "task_name": r["task"], "task": episode_key(r["task"])} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, action="append", help="an exported policy (repeatable)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tamiyo.yaml")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--baselines", default=",".join(BASELINES[:-1]), help="comma-separated (replay is per policy)")
    parser.add_argument("--trial-seeds", type=int, help="seeds of the (costly) trial heuristic (default --seeds)")
    parser.add_argument("--policy-seeds", type=int, help="seeds the policies play (default --seeds)")
    parser.add_argument("--trial-top-slots", type=int, help="the trial heuristic tries only the N best-signalled slots")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from esper_ray.config import load_config
    from esper_ray.simic.config import SimicConfig
    from esper_ray.simic.evaluate import evaluate_controllers, format_table, run_evaluation, summary_table
    from esper_ray.tamiyo.controllers import policy_label
    from esper_ray.tamiyo.policy import load_policy
    from esper_ray.tasks import cache_dir

    start = time.perf_counter()
    cfg = load_config(args.config, model=SimicConfig)
    seeds = list(range(1 if args.quick else args.seeds))
    env = heldout_env(cfg.env, quick=args.quick)
    key = hashlib.sha256(json.dumps([env, seeds], sort_keys=True, default=str).encode()).hexdigest()[:12]
    work = Path(cfg.out_dir) / "tamiyo-generalization"
    best_fixed_cache = cache_dir() / "best_fixed"

    def play(baselines, policies, seeds=seeds, env=env):
        return lambda: run_evaluation(
            env, baselines, policies, seeds, work / "evaluation", progress=print, cache=best_fixed_cache
        )[0]

    rows: list[dict[str, Any]] = []
    for name in [b for b in args.baselines.split(",") if b]:
        if name == "trial" and (args.trial_seeds or args.trial_top_slots):  # paired on the seeds it played
            few = seeds[: args.trial_seeds or len(seeds)]
            run = env["run"]
            controller = run.get("controller", {})
            trial = {**controller.get("trial", {}), "top_slots": args.trial_top_slots}
            trial_env = {**env, "run": {**run, "controller": {**controller, "trial": trial}}}
            trial_key = hashlib.sha256(json.dumps([trial_env, few], sort_keys=True).encode()).hexdigest()[:12]
            rows += cached_rows(work, name, trial_key, play([name], {}, few, trial_env))
        else:
            rows += cached_rows(work, name, key, play([name], {}))
    labels = []
    for path in args.policy or []:
        policy, label = load_policy(path), f"policy:{policy_label(path)}"
        labels.append(label)
        weights = (path / "policy.safetensors").read_bytes().hex()
        played = seeds[: args.policy_seeds or len(seeds)]
        pkey = hashlib.sha256(f"{key}/{weights}/sample={policy.sample}/{played}".encode()).hexdigest()[:12]
        rows += cached_rows(work, label.replace(":", "-"), pkey, play(["replay"], {label: policy}, played))
        rows += cached_rows(
            work,
            label.replace(":", "-") + "-reversed",
            pkey,
            lambda p=policy, lab=label, played=played: evaluate_controllers(
                {f"{lab}(reversed)": p.episode}, heldout_env(cfg.env, reverse=True, quick=args.quick), played
            ),
        )
    table = summary_table(rows)
    print(format_table(table))
    acc = {t["controller"]: t for t in table}
    rules = [n for n in ("heuristic", "trial") if n in acc]
    strongest = max(rules, key=lambda n: acc[n]["test_acc"]) if rules else "static"
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for label in labels:
        others = [n for n in acc if n != label and not n.startswith(("policy:", "big-static"))]
        others += [n for n in (f"replay({label})", f"big-static({label})") if n not in others]
        pooled = [paired(rows, label, n) for n in others if n in acc]
        families = sorted({family(r["task"]) for r in rows})
        per_family = {f: paired(rows, label, strongest, keep=lambda r, f=f: family(r["task"]) == f) for f in families}
        mine = [r for r in rows if r["controller"] == label]
        reversed_acc = [r["final_test_acc"] for r in rows if r["controller"] == f"{label}(reversed)"]
        bottleneck = [r for r in mine if r["fidelity_hits"] is not None and r["germinations"]]
        placed = sum(r["germinations"] for r in bottleneck)
        fidelity = sum(r["fidelity_hits"] for r in bottleneck) / placed if placed else None
        figures = Figures(
            policy=label,
            seeds=sorted({r["seed"] for r in mine}),
            heldout_tasks=len({r["task"] for r in mine}),
            controllers={
                n: {k: acc[n][k] for k in ("test_acc", "test_acc_ci95", "germinations", "culls", "seconds")}
                for n in acc
            },
            pooled=pooled,
            strongest_heuristic=strongest,
            per_family=per_family,
            reversed_catalogue_change=sum(reversed_acc) / len(reversed_acc) - acc[label]["test_acc"],
            heldout_bottleneck_fidelity=fidelity,
            seconds=time.perf_counter() - start,
        )
        results.append(asdict(figures))
        print(f"\n{label} minus (pooled, {figures.heldout_tasks} held-out tasks x {len(figures.seeds)} seeds):")
        for p in pooled:
            print(f"  {p.versus:<34} {p.mean:+.4f} ± {p.ci95:.4f}  (n={p.episodes})")
        print(f"per held-out family, {label} minus the strongest heuristic ({strongest}):")
        for f, p in per_family.items():
            print(f"  {f:<34} {p.mean:+.4f} ± {p.ci95:.4f}  (n={p.episodes})")
        print(f"reversed catalogue: mean accuracy changes by {figures.reversed_catalogue_change:+.4f}")
        if fidelity is not None:
            print(f"germination fidelity on held-out bottleneck tasks: {fidelity:.1%}")
    figures = {"table": table, "policies": results}
    write_result(args.out / f"tamiyo_generalization{suffix}.json", __file__, figures, start)
    with (args.out / f"tamiyo_generalization{suffix}_episodes.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*SCALARS, "task_name"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"written: {args.out}/tamiyo_generalization{suffix}.json and _episodes.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
