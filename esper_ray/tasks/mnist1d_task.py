"""MNIST-1D, generated locally from its seed and cached in-process and on disk."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import random
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from esper_ray.tasks.base import TaskConfig, TaskData, cache_dir, finish, split_pool, task_name

# Bump when the cached arrays change meaning, so stale files are never read.
_FORMAT_VERSION = 1
_KEYS = ("x", "y", "x_test", "y_test")


def _dataset_args(seed: int) -> object:
    # Only make_dataset / get_dataset_args: get_dataset would try to download.
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    args.seed = seed
    return args


def cache_path(seed: int) -> Path:
    """Where the generated arrays for ``seed`` live on disk.

    The name carries a digest of the installed mnist1d version and this module's format
    version, so an upgrade gets a new file instead of silently reusing an old one. It avoids
    importing mnist1d (~0.8 s, it pulls in matplotlib) so that a cache hit stays fast.
    """
    key = {"mnist1d": importlib.metadata.version("mnist1d"), "format": _FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"mnist1d-s{seed}-{digest}.npz"


def _generate(seed: int) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset

    # make_dataset reseeds the global `random` and `numpy.random` generators; put them back so
    # loading data never changes what other code draws from them.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(_dataset_args(seed))
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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    except OSError as exc:
        warnings.warn(f"mnist1d cache not written to {path}: {exc}", stacklevel=3)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"mnist1d cache not written to {path}: {exc}", stacklevel=3)
        Path(tmp).unlink(missing_ok=True)


@functools.lru_cache(maxsize=8)
def raw_arrays(seed: int) -> dict[str, np.ndarray]:
    """The generator's output for ``seed``: x (4000, 40), y, x_test (1000, 40), y_test.

    Read from the disk cache when present (milliseconds), else generated (~1 s) and saved.
    The arrays are shared by every caller in the process, so they are made read-only.
    """
    path = cache_path(seed)
    arrays = _read(path)
    if arrays is None:
        arrays = _generate(seed)
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
    raw = raw_arrays(cfg.seed)
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

    return TaskData(
        name=task_name(cfg, "mnist1d"),
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
        },
    )
