"""Tests of Karn: the generator, the reward model on a synthetic world, and the Ray actor."""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from esper_ray.blueprints import STANDARD_BLUEPRINTS, BlueprintSpec, check_contract, count_params
from esper_ray.config import ActorsConfig
from esper_ray.contracts import EsperError, FieldReport
from esper_ray.karn import (
    REFERENCE_SHAPES,
    BlueprintGenerator,
    KarnBreeder,
    RewardModel,
    SlotContext,
    fits_slot,
    reward_target,
)
from esper_ray.karn.genome import from_spec

PARENTS = list(STANDARD_BLUEPRINTS.values())
NAME = re.compile(r"^karn-(vector|seq|image)-[0-9a-f]{12}$")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Contract checks are tiny; on 2 shared cores extra torch threads only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the generator ------------------------------------------------------------------------------


def test_proposals_validate_build_within_budget_and_pass_the_contract() -> None:
    specs, shares, contract_fail = [], [], []
    for seed in range(4):
        gen = BlueprintGenerator(seed, budget=20_000)
        proposals = gen.propose(PARENTS, 60)
        assert len(proposals) >= 55
        shares.append(gen.stats.valid_share)
        assert gen.stats.attempts == gen.stats.valid + gen.stats.invalid
        specs += [p.spec for p in proposals]
    for spec in specs:
        again = BlueprintSpec.from_json(spec.to_json())  # round-trips through pydantic validation
        assert again.content_hash == spec.content_hash
        assert spec.origin == "karn" and NAME.match(spec.name) and spec.short_hash in spec.name
        for shape in REFERENCE_SHAPES[spec.kind]:
            assert count_params(spec, shape) <= 20_000
            result = check_contract(spec, shape, max_params=20_000)
            if not result.ok:
                contract_fail.append(result.reason)
    assert len(specs) >= 220
    assert min(shares) > 0.8, shares
    # Building and the budget are guaranteed; a contract failure can only be data-dependent
    # (e.g. every ReLU dead on the probe batch), and rare.
    assert len(contract_fail) / len(specs) < 0.03, contract_fail
    assert all("gradient" in reason for reason in contract_fail), contract_fail


def test_vector_specs_have_no_spatial_ops_and_a_small_budget_is_kept() -> None:
    gen = BlueprintGenerator(3, budget=1_500)
    proposals = gen.propose(PARENTS, 80)
    assert len(proposals) >= 60
    assert {p.spec.kind for p in proposals} == {"vector", "seq", "image"}
    for p in proposals:
        if p.spec.kind == "vector":
            assert not {"conv", "pool"} & {n.op for n in p.spec.nodes}
        assert max(count_params(p.spec, s) for s in REFERENCE_SHAPES[p.spec.kind]) <= 1_500
    assert gen.stats.reasons["over_budget"] > 0  # the budget really bit


def test_mutations_differ_from_their_parent_and_record_it() -> None:
    gen = BlueprintGenerator(11)
    operators = Counter()
    for parent in PARENTS:
        for _ in range(12):
            child = gen.mutate(parent)
            assert child is not None
            operators[child.operator] += 1
            assert child.spec.kind == parent.kind
            assert child.spec.parents == (parent.content_hash,)
            assert child.spec.content_hash != parent.content_hash
            # Different in structure, not just in node names (canonical forms differ).
            assert from_spec(child.spec) != from_spec(parent)
    assert {f"mutate:{op}" for op in ("tweak", "insert", "delete", "residual", "gate", "swap")} <= set(operators)


def test_crossover_keeps_the_kind_and_records_both_parents() -> None:
    gen = BlueprintGenerator(5)
    by_kind: dict[str, list[BlueprintSpec]] = {}
    for spec in PARENTS:
        by_kind.setdefault(spec.kind, []).append(spec)
    made = 0
    for kind, specs in by_kind.items():
        for a in specs:
            for b in specs:
                if a is b:
                    continue
                child = gen.crossover(a, b)
                if child is None:
                    continue
                made += 1
                assert child.spec.kind == kind
                assert child.spec.parents == (a.content_hash, b.content_hash)
                assert child.spec.content_hash not in (a.content_hash, b.content_hash)
    assert made >= 12
    with pytest.raises(EsperError, match="one kind"):
        gen.crossover(STANDARD_BLUEPRINTS["lowrank"], STANDARD_BLUEPRINTS["conv2d"])


def test_generation_is_deterministic_per_seed() -> None:
    def run(seed: int) -> list[str]:
        return [p.spec.to_json() for p in BlueprintGenerator(seed).propose(PARENTS, 30)]

    assert run(7) == run(7)
    assert run(7) != run(8)


# ---- the reward model on a synthetic world ------------------------------------------------------

# Slots of the synthetic hosts: kind -> (channels, accuracy before the seed).
SLOTS = {"vector": (64, 0.6), "seq": (16, 0.7), "image": (16, 0.5)}


def hidden_reward(spec: BlueprintSpec, slot: str, params: int) -> float:
    """The synthetic world's true improvement per parameter of ``spec`` in a ``slot`` slot.

    Conv seeds help in spatial slots, and seq conv seeds in vector slots (the MNIST-1D
    story); wider vector seeds help in vector slots up to ~5k params, then hurt; a gate
    helps in spatial slots; deep seeds cost; norm/act-only seeds do nothing.
    """
    ops = Counter(n.op for n in spec.nodes)
    if ops["linear"] + ops["conv"] == 0:
        return 0.0
    lp = math.log10(1 + params)
    score = 0.2
    if ops["conv"] and slot in ("seq", "image"):
        score += 1.0
    if ops["conv"] and spec.kind == "seq" and slot == "vector":
        score += 1.2
    if spec.kind == "vector" and slot == "vector":
        score += 0.8 * min(lp - 2.0, 1.7) - 2.0 * max(0.0, lp - 3.7)
    if ops["mul"] and slot != "vector":
        score += 0.3
    return score - 0.15 * max(0, len(spec.nodes) - 6)


def true_reward(spec: BlueprintSpec, params: int) -> float:
    """The hidden reward averaged over the slots ``spec`` fits (what Karn should rank by)."""
    return float(np.mean([hidden_reward(spec, k, params) for k in SLOTS if fits_slot(spec.kind, k)]))


def field_reports(specs_params, rng: np.random.Generator, noise: float = 0.3) -> list[FieldReport]:
    """One noisy field report per spec, in a random slot it fits."""
    reports = []
    for spec, params in specs_params:
        kinds = [k for k in SLOTS if fits_slot(spec.kind, k)]
        kind = kinds[int(rng.integers(len(kinds)))]
        width, before = SLOTS[kind]
        reward = hidden_reward(spec, kind, params) + noise * rng.standard_normal()
        after = before + reward * math.log1p(params) / 100  # so that reward_target == reward / 100
        reports.append(
            FieldReport(
                run_id="run",
                blueprint_hash=spec.content_hash,
                blueprint_name=spec.name,
                slot="s0",
                slot_kind=kind,
                slot_width=width,
                task="synthetic",
                stage_reached="holding",
                outcome="fossilized",
                accuracy_before=before,
                accuracy_after=after,
                seed_params=params,
                epochs_alive=5,
            )
        )
    return reports


def test_reward_model_chooses_better_than_random_on_a_synthetic_world() -> None:
    margins = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        train = [(p.spec, p.params) for p in BlueprintGenerator(seed).propose(PARENTS, 200)]
        model = RewardModel(seed=seed)
        summary = model.fit(field_reports(train, rng), {s.content_hash: s for s, _ in train})
        assert summary.rows == 200 and summary.loo_rmse < 0.85
        assert {c.kind for c in model.contexts} == set(SLOTS)

        # Held out: candidates from another generator, never seen in training.
        seen = {s.content_hash for s, _ in train}
        pool_props = BlueprintGenerator(seed + 100).propose(PARENTS, 120, exclude=seen)
        pool = [p.spec for p in pool_props]
        params = {p.spec.content_hash: p.params for p in pool_props}

        true = np.array([true_reward(s, params[s.content_hash]) for s in pool])
        chosen = np.mean([true_reward(s, params[s.content_hash]) for s in model.choose(pool, 12)])
        random_pick = np.mean(true[rng.permutation(len(pool))[:12]])
        best = np.mean(np.sort(true)[-12:])
        predicted, std = model.predict(pool)
        rho = spearmanr(predicted, true).statistic
        held = field_reports([(s, params[s.content_hash]) for s in pool], rng)
        pair_pred, _ = model.predict_pairs(pool, [SlotContext.of(r) for r in held])
        rho_reports = spearmanr(pair_pred, [reward_target(r) for r in held]).statistic
        print(
            f"seed {seed}: chosen {chosen:.3f} random {random_pick:.3f} pool mean {true.mean():.3f} "
            f"(sd {true.std():.3f}) best-12 {best:.3f}; spearman vs truth {rho:.3f}, "
            f"vs held-out reports {rho_reports:.3f}; ridge {summary.ridge}, loo {summary.loo_rmse:.3f}"
        )
        assert np.all(std > 0)
        assert chosen > true.mean() + 0.3 * true.std()  # beats the expectation of a random pick
        assert rho > 0.5 and rho_reports > 0.4
        margins.append((chosen - true.mean()) / true.std())
    assert np.mean(margins) > 0.6, margins


def test_untrained_reward_model_chooses_at_random_and_fits_nothing_below_min_rows() -> None:
    model = RewardModel(seed=0, min_rows=8)
    pool = [p.spec for p in BlueprintGenerator(0).propose(PARENTS, 20)]
    picks = model.choose(pool, 5)
    assert len({s.content_hash for s in picks}) == 5 and not model.trained
    few = field_reports([(s, 100) for s in pool[:5]], np.random.default_rng(0))
    assert model.fit(few, {s.content_hash: s for s in pool}).rows == 5 and not model.trained
    unknown = model.fit(field_reports([(s, 100) for s in pool], np.random.default_rng(0)), {})
    assert unknown.skipped == 20 and unknown.rows == 0


def test_reward_target_is_improvement_per_log_parameter() -> None:
    report = FieldReport("r", "h", "n", "s", "vector", 64, "t", "holding", "fossilized", 0.5, 0.6, 99, 3)
    assert reward_target(report) == pytest.approx(0.1 / math.log(100))


def test_breeder_learns_from_dict_reports_and_sends_contract_clean_new_specs() -> None:
    breeder = KarnBreeder(seed=1, pool_factor=6)
    sent: list[BlueprintSpec] = []
    for _ in range(4):
        sent += breeder.round(4)
    assert len(sent) == 16 and len({s.content_hash for s in sent}) == 16  # never resent
    rng = np.random.default_rng(0)
    sized = [(s, count_params(s, REFERENCE_SHAPES[s.kind][0])) for s in sent]
    rows = [vars(r) for r in field_reports(sized, rng)]
    assert breeder.ingest(rows) == 16 and breeder.ingest(rows) == 0  # repeats are dropped
    assert breeder.ingest([{"run_id": "broken"}]) == 0 and breeder.bad_reports == 1
    summary = breeder.retrain_if_needed()
    assert summary is not None and summary.rows == 16 and breeder.model.trained
    assert breeder.retrain_if_needed() is None  # nothing new
    for spec in breeder.round(4):
        assert all(check_contract(spec, s).ok for s in REFERENCE_SHAPES[spec.kind])
    parsed = breeder.add_specs([STANDARD_BLUEPRINTS["conv1d"].to_json(), "{not json"])
    assert len(parsed) == 1 and breeder.bad_specs == 1


# ---- the Ray actor ------------------------------------------------------------------------------


@pytest.fixture
def ray_ready(request: pytest.FixtureRequest) -> Iterator[None]:
    """The shared session Ray (tests/conftest.py) when there is one, else a local one.

    Function-scoped so that it may request ``ray_session`` whatever that fixture's scope.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    try:
        request.getfixturevalue("ray_session")
    except pytest.FixtureLookupError:
        if not ray.is_initialized():
            ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield


@pytest.mark.ray
def test_karn_actor_submits_at_its_rate_and_survives_a_failing_urza(ray_ready: None) -> None:
    import ray

    from actors.karn import Karn

    @ray.remote(num_cpus=0.05)
    class FakeUrza:
        def __init__(self) -> None:
            self.failing = False
            self.reports: list[dict] = []

        def set_failing(self, failing: bool) -> None:
            self.failing = failing

        def set_reports(self, reports: list[dict]) -> None:
            self.reports = reports

        def top_specs(self, k: int) -> list[str]:
            if self.failing:
                raise RuntimeError("urza is down")
            return [s.to_json() for s in PARENTS][:k]

        def field_reports(self) -> list[dict]:
            if self.failing:
                raise RuntimeError("urza is down")
            return self.reports

        def demand_age_s(self) -> float:  # a trainer asked just now: Karn keeps proposing
            if self.failing:
                raise RuntimeError("urza is down")
            return 0.0

    @ray.remote(num_cpus=0.05)
    class FakeTezzeret:
        def __init__(self) -> None:
            self.received: list[tuple[float, str]] = []

        def submit(self, spec_json: str) -> str:
            self.received.append((time.monotonic(), spec_json))
            return BlueprintSpec.from_json(spec_json).content_hash

        def all(self) -> list[tuple[float, str]]:
            return self.received

        def queue_len(self) -> int:  # keeps up: no backpressure here (tests/test_backpressure.py has it)
            return 0

    cfg = ActorsConfig(karn_interval_s=0.25, karn_batch=3, namespace="karn-test")
    urza, tez = FakeUrza.remote(), FakeTezzeret.remote()
    karn = Karn.options(num_cpus=cfg.karn.num_cpus, num_gpus=cfg.karn.num_gpus, max_restarts=cfg.max_restarts).remote(
        cfg, urza, tez, 0
    )
    try:
        assert ray.get(karn.start.remote(), timeout=60)
        assert ray.get(karn.gpu_ids.remote()) == []
        time.sleep(2.5)
        got = ray.get(tez.all.remote())
        stats = ray.get(karn.stats.remote())
        # ~10 rounds of 3 in 2.5 s; a loose lower bound, since the 2 shared cores may be busy.
        assert 9 <= len(got) <= 3 * (2.5 / 0.25 + 2), len(got)
        assert stats["submitted"] >= len(got) and stats["errors"] == 0 and stats["running"]
        specs = [BlueprintSpec.from_json(j) for _, j in got]
        assert all(s.origin == "karn" for s in specs)
        assert len({s.content_hash for s in specs}) == len(specs)
        assert stats["proposals"] >= stats["submitted"] and stats["valid_share"] > 0.8

        # Urza fails: errors are recorded and the loop goes on breeding from its last parents.
        ray.get(urza.set_failing.remote(True))
        n_before = len(ray.get(tez.all.remote()))
        time.sleep(1.0)
        stats = ray.get(karn.stats.remote())
        assert stats["running"] and stats["errors"] >= 2
        assert "urza is down" in stats["last_error"]
        assert len(ray.get(tez.all.remote())) > n_before

        # Urza back with field reports: the model trains on them.
        ray.get(urza.set_failing.remote(False))
        rows = [vars(r) for r in field_reports([(s, 1000) for s in specs[:12]], np.random.default_rng(0))]
        assert ray.get(karn.ingest_field_reports.remote(rows[:2])) == 2  # the direct feed
        ray.get(urza.set_reports.remote(rows))  # and through Urza, overlapping: no double count
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ray.get(karn.stats.remote())["model_trained_on"] < 12:
            time.sleep(0.2)
        assert ray.get(karn.stats.remote())["model_trained_on"] == 12

        # A crash: Ray rebuilds Karn (max_restarts), and it resumes its loop unasked.
        ray.kill(karn, no_restart=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                stats = ray.get(karn.stats.remote(), timeout=5)
                if stats["reconstructed"] and stats["rounds"] >= 1:
                    break
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.ActorUnavailableError,
                ray.exceptions.GetTimeoutError,
            ):
                pass  # still restarting
            time.sleep(0.2)
        assert stats["reconstructed"] and stats["running"]
        n_restarted = len(ray.get(tez.all.remote()))
        time.sleep(0.8)
        assert len(ray.get(tez.all.remote())) > n_restarted
        assert ray.get(karn.stop.remote(), timeout=30)
        n_stopped = len(ray.get(tez.all.remote()))
        time.sleep(0.6)
        assert len(ray.get(tez.all.remote())) == n_stopped  # no more rounds after stop()
        assert not ray.get(karn.stats.remote())["running"]
    finally:
        for actor in (karn, urza, tez):
            ray.kill(actor)
