"""Numeric features of a blueprint, so a controller can judge blueprints it never saw."""

from __future__ import annotations

import math

from esper_ray.blueprints.builder import BlueprintShapeError, count_params
from esper_ray.blueprints.spec import BlueprintSpec

KINDS = ("vector", "seq", "image")
_OPS = ("linear", "conv", "act", "norm", "pool", "add", "mul")

#: Names of the entries of ``blueprint_features``, in order.
FEATURE_NAMES: tuple[str, ...] = (
    *(f"kind_{k}" for k in KINDS),
    *(f"n_{op}" for op in _OPS),
    "depth",
    "log_params",
    "fits",
    "max_kernel",
    "log_width",
)


def blueprint_features(spec: BlueprintSpec, slot_shape: tuple[int, ...] | None = None) -> list[float]:
    """Kind one-hot, op counts, depth, cost in ``slot_shape`` (0 and fits=0 if it does not fit).

    Values are scaled to roughly [0, 1] for a policy network's input.
    """
    counts = {op: 0 for op in _OPS}
    for node in spec.nodes:
        if node.op in counts:  # attn (token slots only) has no column: the layout is the policies' input
            counts[node.op] += 1
    params, fits = 0, 1.0
    if slot_shape is not None:
        try:
            params = count_params(spec, slot_shape)
        except BlueprintShapeError:
            fits = 0.0
    widths = [int(w) for n in spec.nodes if isinstance(w := n.args.get("width"), int | float) and w]
    kernels = [int(k) for n in spec.nodes if isinstance(k := n.args.get("kernel"), int | float) and k]
    return [
        *(1.0 if spec.kind == k else 0.0 for k in KINDS),
        *(min(counts[op], 8) / 4.0 for op in _OPS),
        len(spec.nodes) / 8.0,
        math.log10(1 + params) / 5.0,
        fits,
        max(kernels, default=0) / 15.0,
        math.log2(1 + max(widths, default=0)) / 12.0,
    ]
