"""Offline Simic: train (or warm-start) Tamiyo from recorded decision episodes.

``esper-ray simic --offline PATH`` reads a recording written by
``esper_ray.simic.record`` (RLlib's columnar offline format, Parquet) with RLlib's
offline API (new API stack: ``OfflineData`` -> ``OfflinePreLearner`` -> Learner) and
trains it with **MARWIL** (``beta > 0``: log-likelihood of the recorded actions weighted
by ``exp(beta * advantage / c)``; ``beta = 0`` is plain behaviour cloning).

The RLModule is the one online PPO uses, ``esper_ray.simic.module.TamiyoSetModule``
with the same ``model_config``, so

- the masked logits are what MARWIL's loss sees (an illegal action never has probability);
- the checkpoint's RLModule state loads straight into online PPO (``warm_start``);
- ``esper_ray.tamiyo.policy.export_rl_module`` exports it unchanged.

Why not RLlib's ``BC`` class: ``BCConfig`` removes the GAE connector from the learner
pipeline; ``MARWILConfig`` with ``beta=0`` is the same loss (``-mean(logp)``) with the
pipeline intact, and ``beta > 0`` is one setting away.

Monte-Carlo returns: RLlib's offline pipeline turns every row into a one-step episode,
so MARWIL's value targets would be ``r + gamma * V(s')`` with the value net frozen at
its initial weights (the ``OfflinePreLearner`` keeps the module state it started with).
Before training we therefore write a prepared copy of the recording (``out/data``) in
which each row's reward is its discounted return-to-go and the row is terminal, so the
value target is exactly the Monte-Carlo return MARWIL is defined with. The recording
itself is never modified.

Advantage scale: MARWIL weights by ``exp(beta * A / c)`` with ``c^2`` a moving average of
``A^2``. RLlib's default start (100, moving at 1e-8) suits returns of order 10; ours are
accuracy gains of order 0.1, so every weight would be ~1 (BC in disguise). We start
``c^2`` at the mean squared return-to-go (the value net starts near 0) and let it track.

Warm start: ``warm_start(ppo_algo, out / "checkpoint")`` loads the offline RLModule (policy
and value net) into a built online PPO algorithm (RLlib's component restore, env runners
synced), e.g. in ``train_simic`` right after ``build_algo()``.

Outputs in ``out``: ``checkpoint/`` (RLlib), ``policy/`` (torch-only export),
``data/`` (the prepared copy RLlib reads), ``progress.jsonl`` (per iteration),
``summary.json`` (settings, data size, agreement of the exported policy with the
recorded actions).

Usage::

    esper-ray record --controller heuristic --seeds 3 --out runs/decisions
    esper-ray simic --offline runs/decisions --out runs/tamiyo-offline iterations=10 ppo.num_epochs=200
    esper-ray evaluate --policy runs/tamiyo-offline/policy --policy runs/tamiyo-ppo/policy
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esper_ray.config import validate_model
from esper_ray.contracts import EsperError
from esper_ray.simic.config import OfflineSettings, SimicConfig, module_config_of
from esper_ray.simic.record import decision_arrays, read_recording
from esper_ray.util import error_line


def _settings(cfg: SimicConfig, settings: OfflineSettings | dict[str, Any] | None) -> OfflineSettings:
    if settings is None:
        settings = cfg.offline
    if not isinstance(settings, OfflineSettings):
        settings = validate_model(OfflineSettings, dict(settings), "offline settings")
    return settings


def _model_config(cfg: SimicConfig) -> dict[str, Any]:
    # Exactly what esper_ray.simic.ppo.build_ppo_config gives the online module.
    return module_config_of(cfg)


# ---- data ----------------------------------------------------------------------------------------
def returns_to_go(table: pa.Table, gamma: float) -> np.ndarray:
    """Discounted return from each row to its episode's end (rows grouped by ``eps_id``, ordered by ``t``)."""
    eps = table.column("eps_id").to_pylist()
    t = table.column("t").to_numpy()
    r = table.column("rewards").to_numpy().astype(np.float64)
    out = np.zeros(len(r))
    by: dict[str, list[int]] = {}
    for i, e in enumerate(eps):
        by.setdefault(e, []).append(i)
    for rows in by.values():
        rows.sort(key=lambda i: t[i])
        g = 0.0
        for i in reversed(rows):
            g = r[i] + gamma * g
            out[i] = g
    return out


def prepare_data(table: pa.Table, folder: Path, gamma: float, monte_carlo: bool) -> Path:
    """The table RLlib trains on, in ``folder`` (rewards -> returns-to-go, every row terminal)."""
    if monte_carlo:
        g = returns_to_go(table, gamma)
        table = table.set_column(table.schema.get_field_index("rewards"), "rewards", pa.array(g))
        done = pa.array(np.ones(table.num_rows, dtype=bool))
        table = table.set_column(table.schema.get_field_index("terminateds"), "terminateds", done)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    pq.write_table(table.replace_schema_metadata(None), folder / "train.parquet")
    return folder


# ---- RLlib -----------------------------------------------------------------------------------------
def build_marwil_config(cfg: SimicConfig, data: Path, settings: OfflineSettings, env, adv_norm_start: float = 1.0):
    """The RLlib MARWILConfig: no env runners, one local learner, the online PPO RLModule.

    ``adv_norm_start`` (used unless ``settings.adv_norm_start`` is set): the initial squared
    advantage scale. RLlib's default (100, moving at 1e-8) suits returns of order 10; ours are
    accuracy gains of order 0.1, for which it would make every weight ~1 (i.e. plain BC).
    """
    from ray.rllib.algorithms.marwil import MARWILConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from esper_ray.simic.module import TamiyoSetModule

    p = cfg.ppo
    batch_size = settings.batch_size or p.minibatch_size
    return (
        MARWILConfig()
        .environment(observation_space=env.observation_space, action_space=env.action_space)
        .env_runners(num_env_runners=0)
        .learners(num_learners=0)
        .training(
            beta=settings.beta,
            lr=settings.lr or p.lr,
            gamma=p.gamma,
            vf_coeff=settings.vf_coeff,
            moving_average_sqd_adv_norm_start=settings.adv_norm_start or adv_norm_start,
            moving_average_sqd_adv_norm_update_rate=settings.adv_norm_update_rate,
            train_batch_size_per_learner=batch_size,
        )
        .rl_module(rl_module_spec=RLModuleSpec(module_class=TamiyoSetModule, model_config=_model_config(cfg)))
        .offline_data(
            input_=[str(data.absolute())],
            dataset_num_iters_per_learner=settings.updates_per_iteration or p.num_epochs,
            input_read_method_kwargs={
                "override_num_blocks": 1,
                "num_cpus": settings.num_cpus_per_data_worker,
            },
            map_batches_kwargs={"concurrency": 1, "num_cpus": settings.num_cpus_per_data_worker},
            iter_batches_kwargs={
                "prefetch_batches": 1,
                "local_shuffle_buffer_size": batch_size,
                "local_shuffle_seed": cfg.seed,
            },
            # Map (episodes -> learner batches) once and keep the result: with Monte-Carlo
            # returns nothing in the mapped batch depends on the module being trained.
            materialize_data=False,
            materialize_mapped_data=True,
        )
        .evaluation(off_policy_estimation_methods={})  # none; also silences a deprecation warning
        .debugging(seed=cfg.seed)
    )


def learner_module(algo):
    """A full (not inference-only) copy of the Learner's trained RLModule."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    state = algo.learner_group.get_state(components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}")
    module_state = state[COMPONENT_LEARNER][COMPONENT_RL_MODULE][DEFAULT_MODULE_ID]
    module = algo.config.get_rl_module_spec().build()
    module.set_state(module_state)
    return module.eval()


def agreement(policy, table: pa.Table) -> dict[str, float]:
    """How often the exported policy's greedy legal action equals the recorded one.

    ``uniform``: the expected agreement of a policy picking uniformly among legal actions;
    ``always_wait``: that of a policy that always waits (the majority action of most recordings).
    """
    import torch

    x, mask, actions = decision_arrays(table)
    with torch.no_grad():
        logits = policy.net.policy_logits(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
    greedy = np.where(mask > 0, logits, -np.inf).argmax(axis=1)
    hit = greedy == actions
    acting = actions != 0
    return {
        "decisions": int(len(actions)),
        "agreement": float(hit.mean()),
        "agreement_non_wait": float(hit[acting].mean()) if acting.any() else math.nan,
        "non_wait_decisions": int(acting.sum()),
        "uniform": float((1.0 / mask.sum(axis=1)).mean()),
        "always_wait": float((actions == 0).mean()),
    }


def train_offline(
    cfg: SimicConfig,
    path: str | Path,
    out: str | Path,
    *,
    settings: OfflineSettings | dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Train Tamiyo with MARWIL on the recording at ``path``; return the exported policy folder.

    ``settings``: OfflineSettings (or a dict of its fields); default from ``cfg``. Ray is
    started (embedded, or RAY_ADDRESS) if it is not running.
    """
    import envs
    from esper_ray.cluster import ensure_ray
    from esper_ray.tamiyo.policy import export_rl_module, load_policy

    settings = _settings(cfg, settings)
    table, meta = read_recording(path)  # one-line EsperError when missing or corrupt
    env = envs.MorphogenesisEnv(cfg.env)
    mine = {
        "max_slots": env.layout.max_slots,
        "k": env.layout.k,
        "obs_size": env.layout.size,
        "n_actions": env.layout.n_actions,
    }
    for key, value in mine.items():
        if meta[key] != value:
            raise EsperError(
                f"recording at {path} was made with {key}={meta[key]}, the config's env has {value}: "
                "record with the same env.max_slots and blueprints.max_candidates"
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(table, out / "data", cfg.ppo.gamma, settings.monte_carlo_returns and settings.beta > 0)

    ensure_ray()
    start = time.perf_counter()
    # The value net starts near 0, so the first advantages are the returns themselves.
    scale = max(float(np.mean(returns_to_go(table, cfg.ppo.gamma) ** 2)), 1e-8)
    iterations = settings.iterations or cfg.iterations
    log = out / "progress.jsonl"
    log.write_text("")
    checkpoint = out / "checkpoint"
    quiet = _quiet_ray_data()
    algo = None
    try:
        algo = build_marwil_config(cfg, data, settings, env, adv_norm_start=scale).build_algo()
        for _ in range(iterations):
            row = _summarize(algo.train())
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if progress:
                print("[simic offline] " + " ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
        algo.save_to_path(str(checkpoint.absolute()))
        policy_dir = export_rl_module(learner_module(algo), out / "policy")
    finally:
        if algo is not None:
            algo.stop()
            # Close Ray Data's batch generators now, while Ray is up (at interpreter exit they
            # would try to report stats to a stopped Ray and print a traceback).
            del algo
            gc.collect()
        quiet()
    stats = agreement(load_policy(policy_dir), table)
    summary = {
        "algorithm": "MARWIL" if settings.beta > 0 else "BC (MARWIL beta=0)",
        "recording": str(path),
        "episodes": len(set(table.column("eps_id").to_pylist())),
        "settings": settings.model_dump(),
        "iterations": iterations,
        "updates": iterations * (settings.updates_per_iteration or cfg.ppo.num_epochs),
        "train_seconds": round(time.perf_counter() - start, 2),
        "checkpoint": str(checkpoint),
        "policy": str(policy_dir),
        **stats,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if progress:
        print(
            f"[simic offline] agreement with recorded actions {stats['agreement']:.3f} "
            f"(non-wait {stats['agreement_non_wait']:.3f}; uniform-random {stats['uniform']:.3f}, "
            f"always-wait {stats['always_wait']:.3f}) on {stats['decisions']} decisions"
        )
    return policy_dir


def _quiet_ray_data() -> Callable[[], None]:
    """Ray Data logs every (tiny) dataset execution at INFO; keep it to warnings while we train."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.WARNING)
    return lambda: logger.setLevel(level)


def _summarize(result: dict[str, Any]) -> dict[str, float]:
    from ray.rllib.core import DEFAULT_MODULE_ID

    learner = result.get("learners", {}).get(DEFAULT_MODULE_ID, {})
    row: dict[str, float] = {"iteration": float(result.get("training_iteration", 0))}
    for key in ("policy_loss", "vf_loss", "vf_explained_variance", "num_module_steps_trained"):
        value = learner.get(key)
        if value is not None:
            with contextlib.suppress(TypeError, ValueError):
                row[key] = float(value)
    return row


# ---- warm start ------------------------------------------------------------------------------------
def warm_start(algo, checkpoint: str | Path) -> None:
    """Load an offline checkpoint's RLModule (policy and value net) into a built PPO algorithm.

    The offline module is the PPO module (same class and model_config), so RLlib's own
    component restore applies; the env runners get the weights too. The optimizer starts fresh.
    """
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE

    component = f"{COMPONENT_LEARNER_GROUP}/{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}"
    source = Path(checkpoint) / component
    if not source.is_dir():
        raise EsperError(f"no RLModule in offline checkpoint {checkpoint} ({component} missing)")
    try:
        algo.restore_from_path(str(source.absolute()), component=component)
    except Exception as err:  # RLlib raises many kinds; the user needs one line
        raise EsperError(f"cannot warm-start from {checkpoint}: {error_line(err)}") from None
