"""Tamiyo's set network: equivariance, variable set sizes, masking, export, maxima."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from esper_ray.contracts import (
    ControllerAction,
    EsperError,
    GlobalTelemetry,
    Observation,
    SeedStage,
    SlotTelemetry,
)
from esper_ray.tamiyo.encoding import (
    CANDIDATE_FEATURES,
    SLOT_FEATURES,
    ActionSpace,
    ObsEncoder,
    SetLayout,
)
from esper_ray.tamiyo.policy import PolicyController, export_net, load_policy
from esper_ray.tamiyo.setnet import SetPolicyNet, masked_logits

LAYOUT = SetLayout(max_slots=6, k=5)


def _slot(i: int, n: int, rng: np.random.Generator, kind: str = "vector") -> SlotTelemetry:
    name = "input" if i == 0 else f"hidden{i - 1}"
    return SlotTelemetry(
        name=name,
        index=i,
        stage=SeedStage.DORMANT,
        alpha=0.0,
        epochs_in_stage=int(rng.integers(5)),
        blueprint=None,
        seed_params=0,
        act_mean=float(rng.normal()),
        act_std=float(rng.random()),
        act_dead_frac=float(rng.random()),
        act_effective_rank=float(rng.random()),
        host_grad_norm=float(rng.random()),
        seed_grad_norm=0.0,
        contribution=0.0,
        grad_rms=float(rng.random()),
        grad_predictability=float(rng.random()),
        kind=kind,
        width=64,
        grad_deficit=float(rng.normal() * 0.05),
    )


def _obs(n_slots: int, n_cands: int, seed: int = 0) -> Observation:
    rng = np.random.default_rng(seed)
    glob = GlobalTelemetry(
        epoch=3,
        max_epochs=30,
        train_loss=1.2,
        val_loss=1.4,
        val_accuracy=0.5,
        best_val_accuracy=0.55,
        plateau_epochs=2,
        host_params=7000,
        seed_params=0,
    )
    names = [f"bp{c}" for c in range(n_cands)]
    return Observation(
        glob,
        [_slot(i, n_slots, rng) for i in range(n_slots)],
        candidates=names,
        candidate_features=[rng.random(CANDIDATE_FEATURES - 1).tolist() for _ in names],
        candidate_params=[[int(rng.integers(-1, 5000)) for _ in names] for _ in range(n_slots)],
        task_features=[0.4, 0.3, 0.5, 0.0, 0.1],
    )


def _net(seed: int = 0) -> SetPolicyNet:
    torch.manual_seed(seed)
    return SetPolicyNet(LAYOUT, hidden=16).eval()


def _logits(net: SetPolicyNet, obs: Observation) -> np.ndarray:
    x = torch.from_numpy(ObsEncoder(LAYOUT).encode(obs))[None]
    with torch.no_grad():
        return net.logits(x)[0].numpy()


def _germinate_grid(logits: np.ndarray) -> np.ndarray:
    return logits[1 : 1 + LAYOUT.max_slots * LAYOUT.k].reshape(LAYOUT.max_slots, LAYOUT.k)


def test_layout_sizes_add_up():
    vec = ObsEncoder(LAYOUT).encode(_obs(3, 4))
    assert vec.shape == (LAYOUT.size,) and vec.dtype == np.float32
    assert LAYOUT.size == LAYOUT.pairs_at + 6 * 5 * 3
    assert LAYOUT.n_actions == 1 + 6 * 5 + 12
    slots = vec[LAYOUT.slots_at : LAYOUT.candidates_at].reshape(6, SLOT_FEATURES)
    assert slots[:3, 0].tolist() == [1.0, 1.0, 1.0] and not slots[3:].any()  # present flags, zero padding
    cands = vec[LAYOUT.candidates_at : LAYOUT.pairs_at].reshape(5, CANDIDATE_FEATURES)
    assert cands[:4, 0].tolist() == [1.0] * 4 and not cands[4].any()


def test_permuting_candidates_permutes_the_germinate_logits():
    net, obs = _net(), _obs(3, 5, seed=1)
    perm = [3, 0, 4, 1, 2]
    shuffled = Observation(
        obs.global_,
        obs.slots,
        candidates=[obs.candidates[p] for p in perm],
        candidate_features=[obs.candidate_features[p] for p in perm],
        candidate_params=[[row[p] for p in perm] for row in obs.candidate_params],
        task_features=obs.task_features,
    )
    a, b = _logits(net, obs), _logits(net, shuffled)
    np.testing.assert_allclose(_germinate_grid(b), _germinate_grid(a)[:, perm], rtol=1e-5, atol=1e-6)
    # wait, fossilize and cull do not depend on the candidates' order at all
    np.testing.assert_allclose(b[0], a[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b[31:], a[31:], rtol=1e-5, atol=1e-6)


def test_permuting_slots_of_one_kind_permutes_the_slot_logits():
    net, obs = _net(), _obs(4, 3, seed=2)
    enc = ObsEncoder(LAYOUT)
    x = enc.encode(obs)
    slots = x[LAYOUT.slots_at : LAYOUT.candidates_at].reshape(6, SLOT_FEATURES)
    pairs = x[LAYOUT.pairs_at :].reshape(6, 5, 3)
    perm = [2, 0, 3, 1, 4, 5]  # shuffle the four present rows (their features travel with them)
    y = x.copy()
    y[LAYOUT.slots_at : LAYOUT.candidates_at] = slots[perm].reshape(-1)
    y[LAYOUT.pairs_at :] = pairs[perm].reshape(-1)
    with torch.no_grad():
        a = net.logits(torch.from_numpy(x)[None])[0].numpy()
        b = net.logits(torch.from_numpy(y)[None])[0].numpy()
        va, vb = net.value(torch.from_numpy(np.stack([x, y])))
    np.testing.assert_allclose(_germinate_grid(b), _germinate_grid(a)[perm], rtol=1e-5, atol=1e-6)
    fossil = slice(31, 37)
    np.testing.assert_allclose(b[fossil], a[fossil][perm], rtol=1e-5, atol=1e-6)
    assert float(va) == pytest.approx(float(vb), abs=1e-6)


def test_variable_set_sizes_in_one_batch_match_single_rows():
    net = _net()
    obs = [_obs(3, 2, seed=3), _obs(6, 5, seed=4), _obs(2, 5, seed=5)]
    enc = ObsEncoder(LAYOUT)
    batch = torch.from_numpy(np.stack([enc.encode(o) for o in obs]))
    with torch.no_grad():
        together = net.logits(batch).numpy()
    for i, o in enumerate(obs):
        np.testing.assert_allclose(together[i], _logits(net, o), rtol=1e-5, atol=1e-6)


def test_padding_content_does_not_reach_present_logits():
    net, obs = _net(), _obs(3, 2, seed=6)
    x = ObsEncoder(LAYOUT).encode(obs)
    y = x.copy()
    slots = y[LAYOUT.slots_at : LAYOUT.candidates_at].reshape(6, SLOT_FEATURES)
    slots[3:, 1:] = 7.0  # garbage in absent slot rows (present flag stays 0)
    cands = y[LAYOUT.candidates_at : LAYOUT.pairs_at].reshape(5, CANDIDATE_FEATURES)
    cands[2:, 1:] = -3.0
    with torch.no_grad():
        a = net.logits(torch.from_numpy(x)[None])[0]
        b = net.logits(torch.from_numpy(y)[None])[0]
        va, vb = net.value(torch.from_numpy(np.stack([x, y])))
    grid_a, grid_b = _germinate_grid(a.numpy()), _germinate_grid(b.numpy())
    np.testing.assert_allclose(grid_b[:3, :2], grid_a[:3, :2], rtol=1e-5, atol=1e-6)
    assert float(a[0]) == pytest.approx(float(b[0]), abs=1e-6) and float(va) == pytest.approx(float(vb), abs=1e-6)


def test_masked_logits_put_illegal_actions_out_of_reach():
    logits = torch.tensor([[0.5, 3.0, -1.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    dist = torch.distributions.Categorical(logits=masked_logits(logits, mask))
    assert dist.probs[0, 1] == 0.0 and torch.isfinite(dist.entropy()).all()
    expected = torch.distributions.Categorical(logits=torch.tensor([0.5, -1.0])).entropy()
    assert float(dist.entropy()) == pytest.approx(float(expected), abs=1e-6)


def test_action_space_pads_slots_to_max_slots():
    space = ActionSpace(("input", "hidden0"), k=3, max_slots=4)
    assert space.n == 1 + 4 * 3 + 8
    cands = ["a", "b", "c"]
    for action in (
        ControllerAction.germinate("hidden0", "c"),
        ControllerAction.fossilize("hidden0"),
        ControllerAction.cull("input"),
    ):
        assert space.decode(space.encode(action, cands), cands) == action
    assert space.encode(ControllerAction.fossilize("hidden0"), cands) == 1 + 12 + 1
    with pytest.raises(EsperError, match="no slot at position 3"):
        space.decode(1 + 12 + 3, cands)
    with pytest.raises(EsperError, match="max_slots=1"):
        ActionSpace(("input", "hidden0"), k=3, max_slots=1)


def test_export_round_trip_gives_the_same_decisions(tmp_path):
    net = _net(seed=7)
    export_net(net, tmp_path / "p")
    policy = load_policy(tmp_path / "p", sample=False)
    obs = _obs(4, 5, seed=8)
    legal = [ControllerAction.wait(), ControllerAction.germinate("hidden1", "bp2"), ControllerAction.cull("input")]
    space = policy.space(obs)
    mask = torch.from_numpy(space.mask(legal, obs.candidates).astype(np.float32))[None]
    x = torch.from_numpy(ObsEncoder(LAYOUT).encode(obs))[None]
    with torch.no_grad():
        expected = net.policy_logits(x, mask)[0].numpy()
    np.testing.assert_array_equal(policy.logits(obs, legal), expected)
    assert policy.act(obs, legal) == space.decode(int(np.argmax(expected)), obs.candidates)


def test_germinating_at_all_does_not_grow_with_the_number_of_choices():
    """Equal scores: the chance to germinate is that of one action, whether 1 or 12 germinations are legal."""
    net = _net()
    for p in net.parameters():  # every logit 0 except the wait prior: a policy without preferences
        torch.nn.init.zeros_(p)
    x = torch.from_numpy(ObsEncoder(LAYOUT).encode(_obs(3, 4)))[None]
    for n_legal in (1, 12):
        mask = torch.zeros(1, LAYOUT.n_actions)
        mask[0, 0] = 1.0
        mask[0, 1 : 1 + n_legal] = 1.0
        probs = torch.softmax(net.policy_logits(x, mask), -1)[0]
        assert float(probs[1 : 1 + n_legal].sum()) == pytest.approx(0.5, abs=1e-6)
        assert float(probs[0]) == pytest.approx(0.5, abs=1e-6)
    fresh = _net()
    with torch.no_grad():
        probs = torch.softmax(fresh.policy_logits(x, mask), -1)[0]
    assert float(probs[0]) > 0.75  # a fresh network mostly waits (WAIT_PRIOR)


def test_a_host_beyond_the_policy_maxima_is_one_error(tmp_path):
    policy = PolicyController(_net())
    with pytest.raises(EsperError, match=r"7 slots, more than .*max_slots=6"):
        policy.act(_obs(7, 2), [ControllerAction.wait()])
    with pytest.raises(EsperError, match=r"6 candidate blueprints .*\(k=5\)"):
        policy.act(_obs(3, 6), [ControllerAction.wait()])


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"format": "esper-ray-tamiyo-policy/1"}, "expected 'esper-ray-tamiyo-policy/2'"),
        ({"format": "esper-ray-tamiyo-policy/2", "max_slots": "6", "k": 5, "hidden": 16}, "max_slots must be"),
        ({"format": "esper-ray-tamiyo-policy/2", "max_slots": 6, "k": 0, "hidden": 16}, "k must be"),
        ({"format": "esper-ray-tamiyo-policy/2", "max_slots": 6, "k": 5, "hidden": 10**12}, "hidden must be"),
        ({"format": "esper-ray-tamiyo-policy/2", "max_slots": 6, "k": 5, "hidden": 32}, "inconsistent"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_bad_policy_folders_are_one_line(tmp_path, meta, match):
    export_net(_net(), tmp_path)
    (tmp_path / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(EsperError, match=match):
        load_policy(tmp_path)


def test_a_sampling_policy_draws_from_its_distribution_reproducibly():
    obs = _obs(3, 4, seed=9)
    legal = [ControllerAction.wait(), ControllerAction.germinate("hidden0", "bp1"), ControllerAction.cull("input")]
    policy = PolicyController(_net(seed=3), seed=11)
    logits = policy.logits(obs, legal)
    space = policy.space(obs)
    index = [space.encode(a, obs.candidates) for a in legal]
    p = np.exp(logits[index] - logits[index].max())
    p /= p.sum()
    draws = [policy.act(obs, legal) for _ in range(2000)]
    freq = np.array([sum(d == a for d in draws) for a in legal]) / len(draws)
    np.testing.assert_allclose(freq, p, atol=0.04)  # 2000 draws: ~4 standard errors
    one, two = policy.episode(5), policy.episode(5)
    assert [one.act(obs, legal) for _ in range(20)] == [two.act(obs, legal) for _ in range(20)]
    state = one.state_dict()
    ahead = [one.act(obs, legal) for _ in range(10)]
    two.load_state_dict(state)
    assert [two.act(obs, legal) for _ in range(10)] == ahead  # the generator resumes exactly
