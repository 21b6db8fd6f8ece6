"""Simic: a two-iteration PPO run, checkpoint/resume, and an exported policy that acts like the module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import envs
from esper_ray.contracts import EsperError
from esper_ray.simic.config import SimicConfig
from esper_ray.tamiyo.policy import load_policy

pytestmark = pytest.mark.ray

TINY = SimicConfig(
    iterations=2,
    num_env_runners=0,
    checkpoint_every=1,
    ppo={"train_batch_size": 32, "minibatch_size": 16, "num_epochs": 1, "hidden": 16},
    env={
        "run": {"training": {"epochs": 4}, "lineage": {"enabled": False}},
        "train_tasks": [{"family": "mnist1d", "seed": 0, "n_train": 400}],
        "heldout_tasks": [{"family": "mnist1d", "seed": 1, "n_train": 400}],
    },
)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory) -> Path:
    from esper_ray.simic.ppo import train_simic

    out = tmp_path_factory.mktemp("simic")
    train_simic(TINY, out, progress=False)
    return out


def test_two_iterations_train_checkpoint_and_export(trained: Path) -> None:
    rows = [json.loads(line) for line in (trained / "progress.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[-1]["env_steps"] >= 2 * 32
    assert "esper_final_val_acc" in rows[-1] and 0.0 < rows[-1]["esper_final_val_acc"] <= 1.0
    assert (trained / "checkpoint" / "rllib_checkpoint.json").exists()
    meta = json.loads((trained / "policy" / "policy.json").read_text())
    env = envs.MorphogenesisEnv(TINY.env)
    assert (meta["max_slots"], meta["k"], meta["hidden"]) == (env.layout.max_slots, env.layout.k, 16)


def test_exported_policy_matches_the_checkpointed_module(trained: Path) -> None:
    """Greedy masked actions of the torch-only export equal those of the RLlib module."""
    from ray.rllib.algorithms.algorithm import Algorithm
    from ray.rllib.core.columns import Columns

    algo = Algorithm.from_checkpoint(str(trained / "checkpoint"))
    module = algo.get_module()
    policy = load_policy(trained / "policy", sample=False)
    env = envs.MorphogenesisEnv(TINY.env)
    agree = total = 0
    for seed in range(2):
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            batch = {Columns.OBS: {k: torch.from_numpy(v)[None] for k, v in obs.items()}}
            with torch.no_grad():
                logits = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS][0].numpy()
            rllib_action = int(np.argmax(logits))
            ours = policy.act(env.trainer.observe(), env.trainer.legal_actions())
            ours_index = env.encode_action(ours, env.trainer.observe())
            agree += rllib_action == ours_index
            total += 1
            obs, _, done, _, _ = env.step(ours_index)
    algo.stop()
    assert total > 0 and agree == total


def test_resume_continues_the_iteration_count(trained: Path, tmp_path: Path) -> None:
    from esper_ray.simic.ppo import train_simic

    out = tmp_path / "resumed"
    train_simic(TINY.model_copy(update={"iterations": 3}), out, resume=trained / "checkpoint", progress=False)
    rows = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [3]


def test_a_run_with_env_runners_returns_once_their_cpus_are_free_again(ray_session, tmp_path: Path) -> None:
    """Ray frees a stopped actor's CPUs a moment after the kill: without waiting for them, a second run
    asking for the same CPUs right away failed its check that they are free."""
    from esper_ray.cluster import free_cpus
    from esper_ray.simic.ppo import train_simic

    free = free_cpus()
    cfg = TINY.model_copy(update={"iterations": 1, "num_env_runners": 1, "num_cpus_per_env_runner": free})
    train_simic(cfg, tmp_path / "first", progress=False)
    assert free_cpus() >= free - 1e-9


def test_bad_checkpoints_and_policies_are_one_line(tmp_path: Path) -> None:
    from esper_ray.simic.ppo import train_simic

    with pytest.raises(EsperError, match="cannot resume from") as err:
        train_simic(TINY, tmp_path / "o", resume=tmp_path / "nothing-here", progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(EsperError, match="no exported policy at"):
        load_policy(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "policy.json").write_text(json.dumps({"format": "esper-ray-tamiyo-policy/2", "max_slots": 3}))
    (bad / "policy.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EsperError, match="unreadable"):
        load_policy(bad)


def test_sweep_runs_a_grid_and_reports_the_best_trial(ray_session, tmp_path: Path) -> None:
    from esper_ray.simic.config import SweepConfig
    from esper_ray.simic.sweep import run_sweep

    cfg = SweepConfig(
        name="tiny-sweep",
        storage_path=str(tmp_path / "tune"),
        scheduler="fifo",
        search={"ppo.lr": [1e-4, 1e-3]},
        base=TINY.model_copy(update={"iterations": 1}),
    )
    result = run_sweep(cfg, progress=False)
    assert len(result["trials"]) == 2
    assert {t["lr"] for t in result["trials"]} == {1e-4, 1e-3}
    assert all(not t["error"] for t in result["trials"]), result["trials"]
    assert Path(result["summary_csv"]).read_text().count("\n") == 3  # header + 2 trials
    assert result["best_checkpoint"] is not None and Path(result["best_checkpoint"]).exists()


def test_sweep_rejects_unknown_search_keys(tmp_path: Path) -> None:
    from esper_ray.simic.config import SweepConfig
    from esper_ray.simic.sweep import param_space

    with pytest.raises(EsperError, match="sweep search key 'ppo.nope'"):
        param_space(SweepConfig(search={"ppo.nope": [1, 2]}, base=TINY))
