"""PPO wall time per iteration on a Simic recipe: one env per runner against the batched env.

Run (2 cores, heavy: under the shared lock; about 10 minutes on the Tamiyo recipe):

    flock /tmp/esper-heavy.lock .venv/bin/python benchmarks/ppo_wall_time.py \
        --config configs/tamiyo.yaml --n 1,16 --iterations 3 --json benchmarks/results/ppo_wall_time.json

For each N of ``--n`` it builds the recipe's PPO (its ``train_batch_size``, learning settings and
seed; ``num_env_runners: 0``, so the driver samples, and ``num_envs_per_env_runner: N``: N > 1 is
``envs.batched.BatchedMorphogenesisEnv``), runs ``--iterations`` training iterations and times each
one (the first also builds the module and resets the first episodes). It prints the seconds per
iteration, the mean over the iterations after the first, and each N's ratio to the first N; with
the batched env it also reports how the episodes' hosts were grouped (stacks of one skeleton train
as one batch; a recipe that draws many skeletons batches little). What it does not measure: the
evaluation a whole training run reaches (the recipe's evaluation takes about an hour).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from common import write_result

REPO = Path(__file__).resolve().parents[1]


def time_iterations(cfg: Any, iterations: int) -> dict[str, Any]:
    """Seconds of each of ``iterations`` PPO iterations of ``cfg`` (a SimicConfig), and what they sampled."""
    from esper_ray.simic.ppo import build_ppo_config, summarize

    algo = build_ppo_config(cfg).build_algo()
    seconds, rows = [], []
    try:
        for _ in range(iterations):
            start = time.perf_counter()
            result = algo.train()
            seconds.append(time.perf_counter() - start)
            rows.append(summarize(result))
            n = cfg.num_envs_per_env_runner
            print(f"  N={n}: iteration {len(seconds)} {seconds[-1]:.1f} s {rows[-1]}", flush=True)
        env = algo.env_runner.env.unwrapped
        grouping = env.host_grouping() if hasattr(env, "host_grouping") else None  # the batched env's
    finally:
        algo.stop()
    steady = seconds[1:] or seconds
    return {
        "iteration_seconds": seconds,
        "mean_after_first_s": sum(steady) / len(steady),
        "env_steps": rows[-1].get("env_steps", 0),
        "grouping": grouping,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tamiyo.yaml", help="a SimicConfig YAML (the recipe)")
    parser.add_argument("--n", default="1,16", help="episodes per env runner to compare, comma-separated")
    parser.add_argument("--iterations", type=int, default=3, help="PPO iterations per N")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the recipe (as esper-ray simic takes)")
    args = parser.parse_args()
    import ray

    from esper_ray.config import load_config
    from esper_ray.simic.config import SimicConfig

    torch.set_num_threads(1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ns = [int(v) for v in args.n.split(",") if v]
    started = time.perf_counter()
    figures: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "by_n": {}}
    for n in ns:
        cfg = load_config(
            Path(args.config), [*args.overrides, "num_env_runners=0", f"num_envs_per_env_runner={n}"], model=SimicConfig
        )
        figures["train_batch_size"] = cfg.ppo.train_batch_size
        figures["by_n"][str(n)] = time_iterations(cfg, args.iterations)
    base = figures["by_n"][str(ns[0])]["mean_after_first_s"]
    print(f"PPO seconds per iteration ({args.config}, train_batch_size {figures['train_batch_size']}, 2 cores):")
    for n, row in figures["by_n"].items():
        row["ratio_to_first_n"] = row["mean_after_first_s"] / base
        print(
            f"  N={n:>3}: {' '.join(f'{s:.1f}' for s in row['iteration_seconds'])} s; after the first "
            f"{row['mean_after_first_s']:.1f} s ({row['ratio_to_first_n']:.2f} of N={ns[0]})"
            + (f"; host stacks at the end {row['grouping']}" if row["grouping"] else "")
        )
    if args.json:
        write_result(args.json, __file__, figures, started)
    ray.shutdown()


if __name__ == "__main__":
    main()
