"""Spec -> nn.Module: the only place a blueprint becomes code, from a closed op vocabulary."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esper_ray.blueprints.spec import BlueprintSpec, Node
from esper_ray.contracts import EsperError


class BlueprintShapeError(EsperError):
    """A blueprint's shapes do not fit the slot it was asked to grow in."""


class TokenShape(tuple):
    """The shape ``(T, D)`` of a token-stream slot (a transformer's residual stream): positions
    first, channels last, and causal, so only blueprints that never look at a later position fit.
    A plain ``(C, L)`` tuple is a channels-first ``seq`` slot instead; this type is what tells them
    apart wherever a slot's shape goes (building, counting, contract checks)."""

    def __new__(cls, shape: tuple[int, int] | list[int]) -> TokenShape:
        values = tuple(int(v) for v in shape)
        if len(values) != 2:
            raise ValueError(f"a token slot shape is (T, D), got {values}")
        return super().__new__(cls, values)


def slot_kind(shape: tuple[int, ...]) -> str:
    """The kind of a slot from its activation shape without batch: (C,), (C, L), (C, H, W), or
    ``tokens`` for a :class:`TokenShape`."""
    if isinstance(shape, TokenShape):
        return "tokens"
    return {1: "vector", 2: "seq", 3: "image"}[len(shape)]


def slot_channels(shape: tuple[int, ...]) -> int:
    """A slot's channel count: ``D`` of a token slot, the first entry of any other shape."""
    return shape[-1] if isinstance(shape, TokenShape) else shape[0]


@dataclass(frozen=True)
class _View:
    """How a blueprint sees a slot's activation: channels, spatial rank, and a reshape."""

    channels: int
    spatial_rank: int  # 0 for vectors, 1 for sequences, 2 for images
    unsqueeze: bool  # a seq blueprint on a vector slot sees (B, 1, D)
    tokens: bool = False  # (B, T, D), channels last and causal: linears and norms act on D


def _view_for(spec: BlueprintSpec, shape: tuple[int, ...]) -> _View:
    kind = slot_kind(shape)
    channels = shape[0]
    if kind == "tokens" and spec.kind in ("vector", "seq"):
        return _View(shape[1], 0, unsqueeze=False, tokens=True)
    if spec.kind == "vector":
        return _View(channels, len(shape) - 1, unsqueeze=False)
    if spec.kind == "seq" and kind == "vector":
        return _View(1, 1, unsqueeze=True)
    if spec.kind == "seq" and kind == "seq":
        return _View(channels, 1, unsqueeze=False)
    if spec.kind == "image" and kind == "image":
        return _View(channels, 2, unsqueeze=False)
    raise BlueprintShapeError(f"blueprint {spec.name!r} ({spec.kind}) does not fit a {kind} slot of shape {shape}")


class _Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _Mul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class _GlobalPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
}


def _channel_mixer(c_in: int, c_out: int, spatial_rank: int) -> nn.Module:
    if spatial_rank == 0:
        return nn.Linear(c_in, c_out)
    conv = nn.Conv1d if spatial_rank == 1 else nn.Conv2d
    return conv(c_in, c_out, kernel_size=1)


def _make_op(node: Node, in_channels: list[int], view: _View) -> tuple[nn.Module, int]:
    """Build one node's module; return it with its output channel count."""
    where = f"node {node.id} ({node.op})"
    if node.op in ("conv", "pool") and view.tokens:
        raise BlueprintShapeError(f"{where} sees later positions: it does not fit a causal token slot")
    return _OP_BUILDERS.get(node.op, _merge_op)(node, in_channels, view, where)


def _linear_op(node: Node, in_channels: list[int], view: _View, where: str) -> tuple[nn.Module, int]:
    width = node.arg("width") or view.channels
    return _channel_mixer(in_channels[0], width, view.spatial_rank), width


def _attn_op(node: Node, in_channels: list[int], view: _View, where: str) -> tuple[nn.Module, int]:
    c_in, heads = in_channels[0], node.arg("heads")
    if not view.tokens:
        raise BlueprintShapeError(f"{where} needs a token slot (B, T, D)")
    if c_in % heads:
        raise BlueprintShapeError(f"{where}: {heads} heads must divide {c_in} channels")
    return CausalSelfAttention(c_in, heads), c_in


def _conv_op(node: Node, in_channels: list[int], view: _View, where: str) -> tuple[nn.Module, int]:
    if view.spatial_rank == 0:
        raise BlueprintShapeError(f"{where} needs a spatial view")
    c_in = in_channels[0]
    width, kernel = node.arg("width") or view.channels, node.arg("kernel")
    groups = node.arg("groups") or c_in  # groups null = depthwise
    if c_in % groups or width % groups:
        raise BlueprintShapeError(f"{where}: groups {groups} must divide {c_in} and {width}")
    conv = nn.Conv1d if view.spatial_rank == 1 else nn.Conv2d
    return conv(c_in, width, kernel, padding=kernel // 2, groups=groups), width


def _act_op(node: Node, in_channels: list[int], view: _View, where: str) -> tuple[nn.Module, int]:
    return _ACTIVATIONS[node.arg("fn")](), in_channels[0]


def _norm_op(node: Node, in_channels: list[int], view: _View, where: str) -> tuple[nn.Module, int]:
    c_in, groups = in_channels[0], node.arg("groups")
    if view.spatial_rank == 0:
        if groups != 1:
            raise BlueprintShapeError(f"{where}: a vector norm takes groups=1")
        return nn.LayerNorm(c_in), c_in
    if c_in % groups:
        raise BlueprintShapeError(f"{where}: groups {groups} must divide {c_in} channels")
    return nn.GroupNorm(groups, c_in), c_in


def _pool_op(node: Node, in_channels: list[int], view: _View, where: str) -> tuple[nn.Module, int]:
    return _GlobalPool(), in_channels[0]


def _merge_op(node: Node, in_channels: list[int], view: _View, where: str) -> tuple[nn.Module, int]:
    """add / mul: channels must agree, or one side is a single channel that broadcasts."""
    a, b = in_channels
    if a != b and 1 not in (a, b):
        raise BlueprintShapeError(f"{where}: inputs have {a} and {b} channels")
    return (_Add() if node.op == "add" else _Mul()), max(a, b)


_OP_BUILDERS: dict[str, Callable[[Node, list[int], _View, str], tuple[nn.Module, int]]] = {
    "linear": _linear_op,
    "attn": _attn_op,
    "conv": _conv_op,
    "act": _act_op,
    "norm": _norm_op,
    "pool": _pool_op,
}


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over (B, T, D) where position t reads positions <= t only."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class SeedModule(nn.Module):
    """A built blueprint: ``seed(h) = h + gamma * body(h)`` with ``gamma`` zero at birth."""

    def __init__(self, spec: BlueprintSpec, slot_shape: tuple[int, ...]):
        super().__init__()
        self.spec_json = spec.to_json()
        self.blueprint_hash = spec.content_hash
        # A TokenShape stays one: the slot's kind rides on its shape's type.
        self.slot_shape = slot_shape if isinstance(slot_shape, TokenShape) else tuple(slot_shape)
        view = _view_for(spec, self.slot_shape)
        self._unsqueeze = view.unsqueeze
        channels = {"input": view.channels}
        self.ops = nn.ModuleDict()
        self._plan: list[tuple[str, tuple[str, ...]]] = []
        for node in spec.nodes:
            # A pooled tensor is (B, C, 1, ...), so channel mixing on it stays a 1x1 conv.
            op, channels[node.id] = _make_op(node, [channels[i] for i in node.inputs], view)
            self.ops[node.id] = op
            self._plan.append((node.id, node.inputs))
        out_id = spec.nodes[-1].id
        if channels[out_id] != view.channels:
            raise BlueprintShapeError(
                f"blueprint {spec.name!r}: body ends with {channels[out_id]} channels but the "
                f"slot's view has {view.channels} (end with a linear of width null)"
            )
        self._out = out_id
        self.gamma = nn.Parameter(torch.zeros(view.channels))
        self._gamma_shape = (1, view.channels) + (1,) * view.spatial_rank

    @property
    def vector_as_sequence(self) -> bool:
        """Whether this seed sees its vector slot as a one-position sequence ``(B, 1, D)`` (a seq
        blueprint on a vector slot)."""
        return self._unsqueeze

    def body(self, h: torch.Tensor) -> torch.Tensor:
        """The seed's own computation before the zero-initialised scale."""
        values = {"input": h.unsqueeze(1) if self._unsqueeze else h}
        for node_id, inputs in self._plan:
            values[node_id] = self.ops[node_id](*(values[i] for i in inputs))
        return values[self._out]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.body(h) * self.gamma.view(self._gamma_shape)
        if self._unsqueeze:
            delta = delta.squeeze(1)
        return h + delta

    @property
    def spec(self) -> BlueprintSpec:
        return BlueprintSpec.from_json(self.spec_json)


def count_params(spec: BlueprintSpec, slot_shape: tuple[int, ...]) -> int:
    """Trainable parameters of ``spec`` in a slot, counted without allocating weights."""
    with torch.device("meta"):
        module = SeedModule(spec, slot_shape)
    return sum(p.numel() for p in module.parameters())


def build_seed(
    spec: BlueprintSpec,
    slot_shape: tuple[int, ...],
    *,
    max_params: int | None = None,
    generator_seed: int | None = None,
) -> SeedModule:
    """Build ``spec`` for a slot of ``slot_shape`` (no batch dim).

    Raises BlueprintShapeError when it does not fit and EsperError when it is over
    ``max_params``; the count is taken on the meta device first, so an absurd spec
    never allocates.
    """
    params = count_params(spec, slot_shape)
    if max_params is not None and params > max_params:
        raise EsperError(
            f"blueprint {spec.name!r} has {params:,} parameters in a slot of shape "
            f"{tuple(slot_shape)}, over the budget of {max_params:,}"
        )
    if generator_seed is None:
        return SeedModule(spec, slot_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        return SeedModule(spec, slot_shape)


def flops_per_example(module: SeedModule) -> int:
    """Multiply-accumulates of one forward pass per example (convs and linears only)."""
    total = 0
    positions = math.prod(module.slot_shape[1:]) if not module.vector_as_sequence else module.slot_shape[0]
    if isinstance(module.slot_shape, TokenShape):  # every op runs at each of the T positions
        seq_len, width = module.slot_shape
        for op in module.ops.values():
            if isinstance(op, CausalSelfAttention):  # scores and mixing: about T/2 keys per query
                total += seq_len * width * (seq_len + 1)
        linear = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
        return total + seq_len * linear
    for op in module.ops.values():
        if isinstance(op, nn.Linear):
            total += op.in_features * op.out_features
        elif isinstance(op, nn.Conv1d | nn.Conv2d):
            per_pos = op.in_channels // op.groups * op.out_channels * math.prod(op.kernel_size)
            total += per_pos * positions
    return total
