"""Ray Tune sweeps over PPO and reward settings (``esper-ray sweep``).

The search space is a mapping of dotted SimicConfig keys to lists of values, e.g.
``{"ppo.lr": [1e-4, 3e-4], "env.reward.param_cost": [0.0, 0.05]}``; each list is a
grid axis. PPO keys map onto RLlib's config, ``env.*`` keys onto the env config.
With ``scheduler: asha`` Tune stops weak trials early on the chosen metric.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from esper_ray.cluster import require_free, rllib_trial_resources
from esper_ray.contracts import EsperError
from esper_ray.simic.config import PPOSettings, SweepConfig

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


def run_sweep(cfg: SweepConfig, progress: bool = True) -> dict[str, Any]:
    """Run the sweep; write ``trials.csv`` under the storage path and return the best trial.

    EsperError (one line, with the numbers) before any trial starts when one trial does not fit
    the cluster's free resources (after the service actors): Tune would leave it PENDING forever.
    """
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
    require_free(
        rllib_trial_resources(build_ppo_config(cfg.base)),
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
                "error": str(r.error).splitlines()[0] if r.error else "",
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
        "trials": rows,
        "summary_csv": str(out / "trials.csv"),
        "best_checkpoint": best.checkpoint.path if best.checkpoint else None,
        "best_metric": (best.metrics or {}).get("env_runners", {}).get(cfg.metric),
    }
