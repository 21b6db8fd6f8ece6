"""scikit-learn's 8x8 digits (shipped with scikit-learn, nothing downloaded).

**What the task is.** 1797 handwritten digits as (1, 8, 8) images in [0, 1], ten classes;
optionally each image moved by a random offset of up to ``max_shift`` pixels (zero-filled) and
noised with Gaussian pixel noise of std ``noise``.

**Which growth should help and why.** Strokes are local 2-D patterns, so a ``conv2d`` seed at
the ``input`` slot gives an MLP host local feature detectors it would otherwise learn pixel by
pixel from ~1k examples; shifted images make the same stroke land on other pixels, which widens
the gap. A vector seed at the input (``norm``, ``lowrank``) cannot use the 2-D layout.

**Sampled parameters** (``TaskConfig.params``, :class:`esper_ray.tasks.params.DigitsParams`):
``max_shift``, ``noise`` (defaults 0: the images as shipped), plus ``n_train``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from esper_ray.tasks.base import (
    TEST_FRACTION,
    TaskConfig,
    TaskData,
    split_pool,
    split_task,
    task_name,
)
from esper_ray.tasks.params import DigitsParams, parse_params, settings_tag


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
    """Digits as (1, 8, 8) images in [0, 1]; a seeded 80/20 train/test split, val from train.

    Shifts and noise (``params``) are drawn after the split from the same seeded generator, so
    the default settings give exactly the unshifted images.
    """
    params = parse_params("digits", cfg.params)
    assert isinstance(params, DigitsParams)
    images, target = _raw()
    x = torch.from_numpy(images.copy()).div_(16.0).unsqueeze(1)  # pixel values are 0..16
    y = torch.from_numpy(target.copy())

    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_test = round(TEST_FRACTION * x.shape[0])
    test_idx, pool_idx = perm[:n_test], perm[n_test:]
    train_pos, val_pos = split_pool(pool_idx.numel(), cfg, gen)
    train_idx, val_idx = pool_idx[train_pos], pool_idx[val_pos]
    if params.max_shift:
        x = shift_images(x, params.max_shift, gen)
    if params.noise:
        x = x + params.noise * torch.randn(x.shape, generator=gen)

    stem = settings_tag("digits", params)
    meta = {"family": "digits", "seed": cfg.seed, "scaling": "pixel / 16", "params": params.model_dump()}
    return split_task(task_name(cfg, stem), x, y, (train_idx, val_idx, test_idx), 10, meta)


def shift_images(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) moved by its own random (dy, dx) in [-max_shift, max_shift],
    the uncovered border filled with zeros (the background)."""
    _, _, h, w = x.shape
    m = max_shift
    padded = torch.nn.functional.pad(x, (m, m, m, m))
    offsets = torch.randint(0, 2 * m + 1, (x.shape[0], 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(2 * m + 1):  # at most 7 x 7 distinct windows: a loop over them, not over images
        for dx in range(2 * m + 1):
            rows = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().squeeze(1)
            out[rows] = padded[rows, :, dy : dy + h, dx : dx + w]
    return out
