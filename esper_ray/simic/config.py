"""Simic's settings: PPO on the Morphogenesis env, and Tune sweeps over them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from esper_ray.config import StrictModel


class PPOSettings(StrictModel):
    """The PPO hyperparameters Simic exposes (RLlib new API stack)."""

    lr: float = Field(3e-4, gt=0)
    gamma: float = Field(0.99, gt=0, le=1)
    lambda_: float = Field(0.95, ge=0, le=1, alias="lambda")
    clip_param: float = Field(0.2, gt=0)
    entropy_coeff: float = Field(0.01, ge=0)
    vf_loss_coeff: float = Field(0.5, ge=0)
    train_batch_size: int = Field(512, ge=8, description="env steps per iteration")
    minibatch_size: int = Field(128, ge=8)
    num_epochs: int = Field(6, ge=1, description="SGD passes over each batch")
    hidden: int = Field(64, ge=4, description="width of the set network's encoders and heads")

    model_config = {"extra": "forbid", "populate_by_name": True}


class OfflineSettings(StrictModel):
    """MARWIL settings; ``None`` falls back to the SimicConfig's PPO values (noted per field)."""

    beta: float = Field(1.0, ge=0, le=1, description="advantage weighting; 0 is behaviour cloning")
    iterations: int | None = Field(None, ge=1, description="RLlib iterations (default cfg.iterations)")
    batch_size: int | None = Field(None, ge=1, description="rows per update (default ppo.minibatch_size)")
    updates_per_iteration: int | None = Field(
        None, ge=1, description="gradient updates per iteration (default ppo.num_epochs)"
    )
    lr: float | None = Field(None, gt=0, description="learning rate (default ppo.lr)")
    vf_coeff: float = Field(1.0, ge=0, description="weight of the value loss (beta > 0)")
    adv_norm_start: float | None = Field(
        None, gt=0, description="initial c^2 of exp(beta * A / c) (default: mean squared return-to-go)"
    )
    adv_norm_update_rate: float = Field(
        1e-2, ge=0, le=1, description="moving-average rate of c^2 towards the mean squared advantage"
    )
    monte_carlo_returns: bool = Field(True, description="value targets = discounted returns-to-go")
    num_cpus_per_data_worker: float = Field(
        0.5, gt=0, description="CPUs of the Ray Data read tasks and the OfflinePreLearner map actor"
    )


class SimicConfig(StrictModel):
    """``esper-ray simic --config configs/controller_ppo.yaml``."""

    name: str = "tamiyo-ppo"
    env: dict[str, Any] = Field(default_factory=dict, description="envs.EnvConfig fields")
    ppo: PPOSettings = PPOSettings()
    iterations: int = Field(20, ge=1)
    num_env_runners: int = Field(1, ge=0, description="0: sample in the driver")
    num_cpus_per_env_runner: float = Field(1.0, gt=0, description="fractional on small machines")
    num_gpus_per_env_runner: float = Field(0.0, ge=0)
    num_envs_per_env_runner: int = Field(1, ge=1)
    sample_timeout_s: float = Field(1800.0, gt=0, description="how long a sampling round may take")
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints")
    seed: int = 0
    out_dir: str = "runs"
    offline: OfflineSettings = OfflineSettings()
    fit_to_cluster: bool = Field(
        False,
        description="when the env runners ask for more CPUs than are free (e.g. beside the service actors), "
        "scale num_cpus_per_env_runner down to what is free instead of failing (at least 0.1 CPU each)",
    )


class SweepConfig(StrictModel):
    """``esper-ray sweep --config configs/sweep_ppo.yaml``: a Ray Tune search over SimicConfig."""

    name: str = "tamiyo-sweep"
    base: SimicConfig = SimicConfig()
    search: dict[str, list[Any]] = Field(
        default_factory=dict,
        description='dotted SimicConfig keys -> values to grid over, e.g. {"ppo.lr": [1e-4, 3e-4]}',
    )
    scheduler: Literal["fifo", "asha"] = "asha"
    metric: str = Field("episode_return_mean", description="env_runners/<metric> to maximise")
    num_samples: int = Field(1, ge=1, description="repeats of the grid")
    max_concurrent: int = Field(1, ge=1)
    storage_path: str = "runs/tune"
    fit_to_cluster: bool = Field(
        False,
        description="when one trial asks for more CPUs than are free (e.g. beside the service actors), scale "
        "the CPUs its driver and env runners ask for to what is free instead of failing; fails only when a "
        "process would get less than 0.1 CPU",
    )


def module_config(max_slots: int, k: int, hidden: int) -> dict[str, Any]:
    """The ``model_config`` of a ``TamiyoSetModule`` (``esper_ray.simic.module``)."""
    return {"max_slots": max_slots, "k": k, "hidden": hidden}


def module_config_of(cfg: SimicConfig, env_cfg: Any = None) -> dict[str, Any]:
    """The ``TamiyoSetModule`` ``model_config`` for ``cfg``: set maxima from its env config.

    Online (PPO) and offline (MARWIL) training both build their module from this, so an
    offline checkpoint warm-starts the online one.
    """
    import envs

    env_cfg = env_cfg or envs.EnvConfig.model_validate(cfg.env)
    return module_config(env_cfg.max_slots, env_cfg.run.blueprints.max_candidates, cfg.ppo.hidden)
