"""Offline Simic: recording decision episodes (Parquet, RLlib's offline column format) and
training Tamiyo on them with RLlib MARWIL (the online PPO's action-masking RLModule).

The recording is made once per module (the heuristic on 4 MNIST-1D training tasks x 2
seeds, 8-epoch host runs: 56 decisions, 10-12 of them not a wait). Tests marked ``ray`` use
the shared session from conftest. The file takes ~40 s on an idle 2-core machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import envs
from esper_ray.contracts import EsperError
from esper_ray.simic.config import SimicConfig
from esper_ray.simic.record import COLUMNS, decision_arrays, read_recording, record_episodes
from esper_ray.tamiyo.controllers import HeuristicController

ENV = {
    "run": {
        "name": "episode",
        "host": {"kind": "mlp", "hidden": [16, 16]},
        "training": {"epochs": 8, "batch_size": 100},
        "lifecycle": {"min_training_epochs": 1, "min_holding_epochs": 1, "alpha": {"steps": 4}},
        "lineage": {"enabled": False},
    },
    "train_tasks": [{"family": "mnist1d", "seed": s} for s in range(4)],
}
SEEDS = (0, 1)


def heuristic(seed: int) -> HeuristicController:
    return HeuristicController(plateau_patience=1)  # acts more often than the default (3)


def tiny_cfg(**fields) -> SimicConfig:
    base = {
        "env": ENV,
        "iterations": 2,
        "seed": 0,
        # 2 iterations x 100 updates of 32 rows: BC then also gets some germinations/culls
        # right, not just the waits.
        "ppo": {"hidden": 32, "lr": 1e-2, "minibatch_size": 32, "num_epochs": 100},
    }
    return SimicConfig(**{**base, **fields})


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("offline") / "decisions"
    record_episodes({"heuristic": heuristic}, ENV, SEEDS, folder)
    return folder


# ---- recording -------------------------------------------------------------------------------------
def test_recording_has_rllib_columns_one_row_per_step(recording: Path) -> None:
    table = pq.read_table(recording / "decisions.parquet")
    assert tuple(table.column_names) == COLUMNS
    _, meta = read_recording(recording)
    episodes = meta["episodes"]
    assert len(episodes) == 4 * len(SEEDS)
    assert table.num_rows == sum(e["steps"] for e in episodes) > 0
    # Within each episode: t counts up, only the last row is terminal, new_obs[t] == obs[t + 1].
    rows = table.to_pylist()
    for e in episodes:
        ep = [r for r in rows if r["eps_id"] == e["eps_id"]]
        assert [r["t"] for r in ep] == list(range(e["steps"]))
        assert [r["terminateds"] for r in ep] == [False] * (len(ep) - 1) + [True]
        assert not any(r["truncateds"] for r in ep)
        for a, b in zip(ep, ep[1:], strict=False):
            assert a["new_obs"] == b["obs"]
        assert sum(r["rewards"] for r in ep) == pytest.approx(e["return"])
    x, mask, actions = decision_arrays(table)
    assert x.shape == (table.num_rows, meta["obs_size"]) and mask.shape == (table.num_rows, meta["n_actions"])
    assert (mask[np.arange(len(actions)), actions] == 1).all()  # every recorded action was legal


def test_recording_round_trips_the_env_observations(recording: Path) -> None:
    """Replaying one recorded episode gives exactly the stored Dict observations and actions."""
    import envs

    table, meta = read_recording(recording)
    eps = meta["episodes"][0]
    rows = [r for r in table.to_pylist() if r["eps_id"] == eps["eps_id"]]
    env = envs.MorphogenesisEnv({**ENV, "split": "train"})
    obs, _ = env.reset(seed=eps["seed"], options={"task_index": eps["task_index"], "train_seed": eps["seed"]})
    controller = heuristic(eps["seed"])
    for row in rows:
        for key in ("observations", "action_mask"):
            stored = np.asarray(row["obs"][key], dtype=np.float32)
            assert stored.dtype == obs[key].dtype and np.array_equal(stored, obs[key]), key
        view = env.trainer.observe()
        action = env.encode_action(controller.act(view, env.trainer.legal_actions()), view)
        assert action == row["actions"]
        obs, reward, *_ = env.step(action)
        assert reward == pytest.approx(row["rewards"])


def test_recording_refuses_to_overwrite(recording: Path) -> None:
    with pytest.raises(EsperError, match="already holds a recording"):
        record_episodes({"heuristic": heuristic}, ENV, SEEDS, recording)


@pytest.mark.parametrize("kind", ["missing", "empty-folder", "corrupt", "foreign-parquet"])
def test_bad_offline_path_is_one_line_error(tmp_path: Path, kind: str) -> None:
    from esper_ray.simic.offline import train_offline

    path = tmp_path / "rec"
    if kind == "empty-folder":
        path.mkdir()
    elif kind == "corrupt":
        path.mkdir()
        (path / "decisions.parquet").write_bytes(b"PAR1 this is not parquet")
    elif kind == "foreign-parquet":
        import pyarrow as pa

        path.mkdir()
        pq.write_table(pa.table({"obs": [1.0, 2.0]}), path / "x.parquet")
    with pytest.raises(EsperError) as err:
        train_offline(tiny_cfg(), path, tmp_path / "out", progress=False)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    assert not (tmp_path / "out").exists()


def test_cli_offline_bad_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from esper_ray.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["simic", "--offline", str(tmp_path / "nothing-here")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("esper-ray: error: no recorded episodes"), err


def test_cli_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from esper_ray.cli import main

    monkeypatch.chdir(tmp_path)
    tiny = [
        "env.run.training.epochs=3",
        "env.run.host.hidden=[16,16]",
        "env.train_tasks=[{family: mnist1d, seed: 0}]",
    ]
    out = tmp_path / "rec"
    args = ["record", "--out", str(out), "--seeds", "1", "--controller", "heuristic", "--controller", "random"]
    assert main([*args, "--no-progress", *tiny]) == 0
    assert "esper-ray simic --offline" in capsys.readouterr().out
    table, meta = read_recording(out)
    assert {e["controller"] for e in meta["episodes"]} == {"heuristic", "random"}
    assert table.num_rows == sum(e["steps"] for e in meta["episodes"]) == 2 * 2  # 3 epochs, 1 warm-up
    assert main([*args, *tiny]) == 2  # never overwrites
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "already holds a recording" in err[0], err


def test_cli_record_plays_a_slice_of_the_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from esper_ray.cli import main

    monkeypatch.chdir(tmp_path)
    tiny = [
        "env.run.training.epochs=2",
        "env.run.host.hidden=[8]",
        "env.train_tasks=[{family: mnist1d, seed: 0, n_train: 200}, {family: mnist1d, seed: 1, n_train: 200},"
        " {family: mnist1d, seed: 2, n_train: 200}]",
    ]
    args = ["record", "--seeds", "1", "--controller", "static", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a"), "--tasks", "0:3:2", *tiny]) == 0
    _, meta = read_recording(tmp_path / "a")
    assert [e["task_index"] for e in meta["episodes"]] == [0, 2]
    for bad in ("3", "0:3:0", "a:b"):
        assert main([*args, "--out", str(tmp_path / "b"), "--tasks", bad, *tiny]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "--tasks" in err[0], err
    assert not (tmp_path / "b").exists()


def test_recording_of_another_encoding_is_refused(recording: Path, tmp_path: Path) -> None:
    from esper_ray.simic.offline import train_offline

    other = {**ENV, "run": {**ENV["run"], "blueprints": {"max_candidates": 4}}}
    with pytest.raises(EsperError, match="was made with"):
        train_offline(tiny_cfg(env=other), recording, tmp_path / "out", progress=False)


# ---- RLlib ------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_rllib_offline_prelearner_reads_the_recording(recording: Path, tmp_path: Path, ray_session, torch_seed) -> None:
    """RLlib's own reader (Ray Data read_parquet -> OfflinePreLearner) turns the Parquet rows into
    the learner batch the set RLModule trains on: the Dict observation's observations and
    action_mask, the recorded actions; and on the prepared copy train_offline writes, value
    targets that are the episodes' discounted returns-to-go (what MARWIL's advantages need)."""
    import ray
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.env import INPUT_ENV_SPACES
    from ray.rllib.offline.offline_prelearner import OfflinePreLearner

    import envs
    from esper_ray.simic.offline import OfflineSettings, build_marwil_config, prepare_data, returns_to_go

    table, meta = read_recording(recording)
    x, mask, actions = decision_arrays(table)
    env = envs.MorphogenesisEnv(ENV)
    cfg = tiny_cfg()
    config = build_marwil_config(cfg, recording, OfflineSettings(beta=1.0), env)
    spaces = (env.observation_space, env.action_space)
    # What the Algorithm hands its OfflinePreLearner actors (see OfflineData.sample).
    module_spec = config.get_multi_rl_module_spec(
        spaces={INPUT_ENV_SPACES: spaces, DEFAULT_MODULE_ID: spaces}, inference_only=False
    )
    prelearner = OfflinePreLearner(config=config, spaces=spaces, module_spec=module_spec)
    prepared = prepare_data(table, tmp_path / "data", cfg.ppo.gamma, monte_carlo=True)
    for folder in (recording, prepared):
        batch = ray.data.read_parquet(str(folder)).take_batch(table.num_rows, batch_format="numpy")
        first = batch["obs"][0]
        assert set(first) == {"observations", "action_mask"} and first["observations"].dtype == np.float32
        out = prelearner(batch)  # flattened "<module>/<column>" keys

        def col(name: str, out=out) -> np.ndarray:
            return np.asarray(out[f"{DEFAULT_MODULE_ID}/{name}"])

        live = col("loss_mask").astype(bool)  # RLlib adds one masked-out step per (1-step) episode
        assert live.sum() == table.num_rows
        np.testing.assert_array_equal(col("obs/observations")[live], x)  # the module splits the Dict itself
        np.testing.assert_array_equal(col("obs/action_mask")[live], mask)
        np.testing.assert_array_equal(col("actions")[live], actions)
    np.testing.assert_allclose(col("value_targets")[live], returns_to_go(table, cfg.ppo.gamma), rtol=1e-5, atol=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_train_offline_imitates_the_heuristic(recording: Path, tmp_path: Path, ray_session, torch_seed) -> None:
    """Behaviour cloning (MARWIL with beta=0) on the heuristic's decisions: the exported policy
    loads with plain torch and picks the heuristic's action far more often than chance, and more
    often than always waiting (the majority action); its weights warm-start online PPO."""
    from esper_ray.simic.offline import agreement, train_offline, warm_start
    from esper_ray.simic.ppo import build_ppo_config
    from esper_ray.tamiyo.policy import load_policy

    out = tmp_path / "offline"
    cfg = tiny_cfg()
    policy_dir = train_offline(cfg, recording, out, settings={"beta": 0.0}, progress=False)
    assert policy_dir == out / "policy"
    assert (out / "checkpoint" / "rllib_checkpoint.json").exists()
    policy = load_policy(policy_dir)
    table, _ = read_recording(recording)
    stats = agreement(policy, table)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"].startswith("BC") and summary["agreement"] == pytest.approx(stats["agreement"])
    assert stats["agreement"] > 0.7, stats
    assert stats["agreement"] > stats["uniform"] + 0.5, stats
    assert stats["agreement"] > stats["always_wait"], stats  # it learned more than the majority action
    # Warm start: the offline module's weights become online PPO's (same class, same model_config).
    ppo = build_ppo_config(tiny_cfg(num_env_runners=0)).build_algo()
    try:
        warm_start(ppo, out / "checkpoint")
        import torch

        online = ppo.get_module().net.state_dict()
        exported = policy.net.state_dict()
        assert online.keys() == exported.keys()
        for key, value in exported.items():
            assert torch.equal(online[key].detach().cpu(), value), key
    finally:
        ppo.stop()


@pytest.mark.ray
def test_train_offline_marwil_trains_value_and_policy(recording: Path, tmp_path: Path, ray_session, torch_seed) -> None:
    """MARWIL proper (beta > 0): the value net is trained too, and the policy exports."""
    from esper_ray.simic.offline import train_offline
    from esper_ray.tamiyo.policy import load_policy

    out = tmp_path / "marwil"
    settings = {"beta": 1.0, "iterations": 1, "updates_per_iteration": 5}
    load_policy(train_offline(tiny_cfg(), recording, out, settings=settings, progress=False))
    rows = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["vf_loss"]) and np.isfinite(rows[0]["policy_loss"])
    assert json.loads((out / "summary.json").read_text())["algorithm"] == "MARWIL"


def test_the_trial_heuristic_records_with_the_configs_settings(tmp_path: Path) -> None:
    """``trial`` gets the episode's trainer and the env's run.controller settings: with no gain
    required and no epochs reserved, its first trial round germinates at the first decision."""
    env = {
        **ENV,
        "train_tasks": [{"family": "mnist1d", "seed": 0, "n_train": 300}],
        "run": {
            **ENV["run"],
            "controller": {"trial": {"min_gain": -1.0, "min_epochs_left": 0, "steps": 4, "screen_steps": 2}},
        },
    }
    record_episodes(["trial"], env, [0], tmp_path / "trial")
    table, meta = read_recording(tmp_path / "trial")
    first = [r for r in table.to_pylist() if r["t"] == 0]
    assert [e["controller"] for e in meta["episodes"]] == ["trial"]
    layout = envs.MorphogenesisEnv(env).layout
    assert len(first) == 1 and 1 <= first[0]["actions"] <= layout.max_slots * layout.k  # a germination
