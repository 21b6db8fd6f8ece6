"""Tasks: the data every host trains on.

``load_task(TaskConfig(...))`` returns a :class:`TaskData` with disjoint, seeded train / val /
test splits on the CPU (float32 inputs, int64 labels). Families:

* ``mnist1d``: MNIST-1D generated locally from the seed (cached in-process and under
  ``$ESPER_RAY_CACHE`` or ``~/.cache/esper-ray``), inputs standardised with train statistics;
* ``digits``: scikit-learn's 8x8 digits as (1, 8, 8) images in [0, 1];
* ``bottleneck``: synthetic labels from a random teacher MLP that is wide at one known slot
  (``meta["ground_truth_slot"]``), see :mod:`esper_ray.tasks.bottleneck_task`;
* ``cifar10``: the official python batches from a local folder (``TaskConfig.root``).

Nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from esper_ray.tasks.base import (
    FEATURE_NAMES,
    TASK_FAMILIES,
    TaskConfig,
    TaskData,
    cache_dir,
    slot_names,
)
from esper_ray.tasks.bottleneck_task import load_bottleneck
from esper_ray.tasks.cifar10_task import load_cifar10
from esper_ray.tasks.digits_task import load_digits_task
from esper_ray.tasks.mnist1d_task import load_mnist1d

_LOADERS: dict[str, Callable[[TaskConfig], TaskData]] = {
    "mnist1d": load_mnist1d,
    "digits": load_digits_task,
    "bottleneck": load_bottleneck,
    "cifar10": load_cifar10,
}
assert tuple(_LOADERS) == TASK_FAMILIES  # the one-hot layout of features() relies on this order


def load_task(cfg: TaskConfig | Mapping[str, Any]) -> TaskData:
    """Load the task ``cfg`` describes (a mapping is validated into a TaskConfig first).

    Same config, same tensors; each call returns fresh tensors the caller may modify.
    Raises ``EsperError`` (one line) for data that is missing or unusable, e.g. no CIFAR-10
    folder or an ``n_train`` larger than the training split.
    """
    if not isinstance(cfg, TaskConfig):
        cfg = TaskConfig.model_validate(cfg)
    return _LOADERS[cfg.family](cfg)


__all__ = [
    "FEATURE_NAMES",
    "TASK_FAMILIES",
    "TaskConfig",
    "TaskData",
    "cache_dir",
    "load_task",
    "slot_names",
]
