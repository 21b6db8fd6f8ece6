"""Record Tamiyo's decision episodes as Parquet for offline Simic (RLlib's offline API).

Controllers (baselines or exported policies) play the TRAINING tasks of
``esper/Morphogenesis-v0``; every decision point becomes one row in RLlib's columnar
offline format for the new API stack (what ``OfflineSingleAgentEnvRunner`` writes with
``output_write_episodes=False`` and what ``OfflinePreLearner._map_to_episodes`` reads):

==============  ==========================================================================
``eps_id``      string, one id per episode: ``<controller>/<task>/<seed>``
``t``           int64, the decision's index within its episode
``obs``         the env's Dict observation as a struct column:
                ``{observations: fixed_size_list<float32>[D], action_mask: fixed_size_list<float32>[A]}``
                (Ray Data hands it back as one ``dict`` of float32 arrays per row, i.e. a
                sample of the env's ``gym.spaces.Dict``, so no ``input_compress_columns``)
``actions``     int64, the Discrete action index (``esper_ray.tamiyo.encoding.ActionSpace``)
``rewards``     float64, the env's reward for the step
``new_obs``     the next observation (same struct as ``obs``)
``terminateds`` bool, true on the episode's last decision
``truncateds``  bool, always false (episodes end when the host run ends)
==============  ==========================================================================

Nothing is pickled: RLlib's ``output_compress_columns`` would cloudpickle arrays, which we
never do (no code from storage). The file's Parquet metadata (key ``esper-ray``) holds a
JSON description: format, the encoding (slots, K, sizes), the env config and one entry per
episode (controller, task, seed, steps, return, final accuracy).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esper_ray.contracts import ControllerKind, EsperError
from esper_ray.tamiyo.controllers import Controller, ControllerFactory, policy_factory
from esper_ray.util import atomic_write, error_line, read_parquet

FORMAT = "esper-ray-decisions/2"
META_KEY = b"esper-ray"
COLUMNS = ("eps_id", "t", "obs", "actions", "rewards", "new_obs", "terminateds", "truncateds")
RECORDABLE = (ControllerKind.STATIC, ControllerKind.RANDOM, ControllerKind.HEURISTIC, ControllerKind.TRIAL)
"""Baselines that can be recorded (the schedule baselines need a schedule or a searched table)."""


def obs_type(obs_size: int, n_actions: int) -> pa.StructType:
    """The Arrow type of one Dict observation."""
    return pa.struct(
        [
            ("observations", pa.list_(pa.float32(), obs_size)),
            ("action_mask", pa.list_(pa.float32(), n_actions)),
        ]
    )


def schema(obs_size: int, n_actions: int, meta: dict[str, Any] | None = None) -> pa.Schema:
    o = obs_type(obs_size, n_actions)
    fields = [
        ("eps_id", pa.string()),
        ("t", pa.int64()),
        ("obs", o),
        ("actions", pa.int64()),
        ("rewards", pa.float64()),
        ("new_obs", o),
        ("terminateds", pa.bool_()),
        ("truncateds", pa.bool_()),
    ]
    metadata = {META_KEY: json.dumps(meta).encode()} if meta is not None else None
    return pa.schema(fields, metadata=metadata)


def controller_factories(specs: Iterable[str], settings=None, run=None) -> dict[str, ControllerFactory]:
    """Baseline names (``RECORDABLE``) or exported policy folders -> named factories (a policy as
    ``policy:<label>``, labelled like everywhere else: ``esper_ray.tamiyo.controllers.policy_label``).

    Baselines are built by ``esper_ray.simic.evaluate.baseline_factories`` with ``settings`` (a
    ControllerConfig; its defaults when None) and ``run`` (the EpisodeRun that hands ``trial``
    the episode's trainer; ``record_episodes`` points it at its env).
    """
    from esper_ray.config import ControllerConfig
    from esper_ray.simic.evaluate import EpisodeRun, baseline_factories

    settings = settings or ControllerConfig()
    run = run or EpisodeRun()
    out: dict[str, ControllerFactory] = {}
    for spec in specs:
        if spec in RECORDABLE:
            out.update(baseline_factories([spec], settings, run))
        else:
            label, factory = policy_factory(spec)  # loaded now: fails with one line
            out[label] = factory
    if not out:
        raise EsperError(f"nothing to record: name controllers ({', '.join(RECORDABLE)} or a policy folder)")
    return out


def _obs_row(obs: dict[str, np.ndarray]) -> dict[str, list[float]]:
    return {"observations": obs["observations"].tolist(), "action_mask": obs["action_mask"].tolist()}


def record_episode(env, controller: Controller, task_index: int, seed: int, eps_id: str):
    """Play one episode; return (rows, episode summary). Actions are checked against the mask."""
    obs, _ = env.reset(seed=seed, options={"task_index": task_index, "train_seed": seed})
    trainer = env.trainer
    rows: list[dict[str, Any]] = []
    done, total, info = False, 0.0, {}
    while not done:
        view = trainer.observe()
        action = env.encode_action(controller.act(view, trainer.legal_actions()), view)
        new_obs, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        rows.append(
            {
                "eps_id": eps_id,
                "t": len(rows),
                "obs": _obs_row(obs),
                "actions": action,
                "rewards": float(reward),
                "new_obs": _obs_row(new_obs),
                "terminateds": bool(terminated),
                "truncateds": bool(truncated),
            }
        )
        total += reward
        obs = new_obs
    summary = {
        "eps_id": eps_id,
        "task": info.get("task", ""),
        "task_index": task_index,
        "seed": seed,
        "steps": len(rows),
        "return": total,
        "final_val_acc": info.get("val_acc"),
        "final_test_acc": info.get("test_acc"),
    }
    return rows, summary


def record_episodes(
    controllers: dict[str, ControllerFactory] | Sequence[str],
    env_config: dict[str, Any],
    seeds: Iterable[int],
    path: str | Path,
    *,
    tasks: Sequence[int] | slice | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Play every controller on the env's TRAINING tasks (``tasks``: indices or a slice of them,
    default all) for each seed, and write the decisions to ``path/decisions.parquet``. Returns
    that file.

    ``controllers``: name -> factory(seed) as in ``evaluate_controllers``, or specs for
    ``controller_factories`` (``["trial", "random", "runs/tamiyo-ppo/policy"]``), built with the
    env config's ``run.controller`` settings.
    ``path`` must not hold Parquet files already (a recording is never overwritten).
    """
    import envs
    from esper_ray.simic.evaluate import EpisodeRun

    run = EpisodeRun()
    if not isinstance(controllers, dict):
        settings = envs.EnvConfig.model_validate(env_config).run.controller
        controllers = controller_factories(controllers, settings, run)
    path = Path(path)
    if path.suffix == ".parquet":
        raise EsperError(f"--record/--out takes a folder, not a file: {path}")
    if path.is_dir() and any(path.glob("*.parquet")):
        raise EsperError(f"{path} already holds a recording; choose another folder")
    env = envs.MorphogenesisEnv({**env_config, "split": "train"})
    run.env = env
    every = list(range(len(env.config.tasks)))
    indices = every if tasks is None else every[tasks] if isinstance(tasks, slice) else list(tasks)
    for i in indices:
        if not 0 <= i < len(env.config.tasks):
            raise EsperError(f"task index {i} out of range: {len(env.config.tasks)} training tasks")
    seeds = list(seeds)
    if not seeds:
        raise EsperError("nothing to record: no seeds")
    rows: list[dict[str, Any]] = []
    episodes: list[dict[str, Any]] = []
    for name, factory in controllers.items():
        for t in indices:
            for seed in seeds:
                eps_id = f"{name}/{env.config.tasks[t].family}-{t}/{seed}"
                ep_rows, summary = record_episode(env, factory(seed), t, seed, eps_id)
                rows += ep_rows
                episodes.append({"controller": name, **summary})
                if progress:
                    progress(
                        f"{name:>12} {summary['task']:<22} seed {seed}: {summary['steps']} decisions, "
                        f"return {summary['return']:+.4f}"
                    )
    meta = {
        "format": FORMAT,
        "max_slots": env.layout.max_slots,
        "k": env.layout.k,
        "obs_size": env.layout.size,
        "n_actions": env.layout.n_actions,
        "env_config": env.config.model_dump(mode="json"),
        "episodes": episodes,
    }
    table = pa.Table.from_pylist(rows, schema=schema(env.layout.size, env.layout.n_actions, meta))
    path.mkdir(parents=True, exist_ok=True)
    return atomic_write(path / "decisions.parquet", lambda f: pq.write_table(table, f))


# ---- reading -------------------------------------------------------------------------------------
def recording_files(path: str | Path) -> list[Path]:
    """The Parquet files of a recording (a folder, or one file); EsperError if there are none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if files:
            return files
        raise EsperError(f"no recorded episodes at {path} (no .parquet files in the folder)")
    raise EsperError(f"no recorded episodes at {path} (no such file or folder)")


def read_recording(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """All decisions under ``path`` as one table, and the merged metadata; one-line EsperError
    if the recording is missing, unreadable, not in this format, or inconsistent."""
    tables, metas = [], []
    for file in recording_files(path):
        try:
            table = read_parquet(file)
        except (OSError, pa.ArrowException) as err:
            raise EsperError(f"recording {file} is unreadable: {error_line(err)}") from None
        raw = (table.schema.metadata or {}).get(META_KEY)
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError:
            meta = {}
        if meta.get("format") != FORMAT:
            raise EsperError(f"recording {file} is not an esper-ray decision recording (format {FORMAT})")
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise EsperError(f"recording {file} lacks columns {missing}")
        want = schema(meta["obs_size"], meta["n_actions"])
        try:
            table = table.select(list(COLUMNS)).cast(want)
        except (pa.ArrowException, ValueError) as err:
            raise EsperError(f"recording {file} has wrong column types: {error_line(err)}") from None
        tables.append(table)
        metas.append(meta)
    first = metas[0]
    for file, meta in zip(recording_files(path), metas, strict=True):
        for key in ("max_slots", "k", "obs_size", "n_actions"):
            if meta[key] != first[key]:
                raise EsperError(f"recording {file}: {key}={meta[key]} differs from {first[key]} in the others")
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise EsperError(f"recording at {path} holds no decisions")
    actions = table.column("actions").to_numpy()
    if actions.min() < 0 or actions.max() >= first["n_actions"]:
        raise EsperError(f"recording at {path} has action indices outside [0, {first['n_actions']})")
    merged = {**first, "episodes": [e for m in metas for e in m.get("episodes", [])]}
    return table, merged


def decision_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(observations [N, D] float32, action masks [N, A] float32, actions [N] int64)."""
    obs = table.column("obs").combine_chunks()
    x = obs.field("observations").flatten().to_numpy().reshape(len(obs), -1).astype(np.float32)
    mask = obs.field("action_mask").flatten().to_numpy().reshape(len(obs), -1).astype(np.float32)
    return x, mask, table.column("actions").to_numpy().astype(np.int64)
