"""scikit-learn's 8x8 digits (shipped with scikit-learn, nothing downloaded)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from esper_ray.tasks.base import (
    TEST_FRACTION,
    TaskConfig,
    TaskData,
    finish,
    split_pool,
    task_name,
)


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.ascontiguousarray(bunch.images, dtype=np.float32)  # (1797, 8, 8), 0..16
    target = np.ascontiguousarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)  # shared by every caller in the process
    target.setflags(write=False)
    return images, target


def load_digits_task(cfg: TaskConfig) -> TaskData:
    """Digits as (1, 8, 8) images in [0, 1]; a seeded 80/20 train/test split, val from train."""
    images, target = _raw()
    x = torch.from_numpy(images.copy()).div_(16.0).unsqueeze(1)  # pixel values are 0..16
    y = torch.from_numpy(target.copy())

    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_test = round(TEST_FRACTION * x.shape[0])
    test_idx, pool_idx = perm[:n_test], perm[n_test:]
    train_pos, val_pos = split_pool(pool_idx.numel(), cfg, gen)
    train_idx, val_idx = pool_idx[train_pos], pool_idx[val_pos]

    return TaskData(
        name=task_name(cfg, "digits"),
        x_train=finish(x[train_idx], torch.float32),
        y_train=finish(y[train_idx], torch.int64),
        x_val=finish(x[val_idx], torch.float32),
        y_val=finish(y[val_idx], torch.int64),
        x_test=finish(x[test_idx], torch.float32),
        y_test=finish(y[test_idx], torch.int64),
        input_shape=(1, 8, 8),
        num_classes=10,
        meta={
            "family": "digits",
            "seed": cfg.seed,
            "n_train": int(train_idx.numel()),
            "n_val": int(val_idx.numel()),
            "n_test": int(test_idx.numel()),
            "scaling": "pixel / 16",
        },
    )
