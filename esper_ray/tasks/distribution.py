"""Task distributions: many tasks drawn from families with sampled settings and hosts.

A :class:`TaskDistribution` is a list of :class:`FamilySpec`; each spec draws ``count`` tasks of
one family, each with its own data seed, settings drawn from ``ranges`` (or set in ``fixed``)
and, when ``host`` is given, its own host (kind, depth and widths drawn from a
:class:`HostChoice`). :func:`sample_tasks` turns it into plain ``TaskConfig`` objects, a pure
function of the distribution: the same config gives identical tasks (and so identical data),
in any process. Example (YAML)::

    seed: 0
    families:
      - family: scaleshift
        count: 8
        seed: 1
        fixed: {n_samples: 2500}
        ranges:
          gain_decades: {low: 2.0, high: 4.0}
          input_dim: {choices: [16, 32, 48]}
        host: {kinds: [mlp], depth: [2, 4], widths: [32, 64]}

A setting named in ``fixed`` or ``ranges`` is either a top-level ``TaskConfig`` field
(``n_train``, ``val_fraction``; for bottleneck also ``input_dim``, ``num_classes``, ``wide``,
``n_samples``, ``bottleneck_slot``) or one of the family's ``params``
(:mod:`esper_ray.tasks.params`); anything else is a one-line error when the distribution is
read. A bottleneck task's ``hidden`` widths are its host's, and its ground-truth slot is drawn
uniformly over that host's slots unless ``bottleneck_slot`` is set.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esper_ray.contracts import EsperError
from esper_ray.hosts import HostConfig
from esper_ray.hosts.base import OddKernel
from esper_ray.tasks.base import TaskConfig, TaskFamily
from esper_ray.tasks.params import FAMILY_PARAMS, IMAGE_FAMILIES, NoParams

_COMMON_FIELDS = frozenset({"n_train", "val_fraction"})
_BOTTLENECK_FIELDS = frozenset({"input_dim", "num_classes", "wide", "n_samples", "bottleneck_slot"})
_MAX_DRAWN_SEED = 2**31 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamRange(_Strict):
    """How one setting is drawn: uniform in ``[low, high]`` (log-uniform with ``log``, rounded to an
    integer with ``integer``), or uniformly one of ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> ParamRange:
        bounds = self.low is not None or self.high is not None
        if self.choices is not None:
            if bounds or self.log or self.integer:
                raise ValueError("give either choices or low/high (with log / integer), not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or choices)")
        if self.low > self.high:
            raise ValueError(f"low={self.low} is above high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got low={self.low}")
        return self

    def sample(self, rng: np.random.Generator) -> Any:
        """One draw (a plain Python value, so configs dump and compare cleanly)."""
        if self.choices is not None:
            return self.choices[int(rng.integers(len(self.choices)))]
        assert self.low is not None and self.high is not None
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = float(rng.uniform(self.low, self.high))
        if self.integer:
            return int(min(max(round(value), math.ceil(self.low)), math.floor(self.high)))
        return value


HostKind = Literal["mlp", "cnn1d", "cnn2d"]
_MLP_ONLY: list[HostKind] = ["mlp"]


class HostChoice(_Strict):
    """Which hosts a family's tasks are played with: a kind from ``kinds``, a depth (hidden layers
    or conv blocks) in ``depth`` (inclusive), and each layer's width from ``widths``."""

    kinds: list[HostKind] = Field(default_factory=lambda: _MLP_ONLY.copy(), min_length=1)
    depth: tuple[int, int] = (2, 2)
    widths: list[int] = Field(default_factory=lambda: [64], min_length=1)
    uniform_width: bool = Field(False, description="one width drawn for all layers (else one per layer)")
    kernel: OddKernel = Field(5, description="cnn kernel size (odd)")

    @field_validator("depth")
    @classmethod
    def _depth(cls, depth: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= depth[0] <= depth[1] <= 16:
            raise ValueError(f"depth must be [low, high] with 1 <= low <= high <= 16, got {list(depth)}")
        return depth

    @field_validator("widths")
    @classmethod
    def _widths(cls, widths: list[int]) -> list[int]:
        if any(w < 1 for w in widths):
            raise ValueError(f"widths must be positive, got {widths}")
        return widths

    def sample(self, rng: np.random.Generator) -> HostConfig:
        """One host config."""
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        depth = int(rng.integers(self.depth[0], self.depth[1] + 1))
        if self.uniform_width:
            hidden = [self.widths[int(rng.integers(len(self.widths)))]] * depth
        else:
            hidden = [self.widths[int(i)] for i in rng.integers(len(self.widths), size=depth)]
        return HostConfig(kind=kind, hidden=hidden, kernel=self.kernel)


class FamilySpec(_Strict):
    """``count`` tasks of one family, drawn from ``seed``: settings in ``fixed`` are set, those in
    ``ranges`` drawn per task; ``host`` draws each task's host (None: the run's host)."""

    family: TaskFamily
    count: int = Field(ge=1, le=100_000)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    fixed: dict[str, Any] = Field(default_factory=dict)
    ranges: dict[str, ParamRange] = Field(default_factory=dict)
    host: HostChoice | None = None

    @model_validator(mode="after")
    def _known_settings(self) -> FamilySpec:
        known = set(_COMMON_FIELDS) | set(FAMILY_PARAMS.get(self.family, NoParams).model_fields)
        if self.family == "bottleneck":
            known |= _BOTTLENECK_FIELDS
        for name in [*self.fixed, *self.ranges]:
            if name not in known:
                raise ValueError(
                    f"unknown setting {name!r} of family {self.family!r} (known: {', '.join(sorted(known))})"
                )
        both = sorted(set(self.fixed) & set(self.ranges))
        if both:
            raise ValueError(f"{both[0]!r} is both fixed and ranged; give it once")
        if self.host is not None:
            image = self.family in IMAGE_FAMILIES
            bad = [k for k in self.host.kinds if (k == "cnn2d" and not image) or (k == "cnn1d" and image)]
            if bad:
                raise ValueError(f"host kind {bad[0]!r} cannot play family {self.family!r}")
            if self.family == "bottleneck" and self.host.kinds != ["mlp"]:
                raise ValueError("a bottleneck family is played with MLP hosts only (host.kinds: [mlp])")
        return self


class TaskDistribution(_Strict):
    """A list of families to draw tasks from, and a seed mixed into every family's draws."""

    seed: int = Field(0, ge=0, le=2**32 - 1)
    families: list[FamilySpec]

    @field_validator("families")
    @classmethod
    def _some(cls, families: list[FamilySpec]) -> list[FamilySpec]:
        if not families:
            raise ValueError("a task distribution needs at least one family")
        return families


def _draw_one(spec: FamilySpec, rng: np.random.Generator) -> dict[str, Any]:
    values: dict[str, Any] = dict(spec.fixed)
    for name in sorted(spec.ranges):  # sorted: the draws do not depend on the mapping's order
        values[name] = spec.ranges[name].sample(rng)
    host = (spec.host or HostChoice()).sample(rng) if spec.host or spec.family == "bottleneck" else None
    seed = int(rng.integers(0, _MAX_DRAWN_SEED))
    fields = _COMMON_FIELDS | _BOTTLENECK_FIELDS if spec.family == "bottleneck" else _COMMON_FIELDS
    top = {k: v for k, v in values.items() if k in fields}
    params = {k: v for k, v in values.items() if k not in top}
    if spec.family == "bottleneck":
        assert host is not None
        top["hidden"] = list(host.hidden)
        # Drawn last and always, so adding a fixed slot does not shift the other draws.
        slot = int(rng.integers(0, len(host.hidden) + 1))
        top.setdefault("bottleneck_slot", slot)
    return {"family": spec.family, "seed": seed, "params": params, "host": host, **top}


def sample_tasks(dist: TaskDistribution | Mapping[str, Any]) -> list[TaskConfig]:
    """Every task of ``dist``, family by family, as validated ``TaskConfig`` objects.

    Reproducible: each family's draws come from a generator seeded with (``dist.seed``,
    ``spec.seed``, the family's name), so the same config gives identical configs (and, since
    every loader is a pure function of its config, identical data); another seed gives other
    tasks. A drawn setting that its family refuses (e.g. a range reaching past the allowed
    values) is a one-line EsperError naming the family spec.
    """
    if not isinstance(dist, TaskDistribution):
        dist = load_distribution(dist)
    tasks: list[TaskConfig] = []
    for index, spec in enumerate(dist.families):
        rng = np.random.default_rng([dist.seed, spec.seed, zlib.crc32(spec.family.encode())])
        for _ in range(spec.count):
            drawn = _draw_one(spec, rng)
            try:
                tasks.append(TaskConfig.model_validate(drawn))
            except ValidationError as err:
                first = err.errors()[0]
                where = "".join(f"{p}." for p in first["loc"])
                msg = first["msg"].removeprefix("Value error, ")
                raise EsperError(f"families[{index}] ({spec.family}): a drawn task is invalid: {where}{msg}") from None
    if not tasks:
        raise EsperError("the task distribution gives no tasks")
    return tasks


def load_distribution(source: Mapping[str, Any] | str | Path, key: str | None = None) -> TaskDistribution:
    """A TaskDistribution from a mapping or a YAML file (``key``: the entry of the file that holds
    it, e.g. ``train``); a one-line EsperError for anything that does not validate."""
    # Imported here: esper_ray.config imports this package.
    from esper_ray.config import read_yaml, validate_model

    where = "task distribution"
    if isinstance(source, str | Path):
        where = str(source)
        data: Any = read_yaml(source)
    else:
        data = source
    if key is not None:
        if not isinstance(data, Mapping) or key not in data:
            raise EsperError(f"{where}: no entry {key!r}")
        data, where = data[key], f"{where}: {key}"
    if not isinstance(data, Mapping):
        raise EsperError(f"{where}: expected a mapping with 'families'")
    return validate_model(TaskDistribution, dict(data), where)
