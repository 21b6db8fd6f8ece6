"""PPO wall time per iteration on a Simic recipe: one env per runner against the batched env.

Run (2 cores, heavy: under the shared lock; about 10 minutes on the Tamiyo recipe):

    flock /tmp/esper-heavy.lock .venv/bin/python benchmarks/ppo_wall_time.py \
        --config configs/tamiyo.yaml --layouts 0x1,0x16,2x1,2x8 --iterations 4 \
        --json benchmarks/results/ppo_wall_time_tamiyo.json

A layout ``RxN`` is R env runners (0: the driver samples; R > 0: R Ray actors of
``--cpus-per-runner`` CPU each, sampling in parallel) of N episodes each (N > 1:
``envs.batched.BatchedMorphogenesisEnv``, whose hosts of one skeleton train as one batch). For
each layout it builds the recipe's PPO (its ``train_batch_size``, learning settings and seed), runs
``--iterations`` training iterations and times each one (the first also builds the module and
resets the first episodes). It prints the seconds per iteration, the mean over the iterations after
the first, and each layout's ratio to the first one (the recipe as it was before the batched env:
``0x1``); with the batched env it also reports how the episodes' hosts were grouped (stacks of one
skeleton train as one batch; a recipe that draws many skeletons batches little). ``2x1`` separates
what the second core gives from what batching gives. What it does not measure: the evaluation a
whole training run reaches (``benchmarks/ppo_same_result.py`` does).
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


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """``"0x1,2x8"`` -> [(0, 1), (2, 8)]: env runners x episodes per runner."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        runners, sep, envs = item.partition("x")
        if not sep or not runners.isdigit() or not envs.isdigit() or int(envs) < 1:
            raise SystemExit(f"--layouts: {item!r} is not RxN (env runners x episodes per runner, N >= 1)")
        out.append((int(runners), int(envs)))
    return out


def layout_overrides(runners: int, envs: int, cpus_per_runner: float) -> list[str]:
    """The SimicConfig overrides of one layout."""
    out = [f"num_env_runners={runners}", f"num_envs_per_env_runner={envs}"]
    return out + ([f"num_cpus_per_env_runner={cpus_per_runner}"] if runners else [])


def host_grouping(algo: Any) -> list[dict[str, Any]] | None:
    """Each env runner's batched-env host grouping (None for single envs)."""

    def grouping(runner: Any) -> dict[str, Any] | None:
        env = runner.env.unwrapped if runner.env is not None else None
        return env.host_grouping() if hasattr(env, "host_grouping") else None

    if algo.config.num_env_runners == 0:
        found = [grouping(algo.env_runner)]
    else:
        found = algo.env_runner_group.foreach_env_runner(grouping, local_env_runner=False)
    found = [g for g in found if g is not None]
    return found or None


def time_iterations(cfg: Any, iterations: int) -> dict[str, Any]:
    """Seconds of each of ``iterations`` PPO iterations of ``cfg`` (a SimicConfig), and what they sampled."""
    from esper_ray.simic.ppo import build_ppo_config, summarize

    algo = build_ppo_config(cfg).build_algo()
    seconds, rows = [], []
    label = f"{cfg.num_env_runners}x{cfg.num_envs_per_env_runner}"
    try:
        for _ in range(iterations):
            start = time.perf_counter()
            result = algo.train()
            seconds.append(time.perf_counter() - start)
            rows.append(summarize(result))
            print(f"  {label}: iteration {len(seconds)} {seconds[-1]:.1f} s {rows[-1]}", flush=True)
        grouping = host_grouping(algo)
    finally:
        algo.stop()
    steady = seconds[1:] or seconds
    return {
        "env_runners": cfg.num_env_runners,
        "episodes_per_runner": cfg.num_envs_per_env_runner,
        "iteration_seconds": seconds,
        "mean_after_first_s": sum(steady) / len(steady),
        "env_steps": rows[-1].get("env_steps", 0),
        "grouping": grouping,
    }


def layout_parser(doc: str, layouts: str, iterations: int) -> argparse.ArgumentParser:
    """The arguments of both PPO wall-time scripts: the recipe and its overrides, the layouts, the
    remote runners' CPUs, the iterations per layout and ``--json``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tamiyo.yaml", help="a SimicConfig YAML (the recipe)")
    parser.add_argument("--layouts", default=layouts, help="RxN: env runners x episodes, comma-separated")
    parser.add_argument("--cpus-per-runner", type=float, default=1.0, help="CPUs each remote env runner asks for")
    parser.add_argument("--iterations", type=int, default=iterations, help="PPO iterations per layout")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the recipe (as esper-ray simic takes)")
    return parser


def start_ray() -> None:
    """The local Ray of 2 CPUs the measurements run on (one torch thread in this process)."""
    import ray

    torch.set_num_threads(1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)


def main() -> None:
    args = layout_parser(__doc__, "0x1,0x16,2x1,2x8", 4).parse_args()
    layouts = parse_layouts(args.layouts)
    import ray

    from esper_ray.config import load_config
    from esper_ray.simic.config import SimicConfig

    start_ray()
    started = time.perf_counter()
    figures: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "by_layout": {}}
    for runners, envs in layouts:
        overrides = [*args.overrides, *layout_overrides(runners, envs, args.cpus_per_runner)]
        cfg = load_config(Path(args.config), overrides, model=SimicConfig)
        figures["train_batch_size"] = cfg.ppo.train_batch_size
        figures["by_layout"][f"{runners}x{envs}"] = time_iterations(cfg, args.iterations)
    by = figures["by_layout"]
    base = next(iter(by.values()))["mean_after_first_s"]
    print(f"PPO seconds per iteration ({args.config}, train batch {figures['train_batch_size']}, 2 cores):")
    for label, row in by.items():
        row["ratio_to_first"] = row["mean_after_first_s"] / base
        print(
            f"  {label:>5}: {' '.join(f'{s:.1f}' for s in row['iteration_seconds'])} s; after the first "
            f"{row['mean_after_first_s']:.1f} s ({row['ratio_to_first']:.2f} of {next(iter(by))})"
            + (f"; host stacks at the end {row['grouping']}" if row["grouping"] else "")
        )
    if args.json:
        write_result(args.json, __file__, figures, started)
    ray.shutdown()


if __name__ == "__main__":
    main()
