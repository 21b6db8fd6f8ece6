"""The batched vector env (envs.batched): same semantics as N single envs, per-episode isolation."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401  (registers the env id and its vector entry point)
from envs.batched import BatchedMorphogenesisEnv
from envs.morphogenesis import MorphogenesisEnv
from esper_ray.contracts import EsperError

ENV_ID = "esper/Morphogenesis-v0"

# The equivalence with single envs is bit for bit on the CPU: a batched layer is one torch.baddbmm
# over the episodes whose gradients are computed in F.linear's own order (tolaria.batched's
# _BatchedLinear), each episode's loss value is F.cross_entropy's own reduction, and Adam's step is
# its single-tensor arithmetic per row. It has to be: Adam turns a last-bit difference in a near-zero
# gradient into a step of the learning rate's size (measured before the gradients were made
# bitwise: weights 1e-3 apart after two epochs, validation accuracy one example apart), so on hardware
# where a batched matmul sums in another order than a single one (a GPU) runs drift apart the way
# two runs on different machines do.
OBS_ATOL = 0.0
REWARD_ATOL = 0.0


def _config(epochs: int = 7, **training) -> dict:
    return {
        "run": {
            "training": {"epochs": epochs, **training},
            "lineage": {"enabled": False},
            # short gates (and any contribution fossilizes), so a few epochs walk every lifecycle edge
            "lifecycle": {
                "min_training_epochs": 1,
                "min_holding_epochs": 1,
                "min_improvement": -1.0,
                "alpha": {"steps": 40},
            },
        },
        "train_tasks": [{"family": "mnist1d", "seed": 0}, {"family": "mnist1d", "seed": 1}],
    }


def _kinds(env: MorphogenesisEnv) -> dict[str, range]:
    """Index ranges of each action kind (wait, germinate(s, k), fossilize(s), cull(s))."""
    space = env.space
    width = getattr(space, "width", len(space.slots))
    g = 1 + width * space.k
    return {"germinate": range(1, g), "fossilize": range(g, g + width), "cull": range(g + width, g + 2 * width)}


def _policy(kinds: dict[str, range], episode: int, step: int, mask: np.ndarray) -> int:
    """A scripted controller that walks every lifecycle edge: germinate at once (a different legal
    choice for odd episodes), fossilize whenever allowed, episode 1 culls its seed at step 3."""
    legal = set(np.flatnonzero(mask).tolist())
    fossil = [a for a in kinds["fossilize"] if a in legal]
    if fossil:
        return fossil[0]
    if episode % 3 == 1 and step == 3:
        cull = [a for a in kinds["cull"] if a in legal]
        if cull:
            return cull[0]
    germ = [a for a in kinds["germinate"] if a in legal]
    if step in (0, 4) and germ:  # episodes 0 and 2 grow the same seed (one group per slot and blueprint)
        return germ[(7 * (episode % 2) + step) % len(germ)]
    return 0


def _events(env: MorphogenesisEnv) -> set[str]:
    """Kinds of the run's events and the stages its seeds entered."""
    events = env.trainer.events
    blended_cull = {
        "cull after blending" for e in events if e["kind"] == "cull" and e["old"] in ("BLENDING", "HOLDING")
    }
    return {e["kind"] for e in events} | {e.get("new", "") for e in events} | blended_cull


def test_batched_env_matches_single_envs(torch_seed):
    n, steps = 3, 10  # episodes of 6 steps: the last 4 steps run after an autoreset
    venv = gym.make_vec(ENV_ID, num_envs=n, vectorization_mode="vector_entry_point", config=_config())
    assert isinstance(venv, BatchedMorphogenesisEnv)
    singles = [MorphogenesisEnv(_config()) for _ in range(n)]
    obs, _ = venv.reset(seed=5)
    single_obs = [env.reset(seed=5 + i)[0] for i, env in enumerate(singles)]
    kinds = _kinds(singles[0])
    done = [False] * n
    seen_events: set[str] = set()
    resets = 0
    for step in range(steps):
        for i in range(n):
            np.testing.assert_allclose(obs["observations"][i], single_obs[i]["observations"], atol=OBS_ATOL, rtol=0)
            np.testing.assert_array_equal(obs["action_mask"][i], single_obs[i]["action_mask"])
        actions = np.array([_policy(kinds, i, step, obs["action_mask"][i]) for i in range(n)])
        obs, rewards, terminated, truncated, infos = venv.step(actions)
        for i, env in enumerate(singles):
            if done[i]:  # NEXT_STEP autoreset: this step reset the episode, reward 0
                single_obs[i], info = env.reset()
                assert rewards[i] == 0.0 and not terminated[i]
                done[i] = False
                resets += 1
                continue
            single_obs[i], reward, term, _, info = env.step(int(actions[i]))
            seen_events.update(_events(env))
            assert rewards[i] == pytest.approx(reward, abs=REWARD_ATOL)
            assert terminated[i] == term
            assert infos["val_acc"][i] == pytest.approx(info["val_acc"], abs=1e-9)
            if term:
                assert infos["test_acc"][i] == pytest.approx(info["test_acc"], abs=1e-9)  # the final accuracy
                done[i] = True
    assert resets == n
    assert venv.stacks.grouped_calls == 0  # on the CPU each seed runs its own forward (vmapped groups: GPU only)
    assert venv.stacks.probed >= n  # the probes (forward and backward on the probe batch) ran batched too
    # The script exercised every lifecycle edge the env has (else this test would prove little).
    # (a cull after blending restores the host's weights and Adam state from the blend snapshot)
    assert {"germinate", "fossilize", "cull", "BLENDING", "HOLDING", "cull after blending"} <= seen_events


def test_tasks_of_other_sizes_and_frozen_hosts_batch_too(torch_seed):
    # MNIST-1D (3200 training examples, host trained) beside a bottleneck task (3840, its shipped
    # host frozen): other batch counts, a short last batch, other validation sizes, learning rate 0.
    cfg = _config(epochs=4)
    cfg["train_tasks"] = [
        {"family": "mnist1d", "seed": 0},
        {"family": "bottleneck", "seed": 0, "bottleneck_slot": 1, "input_dim": 40},
    ]
    options = [{"task_index": 0, "train_seed": 3}, {"task_index": 1, "train_seed": 4}]
    venv = BatchedMorphogenesisEnv(2, cfg)
    obs, _ = venv.reset(seed=0, options={"per_env": options})
    singles = [MorphogenesisEnv(cfg) for _ in range(2)]
    single_obs = [env.reset(seed=i, options=options[i])[0] for i, env in enumerate(singles)]
    kinds = _kinds(singles[0])
    for step in range(3):
        for i in range(2):
            np.testing.assert_allclose(obs["observations"][i], single_obs[i]["observations"], atol=OBS_ATOL, rtol=0)
            np.testing.assert_array_equal(obs["action_mask"][i], single_obs[i]["action_mask"])
        actions = np.array([_policy(kinds, i, step, obs["action_mask"][i]) for i in range(2)])
        obs, rewards, *_ = venv.step(actions)
        for i, env in enumerate(singles):
            single_obs[i], reward, *_ = env.step(int(actions[i]))
            assert rewards[i] == pytest.approx(reward, abs=REWARD_ATOL)
    assert venv.trainers[1].opt.param_groups[0]["lr"] == 0.0  # the frozen host really was in the batch


def test_nan_in_one_episode_touches_no_other(torch_seed):
    cfg = _config(epochs=5)
    runs = []
    for poison in (False, True):
        venv = BatchedMorphogenesisEnv(3, cfg)
        obs, _ = venv.reset(seed=11)
        kinds = _kinds(venv.envs[0])
        germ = [a for a in kinds["germinate"] if obs["action_mask"][1][a]]
        actions = np.zeros(3, dtype=int)
        actions[1] = germ[0]
        venv.step(actions)  # episode 1 grows a seed
        if poison:
            slot = next(s for s in venv.trainers[1].host.slots.values() if s.seed is not None)
            with torch.no_grad():
                for p in slot.seed.parameters():
                    p.fill_(float("nan"))
        obs, rewards, *_ = venv.step(np.zeros(3, dtype=int))
        runs.append((obs, rewards, venv))
    (clean, clean_r, _), (dirty, dirty_r, venv) = runs
    for i in (0, 2):  # the other episodes: bit for bit what they were without the NaN
        np.testing.assert_array_equal(dirty["observations"][i], clean["observations"][i])
        assert dirty_r[i] == clean_r[i]
    events = venv.trainers[1].events
    assert any(e["kind"] == "rollback" and "non-finite" in e["reason"] for e in events)
    assert any(e["kind"] == "cull" and "governor" in e["reason"] for e in events)
    for i in (0, 2):
        assert not any(e["kind"] in ("rollback", "cull") for e in venv.trainers[i].events)
    for p in venv.trainers[1].host.host_parameters():  # rolled back to finite weights
        assert torch.isfinite(p).all()
    assert np.isfinite(dirty["observations"][1]).all()


def test_masks_per_episode_and_sampling(torch_seed):
    venv = BatchedMorphogenesisEnv(2, _config(epochs=4))
    obs, _ = venv.reset(seed=3)
    kinds = _kinds(venv.envs[0])
    germ = [a for a in kinds["germinate"] if obs["action_mask"][0][a]]
    obs, *_ = venv.step(np.array([germ[0], 0]))
    np.testing.assert_array_equal(obs["action_mask"], venv.action_masks())
    assert not np.array_equal(obs["action_mask"][0], obs["action_mask"][1])  # episode 0 has a seed now
    for _ in range(20):  # random exploration draws only legal actions, per episode
        a = venv.action_space.sample()
        assert all(obs["action_mask"][i][a[i]] == 1 for i in range(2))
    epochs = [t.epoch for t in venv.trainers]
    illegal = np.array([0, int(np.flatnonzero(obs["action_mask"][1] == 0)[0])])
    with pytest.raises(EsperError, match="episode 1: action"):
        venv.step(illegal)
    assert [t.epoch for t in venv.trainers] == epochs  # nothing moved


def test_check_env_on_a_sub_env(torch_seed):
    from gymnasium.utils.env_checker import check_env

    venv = BatchedMorphogenesisEnv(2, _config(epochs=4))
    venv.reset(seed=0)
    check_env(venv.envs[1], skip_render_check=True)  # a sub-env called on its own trains its epochs alone
    assert venv.single_observation_space == venv.envs[0].observation_space
    assert venv.observation_space["observations"].shape[0] == 2


def test_bad_input_is_one_line(torch_seed):
    with pytest.raises(EsperError, match="num_envs must be an integer >= 1"):
        BatchedMorphogenesisEnv(0, _config())
    with pytest.raises(EsperError, match="num_envs"):
        gym.make_vec(ENV_ID, num_envs=0, vectorization_mode="vector_entry_point", config=_config())
    if not torch.cuda.is_available():
        with pytest.raises(EsperError, match="CUDA is not available"):
            BatchedMorphogenesisEnv(2, _config(device="cuda"))


def test_hosts_of_mixed_skeletons_match_single_envs(torch_seed):
    # A task distribution with hosts of several skeletons (as configs/tamiyo.yaml draws): MNIST-1D on
    # the default MLP, on a narrower 2-layer MLP and on a CNN (not batched: it trains alone), a frozen
    # bottleneck host on 24 inputs. Five episodes, two of them on the default MLP (one stack of 2 rows),
    # run past their end, so autoresets draw new tasks: runs leave stacks, join others, stacks grow.
    cfg = _config(epochs=3)
    cfg["train_tasks"] = [
        {"family": "mnist1d", "seed": 0},
        {"family": "mnist1d", "seed": 1, "host": {"kind": "mlp", "hidden": [32, 48]}},
        {"family": "mnist1d", "seed": 2, "host": {"kind": "cnn1d", "hidden": [8, 8]}},
        {"family": "bottleneck", "seed": 0, "bottleneck_slot": 0, "input_dim": 24},
    ]
    first = [0, 1, 2, 3, 0]
    n, steps = len(first), 9  # episodes of 2 steps, each reset several times
    options = [{"task_index": k, "train_seed": 10 + i} for i, k in enumerate(first)]
    venv = BatchedMorphogenesisEnv(n, cfg)
    obs, _ = venv.reset(seed=21, options={"per_env": options})
    singles = [MorphogenesisEnv(cfg) for _ in range(n)]
    single_obs = [env.reset(seed=21 + i, options=options[i])[0] for i, env in enumerate(singles)]
    assert venv.host_grouping()["stack_rows"] == [2, 1, 1] and venv.host_grouping()["not_batched"] == 1
    kinds = _kinds(singles[0])
    done = [False] * n
    tasks: set[tuple[int, str]] = set()
    for step in range(steps):
        for i in range(n):
            np.testing.assert_allclose(obs["observations"][i], single_obs[i]["observations"], atol=OBS_ATOL, rtol=0)
            np.testing.assert_array_equal(obs["action_mask"][i], single_obs[i]["action_mask"])
            tasks.add((i, singles[i].trainer.data.name))
        actions = np.array([_policy(kinds, i, step, obs["action_mask"][i]) for i in range(n)])
        obs, rewards, terminated, _, infos = venv.step(actions)
        for i, env in enumerate(singles):
            if done[i]:
                single_obs[i], _ = env.reset()
                done[i] = False
                continue
            single_obs[i], reward, term, _, info = env.step(int(actions[i]))
            assert rewards[i] == reward and terminated[i] == term
            if term:
                assert infos["test_acc"][i] == info["test_acc"]
                done[i] = True
    assert len(tasks) > n  # the autoresets moved episodes to other tasks (other skeletons)
    grouping = venv.host_grouping()
    cnn = sum(env.trainer.cfg.host.kind == "cnn1d" for env in singles)
    assert grouping["not_batched"] == cnn and sum(grouping["stack_rows"]) == n - cnn
    assert all(rows > 0 for rows in grouping["stack_rows"])  # a stack whose last run left went away


def test_vector_env_settings_for_rllib():
    from ray.tune.registry import ENV_CREATOR, _global_registry

    from envs.batched import BATCHED_ENV_ID, make_env, vector_env_settings

    env_kwargs, runner_kwargs = vector_env_settings({"run": {"training": {"epochs": 3}}}, 1)
    assert env_kwargs["env"] is MorphogenesisEnv and runner_kwargs == {"num_envs_per_env_runner": 1}
    env_kwargs, runner_kwargs = vector_env_settings({}, 4)
    assert runner_kwargs == {"num_envs_per_env_runner": 4, "gym_env_vectorize_mode": "vector_entry_point"}
    assert env_kwargs["env"] == BATCHED_ENV_ID and _global_registry.get(ENV_CREATOR, BATCHED_ENV_ID) is make_env
    with pytest.raises(EsperError, match="num_envs_per_env_runner must be an integer >= 1"):
        vector_env_settings({}, 0)
    if not torch.cuda.is_available():  # the driver samples (local): a GPU it lacks is one line, for N = 1 too
        for n in (1, 4):
            with pytest.raises(EsperError, match="CUDA is not available") as err:
                vector_env_settings({"run": {"training": {"device": "cuda"}}}, n, local=True)
            assert "\n" not in str(err.value)
        vector_env_settings({"run": {"training": {"device": "cuda"}}}, 4)  # remote runners check it themselves


def test_rllib_env_runner_samples_the_batched_env(torch_seed):
    # RLlib's own sampling loop (the local SingleAgentEnvRunner, no Ray cluster) on N = 4: NEXT_STEP
    # autoreset read as RLlib reads it, episodes that end and restart, the episode callbacks' metrics.
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from esper_ray.simic.config import SimicConfig
    from esper_ray.simic.ppo import build_ppo_config

    cfg = SimicConfig(
        num_env_runners=0,
        num_envs_per_env_runner=4,
        ppo={"train_batch_size": 32, "minibatch_size": 16, "num_epochs": 1, "hidden": 16},
        env={
            "run": {"training": {"epochs": 4}, "lineage": {"enabled": False}},
            "train_tasks": [{"family": "mnist1d", "seed": 0, "n_train": 400}],
        },
    )
    runner = SingleAgentEnvRunner(config=build_ppo_config(cfg))
    try:
        assert isinstance(runner.env.unwrapped, BatchedMorphogenesisEnv) and runner.num_envs == 4
        episodes = runner.sample(num_timesteps=24, explore=True)
        # 3 decisions an episode (4 epochs, 1 of warm-up): 4 episodes x 2 rounds, each run to its end
        assert sum(len(e) for e in episodes) == 24 and sum(e.is_done for e in episodes) == 8
        for e in episodes:
            info = e.get_infos(-1)
            assert 0.0 < info["test_acc"] <= 1.0 and info["epoch"] == 4
        assert "esper_final_test_acc" in runner.get_metrics()
    finally:
        runner.stop()


@pytest.mark.slow
@pytest.mark.ray
def test_two_ppo_iterations_on_the_batched_env(ray_session, tmp_path):
    from esper_ray.simic.config import SimicConfig
    from esper_ray.simic.ppo import build_ppo_config, summarize

    cfg = SimicConfig(
        iterations=2,
        num_env_runners=0,
        num_envs_per_env_runner=4,
        ppo={"train_batch_size": 32, "minibatch_size": 16, "num_epochs": 1, "hidden": 16},
        env={
            "run": {"training": {"epochs": 4}, "lineage": {"enabled": False}},
            "train_tasks": [{"family": "mnist1d", "seed": 0, "n_train": 400}],
        },
    )
    algo = build_ppo_config(cfg).build_algo()
    try:
        env = algo.env_runner.env.unwrapped
        assert isinstance(env, BatchedMorphogenesisEnv) and env.num_envs == 4
        rows = [summarize(algo.train()) for _ in range(2)]
    finally:
        algo.stop()
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[-1]["env_steps"] >= 2 * 32
    assert 0.0 < rows[-1]["esper_final_val_acc"] <= 1.0  # episodes ran to the end and were logged
    assert sum(t.epoch for t in env.trainers) > 0


def test_reset_takes_one_seed_per_episode(torch_seed):
    venv = BatchedMorphogenesisEnv(2, _config(epochs=3))
    obs, _ = venv.reset(seed=[7, 8])
    single = MorphogenesisEnv(_config(epochs=3))
    np.testing.assert_array_equal(obs["observations"][1], single.reset(seed=8)[0]["observations"])
    with pytest.raises(EsperError, match="3 seeds for 2 episodes"):
        venv.reset(seed=[1, 2, 3])


def test_a_stack_grows_and_runs_leave_it_bit_for_bit(torch_seed):
    # HostStacks directly: a run's weights and Adam state survive its stack growing around it (1 -> 2
    # rows) exactly, and a run that leaves keeps its values in memory of its own.
    from esper_ray.config import RunConfig
    from esper_ray.tasks import load_task
    from esper_ray.tolaria.batched import HostStacks
    from esper_ray.tolaria.trainer import Trainer

    cfg = RunConfig(task={"family": "mnist1d", "n_train": 400}, lineage={"enabled": False})
    data = load_task(cfg.task)

    def run(seed: int) -> Trainer:
        return Trainer(cfg.model_copy(update={"training": cfg.training.model_copy(update={"seed": seed})}), data)

    alone, a, b = run(1), run(1), run(2)
    stacks = HostStacks(3)
    stacks.attach(0, a)
    for _ in range(2):
        stacks.train_epochs([0])
        alone.train_epoch()
    stacks.attach(2, b)  # same skeleton, no free row: the stack grows to 2 rows with a's Adam state in it
    assert [s.n for s in stacks.stacks.values()] == [2]
    stacks.train_epochs([0, 2])
    alone.train_epoch()
    assert a.last == {**alone.last, "epoch_seconds": a.last["epoch_seconds"]}
    for p, q in zip(a.host.host_parameters(), alone.host.host_parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(a.opt.state[p]["exp_avg_sq"], alone.opt.state[q]["exp_avg_sq"])
        assert float(a.opt.state[p]["step"]) == float(alone.opt.state[q]["step"]) == 12.0  # 3 epochs x 4 batches
    stacks.detach(0)
    kept = [p.clone() for p in a.host.host_parameters()]
    stacks.train_epochs([2])  # b trains on; a's weights no longer live in the stack
    assert all(torch.equal(p, k) for p, k in zip(a.host.host_parameters(), kept, strict=True))
    stacks.detach(2)
    assert stacks.stacks == {}
    with pytest.raises(EsperError, match="episode 2 has no run"):
        stacks.train_epochs([2])


@pytest.mark.parametrize("blueprint", ["conv1d", "se1d", "norm"])
def test_one_blueprint_in_every_episode_matches_single_envs(torch_seed, blueprint):
    # The same seed kind blending in several episodes at once (on the CPU each seed runs its own
    # forward: a vmapped group of conv1d, se1d or norm seeds differed from it in the last bits of the
    # seeds' gradients).
    from esper_ray.contracts import ControllerAction

    n, cfg = 3, _config(epochs=6)
    venv = BatchedMorphogenesisEnv(n, cfg)
    singles = [MorphogenesisEnv(cfg) for _ in range(n)]
    obs, _ = venv.reset(seed=2)
    single_obs = [env.reset(seed=2 + i)[0] for i, env in enumerate(singles)]
    grow = ControllerAction.germinate("hidden0", blueprint)
    stages = set()
    for step in range(5):
        actions = np.zeros(n, dtype=int)
        for i, env in enumerate(singles):
            np.testing.assert_array_equal(obs["observations"][i], single_obs[i]["observations"])
            if step == 0:
                actions[i] = env.space.encode(grow, [e.name for e in env.trainer.candidates])
        obs, rewards, *_ = venv.step(actions)
        for i, env in enumerate(singles):
            single_obs[i], reward, *_ = env.step(int(actions[i]))
            assert rewards[i] == reward
            stages.add(env.trainer.host.slots["hidden0"].stage.name)
    assert "BLENDING" in stages  # the seeds blended in every episode together


@pytest.mark.slow
def test_random_legal_actions_on_the_default_tasks_match_single_envs(torch_seed):
    # The simic recipe's env (MNIST-1D and frozen bottleneck hosts of one skeleton) with random legal
    # actions: 12 episodes in one stack through germinations, blends, culls and autoresets, exactly.
    cfg = {
        "run": {"host": {"kind": "mlp", "hidden": [64, 64]}, "training": {"epochs": 8}, "lineage": {"enabled": False}},
        "reward": {"param_cost": 0.02, "action_cost": 0.01},
    }
    n = 12
    venv = BatchedMorphogenesisEnv(n, cfg)
    singles = [MorphogenesisEnv(cfg) for _ in range(n)]
    obs, _ = venv.reset(seed=0)
    single_obs = [env.reset(seed=i)[0] for i, env in enumerate(singles)]
    rng = np.random.default_rng(0)
    done = [False] * n
    for _ in range(12):
        for i in range(n):
            np.testing.assert_array_equal(obs["observations"][i], single_obs[i]["observations"])
        legal = [np.flatnonzero(obs["action_mask"][i]) for i in range(n)]
        actions = np.array([rng.choice(a) if rng.random() < 0.4 else 0 for a in legal])
        obs, rewards, *_ = venv.step(actions)
        for i, env in enumerate(singles):
            if done[i]:
                single_obs[i], _ = env.reset()
                done[i] = False
                continue
            single_obs[i], reward, done[i], *_ = env.step(int(actions[i]))
            assert rewards[i] == reward
    assert venv.host_grouping()["stack_rows"] == [n]
