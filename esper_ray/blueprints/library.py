"""Blueprints v0: the hand-written starting library (Karn breeds from these)."""

from __future__ import annotations

from esper_ray.blueprints.spec import BlueprintSpec, Node
from esper_ray.contracts import EsperError


def _spec(name: str, kind: str, *nodes: dict) -> BlueprintSpec:
    return BlueprintSpec(name=name, kind=kind, nodes=tuple(Node(**n) for n in nodes))


def _chain(*ops: tuple[str, dict]) -> list[dict]:
    """Nodes n0, n1, ... each reading the previous one."""
    nodes, prev = [], "input"
    for i, (op, args) in enumerate(ops):
        nodes.append({"id": f"n{i}", "op": op, "inputs": (prev,), "args": args})
        prev = f"n{i}"
    return nodes


def _squeeze_excitation(name: str, kind: str, reduced: int) -> BlueprintSpec:
    """Channel attention: x * sigmoid(W2 relu(W1 pool(x)))."""
    gate = _chain(
        ("pool", {}),
        ("linear", {"width": reduced}),
        ("act", {"fn": "relu"}),
        ("linear", {"width": None}),
        ("act", {"fn": "sigmoid"}),
    )
    return _spec(name, kind, *gate, {"id": "out", "op": "mul", "inputs": ("input", "n4")})


STANDARD_BLUEPRINTS: dict[str, BlueprintSpec] = {
    spec.name: spec
    for spec in (
        # Residual MLP: a wider nonlinear layer at the slot.
        _spec(
            "residual_mlp",
            "vector",
            *_chain(("linear", {"width": 64}), ("act", {"fn": "relu"}), ("linear", {"width": None})),
        ),
        # Low-rank adapter (LoRA-like): down to rank 4 and back up.
        _spec("lowrank", "vector", *_chain(("linear", {"width": 4}), ("linear", {"width": None}))),
        # Normalisation: a learned per-channel rescale of the normalised activation.
        _spec("norm", "vector", *_chain(("norm", {"groups": 1}))),
        # 1-D conv block: two 16-channel convs (kernel 5) and a projection back.
        _spec(
            "conv1d",
            "seq",
            *_chain(
                ("conv", {"width": 16, "kernel": 5}),
                ("act", {"fn": "relu"}),
                ("conv", {"width": 16, "kernel": 5}),
                ("act", {"fn": "relu"}),
                ("linear", {"width": None}),
            ),
        ),
        # 2-D conv block.
        _spec(
            "conv2d",
            "image",
            *_chain(
                ("conv", {"width": 16, "kernel": 3}),
                ("act", {"fn": "relu"}),
                ("conv", {"width": None, "kernel": 3}),
            ),
        ),
        # Depthwise separable 2-D conv.
        _spec(
            "dwconv2d",
            "image",
            *_chain(
                ("conv", {"width": None, "kernel": 3, "groups": None}),
                ("act", {"fn": "gelu"}),
                ("linear", {"width": None}),
            ),
        ),
        _squeeze_excitation("se1d", "seq", reduced=4),
        _squeeze_excitation("se2d", "image", reduced=4),
    )
}


# Blueprints for a transformer's residual stream (a token slot, (B, T, D); see spec.py). Kept apart
# from STANDARD_BLUEPRINTS, the default catalogue of the MLP and CNN hosts; a config names them in
# ``blueprints.names`` and ``MorphoHost.germinate`` takes their names (``named_blueprint``).
TRANSFORMER_BLUEPRINTS: dict[str, BlueprintSpec] = {
    spec.name: spec
    for spec in (
        # Low-rank residual adapter (LoRA-like on the residual stream): down to rank 8 and back up,
        # the same at every position.
        _spec("adapter8", "vector", *_chain(("linear", {"width": 8}), ("linear", {"width": None}))),
        # MLP expansion: a pre-norm feed-forward block of width 128 beside the host's own.
        _spec(
            "mlp_expand",
            "vector",
            *_chain(
                ("norm", {"groups": 1}),
                ("linear", {"width": 128}),
                ("act", {"fn": "gelu"}),
                ("linear", {"width": None}),
            ),
        ),
        # An extra attention block: pre-norm causal self-attention with one head over the stream.
        _spec("attn_head", "seq", *_chain(("norm", {"groups": 1}), ("attn", {"heads": 1}))),
        # Normalisation of the stream (LayerNorm over D) with its learned scale and shift.
        _spec("tok_norm", "vector", *_chain(("norm", {"groups": 1}))),
    )
}


def named_blueprint(name: str) -> BlueprintSpec:
    """The standard or transformer blueprint called ``name``; EsperError naming the known ones."""
    if name in STANDARD_BLUEPRINTS:
        return STANDARD_BLUEPRINTS[name]
    if name in TRANSFORMER_BLUEPRINTS:
        return TRANSFORMER_BLUEPRINTS[name]
    known = ", ".join(sorted({**STANDARD_BLUEPRINTS, **TRANSFORMER_BLUEPRINTS}))
    raise EsperError(f"unknown blueprint {name!r} (known: {known})")
