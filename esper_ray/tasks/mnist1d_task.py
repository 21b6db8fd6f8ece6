"""MNIST-1D, generated locally from its seed (and generator settings) and cached in-process and on disk.

**What the task is.** Ten fixed 1-D templates (digits drawn as 12-step curves), each signal one of
them padded, scaled, translated, sheared and noised, then resampled to ``final_seq_length``
steps. The label is the template.

**Which growth should help and why.** The class is a local shape that appears anywhere in the
signal (``max_translation``), so a translation-equivariant local feature extractor, a
``conv1d`` seed at the ``input`` slot, gives an MLP host what it lacks. With
``shuffle_seq: true`` the positions are permuted by one fixed permutation: neighbours are no
longer neighbours, locality is gone and a convolution should stop helping (a control that
looks the same to a controller). A cnn1d host already has convolutions, so the same seed
should add less there.

**Sampled parameters** (``TaskConfig.params``, :class:`esper_ray.tasks.params.Mnist1dParams`):
``num_samples``, ``scale_coeff``, ``max_translation``, ``corr_noise_scale``,
``iid_noise_scale``, ``shear_scale``, ``final_seq_length``, ``shuffle_seq``; the defaults are
the package's own (the original MNIST-1D). Only ``mnist1d.data.make_dataset`` is called, never
``get_dataset`` (which downloads).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from esper_ray.tasks.base import TaskConfig, TaskData, cache_dir, finish, split_pool, task_name
from esper_ray.tasks.params import Mnist1dParams, parse_params, settings_tag
from esper_ray.util import atomic_write

_DEFAULT = Mnist1dParams()

# Bump when the cached arrays change meaning, so stale files are never read.
_FORMAT_VERSION = 1
_KEYS = ("x", "y", "x_test", "y_test")


def _dataset_args(seed: int, params: Mnist1dParams = _DEFAULT) -> object:
    # Only make_dataset / get_dataset_args: get_dataset would try to download.
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    args.seed = seed
    for name, value in params.model_dump().items():
        setattr(args, name, value)
    return args


def cache_path(seed: int, params: Mnist1dParams = _DEFAULT) -> Path:
    """Where the generated arrays for ``seed`` (and generator ``params``) live on disk.

    The name carries a digest of the installed mnist1d version, this module's format version
    and any non-default generator settings, so an upgrade or another setting gets a new file
    instead of silently reusing an old one. It avoids importing mnist1d (slow: it pulls in
    matplotlib; BENCHMARKS.md, "Measurements behind the code") so that a cache hit stays fast.
    """
    key: dict[str, object] = {"mnist1d": importlib.metadata.version("mnist1d"), "format": _FORMAT_VERSION}
    changed = params.model_dump(exclude_defaults=True)
    if changed:  # the default settings keep the name they always had
        key["args"] = changed
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"mnist1d-s{seed}-{digest}.npz"


def _generate(seed: int, params: Mnist1dParams = _DEFAULT) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset

    # make_dataset reseeds the global `random` and `numpy.random` generators; put them back so
    # loading data never changes what other code draws from them.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(_dataset_args(seed, params))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {k: np.ascontiguousarray(data[k]) for k in _KEYS}


def _read(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if the file is missing, unreadable or malformed."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in _KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = (
        arrays["x"].ndim == 2
        and arrays["x_test"].ndim == 2
        and arrays["x"].shape[0] == arrays["y"].shape[0]
        and arrays["x_test"].shape[0] == arrays["y_test"].shape[0]
    )
    return arrays if ok else None


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + rename) so a concurrent reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, **cast(dict[str, Any], arrays)))  # (savez also takes flags)
    except OSError as exc:
        warnings.warn(f"mnist1d cache not written to {path}: {exc}", stacklevel=3)


@functools.lru_cache(maxsize=32)
def raw_arrays(seed: int, params: Mnist1dParams = _DEFAULT) -> dict[str, np.ndarray]:
    """The generator's output for ``seed``: x (4000, 40), y, x_test (1000, 40), y_test with the
    default ``params`` (80 / 20 % of ``num_samples`` signals of ``final_seq_length`` steps).

    Read from the disk cache when present, else generated (the slower path) and saved. The arrays
    are shared by every caller in the process, so they are made read-only.
    """
    path = cache_path(seed, params)
    arrays = _read(path)
    if arrays is None:
        arrays = _generate(seed) if params == _DEFAULT else _generate(seed, params)
        _write(path, arrays)
    for a in arrays.values():
        a.setflags(write=False)
    return arrays


def load_mnist1d(cfg: TaskConfig) -> TaskData:
    """MNIST-1D for ``cfg.seed``: val carved from the 4000 training signals, the 1000 test kept.

    Inputs are standardised with one mean and std over all values of the train pool (train
    before any ``n_train`` subsampling, so every ``n_train`` sees identical inputs); a scalar,
    not per position, because the signals are translated and a 1-D CNN should see one scale.
    """
    params = parse_params("mnist1d", cfg.params)
    assert isinstance(params, Mnist1dParams)
    raw = raw_arrays(cfg.seed) if params == _DEFAULT else raw_arrays(cfg.seed, params)
    x = torch.from_numpy(raw["x"].astype(np.float64))
    y = torch.from_numpy(raw["y"].astype(np.int64))
    x_test = torch.from_numpy(raw["x_test"].astype(np.float64))
    y_test = torch.from_numpy(raw["y_test"].astype(np.int64))

    gen = torch.Generator().manual_seed(cfg.seed)
    train_idx, val_idx = split_pool(x.shape[0], cfg, gen)
    pool_mask = torch.ones(x.shape[0], dtype=torch.bool)
    pool_mask[val_idx] = False
    mean, std = x[pool_mask].mean(), x[pool_mask].std()

    def norm(t: torch.Tensor) -> torch.Tensor:
        return finish((t - mean) / std, torch.float32)

    stem = settings_tag("mnist1d", params)
    return TaskData(
        name=task_name(cfg, stem),
        x_train=norm(x[train_idx]),
        y_train=finish(y[train_idx], torch.int64),
        x_val=norm(x[val_idx]),
        y_val=finish(y[val_idx], torch.int64),
        x_test=norm(x_test),
        y_test=finish(y_test, torch.int64),
        input_shape=(int(x.shape[1]),),
        num_classes=10,
        meta={
            "family": "mnist1d",
            "seed": cfg.seed,
            "n_train": int(train_idx.numel()),
            "n_val": int(val_idx.numel()),
            "n_test": int(y_test.numel()),
            "input_mean": float(mean),
            "input_std": float(std),
            "params": params.model_dump(),
        },
    )
