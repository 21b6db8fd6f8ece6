"""Env throughput: esper/Morphogenesis-v0 against a plain PyTorch loop doing the same training.

Run:
    .venv/bin/python benchmarks/env_throughput.py [--episodes 5] [--ppo-iterations 2]

What it measures (one torch thread):
  * plain: a hand-written PyTorch loop that trains the same MLP host (40-64-64-10, Adam,
    batch 100) on the same MNIST-1D split for the same epochs, evaluating on the
    validation set each epoch (what any training script does);
  * env: the same training driven through the env's default config, one step per epoch,
    always "wait" (so both train the same network), including everything a decision point
    costs: slot telemetry (the probe signals, refreshed every ``SIGNAL_EVERY`` = 8 epochs and
    after every lifecycle transition; a wait-only episode has none), the legal-action mask, the
    observation vector, the governor's rollback point;
  * env, fresh telemetry: the same with ``signal_every: 1`` (the probe signals measured at
    every step);
  * env, probe kept: ``signal_every`` past the episode (measured once, at reset): what the env's
    own machinery costs (for information);
  * env+seed: the default env with a conv1d seed germinated at the input at the first step
    (seeds add real compute; for information);
  * optionally, PPO seconds per iteration of the default Simic settings (small batch).

How: lockstep in blocks. Each episode runs a plain run and an env episode side by side in
alternating blocks of ``BLOCK`` = 5 epochs (which side goes first alternates), so both see the
same machine within a fraction of a second and each still runs five epochs in a row, as it would
alone. Why not other designs: whole-episode rounds, the design before, swing from round to round
(drift of a second hits one side of a round); alternating single epochs is steady but flatters the
env (the plain loop, no longer alone with its caches, runs slower); the comparison is in
BENCHMARKS.md ("Other measurements"). The ratio env/plain (target >= 0.9) is
total plain time over total env time across the episodes; the range is that of the episodes.
``--quick`` (1 episode of 15 epochs) and ``--json PATH`` (the figures) are for benchmarks/run_all.py.

Batched rows (``envs.batched``, issue "many host runs in one step"): env steps per second per core
of ``BatchedMorphogenesisEnv`` at N = 1, 8, 32, 128 episodes (``--batched-n``) against the single
env, both on one torch thread, timed in alternating blocks of ``BLOCK`` steps within one episode
each (the same lockstep design as above), wait only and with a conv1d seed germinated at the input
in every episode at the first step (seeds growing; at N = 1, 8, 32 over 10 steps by default,
``--batched-seeded-n`` and ``--batched-seeded-steps``: a conv1d seed costs several times the host's
own compute). The ratio is batched steps/s over single steps/s
(target on the CPU: >= 3 at N = 32, MLP host, wait only). ``--batched-only`` skips the other rows;
``--device cuda`` runs the batched env on a GPU (the single env stays on one CPU core: the
baseline of the GPU target, >= 100x at the best N; benchmarks/gpu_check.sh runs it that way).

The measured ratios, and where an env step's time goes beyond the plain epoch, are in BENCHMARKS.md
("Other measurements").
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from common import write_result

import envs
from esper_ray.tasks import TaskConfig, load_task

BLOCK = 5
"""Epochs each side runs before the other takes over (see the module docstring)."""


def plain_run(seed: int) -> Callable[[], None]:
    """One epoch of plain training + validation per call."""
    data = load_task(TaskConfig(family="mnist1d", seed=0))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(40, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.x_train, data.y_train

    def epoch() -> None:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 100):
            idx = perm[i : i + 100]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            (model(data.x_val).argmax(1) == data.y_val).float().mean().item()

    return epoch


def env_run(epochs: int, seed: int, germinate: bool, signal_every: int = envs.SIGNAL_EVERY) -> Callable[[], None]:
    """A reset env; each call is one step (one epoch), the first germinating a conv1d seed at the input
    if ``germinate``, the others waiting."""
    training = {"epochs": epochs + 1, "signal_every": signal_every}
    env = envs.MorphogenesisEnv(
        {
            "run": {"training": training, "lineage": {"enabled": False}},
            "train_tasks": [{"family": "mnist1d", "seed": 0}],
        }
    )
    env.reset(seed=seed, options={"task_index": 0, "train_seed": seed})
    actions = [0] * epochs
    if germinate:
        actions[0] = _germination(env)
    steps = iter(actions)
    return lambda: env.step(next(steps))


def lockstep(epochs: int, seed: int, block: int = BLOCK, **env_options) -> tuple[float, float]:
    """Seconds of a plain run and of an env episode of ``epochs``, timed in alternating blocks of
    ``block`` epochs (which side goes first alternates too)."""
    plain, env = plain_run(seed), env_run(epochs, seed, **env_options)
    spent = [0.0, 0.0]
    for b, first in enumerate(range(0, epochs, block)):
        order = ((0, plain), (1, env)) if (b + seed) % 2 else ((1, env), (0, plain))
        for side, step in order:
            start = time.perf_counter()
            for _ in range(min(block, epochs - first)):
                step()
            spent[side] += time.perf_counter() - start
    return spent[0], spent[1]


def _germination(env) -> int:
    """The action germinating a conv1d seed at the input of a reset single env."""
    from esper_ray.contracts import ControllerAction

    return env.space.encode(ControllerAction.germinate("input", "conv1d"), [e.name for e in env.trainer.candidates])


def batched_lockstep(n: int, steps: int, seeded: bool, device: str = "cpu") -> tuple[float, float]:
    """Env steps per second of one single env and of a batched env of ``n`` episodes, each over
    ``steps`` steps of one episode, timed in alternating blocks of ``BLOCK`` steps."""
    from envs.batched import BatchedMorphogenesisEnv

    def config(dev: str) -> dict:
        return {
            "run": {
                "training": {"epochs": steps + 2, "device": dev, "signal_every": envs.SIGNAL_EVERY},
                "lineage": {"enabled": False},
            },
            "train_tasks": [{"family": "mnist1d", "seed": 0}],
        }

    single = envs.MorphogenesisEnv(config("cpu"))
    single.reset(seed=0, options={"task_index": 0, "train_seed": 0})
    batched = BatchedMorphogenesisEnv(n, config(device))
    batched.reset(seed=0, options={"task_index": 0})
    first_single = _germination(single) if seeded else 0
    first_batched = np.full(n, _germination(batched.envs[0]) if seeded else 0)
    single.step(first_single)  # warm-up step (and the germination, outside the timing)
    batched.step(first_batched)
    wait = np.zeros(n, dtype=np.int64)
    spent = [0.0, 0.0]
    for b, first in enumerate(range(0, steps, BLOCK)):
        sides = ((0, lambda: single.step(0)), (1, lambda: batched.step(wait)))
        for side, step in sides if b % 2 else sides[::-1]:
            start = time.perf_counter()
            for _ in range(min(BLOCK, steps - first)):
                step()
            if device != "cpu":
                torch.cuda.synchronize()
            spent[side] += time.perf_counter() - start
    batched.close()
    return steps / spent[0], n * steps / spent[1]


def batched_rows(
    ns: list[int], steps: int, device: str, seeded_ns: list[int] | None = None, seeded_steps: int = 10
) -> dict[str, dict[int, tuple[float, float]]]:
    """Per variant (wait only; seeds growing, at ``seeded_ns`` over ``seeded_steps``: a conv1d seed
    costs many times the host's compute, so fewer) and N: (single, batched) env steps per second."""
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    variants = [("wait only", False, ns, steps)] + (
        [("seeds growing", True, seeded_ns, seeded_steps)] if seeded_ns else []
    )
    for name, seeded, sizes, count in variants:
        rows[name] = {}
        for n in sizes:
            single, batched = batched_lockstep(n, count, seeded, device)
            rows[name][n] = (single, batched)
            print(
                f"batched env N={n:4d} ({name:13s}, {device}): {batched:8.1f} env steps/s against single "
                f"{single:6.1f} (1 CPU thread): ratio {batched / single:6.2f}",
                flush=True,
            )
    return rows


def ppo_iteration_seconds(iterations: int) -> float:
    import ray

    from esper_ray.simic.config import SimicConfig
    from esper_ray.simic.ppo import build_ppo_config

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    cfg = SimicConfig(num_env_runners=0, ppo={"train_batch_size": 256, "minibatch_size": 64})
    algo = build_ppo_config(cfg).build_algo()
    algo.train()  # warm-up iteration (module build, first episodes)
    start = time.perf_counter()
    for _ in range(iterations):
        algo.train()
    algo.stop()
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--ppo-iterations", type=int, default=0, help="also time PPO (0: skip)")
    parser.add_argument("--quick", action="store_true", help="1 episode of 15 epochs")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--batched-n", default="1,8,32,128", help="episodes per batched env, comma-separated")
    parser.add_argument("--batched-steps", type=int, default=30, help="timed steps per batched row")
    parser.add_argument("--batched-only", action="store_true", help="only the batched rows")
    parser.add_argument("--device", default="cpu", help="device of the batched env (cpu, cuda)")
    parser.add_argument("--batched-seeded-n", default="1,8,32", help="N of the seeded rows ('' for none)")
    parser.add_argument("--batched-seeded-steps", type=int, default=10, help="timed steps per seeded row")
    parser.add_argument("--batched-wait-only", action="store_true", help="batched rows without the seeded variant")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.quick:
        args.episodes, args.epochs = 1, 15
        args.batched_n, args.batched_steps, args.batched_seeded_n, args.batched_seeded_steps = "1,8", 5, "8", 3
    torch.set_num_threads(1)
    ns = [int(v) for v in args.batched_n.split(",") if v]
    seeded_ns = [] if args.batched_wait_only else [int(v) for v in args.batched_seeded_n.split(",") if v]
    if args.batched_only:
        rows = batched_rows(ns, args.batched_steps, args.device, seeded_ns, args.batched_seeded_steps)
        _print_batched(rows)
        if args.json:
            write_result(
                args.json, __file__, {"batched": _batched_json(rows, args.device)}, started, device=args.device
            )
        return
    lockstep(2, 0, germinate=False)  # warm caches and code paths
    variants = {
        "env, wait only": dict(germinate=False),
        "env, fresh signals": dict(germinate=False, signal_every=1),
        "env, probe kept": dict(germinate=False, signal_every=10**6),
        "env, conv1d seed": dict(germinate=True),
    }
    figures = {}  # variant -> (plain seconds per episode, env seconds per episode)
    for name, options in variants.items():
        runs = [lockstep(args.epochs, ep, **options) for ep in range(args.episodes)]
        figures[name] = tuple(np.array(side) for side in zip(*runs, strict=True))
    plain, env = figures["env, wait only"]
    ms = 1e3 / args.epochs
    print(f"plain PyTorch loop : {args.epochs / np.mean(plain):7.1f} epochs/s ({np.mean(plain) * ms:.1f} ms/epoch)")
    ratios = {}
    for name, (p, e) in figures.items():
        ratios[name] = p.sum() / e.sum()
        episodes = p / e
        print(
            f"{name:19s}: {args.epochs / np.mean(e):7.1f} env steps/s ({np.mean(e) * ms:.1f} ms/step), "
            f"ratio env/plain {ratios[name]:.3f} (episodes {episodes.min():.3f}-{episodes.max():.3f})"
        )
    seeded = figures["env, conv1d seed"][1]
    wait_s, seed_s = np.mean(env), np.mean(seeded)
    print(f"an episode of {args.epochs} epochs: {wait_s:.2f} s (wait only), {seed_s:.2f} s (with a seed)")
    seconds = None
    if args.ppo_iterations:
        seconds = ppo_iteration_seconds(args.ppo_iterations)
        print(f"PPO (256 env steps/iteration, sampling in the driver): {seconds:.1f} s/iteration")
    ratio, per_episode = ratios["env, wait only"], sorted((plain / env).tolist())
    spread = f"episodes {per_episode[0]:.3f}-{per_episode[-1]:.3f}"
    rows = batched_rows(ns, args.batched_steps, args.device, seeded_ns, args.batched_seeded_steps)
    print(f"throughput ratio env/plain = {ratio:.3f} (target >= 0.9); {spread}")
    _print_batched(rows)
    if args.json:
        write_result(
            args.json,
            __file__,
            {
                "epochs": args.epochs,
                "episodes": args.episodes,
                "design": "lockstep",
                "plain_epochs_per_s": args.epochs / float(np.mean(plain)),
                "env_steps_per_s": args.epochs / float(np.mean(env)),
                "env_fresh_steps_per_s": args.epochs / float(np.mean(figures["env, fresh signals"][1])),
                "ratio_fresh": ratios["env, fresh signals"],
                "ratio_probe_kept": ratios["env, probe kept"],
                "signal_every": envs.SIGNAL_EVERY,
                "env_seeded_steps_per_s": args.epochs / float(np.mean(seeded)),
                "episode_s": float(np.mean(env)),
                "episode_seeded_s": float(np.mean(seeded)),
                "ratio": ratio,
                "ratio_per_episode": per_episode,
                "target": 0.9,
                "ppo_s_per_iteration": seconds,
                "quick": args.quick,
                "batched": _batched_json(rows, args.device),
            },
            started,
            device=args.device,
        )


def _print_batched(rows: dict[str, dict[int, tuple[float, float]]]) -> None:
    for name, by_n in rows.items():
        text = ", ".join(f"N={n} {b / s:.2f}" for n, (s, b) in by_n.items())
        print(
            f"batched/single env steps per core ({name}): {text}"
            + (" (target >= 3 at N=32)" if name == "wait only" else "")
        )


def _batched_json(rows: dict[str, dict[int, tuple[float, float]]], device: str) -> dict:
    return {
        "device": device,
        **{
            name: {
                str(n): {"single_steps_per_s": s, "batched_steps_per_s": b, "ratio": b / s}
                for n, (s, b) in by_n.items()
            }
            for name, by_n in rows.items()
        },
        "target_ratio_n32_wait_only": 3.0,
    }


if __name__ == "__main__":
    main()
