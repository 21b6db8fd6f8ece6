"""Simic: train Tamiyo with RLlib PPO (new API stack) on ``esper/Morphogenesis-v0``.

The RLModule is the project's own set network (``esper_ray.simic.module.TamiyoSetModule``):
one encoder shared by all slots, one by all candidate blueprints, a pair scorer for
germinations, masked logits so PPO never samples an illegal action. Episode
telemetry (final accuracy, seed parameters, germinations, fidelity on bottleneck
tasks) is logged through an RLlib callback and shows up in each iteration's result
under ``env_runners``.

After training, ``export_policy`` writes the policy network as safetensors + JSON,
which ``esper_ray.tamiyo.policy`` runs with plain torch (no RLlib) inside
``esper-ray train --controller PATH``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from esper_ray.cluster import ensure_ray, free_cpus, require_free, wait_for_cpus
from esper_ray.contracts import EnvInfo, EsperError
from esper_ray.simic.config import SimicConfig, module_config_of
from esper_ray.util import error_line


def episode_window(config: Any) -> int:
    """How many recent episodes each env runner averages an episode metric over: RLlib's own window for
    the episode return (``metrics_num_episodes_for_smoothing`` shared among the env runners)."""
    return max(1, math.ceil(config.metrics_num_episodes_for_smoothing / (config.num_env_runners or 1)))


def _callbacks_class():
    from ray.rllib.callbacks.callbacks import RLlibCallback

    class EsperCallbacks(RLlibCallback):
        """Logs what the host run did in each episode, averaged over the same recent episodes as RLlib's
        ``episode_return_mean`` (a metric logged without a window is an EMA with coefficient 0.01: it
        would report mostly the first episodes of the run, whatever came later)."""

        def on_episode_end(self, *, episode, env_runner=None, metrics_logger=None, **kwargs) -> None:
            info: EnvInfo = episode.get_infos(-1)
            if metrics_logger is None or not info:
                return
            window = episode_window(env_runner.config) if env_runner is not None else 100

            def log(key: str, value: float) -> None:
                metrics_logger.log_value(key, value, window=window)

            log("esper_final_val_acc", info["val_acc"])
            if info["test_acc"] is not None:  # None unless the host run finished
                log("esper_final_test_acc", info["test_acc"])
            log("esper_acc_gain", info["val_acc"] - info["start_val_acc"])
            log("esper_seed_params", info["seed_params"])
            log("esper_germinations", len(info["germinated_slots"]))
            truth = info.get("ground_truth_slot")
            if truth and info["germinated_slots"]:
                hits = sum(s == truth for s in info["germinated_slots"])
                log("esper_fidelity", hits / len(info["germinated_slots"]))

    return EsperCallbacks


def build_ppo_config(cfg: SimicConfig):
    """The RLlib PPOConfig for ``cfg`` (importing RLlib lazily: it is slow to import)."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    import envs
    from envs.batched import vector_env_settings
    from esper_ray.config import validate_model
    from esper_ray.simic.module import TamiyoSetModule

    # Validate the env config here, in the driver, so a bad value is one clear line.
    env_cfg = validate_model(envs.EnvConfig, cfg.env, "env config")
    p = cfg.ppo
    # N > 1 episodes per env runner train their hosts as one batch (envs.batched, a vector env).
    local = cfg.num_env_runners == 0  # the driver samples: a missing GPU is one line here
    env_kwargs, runner_kwargs = vector_env_settings(cfg.env, cfg.num_envs_per_env_runner, local=local)
    return (
        PPOConfig()
        .environment(**env_kwargs)
        .env_runners(
            num_env_runners=cfg.num_env_runners,
            # Fractional CPUs work (Ray schedules them); RLlib's annotation says int.
            num_cpus_per_env_runner=cfg.num_cpus_per_env_runner,  # type: ignore[arg-type]
            num_gpus_per_env_runner=cfg.num_gpus_per_env_runner,
            **runner_kwargs,
            rollout_fragment_length="auto",
            # An env step trains a host epoch: a fragment can take minutes on a busy machine.
            sample_timeout_s=cfg.sample_timeout_s,
        )
        .training(
            lr=p.lr,
            gamma=p.gamma,
            lambda_=p.lambda_,
            clip_param=p.clip_param,
            entropy_coeff=p.entropy_coeff,
            vf_loss_coeff=p.vf_loss_coeff,
            train_batch_size_per_learner=p.train_batch_size,
            minibatch_size=p.minibatch_size,
            num_epochs=p.num_epochs,
        )
        .rl_module(
            rl_module_spec=RLModuleSpec(module_class=TamiyoSetModule, model_config=module_config_of(cfg, env_cfg))
        )
        .callbacks(_callbacks_class())
        .debugging(seed=cfg.seed)
    )


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of one training iteration worth printing."""
    runners = result.get("env_runners", {})
    keys = (
        "episode_return_mean",
        "esper_final_val_acc",
        "esper_acc_gain",
        "esper_germinations",
        "esper_fidelity",
    )
    out = {k: float(runners[k]) for k in keys if k in runners and not _nan(runners[k])}
    out["iteration"] = result.get("training_iteration", 0)
    out["env_steps"] = result.get("num_env_steps_sampled_lifetime", runners.get("num_env_steps_sampled_lifetime", 0))
    return out


def _nan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def train_simic(
    cfg: SimicConfig,
    out: str | Path,
    *,
    resume: str | Path | None = None,
    warm_start: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Train for ``cfg.iterations`` (counting those before ``resume``); return the final checkpoint."""
    from ray.rllib.algorithms.algorithm import Algorithm

    import envs  # noqa: F401  (registers the env id the checkpoint refers to)

    ensure_ray()
    # The algorithm runs in this process; its env runners are Ray actors that must fit what is free
    # (Ray would leave them pending forever, without a word).
    require_free(
        {"CPU": cfg.num_env_runners * cfg.num_cpus_per_env_runner},
        f"simic's env runners (num_env_runners={cfg.num_env_runners} x {cfg.num_cpus_per_env_runner:g} CPU)",
        hint="stop what holds them (e.g. the service actors: ray stop) or lower num_env_runners / "
        "num_cpus_per_env_runner (num_env_runners=0 samples in this process)",
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    free_before = free_cpus()
    if resume is not None:
        try:
            algo = Algorithm.from_checkpoint(str(Path(resume).absolute()))
        except Exception as err:  # RLlib raises many kinds; the user needs one line
            raise EsperError(f"cannot resume from {resume}: {error_line(err)}") from None
    else:
        algo = build_ppo_config(cfg).build_algo()
        if warm_start is not None:  # an offline (MARWIL/BC) checkpoint of the same module
            from esper_ray.simic.offline import warm_start as load_offline

            load_offline(algo, warm_start)
    log = out / "progress.jsonl"
    checkpoint = out / "checkpoint"
    try:
        while algo.iteration < cfg.iterations:
            result = algo.train()
            row = summarize(result)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if progress:
                print("[simic] " + " ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
            if algo.iteration % cfg.checkpoint_every == 0 or algo.iteration >= cfg.iterations:
                algo.save_to_path(str(checkpoint.absolute()))
        export_policy(algo, out / "policy", cfg)
    finally:
        algo.stop()
        if cfg.num_env_runners:  # the runners' CPUs come back a moment later: the next run may need them
            wait_for_cpus(free_before)
    return checkpoint


def export_policy(algo, path: str | Path, cfg: SimicConfig | None = None) -> Path:
    """Write the trained policy network as ``policy.safetensors`` + ``policy.json``."""
    from esper_ray.tamiyo.policy import export_rl_module

    return export_rl_module(algo.get_module(), path)
