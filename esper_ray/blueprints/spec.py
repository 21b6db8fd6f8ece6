"""The blueprint genome: a declarative, JSON-serialisable, content-hashed spec of a seed.

A blueprint is a small DAG of typed operations over one tensor, the host activation
at a slot. The builder (``builder.py``) turns it into an ``nn.Module`` computing

    seed(h) = h + gamma * body(h)

with ``gamma`` a per-channel scale initialised to zero, so every seed is
function-preserving when born whatever its body. Specs never carry code: only op
names from a closed vocabulary and numbers, so a spec from shared storage is safe
to load.

Kinds say which view of the activation the body works on:

- ``vector``: (B, C); channel-mixing ops only. On a spatial slot it mixes channels
  at every position (as 1x1 convolutions).
- ``seq``: (B, C, L); on a vector slot of width D it sees (B, 1, D).
- ``image``: (B, C, H, W); fits only image slots.

A transformer's residual stream is a ``tokens`` slot, (B, T, D) with channels last: a ``vector``
blueprint mixes channels at each position (linear, LayerNorm), and a ``seq`` blueprint may also
use ``attn`` (causal self-attention over the positions). Ops that look at later positions
(``conv``, ``pool``) do not fit a tokens slot: they would break causality.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import cached_property
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

BlueprintKind = Literal["vector", "seq", "image"]

# Closed vocabulary: op name -> the argument names it accepts (with defaults).
OP_ARGS: dict[str, dict[str, Any]] = {
    "linear": {"width": None},  # channel mixing; width None = the input's channels
    "conv": {"width": None, "kernel": 3, "groups": 1},  # 'same' padding; groups null = depthwise
    "act": {"fn": "relu"},
    "norm": {"groups": 1},  # LayerNorm on vectors, GroupNorm on spatial views
    "pool": {},  # global average over spatial positions, keeps dims for broadcasting
    "add": {},
    "mul": {},
    "attn": {"heads": 1},  # causal multi-head self-attention; tokens slots only
}
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "silu")
ARITY = {"add": 2, "mul": 2}
# Arguments whose null has a meaning: width null = the input's channels; conv groups null = depthwise.
_NULLABLE = {("linear", "width"): True, ("conv", "width"): True, ("conv", "groups"): True}
MAX_WIDTH = 4096
MAX_KERNEL = 15
MAX_NODES = 64
GATE_NODE = "gate"  # a gated blueprint's gate: sigmoid of a width-1 linear (see BlueprintSpec.blend)


class Node(BaseModel):
    """One operation of the body: ``op`` applied to the outputs of ``inputs``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    op: str
    inputs: tuple[str, ...] = ("input",)
    # Strict types: a JSON ``true`` must not slip in as width 1 through lax coercion.
    args: dict[str, StrictInt | StrictFloat | StrictStr | None] = Field(default_factory=dict)

    @field_validator("op")
    @classmethod
    def _known_op(cls, op: str) -> str:
        if op not in OP_ARGS:
            raise ValueError(f"unknown op {op!r} (known: {', '.join(OP_ARGS)})")
        return op

    @model_validator(mode="after")
    def _check_args(self) -> Node:
        allowed = OP_ARGS[self.op]
        unknown = set(self.args) - set(allowed)
        if unknown:
            raise ValueError(f"node {self.id}: op {self.op} takes no argument {sorted(unknown)}")
        want = ARITY.get(self.op, 1)
        if len(self.inputs) != want:
            raise ValueError(f"node {self.id}: op {self.op} takes {want} input(s), got {len(self.inputs)}")
        for name in ("width", "kernel", "groups", "heads"):
            value = self.args.get(name)
            if value is None and name in self.args and not _NULLABLE.get((self.op, name)):
                raise ValueError(f"node {self.id}: {name} of {self.op} cannot be null")
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"node {self.id}: {name} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"node {self.id}: {name} must be >= 1, got {value}")
        # Both are integers here when present (checked just above).
        if isinstance(w := self.args.get("width"), int) and w > MAX_WIDTH:
            raise ValueError(f"node {self.id}: width {w} is over the limit {MAX_WIDTH}")
        if isinstance(k := self.args.get("kernel"), int) and (k > MAX_KERNEL or k % 2 == 0):
            raise ValueError(f"node {self.id}: kernel must be odd and <= {MAX_KERNEL}, got {k}")
        if self.op == "act" and self.args.get("fn", "relu") not in ACTIVATIONS:
            raise ValueError(f"node {self.id}: unknown activation {self.args.get('fn')!r}")
        return self

    def arg(self, name: str) -> Any:
        """The argument's value, or the op's default."""
        return self.args.get(name, OP_ARGS[self.op][name])


class BlueprintSpec(BaseModel):
    """A seed's architecture: a named DAG of ops whose last node is the body's output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    kind: BlueprintKind
    nodes: tuple[Node, ...] = Field(min_length=1, max_length=MAX_NODES)
    # How the slot mixes the seed in. "lerp": ``lerp(h, seed(h), alpha)``. "gated": the body is
    # multiplied by a learned per-example gate ``g(h)`` (node GATE_NODE, a sigmoid of a width-1
    # linear), so the seed adds ``g(h) * alpha * (seed(h) - h)``: see ``esper_ray.kasmina.gate``.
    blend: Literal["lerp", "gated"] = "lerp"
    origin: str = "hand"  # "hand" | "karn" | ...; metadata, not hashed
    parents: tuple[str, ...] = ()  # content hashes of the specs this one came from; not hashed

    @model_validator(mode="after")
    def _check_graph(self) -> BlueprintSpec:
        seen = {"input"}
        for node in self.nodes:
            if node.id in seen:
                raise ValueError(f"duplicate node id {node.id!r}")
            for src in node.inputs:
                if src == node.id or src not in seen:
                    # Nodes are listed in topological order; a reference to itself or to a
                    # later node is how a cycle shows up in this encoding.
                    raise ValueError(f"node {node.id} reads {src!r}: cycle or undefined input")
            if self.kind == "vector" and node.op in ("conv", "pool", "attn"):
                raise ValueError(f"node {node.id}: op {node.op} needs a seq or image blueprint")
            seen.add(node.id)
        if self.blend == "gated":
            self._check_gate()
        return self

    def _check_gate(self) -> None:
        """A gated spec: vector kind, a node GATE_NODE = sigmoid(linear of width 1) that the last
        node (a ``mul``) takes as one of its inputs."""
        if self.kind != "vector":
            raise ValueError(f"a gated blend needs a vector blueprint (the gate reads one vector), got {self.kind}")
        by_id = {n.id: n for n in self.nodes}
        gate = by_id.get(GATE_NODE)
        if gate is None or gate.op != "act" or gate.arg("fn") != "sigmoid":
            raise ValueError(f"a gated blueprint needs a node {GATE_NODE!r}: act with fn sigmoid")
        logit = by_id.get(gate.inputs[0])
        if logit is None or logit.op != "linear" or logit.arg("width") != 1:
            raise ValueError(f"the gate node {GATE_NODE!r} must read a linear of width 1 (its logit)")
        last = self.nodes[-1]
        if last.op != "mul" or GATE_NODE not in last.inputs:
            raise ValueError(f"a gated blueprint's last node must be a mul of the body and {GATE_NODE!r}")

    @cached_property
    def content_hash(self) -> str:
        """SHA-256 over what determines the built module (kind and nodes), not the name."""
        body: dict[str, Any] = {"kind": self.kind, "nodes": [n.model_dump(mode="json") for n in self.nodes]}
        if self.blend != "lerp":  # only then: the hashes of every lerp spec stay what they were
            body["blend"] = self.blend
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> BlueprintSpec:
        """A validated copy (pydantic's own would skip validation and keep the cached hash)."""
        return type(self).model_validate({**self.model_dump(), **(update or {})})

    @property
    def short_hash(self) -> str:
        return self.content_hash[:12]

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> BlueprintSpec:
        return cls.model_validate_json(text)
