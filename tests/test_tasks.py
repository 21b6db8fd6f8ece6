"""Tests of esper_ray.tasks: shapes, determinism, splits, caching, ground truth, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import random
import time
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from esper_ray.contracts import EsperError
from esper_ray.tasks import (
    FEATURE_NAMES,
    TASK_FAMILIES,
    TaskConfig,
    TaskData,
    load_task,
    mnist1d_task,
)
from esper_ray.tasks.bottleneck_task import build_teacher, label_change_if_removed

EXPECTED = {
    # family: (input_shape, n_train, n_val, n_test) with default settings
    "mnist1d": ((40,), 3200, 800, 1000),
    "digits": ((1, 8, 8), 1150, 288, 359),
    "bottleneck": ((32,), 3840, 960, 1200),
}


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep generated files out of the user's ~/.cache while these tests run."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ESPER_RAY_CACHE", str(tmp_path_factory.mktemp("esper-cache")))
    yield
    mp.undo()


def _splits(d: TaskData) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    return [
        ("train", d.x_train, d.y_train),
        ("val", d.x_val, d.y_val),
        ("test", d.x_test, d.y_test),
    ]


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(x.shape[0], -1)}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_shapes_dtypes_and_meta(family: str) -> None:
    d = load_task(TaskConfig(family=family))
    shape, n_train, n_val, n_test = EXPECTED[family]
    assert d.input_shape == shape
    assert d.num_classes == 10
    for split, x, y in _splits(d):
        n = {"train": n_train, "val": n_val, "test": n_test}[split]
        assert x.shape == (n, *shape), split
        assert y.shape == (n,), split
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.device.type == "cpu" and x.is_contiguous() and y.is_contiguous()
        assert torch.isfinite(x).all()
        assert int(y.min()) >= 0 and int(y.max()) < d.num_classes
    assert d.meta["family"] == family
    assert d.meta["n_train"] == n_train
    json.dumps(d.meta)  # must be JSON-serialisable
    assert d.name == (f"{family}/s0" if family != "bottleneck" else "bottleneck/k1/s0")


def test_digits_pixels_in_unit_range() -> None:
    d = load_task(TaskConfig(family="digits"))
    x = torch.cat([d.x_train, d.x_val, d.x_test])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_same_seed_same_tensors_other_seed_differs(family: str) -> None:
    a, b = load_task(TaskConfig(family=family)), load_task(TaskConfig(family=family, seed=1))
    again = load_task(TaskConfig(family=family))
    for (split, xa, ya), (_, xr, yr), (_, xb, _) in zip(_splits(a), _splits(again), _splits(b), strict=True):
        assert torch.equal(xa, xr) and torch.equal(ya, yr), split
        assert xa is not xr  # fresh tensors: one caller's in-place edit cannot leak to another
        assert not torch.equal(xa, xb), split
    assert a.name != b.name


@pytest.mark.parametrize("family", ["mnist1d", "bottleneck"])
def test_splits_share_no_rows(family: str) -> None:
    # Exact-row disjointness; digits is left out because the dataset itself repeats images.
    d = load_task(TaskConfig(family=family))
    tr, va, te = _rows(d.x_train), _rows(d.x_val), _rows(d.x_test)
    assert len(tr) == d.x_train.shape[0]  # no duplicates inside a split either
    assert not tr & va and not tr & te and not va & te


def test_mnist1d_standardised_with_train_statistics() -> None:
    d = load_task(TaskConfig(family="mnist1d"))
    assert abs(float(d.x_train.mean())) < 1e-4
    assert abs(float(d.x_train.std()) - 1.0) < 1e-3
    # val / test use the train statistics, so they are close to, not exactly, standard
    for x in (d.x_val, d.x_test):
        assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1.0) < 0.1


def test_n_train_subsamples_train_only_and_nests() -> None:
    full = load_task(TaskConfig(family="mnist1d"))
    small = load_task(TaskConfig(family="mnist1d", n_train=200))
    medium = load_task(TaskConfig(family="mnist1d", n_train=500))
    assert small.x_train.shape == (200, 40) and small.name == "mnist1d/s0/n200"
    assert torch.equal(small.x_train, medium.x_train[:200])  # smaller is a subset of larger
    assert _rows(medium.x_train) <= _rows(full.x_train)
    # val, test and the input scaling do not depend on n_train
    assert torch.equal(small.x_val, full.x_val) and torch.equal(small.x_test, full.x_test)
    assert small.features()[0] < full.features()[0]


def test_n_train_larger_than_split_is_an_esper_error() -> None:
    with pytest.raises(EsperError, match="n_train=5000"):
        load_task(TaskConfig(family="digits", n_train=5000))


def test_mnist1d_disk_cache_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_RAY_CACHE", str(tmp_path))
    seed = 11
    mnist1d_task.raw_arrays.cache_clear()
    np_state, py_state = np.random.get_state(), random.getstate()
    first = load_task(TaskConfig(seed=seed))  # generated (about 1 s) and written
    # generation reseeds numpy's and Python's global RNGs; the loader must restore them
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))

    path = mnist1d_task.cache_path(seed)
    assert path.parent == tmp_path and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind

    mnist1d_task.raw_arrays.cache_clear()  # as a fresh process would be

    def no_generate(s: int, params: object = None) -> dict[str, np.ndarray]:
        raise AssertionError("regenerated although the cache file exists")

    monkeypatch.setattr(mnist1d_task, "_generate", no_generate)
    start = time.perf_counter()
    second = load_task(TaskConfig(seed=seed))
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"cached load took {elapsed:.3f} s"
    for (_, xa, ya), (_, xb, yb) in zip(_splits(first), _splits(second), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

    # a damaged cache file is regenerated (and rewritten), not trusted; "generation" here
    # replays the arrays already made, so the check costs no second second of generating
    made = {k: np.array(v) for k, v in mnist1d_task.raw_arrays(seed).items()}
    calls: list[int] = []

    def fake_generate(s: int, params: object = None) -> dict[str, np.ndarray]:
        calls.append(s)
        return {k: v.copy() for k, v in made.items()}

    monkeypatch.setattr(mnist1d_task, "_generate", fake_generate)
    path.write_bytes(b"not a zip file")
    mnist1d_task.raw_arrays.cache_clear()
    assert torch.equal(load_task(TaskConfig(seed=seed)).x_train, first.x_train)
    assert calls == [seed]
    mnist1d_task.raw_arrays.cache_clear()
    assert torch.equal(load_task(TaskConfig(seed=seed)).x_test, first.x_test)
    assert calls == [seed]  # the rewritten file was read back


@pytest.mark.parametrize(("slot", "name"), [(0, "input"), (1, "hidden0"), (2, "hidden1")])
def test_bottleneck_ground_truth_changes_labels_and_classes_balanced(slot: int, name: str) -> None:
    for seed in (slot, slot + 3):
        d = load_task(TaskConfig(family="bottleneck", bottleneck_slot=slot, seed=seed))
        assert d.meta["ground_truth_slot"] == name == d.meta["bottleneck_slot"]
        assert d.meta["slots"] == ["input", "hidden0", "hidden1"]
        assert d.meta["wide"] == 512
        assert d.meta["label_change_if_removed"] > 0.4
        y = torch.cat([d.y_train, d.y_val, d.y_test])
        shares = torch.bincount(y, minlength=10).double() / y.numel()
        assert float(shares.max()) < 0.25
        assert float(shares.min()) > 0.02  # every class is present in earnest
        assert d.name == f"bottleneck/k{slot}/s{seed}"


def test_bottleneck_label_change_is_measured_not_assumed() -> None:
    cfg = TaskConfig(family="bottleneck")
    teacher, x_cal = build_teacher(cfg, torch.Generator().manual_seed(0))
    # labels come from the teacher, and removing the map at its slot changes most of them
    d = load_task(cfg)
    x = torch.cat([d.x_train, d.x_val, d.x_test])
    y = torch.cat([d.y_train, d.y_val, d.y_test])
    assert torch.equal(teacher.logits(x.double()).argmax(1), y)
    change = label_change_if_removed(teacher, x.double())
    assert change > 0.4
    assert abs(change - d.meta["label_change_if_removed"]) < 0.05
    # a teacher without the map (output re-standardised for it) scores ~0: no upward bias
    off = dataclasses.replace(teacher, scale=0.0)
    pre = off.penultimate(x_cal) @ teacher.weights[-1].T
    mu, sd = pre.mean(0), pre.std(0)
    w_out, b_out = teacher.weights[-1] / sd[:, None], -mu / sd
    off = dataclasses.replace(off, weights=(*teacher.weights[:-1], w_out), biases=(*teacher.biases[:-1], b_out))
    assert label_change_if_removed(off, x_cal) < 0.001


def test_bottleneck_custom_shape() -> None:
    cfg = TaskConfig(
        family="bottleneck",
        input_dim=8,
        hidden=[16, 16, 16],
        num_classes=4,
        wide=64,
        n_samples=500,
        bottleneck_slot=3,
        val_fraction=0.25,
    )
    d = load_task(cfg)
    assert d.input_shape == (8,) and d.num_classes == 4
    assert (d.x_train.shape[0], d.x_val.shape[0], d.x_test.shape[0]) == (300, 100, 100)
    assert d.meta["ground_truth_slot"] == "hidden2"
    assert d.meta["label_change_if_removed"] > 0.4
    assert max(d.meta["class_shares"]) < 2.0 / 4


def test_features_layout() -> None:
    assert len(FEATURE_NAMES) == 5
    assert not any("family" in name for name in FEATURE_NAMES)  # no task identity in the observation
    assert {"mnist1d", "digits", "bottleneck", "cifar10"} <= set(TASK_FAMILIES)
    for family in EXPECTED:
        d = load_task(TaskConfig(family=family))
        f = d.features()
        assert len(f) == len(FEATURE_NAMES) == len(d.feature_names())
        assert all(isinstance(v, float) and math.isfinite(v) for v in f)
        assert f[0] == pytest.approx(math.log10(d.x_train.shape[0]) / 5)
        assert f[2] == pytest.approx(0.5)  # 10 classes
        assert f[3] == (1.0 if family == "digits" else 0.0)
        assert 0.1 <= f[4] < 0.25  # majority share, ~balanced


# ---------------------------------------------------------------------------------- CIFAR-10


def _write_fake_cifar(folder: Path, per_batch: int = 4, protocol: int = 2) -> dict[str, list]:
    """Write the official layout with tiny batches; pixel (i, c) is constant, = 10 * i + c."""
    folder.mkdir(parents=True)
    written: dict[str, list] = {}
    count = 0
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = np.zeros((per_batch, 3, 1024), dtype=np.uint8)
        labels = []
        for i in range(per_batch):
            for c in range(3):
                data[i, c] = (10 * count + c) % 256
            labels.append(count % 10)
            count += 1
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data.reshape(per_batch, 3072),
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        written[name] = labels
    return written


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_fake_folder_loads(tmp_path: Path, nested: bool, protocol: int) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py" if nested else tmp_path / "cifar"
    written = _write_fake_cifar(batch_dir, protocol=protocol)
    root = tmp_path if nested else batch_dir
    d = load_task(TaskConfig(family="cifar10", root=str(root), val_fraction=0.25))
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_val.shape == (5, 3, 32, 32)
    assert d.x_test.shape == (4, 3, 32, 32) and d.x_train.dtype == torch.float32
    assert d.y_test.tolist() == written["test_batch"]  # test keeps file order
    train_labels = sorted(lab for k, v in written.items() if k != "test_batch" for lab in v)
    assert sorted(d.y_train.tolist() + d.y_val.tolist()) == train_labels
    # undo the per-channel standardisation: the (N, 3072) rows are channel-major planes
    mean = torch.tensor(d.meta["channel_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(d.meta["channel_std"]).view(1, 3, 1, 1)
    pixels = ((d.x_test * std + mean) * 255).round()
    for i in range(4):
        for c in range(3):
            assert torch.all(pixels[i, c] == 10 * (20 + i) + c)
    assert d.meta["root"] == str(batch_dir)
    json.dumps(d.meta)


def test_cifar10_missing_folder_is_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(EsperError) as err:
        load_task(TaskConfig(family="cifar10", root=str(missing)))
    msg = str(err.value)
    assert "\n" not in msg
    assert str(missing) in msg and "never downloads" in msg

    with pytest.raises(EsperError, match="root") as err:
        load_task(TaskConfig(family="cifar10"))
    assert "\n" not in str(err.value)


def test_cifar10_incomplete_folder_names_missing_files(tmp_path: Path) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py"
    _write_fake_cifar(batch_dir)
    (batch_dir / "data_batch_3").unlink()
    with pytest.raises(EsperError, match="data_batch_3") as err:
        load_task(TaskConfig(family="cifar10", root=str(tmp_path)))
    assert "\n" not in str(err.value) and str(batch_dir) in str(err.value)


def test_cifar10_refuses_pickled_code(tmp_path: Path) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py"
    _write_fake_cifar(batch_dir)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with (batch_dir / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(EsperError, match="data_batch_2") as err:
        load_task(TaskConfig(family="cifar10", root=str(tmp_path)))
    assert "\n" not in str(err.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"val_fraction": 0.9}, "val_fraction"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"n_train": -5}, "n_train"),
        ({"n_train": 0}, "n_train"),
        ({"bottleneck_slot": 3}, "bottleneck_slot"),
        ({"bottleneck_slot": -1}, "bottleneck_slot"),
        ({"bottleneck_slot": 2, "hidden": [64]}, "bottleneck_slot"),
        ({"hidden": []}, "hidden"),
        ({"family": "imagenet"}, "family"),
        ({"seed": -1}, "seed"),
        ({"num_classes": 1}, "num_classes"),
        ({"colour": "blue"}, "colour"),  # extra fields are forbidden
    ],
)
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        TaskConfig(**kwargs)
    assert field in str(err.value)


def test_valid_edge_configs_and_mapping_input() -> None:
    TaskConfig(val_fraction=0.5, bottleneck_slot=0)
    TaskConfig(bottleneck_slot=2)  # the last hidden layer's output
    d = load_task({"family": "digits", "n_train": 50})
    assert d.x_train.shape[0] == 50
