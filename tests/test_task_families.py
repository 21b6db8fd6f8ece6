"""Tests of the task families with generator settings, TaskConfig.host, and the task distribution sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from esper_ray.config import validate_model
from esper_ray.contracts import EsperError
from esper_ray.hosts import HostConfig, build_host
from esper_ray.tasks import (
    FAMILY_PARAMS,
    FEATURE_NAMES,
    TASK_FAMILIES,
    ParamRange,
    TaskConfig,
    TaskData,
    TaskDistribution,
    load_distribution,
    load_task,
    mnist1d_task,
    sample_tasks,
    training_overrides,
)
from esper_ray.tasks.scaleshift_task import standardise

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "task_families.yaml"
SMALL = {"n_samples": 600}


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep generated MNIST-1D files out of the user's ~/.cache while these tests run."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ESPER_RAY_CACHE", str(tmp_path_factory.mktemp("esper-cache")))
    yield
    mp.undo()


def _splits(d: TaskData) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)]


def _bytes(d: TaskData) -> bytes:
    return b"".join(t.numpy().tobytes() for pair in _splits(d) for t in pair)


NEW = [
    ("scaleshift", {**SMALL, "input_dim": 12, "num_classes": 5}),
    ("interaction", {**SMALL, "input_dim": 16, "rank": 8}),
    ("saturated", {**SMALL, "input_dim": 8, "num_classes": 3}),
    ("digits", {"max_shift": 2, "noise": 0.1}),
    ("mnist1d", {"num_samples": 500, "final_seq_length": 24, "shuffle_seq": True}),
]


@pytest.mark.parametrize(("family", "params"), NEW)
def test_family_shapes_labels_and_reproducibility(family: str, params: dict) -> None:
    cfg = TaskConfig(family=family, seed=3, params=params)
    d = load_task(cfg)
    k = params.get("num_classes", 10)
    shape = {
        "digits": (1, 8, 8),
        "mnist1d": (params.get("final_seq_length", 40),),
    }.get(family, (params.get("input_dim"),))
    assert d.input_shape == shape and d.num_classes == k
    n = params.get("n_samples", params.get("num_samples"))
    if n is not None:  # 20 % test, 20 % of the rest val
        assert d.x_test.shape[0] == round(0.2 * n)
        assert d.x_train.shape[0] + d.x_val.shape[0] + d.x_test.shape[0] == n
    for x, y in _splits(d):
        assert x.shape[1:] == shape and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.isfinite(x).all()
        assert int(y.min()) >= 0 and int(y.max()) < k
    assert len(torch.unique(d.y_train)) == k  # every class is present
    assert d.meta["family"] == family and {key: d.meta["params"][key] for key in params} == params
    json.dumps(d.meta)
    again = load_task(TaskConfig(family=family, seed=3, params=params))
    assert _bytes(again) == _bytes(d) and again.name == d.name
    other = load_task(TaskConfig(family=family, seed=4, params=params))
    assert _bytes(other) != _bytes(d)


def test_synthetic_classes_are_balanced() -> None:
    for family, params in (
        ("scaleshift", {}),
        ("interaction", {"rank": 8}),
        ("saturated", {}),
    ):
        for seed in range(2):
            shares = load_task(TaskConfig(family=family, seed=seed, params=params)).meta["class_shares"]
            assert max(shares) < 0.2 and min(shares) > 0.03, (family, seed, shares)


def test_scaleshift_nuisance_changes_inputs_not_labels() -> None:
    plain = load_task(TaskConfig(family="scaleshift", seed=7, params={"gain_decades": 0.0, "shift": 0.0}))
    hard = load_task(TaskConfig(family="scaleshift", seed=7, params={"gain_decades": 4.0, "shift": 5.0}))
    # Same labels, and what a LayerNorm sees is the same pattern: gains and offsets are pure nuisance.
    assert torch.equal(plain.y_train, hard.y_train) and torch.equal(plain.y_test, hard.y_test)
    assert torch.allclose(standardise(plain.x_train.double()), standardise(hard.x_train.double()), atol=1e-3)
    # ...while the raw inputs' sizes span orders of magnitude.
    norms = hard.x_train.norm(dim=1)
    assert float(norms.max() / norms.min()) > 1e3
    rows = plain.x_train.norm(dim=1)
    assert float(rows.max() / rows.min()) < 10


def _ridge_accuracy(features, x_fit, y_fit, x_test, y_test) -> float:
    """Test accuracy of a ridge regression onto one-hot labels (solved exactly: deterministic)."""
    a, t = features(x_fit), torch.eye(10, dtype=torch.float64)[y_fit]
    w = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ t)
    return float(((features(x_test) @ w).argmax(1) == y_test).double().mean())


def test_interaction_labels_are_even_in_the_input() -> None:
    # Pure products: x and -x get the same scores, so a linear model cannot separate the classes...
    d = load_task(TaskConfig(family="interaction", seed=1, params={"rank": 8, "n_samples": 6000, "input_dim": 8}))
    x, y = torch.cat([d.x_train, d.x_val]).double(), torch.cat([d.y_train, d.y_val])
    iu = torch.triu_indices(8, 8)

    def linear(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, torch.ones(len(t), 1, dtype=t.dtype)], 1)

    def quadratic(t: torch.Tensor) -> torch.Tensor:
        return linear(torch.einsum("ni,nj->nij", t, t)[:, iu[0], iu[1]])

    linear_acc = _ridge_accuracy(linear, x, y, d.x_test.double(), d.y_test)
    quad_acc = _ridge_accuracy(quadratic, x, y, d.x_test.double(), d.y_test)
    assert linear_acc < 0.25
    # ...while the same regression on the pairwise products does far better.
    assert quad_acc > linear_acc + 0.15


def test_saturated_is_solved_by_nearest_centroid() -> None:
    d = load_task(TaskConfig(family="saturated", seed=2))
    centres = torch.stack([d.x_train[d.y_train == c].mean(0) for c in range(d.num_classes)])
    pred = torch.cdist(d.x_test, centres).argmin(1)
    assert float((pred == d.y_test).double().mean()) > 0.98


def test_digits_default_settings_are_the_plain_images() -> None:
    plain = load_task(TaskConfig(family="digits", seed=5))
    explicit = load_task(TaskConfig(family="digits", seed=5, params={"max_shift": 0, "noise": 0.0}))
    assert _bytes(plain) == _bytes(explicit) and plain.name == explicit.name == "digits/s5"
    shifted = load_task(TaskConfig(family="digits", seed=5, params={"max_shift": 1}))
    assert torch.equal(shifted.y_train, plain.y_train)  # same split, moved pixels
    moved = (shifted.x_train != plain.x_train).flatten(1).any(1).double().mean()
    assert float(moved) > 0.5  # 8 of 9 offsets move an image
    assert float(shifted.x_train.min()) >= 0.0 and float(shifted.x_train.max()) <= 1.0
    # a one-pixel move loses at most the outer ring: most of each image's ink stays
    assert float(shifted.x_train.sum() / plain.x_train.sum()) > 0.9


def test_mnist1d_settings_get_their_own_cache_file() -> None:
    default = mnist1d_task.Mnist1dParams()
    shuffled = mnist1d_task.Mnist1dParams(shuffle_seq=True)
    assert mnist1d_task.cache_path(0) == mnist1d_task.cache_path(0, default)  # old files stay valid
    assert mnist1d_task.cache_path(0, shuffled) != mnist1d_task.cache_path(0)
    params = {"num_samples": 500}
    a = load_task(TaskConfig(family="mnist1d", seed=2, params=params))
    b = load_task(TaskConfig(family="mnist1d", seed=2, params={**params, "shuffle_seq": True}))
    assert a.input_shape == b.input_shape == (40,) and a.x_train.shape[0] == 320
    # one fixed permutation of the positions: the same values per signal, in another order
    assert not torch.equal(a.x_train, b.x_train)
    assert torch.allclose(a.x_train.sort(1).values, b.x_train.sort(1).values, atol=1e-5)


# ------------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("family", "params", "needle"),
    [
        ("scaleshift", {"gain": 3}, "params.gain: unknown setting of family 'scaleshift'"),
        ("scaleshift", {"gain_decades": 9.0}, "params.gain_decades"),
        ("interaction", {"rank": 0}, "params.rank"),
        ("saturated", {"separation": -1.0}, "params.separation"),
        ("mnist1d", {"max_translation": 100}, "params.max_translation"),
        ("mnist1d", {"templates": 3}, "known: num_samples"),
        ("digits", {"max_shift": 5}, "params.max_shift"),
        ("bottleneck", {"input_dim": 8}, "known: none"),  # bottleneck settings are top-level fields
    ],
)
def test_bad_family_setting_is_one_line(family: str, params: dict, needle: str) -> None:
    with pytest.raises(EsperError) as err:
        validate_model(TaskConfig, {"family": family, "params": params}, "task")
    msg = str(err.value)
    assert "\n" not in msg and needle in msg


def test_every_family_checks_its_settings() -> None:
    assert set(FAMILY_PARAMS) <= set(TASK_FAMILIES)
    for family in TASK_FAMILIES:
        with pytest.raises(pydantic.ValidationError):
            TaskConfig(family=family, params={"no_such_setting": 1})


# ------------------------------------------------------------------------------------ host


def test_host_field_defaults_to_the_runs_host_and_accepts_a_fitting_one() -> None:
    assert TaskConfig().host is None
    cfg = TaskConfig(family="mnist1d", host={"kind": "cnn1d", "hidden": [16, 16, 16]})
    assert isinstance(cfg.host, HostConfig) and cfg.host.hidden == [16, 16, 16]
    assert TaskConfig.model_validate(cfg.model_dump()) == cfg  # round-trips through a dump
    TaskConfig(family="digits", host={"kind": "cnn2d", "hidden": [8]})
    TaskConfig(family="bottleneck", hidden=[32, 48, 32], host={"kind": "mlp", "hidden": [32, 48, 32]})


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ({"family": "scaleshift", "host": {"kind": "cnn2d"}}, "needs image inputs"),
        ({"family": "digits", "host": {"kind": "cnn1d"}}, "cannot take the images"),
        ({"family": "bottleneck", "hidden": [64, 64], "host": {"hidden": [64, 64, 64]}}, "teacher's MLP"),
        ({"family": "bottleneck", "host": {"kind": "cnn1d"}}, "teacher's MLP"),
        ({"family": "mnist1d", "host": {"kind": "rnn"}}, "host.kind"),
        ({"family": "mnist1d", "host": {"hidden": [64], "depth": 3}}, "host.depth"),
    ],
)
def test_bad_host_is_one_line(cfg: dict, needle: str) -> None:
    with pytest.raises(EsperError) as err:
        validate_model(TaskConfig, cfg, "task")
    assert "\n" not in str(err.value) and needle in str(err.value)


def test_sampled_hosts_build_for_their_tasks() -> None:
    tasks = sample_tasks(load_distribution(CONFIG, key="heldout"))
    seen = set()
    for task in tasks:
        if task.family in seen:
            continue
        seen.add(task.family)
        d = load_task(task)
        assert task.host is not None
        host = build_host(task.host, d.input_shape, d.num_classes)
        assert host(d.x_val[:4]).shape == (4, d.num_classes)


# --------------------------------------------------------------------------------- features


def test_features_carry_no_family_identity() -> None:
    assert not any("family" in n for n in FEATURE_NAMES)
    common = {"n_samples": 800, "input_dim": 16, "num_classes": 4}
    feats = {
        family: load_task(TaskConfig(family=family, params=common)).features()
        for family in ("scaleshift", "interaction", "saturated")
    }
    # Same sizes give the same features up to the label shares: nothing names the family.
    first = feats["scaleshift"]
    for f in feats.values():
        assert len(f) == len(FEATURE_NAMES)
        assert f[:4] == first[:4]
        assert abs(f[4] - first[4]) < 0.1


# ----------------------------------------------------------------------------- distribution


def _dist(seed: int = 0) -> TaskDistribution:
    return TaskDistribution.model_validate(
        {
            "seed": seed,
            "families": [
                {
                    "family": "scaleshift",
                    "count": 3,
                    "seed": 1,
                    "fixed": {"n_samples": 300},
                    "ranges": {"gain_decades": {"low": 1.0, "high": 4.0}, "input_dim": {"choices": [8, 12]}},
                    "host": {"kinds": ["mlp"], "depth": [2, 5], "widths": [16, 32]},
                },
                {
                    "family": "bottleneck",
                    "count": 3,
                    "seed": 2,
                    "fixed": {"n_samples": 200, "wide": 32, "input_dim": 8},
                    "host": {"depth": [2, 4], "widths": [8, 16]},
                },
                {"family": "saturated", "count": 2, "ranges": {"num_classes": {"low": 2, "high": 6, "integer": True}}},
            ],
        }
    )


def test_sample_tasks_is_reproducible_and_seeded() -> None:
    a, b = sample_tasks(_dist()), sample_tasks(_dist())
    assert a == b and len(a) == 8
    assert [t.family for t in a] == ["scaleshift"] * 3 + ["bottleneck"] * 3 + ["saturated"] * 2
    for ta, tb in zip(a, b, strict=True):
        assert _bytes(load_task(ta)) == _bytes(load_task(tb))
    c = sample_tasks(_dist(seed=1))
    assert all(x != y for x, y in zip(a, c, strict=True))
    assert _bytes(load_task(a[0])) != _bytes(load_task(c[0]))
    assert len({t.seed for t in a}) == len(a)  # every task its own data
    # a mapping is validated the same way
    assert sample_tasks(_dist().model_dump()) == a


def test_sampled_settings_and_hosts_stay_in_their_ranges() -> None:
    tasks = sample_tasks(_dist().model_copy(update={"seed": 5}))
    for t in tasks:
        if t.family == "scaleshift":
            assert 1.0 <= t.params["gain_decades"] <= 4.0 and t.params["input_dim"] in (8, 12)
            assert t.params["n_samples"] == 300
            assert t.host is not None and 2 <= len(t.host.hidden) <= 5 and set(t.host.hidden) <= {16, 32}
        elif t.family == "bottleneck":
            assert t.host is not None and t.host.kind == "mlp" and t.host.hidden == t.hidden
            assert 0 <= t.bottleneck_slot <= len(t.hidden) and 2 <= len(t.hidden) <= 4
            assert t.params == {} and t.wide == 32
            assert training_overrides(t) == {"host_init": "task", "freeze_host": True}
            # the task's host weights fit the host it names
            d = load_task(t)
            host = build_host(t.host, d.input_shape, d.num_classes)
            host.load_host_state_dict(d.host_init)
        else:
            assert t.host is None  # no host choice: played with the run's host
            assert isinstance(t.params["num_classes"], int) and 2 <= t.params["num_classes"] <= 6
            assert training_overrides(t) == {}


def test_bottleneck_slots_cover_every_depth() -> None:
    spec = {"family": "bottleneck", "count": 200, "host": {"depth": [2, 5], "widths": [8]}}
    tasks = sample_tasks({"families": [spec]})
    assert {len(t.hidden) for t in tasks} == {2, 3, 4, 5}
    assert {t.bottleneck_slot for t in tasks if len(t.hidden) == 5} == set(range(6))


def test_param_range_draws() -> None:
    rng = np.random.default_rng(0)
    draws = [ParamRange(low=2, high=5, integer=True).sample(rng) for _ in range(200)]
    assert set(draws) == {2, 3, 4, 5} and all(type(v) is int for v in draws)
    logs = [ParamRange(low=1e-3, high=1.0, log=True).sample(rng) for _ in range(400)]
    assert min(logs) >= 1e-3 and max(logs) <= 1.0
    assert sum(v < 0.0316 for v in logs) / len(logs) == pytest.approx(0.5, abs=0.1)  # half below the log-midpoint
    assert {ParamRange(choices=[True, False]).sample(rng) for _ in range(50)} == {True, False}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"families": []}, "at least one family"),
        ({}, "families: Field required"),
        ({"families": [{"family": "scaleshift", "count": 2, "fixed": {"colour": 1}}]}, "unknown setting 'colour'"),
        ({"families": [{"family": "saturated", "count": 2, "ranges": {"wide": {"low": 1, "high": 2}}}]}, "'wide'"),
        ({"families": [{"family": "imagenet", "count": 2}]}, "families.0.family"),
        ({"families": [{"family": "saturated", "count": 0}]}, "count"),
        ({"families": [{"family": "saturated", "count": 1, "ranges": {"separation": {"low": 3}}}]}, "both low"),
        ({"families": [{"family": "saturated", "count": 1, "ranges": {"separation": {"low": 3, "high": 1}}}]}, "above"),
        (
            {
                "families": [
                    {
                        "family": "saturated",
                        "count": 1,
                        "fixed": {"separation": 3},
                        "ranges": {"separation": {"low": 2, "high": 4}},
                    }
                ]
            },
            "both fixed and ranged",
        ),
        ({"families": [{"family": "scaleshift", "count": 1, "host": {"kinds": ["cnn2d"]}}]}, "cannot play"),
        ({"families": [{"family": "digits", "count": 1, "host": {"kinds": ["cnn1d"]}}]}, "cannot play"),
        ({"families": [{"family": "bottleneck", "count": 1, "host": {"kinds": ["mlp", "cnn1d"]}}]}, "MLP hosts"),
        ({"families": [{"family": "saturated", "count": 1, "host": {"depth": [3, 2]}}]}, "depth"),
    ],
)
def test_bad_distribution_is_one_line(data: dict, needle: str) -> None:
    with pytest.raises(EsperError) as err:
        load_distribution(data)
    assert "\n" not in str(err.value) and needle in str(err.value), str(err.value)


def test_a_drawn_value_out_of_range_is_one_line() -> None:
    spec = {"family": "saturated", "count": 3, "ranges": {"separation": {"low": 50, "high": 500}}}
    with pytest.raises(EsperError, match=r"families\[0\] \(saturated\): a drawn task is invalid: params.sep") as err:
        sample_tasks({"families": [spec]})
    assert "\n" not in str(err.value)


def test_load_distribution_from_a_file(tmp_path: Path) -> None:
    with pytest.raises(EsperError, match="no entry 'test'"):
        load_distribution(CONFIG, key="test")
    with pytest.raises(EsperError, match="config file not found"):
        load_distribution(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  families:\n    - {family: saturated, count: 1, fixed: {bogus: 1}}\n")
    with pytest.raises(EsperError) as err:
        load_distribution(bad, key="train")
    assert str(bad) in str(err.value) and "bogus" in str(err.value) and "\n" not in str(err.value)


def test_committed_distributions_hold_out_families_and_depths() -> None:
    train = sample_tasks(load_distribution(CONFIG, key="train"))
    heldout = sample_tasks(load_distribution(CONFIG, key="heldout"))
    train_families = {t.family for t in train}
    assert len({t.family for t in heldout} - train_families) >= 2  # whole families never trained on
    depths = {len(t.host.hidden) for t in train if t.host is not None}
    assert depths == {2, 3, 4}
    assert 5 in {len(t.host.hidden) for t in heldout if t.host is not None}
    for t in heldout:
        if t.family in train_families:
            assert t.host is not None and len(t.host.hidden) not in depths  # only unseen depths
    assert not {(t.family, t.seed) for t in train} & {(t.family, t.seed) for t in heldout}
    kinds = {t.host.kind for t in train if t.host is not None}
    assert kinds == {"mlp", "cnn1d"}
    assert all(math.isfinite(v) for v in load_task(train[0]).features())


@pytest.mark.parametrize("slot", [0, 2, 5])
def test_bottleneck_at_any_depth_and_width(slot: int) -> None:
    hidden = [32, 96, 48, 64, 32]
    d = load_task(
        TaskConfig(family="bottleneck", seed=slot, hidden=hidden, bottleneck_slot=slot, n_samples=600, input_dim=24)
    )
    assert d.meta["ground_truth_slot"] == ["input", "hidden0", "hidden1", "hidden2", "hidden3", "hidden4"][slot]
    assert d.meta["label_change_if_removed"] > 0.5  # the missing map decides most labels
    assert d.meta["host_init_test_accuracy"] < 0.3  # so the damaged host is far from solving it
    assert max(d.meta["class_shares"]) < 0.25
    host = build_host(HostConfig(hidden=hidden), d.input_shape, d.num_classes)
    host.load_host_state_dict(d.host_init)  # the damaged teacher is a host of exactly these widths
