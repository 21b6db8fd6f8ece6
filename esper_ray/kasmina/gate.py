"""Gated blending: a seed that learns where it belongs, from the slot's input alone.

A gated blueprint (``BlueprintSpec.blend == "gated"``) multiplies its body by a learned
per-example gate ``g(h) = sigmoid(w . relu(W h + b) + c)`` that reads the slot's input ``h``,
so a gated seed computes ``seed_g(h) = h + g(h) * gamma * body(h) = h + g(h) * (seed(h) - h)``
(``seed`` the same blueprint ungated) and the slot's blend becomes

    out = lerp(h, seed_g(h), alpha) = h + g(h) * alpha * (seed(h) - h).

The gate is part of the seed's own spec and weights (a branch of its DAG ending in the node
``GATE_NODE``), so gradient isolation, the lifecycle, rollback, checkpoints and lineage treat a
gated seed exactly as any other: while isolated or blending the gate reads ``h.detach()`` as the
body does, and a gated seed's content hash says it is gated. ``g = 0`` leaves the host's output
bit-identical (``h + 0``); ``g = 1`` is the ungated blend.

No task identity is used at test time: the gate decides from the activation. What it learns
from is the run's business: the task loss alone opens it where the seed helps, and
``esper_ray.tolaria.continual.GateRehearsal`` adds a binary objective that also closes it on a
small bounded sample of the original task (``BoundedSample``).

The gate reads one vector per example, so a gated seed grows only in a vector slot ``(C,)``;
elsewhere germinating one is an ``EsperError`` (``check_gate_fits``).
"""

from __future__ import annotations

import torch
from torch import nn

from esper_ray.blueprints.builder import SeedModule
from esper_ray.blueprints.spec import GATE_NODE, BlueprintSpec, Node
from esper_ray.contracts import EsperError

DEFAULT_GATE_WIDTH = 16
MAX_GATE_WIDTH = 256
_PREFIX = "gate_"  # ids of the gate branch's hidden nodes; the body's ids must not collide


class GateShapeError(EsperError):
    """A gated blend asked of a slot whose activation the gate cannot read."""


def gated_blueprint(spec: BlueprintSpec, width: int = DEFAULT_GATE_WIDTH) -> BlueprintSpec:
    """The gated variant of a vector blueprint: its body times ``g(h)``, named ``<name>.gated``.

    ``width`` is the gate's hidden width (1..MAX_GATE_WIDTH). The body's nodes are unchanged,
    so the gated seed equals the ungated one whenever ``g = 1``.
    """
    if spec.blend == "gated":
        return spec
    if not 1 <= width <= MAX_GATE_WIDTH:
        raise EsperError(f"gate width {width} out of range [1, {MAX_GATE_WIDTH}]")
    if spec.kind != "vector":
        raise GateShapeError(f"blueprint {spec.name!r} is {spec.kind}: the gate reads vector blueprints only")
    ids = {n.id for n in spec.nodes}
    names = {"hidden": _PREFIX + "hidden", "act": _PREFIX + "act", "logit": _PREFIX + "logit", "out": _PREFIX + "out"}
    if clash := ids & {*names.values(), GATE_NODE}:
        raise EsperError(f"blueprint {spec.name!r} already has node(s) {sorted(clash)}")
    gate = (
        Node(id=names["hidden"], op="linear", inputs=("input",), args={"width": width}),
        Node(id=names["act"], op="act", inputs=(names["hidden"],), args={"fn": "relu"}),
        Node(id=names["logit"], op="linear", inputs=(names["act"],), args={"width": 1}),
        Node(id=GATE_NODE, op="act", inputs=(names["logit"],), args={"fn": "sigmoid"}),
        Node(id=names["out"], op="mul", inputs=(spec.nodes[-1].id, GATE_NODE)),
    )
    return BlueprintSpec(
        name=f"{spec.name}.gated"[:64],
        kind=spec.kind,
        nodes=spec.nodes + gate,
        blend="gated",
        origin=spec.origin,
        parents=(spec.content_hash,),
    )


def is_gated(seed: nn.Module | None) -> bool:
    """True for a built seed whose blueprint is gated."""
    return isinstance(seed, SeedModule) and seed.spec.blend == "gated"


def check_gate_fits(spec: BlueprintSpec, slot_name: str, shape: tuple[int, ...]) -> None:
    """GateShapeError (one line) unless a gated ``spec`` can read a slot of ``shape``."""
    if spec.blend == "gated" and len(shape) != 1:
        raise GateShapeError(
            f"slot {slot_name}: a gated blend reads one vector per example, but the slot's shape is "
            f"{tuple(shape)} (gated seeds grow in vector slots (C,) only)"
        )


def gate_logits(seed: SeedModule, h: torch.Tensor) -> torch.Tensor:
    """The gate's logit per example, shape (B,), for a gated seed on its slot's input ``h``
    (``sigmoid`` of it is ``g(h)``); only the gate's branch is computed."""
    spec = seed.spec
    if spec.blend != "gated":
        raise EsperError(f"blueprint {spec.name!r} is not gated")
    by_id = {n.id: n for n in spec.nodes}
    logit_id = by_id[GATE_NODE].inputs[0]
    values = {"input": h}

    def value(node_id: str) -> torch.Tensor:
        if node_id not in values:
            node = by_id[node_id]
            values[node_id] = seed.ops[node_id](*(value(i) for i in node.inputs))
        return values[node_id]

    return value(logit_id).reshape(h.shape[0])


def set_gate(seed: SeedModule, logit: float) -> None:
    """Pin the gate's output to ``sigmoid(logit)`` for every input (zero weights, that bias);
    for tests and reference runs: ``logit`` -inf closes it exactly, +inf opens it exactly."""
    by_id = {n.id: n for n in seed.spec.nodes}
    layer = seed.ops[by_id[GATE_NODE].inputs[0]]
    weight, bias = layer.weight, layer.bias
    assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor), "a gate's logit is a linear layer"
    with torch.no_grad():
        weight.zero_()
        bias.fill_(logit)
