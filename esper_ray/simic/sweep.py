"""Ray Tune sweeps over PPO and reward settings (``esper-ray sweep``).

The search space is a mapping of dotted SimicConfig keys to lists of values, e.g.
``{"ppo.lr": [1e-4, 3e-4], "env.reward.param_cost": [0.0, 0.05]}``; each list is a
grid axis. PPO keys map onto RLlib's config, ``env.*`` keys onto the env config.
With ``scheduler: asha`` Tune stops weak trials early on the chosen metric.

Before any trial starts, one trial's request (its driver with the learner, and its env runners)
is checked against the CPUs free after whatever holds some (the service actors hold theirs for as
long as they live). A trial that does not fit fails the sweep in one line with the numbers; with
``fit_to_cluster: true`` its processes' CPU requests are scaled down together to what is free (Ray
does not cap a process at its request: the trial runs on less of a reservation, not on less CPU).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper_ray.cluster import MIN_CPU_PER_PROCESS, require_free, rllib_trial_resources
from esper_ray.contracts import EsperError
from esper_ray.simic.config import PPOSettings, SweepConfig
from esper_ray.util import error_line

# SimicConfig.ppo field -> RLlib AlgorithmConfig key.
_PPO_KEYS = {
    "lr": "lr",
    "gamma": "gamma",
    "lambda_": "lambda",
    "lambda": "lambda",
    "clip_param": "clip_param",
    "entropy_coeff": "entropy_coeff",
    "vf_loss_coeff": "vf_loss_coeff",
    "train_batch_size": "train_batch_size_per_learner",
    "minibatch_size": "minibatch_size",
    "num_epochs": "num_epochs",
}


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """The Tune param space: the base PPO config as a dict with grid axes put in."""
    from ray import tune

    from esper_ray.simic.ppo import build_ppo_config

    space = build_ppo_config(cfg.base).to_dict()
    env_config = dict(space.get("env_config", {}))
    for dotted, values in cfg.search.items():
        if not isinstance(values, list) or not values:
            raise EsperError(f"sweep search {dotted}: expected a non-empty list of values")
        head, _, rest = dotted.partition(".")
        if head == "ppo" and rest in _PPO_KEYS:
            PPOSettings.model_validate({**cfg.base.ppo.model_dump(by_alias=True), rest: values[0]})
            space[_PPO_KEYS[rest]] = tune.grid_search(values)
        elif head == "env" and rest:
            node = env_config
            *parents, leaf = rest.split(".")
            for key in parents:
                node[key] = dict(node.get(key, {}))
                node = node[key]
            node[leaf] = tune.grid_search(values)
        else:
            raise EsperError(f"sweep search key {dotted!r}: use ppo.<{'|'.join(sorted(_PPO_KEYS))}> or env.<key>")
    space["env_config"] = env_config
    return space


@dataclass(frozen=True)
class TrialFit:
    """CPU requests of one sweep trial's processes, as configured or scaled to fit."""

    driver_cpus: float  # the trial's driver, which also runs its learner (num_learners=0)
    env_runner_cpus: float  # each env runner
    num_env_runners: int
    scale: float  # 1.0: as configured

    @property
    def total(self) -> float:
        """What one trial reserves."""
        return self.driver_cpus + self.num_env_runners * self.env_runner_cpus


def _floor4(x: float) -> float:
    # Ray keeps resources to 1e-4: round down so the scaled parts never sum past what is free.
    return math.floor(x * 1e4) / 1e4


def fit_trial(driver_cpus: float, env_runner_cpus: float, num_env_runners: int, free_cpus: float) -> TrialFit:
    """The trial's CPU requests scaled by one factor so that they fit ``free_cpus`` (unchanged if they do).

    EsperError (one line, with the numbers) when a process would get less than MIN_CPU_PER_PROCESS.
    """
    asked = TrialFit(driver_cpus, env_runner_cpus, num_env_runners, 1.0)
    if asked.total <= free_cpus + 1e-9:
        return asked
    scale = free_cpus / asked.total
    fitted = TrialFit(_floor4(driver_cpus * scale), _floor4(env_runner_cpus * scale), num_env_runners, scale)
    smallest = min([fitted.driver_cpus] + ([fitted.env_runner_cpus] if num_env_runners else []))
    if smallest < MIN_CPU_PER_PROCESS:
        processes = 1 + num_env_runners
        raise EsperError(
            f"a sweep trial (driver {driver_cpus:g} CPU + {num_env_runners} env runners x {env_runner_cpus:g} CPU "
            f"= {asked.total:g} CPU) cannot fit the {free_cpus:g} CPU free even scaled down (fit_to_cluster): its "
            f"{processes} processes need at least {MIN_CPU_PER_PROCESS:g} CPU each; lower base.num_env_runners or "
            "free CPUs (e.g. stop the service actors)"
        )
    return fitted


def space_without_grid(space: dict[str, Any]) -> dict[str, Any]:
    """``space`` with each grid axis replaced by its first value (what RLlib's validation accepts)."""

    def first(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"grid_search"}:
            return value["grid_search"][0]
        if isinstance(value, dict):
            return {k: first(v) for k, v in value.items()}
        return value

    return {k: first(v) for k, v in space.items()}


def run_sweep(cfg: SweepConfig, progress: bool = True) -> dict[str, Any]:
    """Run the sweep; write ``trials.csv`` under the storage path and return the best trial.

    EsperError (one line, with the numbers) before any trial starts when one trial does not fit
    the cluster's free resources (after the service actors): Tune would leave it PENDING forever.
    With ``cfg.fit_to_cluster`` a trial's CPU requests are scaled to what is free instead (the
    result's ``fit`` says how); GPUs are never scaled.
    """
    import ray
    from ray import tune
    from ray.rllib.algorithms.ppo import PPO
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    storage = Path(cfg.storage_path).expanduser().absolute()
    metric = f"env_runners/{cfg.metric}"
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.base.iterations,
            grace_period=max(1, cfg.base.iterations // 4),
        )
        if cfg.scheduler == "asha"
        else FIFOScheduler()
    )
    from esper_ray.simic.ppo import build_ppo_config

    space = param_space(cfg)
    # From the base config: the grid axes (PPO and env settings) do not change what a trial asks for.
    need = rllib_trial_resources(build_ppo_config(cfg.base))
    runners = cfg.base.num_env_runners
    fit = TrialFit(
        need.get("CPU", 0.0) - runners * cfg.base.num_cpus_per_env_runner,
        cfg.base.num_cpus_per_env_runner,
        runners,
        1.0,
    )
    if cfg.fit_to_cluster:
        fit = fit_trial(fit.driver_cpus, fit.env_runner_cpus, runners, ray.available_resources().get("CPU", 0.0))
        if fit.scale != 1.0:
            # The driver runs the learner (num_learners=0): its bundle is the larger of the two requests.
            space["num_cpus_for_main_process"] = fit.driver_cpus
            space["num_cpus_per_learner"] = fit.driver_cpus
            space["num_cpus_per_env_runner"] = fit.env_runner_cpus
            need = rllib_trial_resources(space_without_grid(space))
    require_free(
        need,
        f"a sweep trial (1 CPU for its driver + base.num_env_runners={cfg.base.num_env_runners} x "
        f"{cfg.base.num_cpus_per_env_runner:g} CPU)",
        hint="stop what holds them (e.g. the service actors: ray stop, or stop_pipeline(kill=True)) "
        "or lower base.num_env_runners / base.num_cpus_per_env_runner",
    )
    tuner = tune.Tuner(
        PPO,  # the class, not "PPO": the string path imports every algorithm (and needs Pillow)
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            scheduler=scheduler,
            num_samples=cfg.num_samples,
            max_concurrent_trials=cfg.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=str(storage),
            stop={"training_iteration": cfg.base.iterations},
            checkpoint_config=tune.CheckpointConfig(
                checkpoint_frequency=cfg.base.checkpoint_every, checkpoint_at_end=True, num_to_keep=2
            ),
            verbose=1 if progress else 0,
        ),
    )
    results = tuner.fit()
    rows = []
    for i in range(len(results)):
        r = results[i]
        rows.append(
            {
                "trial": Path(r.path).name,
                **{k: v for k, v in (r.config or {}).items() if k in _PPO_KEYS.values()},
                "env_config": str(r.config.get("env_config", {}).get("reward", "")) if r.config else "",
                cfg.metric: (r.metrics or {}).get("env_runners", {}).get(cfg.metric),
                "iterations": (r.metrics or {}).get("training_iteration"),
                "error": error_line(r.error) if r.error else "",
            }
        )
    out = storage / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    with (out / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = results.get_best_result(metric=metric, mode="max")
    return {
        "fit": fit,
        "trials": rows,
        "summary_csv": str(out / "trials.csv"),
        "best_checkpoint": best.checkpoint.path if best.checkpoint else None,
        "best_metric": (best.metrics or {}).get("env_runners", {}).get(cfg.metric),
    }
