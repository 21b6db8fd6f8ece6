"""The Morphogenesis env: Gymnasium contract, masks, rewards, bad actions; the action codec."""

from __future__ import annotations

import contextlib

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

import envs
from esper_ray.contracts import ActionKind, ControllerAction, EsperError
from esper_ray.tamiyo.encoding import ActionSpace

SMALL = {
    "run": {
        "training": {"epochs": 6},
        "lifecycle": {"min_training_epochs": 1, "min_holding_epochs": 1, "alpha": {"steps": 32}},
        "lineage": {"enabled": False},
    },
    "train_tasks": [{"family": "mnist1d", "seed": 0, "n_train": 600}],
    "heldout_tasks": [{"family": "mnist1d", "seed": 1, "n_train": 600}],
}


@pytest.fixture
def env() -> envs.MorphogenesisEnv:
    return envs.MorphogenesisEnv(SMALL)


def test_registered_and_passes_the_env_checker() -> None:
    made = gym.make(envs.ENV_ID, **SMALL)
    assert isinstance(made.unwrapped, envs.MorphogenesisEnv)
    check_env(made.unwrapped, skip_render_check=True)


def test_observation_is_a_dict_of_exactly_observations_and_action_mask(env) -> None:
    obs, info = env.reset(seed=0)
    assert set(obs) == {"observations", "action_mask"}
    assert obs["observations"].shape == (env.encoder.size,) and obs["observations"].dtype == np.float32
    assert obs["action_mask"].shape == (env.space.n,) and obs["action_mask"][0] == 1.0
    assert np.isfinite(obs["observations"]).all()
    assert env.observation_space.contains(obs)
    assert info["epoch"] == 1  # one warm-up epoch before the first decision


def test_reward_is_the_accuracy_change_minus_documented_costs(env) -> None:
    obs, _ = env.reset(seed=0)
    acc0 = env.trainer.last["val_acc"]
    germinate = env.space.encode(ControllerAction.germinate("input", "conv1d"), env._candidates)
    _, reward, _, _, info = env.step(germinate)
    params = env.trainer.host.param_count()
    r = env.config.reward
    expected = info["val_acc"] - acc0 - r.param_cost * params["seeds"] / params["host"] - r.action_cost
    assert params["seeds"] > 0
    assert reward == pytest.approx(expected, abs=1e-12)
    acc1 = info["val_acc"]
    _, reward, _, _, info = env.step(0)
    assert reward == pytest.approx(info["val_acc"] - acc1, abs=1e-12)  # wait: no cost


def test_episode_ends_after_the_configured_epochs(env) -> None:
    env.reset(seed=0)
    steps, done = 0, False
    while not done:
        _, _, done, truncated, info = env.step(0)
        steps += 1
        assert not truncated
    assert steps == SMALL["run"]["training"]["epochs"] - 1 and info["epoch"] == 6


def test_masked_action_raises_a_clear_error(env) -> None:
    obs, _ = env.reset(seed=0)
    illegal = int(np.flatnonzero(obs["action_mask"] == 0)[0])
    with pytest.raises(EsperError, match=f"action {illegal} is not legal now"):
        env.step(illegal)
    with pytest.raises(EsperError, match="not legal"):
        env.step(env.space.n + 3)


def test_masks_forbid_every_illegal_action_over_random_episodes(env) -> None:
    """Property: every masked-in action applies; every masked-out one is illegal for the trainer."""
    rng = np.random.default_rng(0)
    for episode in range(2):
        obs, _ = env.reset(seed=episode)
        done = False
        while not done:
            legal = set(np.flatnonzero(obs["action_mask"]).tolist())
            for index in range(env.space.n):
                try:
                    action = env.space.decode(index, env._candidates)
                except EsperError:
                    assert index not in legal  # no candidate at that position
                    continue
                assert (index in legal) == (env.trainer.why_illegal(action) == ""), (index, action)
            choice = int(rng.choice(sorted(legal))) if rng.random() < 0.5 else 0
            obs, _, done, _, _ = env.step(choice)


def test_heldout_split_uses_the_heldout_tasks() -> None:
    env = envs.MorphogenesisEnv({**SMALL, "split": "heldout"})
    _, info = env.reset(seed=0)
    assert info["task"].startswith("mnist1d/s1")


def test_bad_env_config_is_one_clear_line() -> None:
    with pytest.raises(EsperError, match="env config: reward.param_cost"):
        envs.MorphogenesisEnv({**SMALL, "reward": {"param_cost": -1}})
    with pytest.raises(EsperError, match="no heldout tasks"):
        envs.MorphogenesisEnv({**SMALL, "split": "heldout", "heldout_tasks": []})


SPACE = ActionSpace(("input", "hidden0", "hidden1"), 4)
CANDIDATES = ["a", "b", "c", "d"]


@given(st.integers(0, SPACE.n - 1))
@settings(max_examples=200, deadline=None)
def test_action_codec_round_trips(index: int) -> None:
    action = SPACE.decode(index, CANDIDATES)
    assert SPACE.encode(action, CANDIDATES) == index


def test_action_codec_layout_and_errors() -> None:
    assert SPACE.n == 1 + 3 * 4 + 2 * 3
    assert SPACE.decode(0, CANDIDATES).kind is ActionKind.WAIT
    assert SPACE.decode(1 + 4 + 2, CANDIDATES) == ControllerAction.germinate("hidden0", "c")
    assert SPACE.decode(1 + 12 + 2, CANDIDATES) == ControllerAction.fossilize("hidden1")
    assert SPACE.decode(1 + 12 + 3, CANDIDATES) == ControllerAction.cull("input")
    with pytest.raises(EsperError, match="no candidate blueprint at position 3"):
        SPACE.decode(1 + 3, CANDIDATES[:3])
    with pytest.raises(EsperError, match="out of range"):
        SPACE.decode(SPACE.n, CANDIDATES)
    with pytest.raises(EsperError, match="not among"):
        SPACE.encode(ControllerAction.germinate("input", "zzz"), CANDIDATES)


def test_shuffled_candidates_keep_one_order_per_episode_and_vary_between_episodes() -> None:
    plain = envs.MorphogenesisEnv(SMALL)
    plain.reset(seed=0)
    env = envs.MorphogenesisEnv({**SMALL, "shuffle_candidates": True})
    orders = []
    for episode in range(4):
        env.reset(seed=episode)
        first = list(env._candidates)
        assert sorted(first) == sorted(plain._candidates)  # the same blueprints, another order
        for _ in range(2):
            obs, *_ = env.step(0)
            assert env._candidates == first  # fixed within the episode
        # the mask and the codec follow the shown order: conv1d at input is legal wherever it sits
        k = first.index("conv1d")
        assert obs["action_mask"][env.space.encode(ControllerAction.germinate("input", "conv1d"), first)] == 1.0
        assert env.space.decode(1 + k, first) == ControllerAction.germinate("input", "conv1d")
        orders.append(tuple(first))
    assert len(set(orders)) > 1
    held = envs.MorphogenesisEnv({**SMALL, "shuffle_candidates": True, "split": "heldout"})
    held.reset(seed=0)
    assert held._candidates == plain._candidates  # evaluation shows the catalogue order


def test_non_finite_telemetry_is_encoded_as_documented_bounded_values(env) -> None:
    env.reset(seed=0)
    obs = env.trainer.observe()
    clean = env.encoder.encode(obs)
    assert np.isfinite(clean).all()
    slot = obs.slots[1]
    slot.act_effective_rank, slot.host_grad_norm, slot.act_mean = float("nan"), float("inf"), float("-inf")
    vec = env.encoder.encode(obs)
    assert np.isfinite(vec).all() and vec.dtype == np.float32
    changed = np.flatnonzero(vec != clean)
    assert 0 < len(changed) <= 3
    assert set(vec[changed].tolist()) <= {0.0, 10.0, -1.0}  # NaN -> 0, log1p(inf) -> inf -> 10, tanh(-inf) = -1


ALL_ACTIONS = [ControllerAction.wait()] + [
    action
    for slot in ("input", "hidden0", "hidden1", "elsewhere")
    for action in (
        *(ControllerAction.germinate(slot, b) for b in (*CANDIDATES, "zzz")),
        ControllerAction.fossilize(slot),
        ControllerAction.cull(slot),
    )
]


@given(st.lists(st.sampled_from(ALL_ACTIONS), max_size=40), st.integers(1, 4))
@settings(max_examples=200, deadline=None)
def test_mask_marks_exactly_the_encoded_actions_in_view(legal: list[ControllerAction], shown: int) -> None:
    candidates = CANDIDATES[:shown] + ["beyond", "the", "view"]  # more than K: the rest are out of view
    expected = np.zeros(SPACE.n, np.int8)
    for action in legal:
        with contextlib.suppress(EsperError):  # an unknown slot, or a blueprint not among the K in view
            expected[SPACE.encode(action, candidates)] = 1
    assert np.array_equal(SPACE.mask(legal, candidates), expected)
