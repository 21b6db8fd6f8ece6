"""Numbers that describe a blueprint spec and the slot it grew in, for Karn's reward model.

Spec features are measured on the kind's first reference shape
(``generator.REFERENCE_SHAPES``), so a spec has one feature vector whatever slot it
later lands in; the slot is described separately by a :class:`SlotContext`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from esper_ray.blueprints.builder import count_params
from esper_ray.blueprints.spec import ACTIVATIONS, BlueprintSpec
from esper_ray.contracts import FieldReport
from esper_ray.karn.generator import KINDS, REFERENCE_SHAPES
from esper_ray.karn.genome import INPUT, channels, from_spec, view_of

SPEC_FEATURES: tuple[str, ...] = (
    *(f"kind_{k}" for k in KINDS),
    "n_linear",
    "n_conv",
    *(f"n_act_{fn}" for fn in ACTIVATIONS),
    "n_norm",
    "n_pool",
    "n_add",
    "n_mul",
    "n_depthwise",
    "depth",  # longest path from the input to the output, in nodes
    "n_nodes",
    "log_total_width",  # log2(1 + sum of the output channels of linear and conv nodes)
    "log_min_width",  # log2 of the narrowest linear/conv output (the bottleneck)
    "max_kernel",
    "log_params",  # log10(1 + parameters) at the reference shape
    "has_gate",
    "has_residual",
)
# Continuous spec features whose squares the reward model also sees (optima inside a range).
SQUARED_FEATURES: tuple[str, ...] = ("log_params", "log_total_width", "depth")

CONTEXT_FEATURES: tuple[str, ...] = (*(f"slot_{k}" for k in KINDS), "log_slot_width", "accuracy_before")

# Which slot kinds a spec kind can grow in (vector specs mix channels at every position).
FITS: dict[str, tuple[str, ...]] = {"vector": KINDS, "seq": ("vector", "seq"), "image": ("image",)}


@dataclass(frozen=True)
class SlotContext:
    """Where a seed grows: the slot's kind and channel count, and the host's accuracy then."""

    kind: str
    width: int
    accuracy_before: float = 0.5

    @classmethod
    def of(cls, report: FieldReport) -> SlotContext:
        # Rounded so that contexts from many reports of one slot collapse into one.
        return cls(report.slot_kind, int(report.slot_width), round(float(report.accuracy_before), 2))

    def features(self) -> np.ndarray:
        one_hot = [float(self.kind == k) for k in KINDS]
        return np.array([*one_hot, math.log2(max(self.width, 1)) / 8.0, self.accuracy_before])


# The slot a spec is assumed to meet when no field report has shown a real one yet.
DEFAULT_CONTEXTS: dict[str, SlotContext] = {
    "vector": SlotContext("vector", 64),
    "seq": SlotContext("seq", 16),
    "image": SlotContext("image", 16),
}


def fits_slot(spec_kind: str, slot_kind: str) -> bool:
    """Whether a ``spec_kind`` blueprint can be grafted in a ``slot_kind`` slot."""
    return slot_kind in FITS.get(spec_kind, ())


def spec_features(spec: BlueprintSpec) -> np.ndarray:
    """The ``SPEC_FEATURES`` vector of ``spec`` (float64)."""
    genes = from_spec(spec)
    shape = REFERENCE_SHAPES[spec.kind][0]
    view = view_of(spec.kind, shape)
    chans = channels(genes, view) or [view.channels] * len(genes)
    ops = [g.op for g in genes]
    fns = [g.arg("fn") for g in genes if g.op == "act"]
    mixer_widths = [c for g, c in zip(genes, chans, strict=True) if g.op in ("linear", "conv")]
    depth: list[int] = []
    for g in genes:
        depth.append(1 + max(0 if j == INPUT else depth[j] for j in g.inputs))
    try:
        params = count_params(spec, shape)
    except Exception:  # a spec that does not build here still gets features; params unknown
        params = 0
    values = {
        **{f"kind_{k}": float(spec.kind == k) for k in KINDS},
        "n_linear": ops.count("linear"),
        "n_conv": ops.count("conv"),
        **{f"n_act_{fn}": fns.count(fn) for fn in ACTIVATIONS},
        "n_norm": ops.count("norm"),
        "n_pool": ops.count("pool"),
        "n_add": ops.count("add"),
        "n_mul": ops.count("mul"),
        "n_depthwise": sum(1 for g in genes if g.op == "conv" and g.arg("groups") is None),
        "depth": depth[-1],
        "n_nodes": len(genes),
        "log_total_width": math.log2(1 + sum(mixer_widths)),
        "log_min_width": math.log2(min(mixer_widths, default=view.channels)),
        "max_kernel": max((g.arg("kernel") for g in genes if g.op == "conv"), default=0),
        "log_params": math.log10(1 + params),
        "has_gate": float("mul" in ops),
        "has_residual": float("add" in ops),
    }
    return np.array([float(values[name]) for name in SPEC_FEATURES])
