"""Shared types of the task package: the config, the loaded data, splits and the cache folder."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from esper_ray.contracts import EsperError
from esper_ray.hosts import HostConfig

TaskFamily = Literal["mnist1d", "digits", "bottleneck", "cifar10", "scaleshift", "interaction", "saturated", "text"]
TASK_FAMILIES: tuple[str, ...] = get_args(TaskFamily)
"""Every task family (what ``TaskConfig.family`` accepts)."""

FEATURE_NAMES: tuple[str, ...] = (
    "log_n_train",  # log10(len(x_train)) / 5: 0.5 at 316 examples, 1.0 at 100k
    "log_input_size",  # log10(prod(input_shape)) / 4: 0.40 for 40 values, 0.87 for 3x32x32
    "log_num_classes",  # log10(num_classes) / 2: 0.5 for 10 classes
    "spatial_rank",  # (len(input_shape) - 1) / 2: 0 for a flat vector, 1 for (C, H, W)
    "majority_share",  # share of the commonest label in y_train (the constant predictor's accuracy)
)
"""Names of the entries of :meth:`TaskData.features`, in order. Generic statistics of the data only:
no family or task identity, so a controller has to read the run to tell tasks apart."""

TEST_FRACTION = 0.2
"""Share of a family's labelled examples held out as the test split, where the source has none."""

_MAX_SEED = 2**32 - 1  # mnist1d seeds numpy's global RNG, which takes 32-bit seeds only


def cache_dir() -> Path:
    """Folder for generated data: ``$ESPER_RAY_CACHE`` if set, else ``~/.cache/esper-ray``.

    Read on every call (not at import) so tests and runs can point it elsewhere.
    """
    env = os.environ.get("ESPER_RAY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "esper-ray"


class TaskConfig(BaseModel):
    """Which data a host trains on; validated on construction so bad values fail early."""

    model_config = ConfigDict(extra="forbid")

    family: TaskFamily = "mnist1d"
    seed: int = Field(0, ge=0, le=_MAX_SEED, description="data generation / split seed")
    n_train: int | None = Field(None, ge=1, description="keep only this many training examples (None = all)")
    val_fraction: float = Field(0.2, gt=0.0, le=0.5, description="share of the non-test labelled data held out for val")
    root: str | None = Field(None, description="cifar10 only: folder holding cifar-10-batches-py/, or that folder")
    # bottleneck family only (ignored by the others)
    bottleneck_slot: int = Field(1, ge=0, description="0 = 'input', i + 1 = 'hidden{i}'")
    input_dim: int = Field(32, ge=1)
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64, 64], min_length=1)
    num_classes: int = Field(10, ge=2)
    wide: int = Field(512, ge=1)
    n_samples: int = Field(6000, ge=20)
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the family's own generator settings (see esper_ray.tasks.params); unknown names are errors",
    )
    host: HostConfig | None = Field(
        None, description="the host this task is played with; None: the run's host (RunConfig.host)"
    )

    @model_validator(mode="after")
    def _slot_in_range(self) -> TaskConfig:
        # Needs `hidden`, so it cannot be a per-field check; the message names the field itself.
        if self.bottleneck_slot > len(self.hidden):
            slots = ", ".join(f"{i}={name!r}" for i, name in enumerate(slot_names(self.hidden)))
            raise ValueError(
                f"bottleneck_slot={self.bottleneck_slot} is out of range for hidden={self.hidden}; valid slots: {slots}"
            )
        return self

    @model_validator(mode="after")
    def _params_and_host(self) -> TaskConfig:
        # Imported here: the parameter models live beside the families, which import this module.
        from esper_ray.tasks.params import check_host, parse_params

        parse_params(self.family, self.params)
        if self.host is not None:
            check_host(self)
        return self


def slot_names(hidden: list[int] | tuple[int, ...]) -> list[str]:
    """Slot names of an MLP with these hidden widths: ``["input", "hidden0", ...]``."""
    return ["input", *(f"hidden{i}" for i in range(len(hidden)))]


@dataclass
class TaskData:
    """One loaded task: three disjoint splits on the CPU, plus what a host needs to be built.

    Inputs are contiguous float32 of shape ``(N, *input_shape)``, labels contiguous int64 in
    ``[0, num_classes)``. ``meta`` is JSON-serialisable.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)
    # Optional weights for an MLP host of the task's widths (keys as in MorphoHost.state_dict),
    # used with ``training.host_init: task`` (e.g. a pre-trained host missing one capacity).
    host_init: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        # A mismatch here is always a bug in whoever built the task; fail where it is made.
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0] or tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"TaskData {self.name!r}: {split} split has x {tuple(x.shape)} and "
                    f"y {tuple(y.shape)}, expected (N, *{tuple(self.input_shape)}) and (N,)"
                )

    @staticmethod
    def feature_names() -> tuple[str, ...]:
        """Names of the entries of :meth:`features`, in order (same as ``FEATURE_NAMES``)."""
        return FEATURE_NAMES

    def features(self) -> list[float]:
        """A fixed-length numeric description of the task for a controller's observation.

        Layout (``len == len(FEATURE_NAMES) == 5``), every entry roughly in [0, 1]:

        0. ``log10(n_train) / 5``
        1. ``log10(prod(input_shape)) / 4``
        2. ``log10(num_classes) / 2``
        3. ``(len(input_shape) - 1) / 2`` (0 = flat vector, 1 = image ``(C, H, W)``)
        4. share of the commonest label in ``y_train``

        Nothing names the task or its family, and nothing about a bottleneck task's ground-truth
        slot is included: which growth helps is what a controller is meant to discover.
        """
        n_train = max(int(self.y_train.numel()), 1)
        counts = torch.bincount(self.y_train.flatten(), minlength=self.num_classes)  # (N, T) for text
        return [
            math.log10(n_train) / 5.0,
            math.log10(max(math.prod(self.input_shape), 1)) / 4.0,
            math.log10(self.num_classes) / 2.0,
            (len(self.input_shape) - 1) / 2.0,
            float(counts.max()) / n_train,
        ]


def split_pool(n_pool: int, cfg: TaskConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly carve ``(train_idx, val_idx)`` out of ``n_pool`` labelled non-test examples.

    ``val`` gets ``round(val_fraction * n_pool)`` examples (at least one). With ``n_train`` set,
    train is the first ``n_train`` of the shuffled rest, so a smaller ``n_train`` gives a subset
    of a larger one and val is the same for every ``n_train``.
    """
    perm = torch.randperm(n_pool, generator=generator)
    n_val = max(1, round(cfg.val_fraction * n_pool))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if cfg.n_train is not None:
        if cfg.n_train > train_idx.numel():
            raise EsperError(
                f"n_train={cfg.n_train} is more than the {train_idx.numel()} training examples "
                f"that {cfg.family} has with val_fraction={cfg.val_fraction}"
            )
        train_idx = train_idx[: cfg.n_train]
    return train_idx, val_idx


def task_name(cfg: TaskConfig, stem: str) -> str:
    """``"{stem}/s{seed}"``, plus ``"/n{n_train}"`` when the train split is subsampled."""
    name = f"{stem}/s{cfg.seed}"
    return name if cfg.n_train is None else f"{name}/n{cfg.n_train}"


def finish(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to ``dtype`` on the CPU, contiguous (a fresh tensor callers may modify in place)."""
    return t.to(device="cpu", dtype=dtype).contiguous()


def class_shares(y: torch.Tensor, num_classes: int) -> list[float]:
    """Share of each label in ``y``, as plain floats (for ``meta``)."""
    counts = torch.bincount(y, minlength=num_classes).double()
    return [round(float(c), 6) for c in counts / max(y.numel(), 1)]


def synthetic_splits(
    n_samples: int, cfg: TaskConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_idx, val_idx, test_idx)`` of ``n_samples`` drawn examples: ``TEST_FRACTION`` of them
    test, val carved from the rest by :func:`split_pool` (``n_train`` honoured)."""
    perm = torch.randperm(n_samples, generator=generator)
    n_test = round(TEST_FRACTION * n_samples)
    test_idx, pool_idx = perm[:n_test], perm[n_test:]
    train_pos, val_pos = split_pool(pool_idx.numel(), cfg, generator)
    return pool_idx[train_pos], pool_idx[val_pos], test_idx


def balanced_argmax(scores: torch.Tensor, calibration: torch.Tensor, rounds: int = 50) -> torch.Tensor:
    """Labels ``argmax(scores)`` after a per-class affine fit on ``calibration`` (scores of other
    inputs from the same distribution) that makes the classes about equally common: each column
    z-scored, then per-class offsets nudged for ``rounds`` rounds towards equal argmax shares (a
    skewed score, e.g. a product, would otherwise let a few classes win most inputs)."""
    mu, sd = calibration.mean(0), calibration.std(0).clamp_min(1e-12)
    z_cal = (calibration - mu) / sd
    k = calibration.shape[1]
    offset = torch.zeros(k, dtype=calibration.dtype)
    for _ in range(rounds):
        shares = torch.bincount((z_cal + offset).argmax(1), minlength=k).to(calibration.dtype) / len(z_cal)
        offset -= 0.3 * torch.log((shares * k).clamp_min(0.05))
    return ((scores - mu) / sd + offset).argmax(1)


def split_task(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    num_classes: int,
    meta: dict[str, Any],
) -> TaskData:
    """A TaskData of ``x``/``y`` cut by the (train, val, test) indices ``splits``: float32 inputs,
    int64 labels, the split sizes added to ``meta``."""
    train_idx, val_idx, test_idx = splits
    return TaskData(
        name=name,
        x_train=finish(x[train_idx], torch.float32),
        y_train=finish(y[train_idx], torch.int64),
        x_val=finish(x[val_idx], torch.float32),
        y_val=finish(y[val_idx], torch.int64),
        x_test=finish(x[test_idx], torch.float32),
        y_test=finish(y[test_idx], torch.int64),
        input_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        meta={
            **meta,
            "n_train": int(train_idx.numel()),
            "n_val": int(val_idx.numel()),
            "n_test": int(test_idx.numel()),
        },
    )


def synthetic_task(
    cfg: TaskConfig, stem: str, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, meta: dict[str, Any]
) -> TaskData:
    """A TaskData from drawn vectors ``x`` (float64 ok) and labels ``y``: seeded splits, float32 / int64."""
    num_classes = int(meta["num_classes"])
    splits = synthetic_splits(x.shape[0], cfg, generator)
    meta = {**meta, "seed": cfg.seed, "class_shares": class_shares(y, num_classes)}
    return split_task(task_name(cfg, stem), x, y, splits, num_classes, meta)
