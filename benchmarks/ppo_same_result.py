"""The PPO wall time to the same result: one Simic recipe trained in several layouts, each policy
evaluated on the same held-out episodes.

Run (2 cores, heavy: under the shared lock; about 25 minutes for the Tamiyo recipe's PPO stage):

    flock /tmp/esper-heavy.lock .venv/bin/python benchmarks/ppo_same_result.py \
        --config configs/tamiyo.yaml --warm-start runs/tamiyo-bc/checkpoint \
        --layouts 0x1,2x1,2x8 --iterations 20 --eval-seeds 2 \
        --json benchmarks/results/ppo_same_result.json ppo.lr=0.0001 ppo.entropy_coeff=0.005 seed=0

(``seed=1`` and ``--json benchmarks/results/ppo_same_result_seed1.json``: the second seed BENCHMARKS.md shows.)

(``runs/tamiyo-bc/checkpoint`` is the behaviour-cloning stage of the recipe; the recipe's header in
``configs/tamiyo.yaml`` shows how to make it. Without ``--warm-start`` PPO starts from scratch.)

A layout ``RxN`` is R env runners (0: the driver samples) of N episodes each (N > 1: the batched
env). For each layout it runs ``esper_ray.simic.ppo.train_simic`` as ``esper-ray simic`` does (the
same config, overrides, seed, warm start, checkpoints and policy export) and times it end to end.
Then every exported policy plays the same held-out episodes of the recipe (its
``heldout_distribution``, with the evaluation catalogue of ``tamiyo_generalization.py``) and the
script prints each policy's mean final test accuracy and germinations per episode, and, paired on
the episodes, each layout minus the first one and minus no growth (the static controller, played on
the same episodes), with 95% confidence intervals. "The same result" means the interval of the
difference to the first layout holds 0.

Expect: the first layout (the recipe before the batched env) takes roughly twice as long as 2x8
on 2 quiet cores; the evaluation adds about 2 minutes per policy and seed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import write_result
from ppo_wall_time import layout_overrides, layout_parser, parse_layouts, start_ray
from tamiyo_generalization import episode_key, heldout_env

STATIC = "static"  # no growth: what every policy is also compared with


def train(cfg: Any, out: Path, warm_start: Path | None) -> dict[str, Any]:
    """Train ``cfg`` (a SimicConfig) into ``out`` as ``esper-ray simic`` does; its wall time and curve.
    A layout trained before into the same ``--work`` folder (its ``train.json`` and policy there) is
    read back, not trained again."""
    from esper_ray.simic.ppo import train_simic

    done = out / "train.json"
    if done.exists() and (out / "policy" / "policy.safetensors").exists():
        print(f"   trained before: {done}", flush=True)
        seconds = json.loads(done.read_text())["train_seconds"]
    else:
        start = time.perf_counter()
        train_simic(cfg, out, warm_start=warm_start, progress=True)
        seconds = time.perf_counter() - start
        done.write_text(json.dumps({"train_seconds": seconds}))
    curve = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines() if line]
    return {
        "train_seconds": seconds,
        "iterations": len(curve),
        # what the policy did while it trained (RLlib's window of recent episodes, per iteration)
        "germinations_curve": [round(row.get("esper_germinations", float("nan")), 3) for row in curve],
        "return_curve": [round(row.get("episode_return_mean", float("nan")), 4) for row in curve],
    }


def evaluate(policies: dict[str, Path], env: dict[str, Any], seeds: list[int]) -> list[dict[str, Any]]:
    """No growth (``static``) and every policy on the same held-out episodes: one row per
    (controller, task, seed)."""
    from envs import EnvConfig
    from esper_ray.config import validate_model
    from esper_ray.simic.evaluate import EpisodeRun, baseline_factories, evaluate_controllers
    from esper_ray.tamiyo.policy import load_policy

    run = EpisodeRun()
    settings = validate_model(EnvConfig, env, "env config").run.controller
    controllers = baseline_factories([STATIC], settings, run)
    controllers.update({label: load_policy(path).episode for label, path in policies.items()})
    rows = evaluate_controllers(controllers, env, seeds, progress=print, run=run)
    return [{**r, "task": episode_key(r["task"])} for r in rows]


def compare(rows: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[str, Any]]:
    """Per layout: mean final test accuracy ± 95% CI, germinations per episode, and paired on the
    episodes, minus the first layout and minus no growth (when it played)."""
    from esper_ray.simic.evaluate import mean_ci

    acc = {(r["controller"], r["task"], r["seed"]): r["final_test_acc"] for r in rows}

    def of(label: str) -> dict[tuple[str, int], float]:
        return {(t, s): v for (c, t, s), v in acc.items() if c == label}

    def minus(mine: dict[tuple[str, int], float], other: dict[tuple[str, int], float]) -> Any:
        return mean_ci([mine[k] - other[k] for k in mine if k in other])

    base, static = of(labels[0]), of(STATIC)
    out = {}
    for label in labels:
        mine = of(label)
        stat, diff = mean_ci(list(mine.values())), minus(mine, base)
        grown = [r["germinations"] for r in rows if r["controller"] == label and "germinations" in r]
        out[label] = {
            "test_acc": stat.mean,
            "test_acc_ci95": stat.half_width,
            "germinations": sum(grown) / len(grown) if grown else None,
            "minus_first": diff.mean,
            "minus_first_ci95": diff.half_width,
            "episodes": diff.n,
            "same_result": abs(diff.mean) <= diff.half_width,
        }
        if static:
            vs = minus(mine, static)
            out[label] |= {"minus_static": vs.mean, "minus_static_ci95": vs.half_width}
    return out


def main() -> None:
    parser = layout_parser(__doc__, "0x1,2x8", 20)
    parser.add_argument("--warm-start", type=Path, help="an offline (behaviour cloning) checkpoint to start from")
    parser.add_argument("--eval-seeds", type=int, default=2, help="training seeds of each held-out task")
    parser.add_argument("--work", type=Path, help="where the runs go (default: a temporary folder, removed)")
    args = parser.parse_args()
    layouts = parse_layouts(args.layouts)
    if args.warm_start is not None and not args.warm_start.is_dir():
        raise SystemExit(f"--warm-start: no checkpoint folder at {args.warm_start}")
    import ray

    from esper_ray.config import load_config
    from esper_ray.simic.config import SimicConfig

    start_ray()
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="esper-ppo-same-result-"))
    figures: dict[str, Any] = {
        "config": args.config,
        "overrides": args.overrides,
        "warm_start": str(args.warm_start) if args.warm_start else None,
        "iterations": args.iterations,
        "by_layout": {},
    }
    policies: dict[str, Path] = {}
    env: dict[str, Any] = {}
    try:
        for runners, envs in layouts:
            label = f"{runners}x{envs}"
            overrides = [*args.overrides, f"iterations={args.iterations}"]
            overrides += layout_overrides(runners, envs, args.cpus_per_runner)
            cfg = load_config(Path(args.config), overrides, model=SimicConfig)
            print(f"== {label}: training {args.iterations} iterations", flush=True)
            figures["by_layout"][label] = train(cfg, work / label, args.warm_start)
            policies[label] = work / label / "policy"
            env, figures["seed"] = heldout_env(cfg.env), cfg.seed  # the same for every layout
        seeds = list(range(args.eval_seeds))
        eval_start = time.perf_counter()
        rows = evaluate(policies, env, seeds)
        figures["eval_seconds"] = time.perf_counter() - eval_start
        figures["eval_seeds"] = seeds
        figures["heldout_tasks"] = len({r["task"] for r in rows})
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    labels = list(figures["by_layout"])
    base = figures["by_layout"][labels[0]]["train_seconds"]
    static = [r["final_test_acc"] for r in rows if r["controller"] == STATIC]
    figures["static_test_acc"] = sum(static) / len(static)
    for label, row in compare(rows, labels).items():
        figures["by_layout"][label].update(row, time_ratio_to_first=figures["by_layout"][label]["train_seconds"] / base)
    print(f"{args.config}, {args.iterations} PPO iterations, {figures['heldout_tasks']} held-out tasks x {seeds}:")
    for label, row in figures["by_layout"].items():
        print(
            f"  {label:>5}: trained in {row['train_seconds']:.0f} s ({row['time_ratio_to_first']:.2f} of "
            f"{labels[0]}); held-out test accuracy {row['test_acc']:.4f} ± {row['test_acc_ci95']:.4f}; minus "
            f"{labels[0]} {row['minus_first']:+.4f} ± {row['minus_first_ci95']:.4f} (n={row['episodes']}); "
            f"minus no growth {row.get('minus_static', float('nan')):+.4f} ± {row.get('minus_static_ci95', 0):.4f}; "
            f"{row['germinations'] or 0:.2f} germinations per episode"
        )
    if args.json:
        write_result(args.json, __file__, figures, started)
    ray.shutdown()


if __name__ == "__main__":
    main()
