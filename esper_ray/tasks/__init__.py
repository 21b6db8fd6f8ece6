"""Tasks: the data every host trains on.

``load_task(TaskConfig(...))`` returns a :class:`TaskData` with disjoint, seeded train / val /
test splits on the CPU (float32 inputs, int64 labels). Families:

* ``mnist1d``: MNIST-1D generated locally from the seed (cached in-process and under
  ``$ESPER_RAY_CACHE`` or ``~/.cache/esper-ray``), inputs standardised with train statistics;
* ``digits``: scikit-learn's 8x8 digits as (1, 8, 8) images in [0, 1];
* ``bottleneck``: synthetic labels from a random teacher MLP that is wide at one known slot
  (``meta["ground_truth_slot"]``), see :mod:`esper_ray.tasks.bottleneck_task`;
* ``cifar10``: the official python batches from a local folder (``TaskConfig.root``);
* ``scaleshift``: a pattern under per-example gains and offsets (a ``norm`` seed should help);
* ``interaction``: labels from products of a few projections (a nonlinear vector seed should help);
* ``saturated``: separable Gaussian classes the host already solves (growth only costs);
* ``text``: next-byte prediction on English prose or Python source shipped with the package
  (CPython's, PSF License; pinned by SHA-256), for the transformer host, see
  :mod:`esper_ray.tasks.text_task`.

Each family's own settings go in ``TaskConfig.params`` (models in :mod:`esper_ray.tasks.params`);
each module's docstring says what its task is, which growth should help and why, and what it
samples. ``TaskConfig.host`` names the host a task is played with (None: the run's).
:func:`sample_tasks` draws many tasks from a :class:`TaskDistribution` of families.

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
from esper_ray.tasks.distribution import (
    FamilySpec,
    HostChoice,
    ParamRange,
    TaskDistribution,
    load_distribution,
    sample_tasks,
)
from esper_ray.tasks.interaction_task import load_interaction
from esper_ray.tasks.mnist1d_task import load_mnist1d
from esper_ray.tasks.params import FAMILY_PARAMS, parse_params
from esper_ray.tasks.saturated_task import load_saturated
from esper_ray.tasks.scaleshift_task import load_scaleshift
from esper_ray.tasks.text_task import load_text

_LOADERS: dict[str, Callable[[TaskConfig], TaskData]] = {
    "mnist1d": load_mnist1d,
    "digits": load_digits_task,
    "bottleneck": load_bottleneck,
    "cifar10": load_cifar10,
    "scaleshift": load_scaleshift,
    "interaction": load_interaction,
    "saturated": load_saturated,
    "text": load_text,
}
assert set(_LOADERS) == set(TASK_FAMILIES) >= set(FAMILY_PARAMS)  # every family can be loaded


def load_task(cfg: TaskConfig | Mapping[str, Any]) -> TaskData:
    """Load the task ``cfg`` describes (a mapping is validated into a TaskConfig first).

    Same config, same tensors; each call returns fresh tensors the caller may modify.
    Raises ``EsperError`` (one line) for data that is missing or unusable, e.g. no CIFAR-10
    folder or an ``n_train`` larger than the training split.
    """
    if not isinstance(cfg, TaskConfig):
        cfg = TaskConfig.model_validate(cfg)
    return _LOADERS[cfg.family](cfg)


def training_overrides(cfg: TaskConfig) -> dict[str, Any]:
    """``TrainingConfig`` settings a task must be played with, as a mapping to merge into ``training``.

    A bottleneck task is a pre-trained host with one capacity cut out, so it is played from the
    task's host weights, frozen (``host_init: task``, ``freeze_host: true``; see
    :mod:`esper_ray.tasks.bottleneck_task`); every other family trains its host from scratch
    (nothing to override).
    """
    return {"host_init": "task", "freeze_host": True} if cfg.family == "bottleneck" else {}


__all__ = [
    "FAMILY_PARAMS",
    "FEATURE_NAMES",
    "TASK_FAMILIES",
    "FamilySpec",
    "HostChoice",
    "ParamRange",
    "TaskConfig",
    "TaskData",
    "TaskDistribution",
    "cache_dir",
    "load_distribution",
    "load_task",
    "parse_params",
    "sample_tasks",
    "slot_names",
    "training_overrides",
]
