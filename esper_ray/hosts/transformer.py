"""A decoder-only transformer host: byte embedding, pre-norm blocks, seed slots on the residual stream.

The host is a :class:`~esper_ray.hosts.base.MorphoHost` whose blocks are the embedding (token +
learned position) and ``len(hidden)`` pre-norm transformer blocks::

    x = x + attn(ln1(x));  x = x + mlp(ln2(x))     # attn: causal, F.scaled_dot_product_attention

and whose head is ``LayerNorm`` then a linear read-out to one logit per byte value. Its slots sit
on the residual stream, ``(B, T, D)``: ``hidden0`` after the embedding and ``hidden{i + 1}`` after
block ``i``. Their shapes are :class:`~esper_ray.blueprints.builder.TokenShape` ``(T, D)`` (kind
``tokens``): a seed there acts on every position alone (``vector`` blueprints: adapters, MLPs,
norms) or attends causally (``attn``), so a grown host stays causal. The input (byte values,
as float32 like every task's inputs) has no slot.

Inputs are ``(B, T)`` byte values with ``T <= context``; outputs are logits ``(B, T, vocab)``
predicting the byte after each position. Lifecycle, isolation, blending, checkpoints and lineage
are MorphoHost's, unchanged. :class:`PlainTransformer` is the same network without any slot
machinery (the reference the dormant host must equal bit for bit, and the overhead baseline).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from esper_ray.blueprints.builder import CausalSelfAttention, TokenShape
from esper_ray.contracts import EsperError
from esper_ray.hosts.base import HostConfig, MorphoHost, slot_names
from esper_ray.kasmina.lifecycle import LifecycleConfig

INIT_STD = 0.02
"""Standard deviation of the normal initialisation of every linear and embedding weight (GPT-2's)."""


class ByteEmbedding(nn.Module):
    """Token ids (given as float byte values or integers) -> token + learned position embedding."""

    def __init__(self, vocab: int, context: int, width: int):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.context:
            raise EsperError(f"a sequence of {t} tokens is longer than the transformer's context of {self.context}")
        return self.tok(x.long()) + self.pos[:t]


class TransformerBlock(nn.Module):
    """Pre-norm block: causal self-attention and a GELU MLP, each added to the residual stream."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, ByteEmbedding):
        nn.init.normal_(module.pos, 0.0, INIT_STD)


def transformer_parts(cfg: HostConfig, input_shape: tuple[int, ...], vocab: int) -> tuple[list[nn.Module], nn.Module]:
    """The blocks (embedding first) and head of the transformer ``cfg`` describes, initialised."""
    if len(input_shape) != 1:
        raise EsperError(f"a transformer host takes token sequences (T,), not inputs of shape {tuple(input_shape)}")
    if input_shape[0] > cfg.context:
        raise EsperError(
            f"the task's sequences have {input_shape[0]} tokens, more than the transformer's context of "
            f"{cfg.context} (host.context)"
        )
    width = cfg.hidden[0]
    blocks: list[nn.Module] = [ByteEmbedding(vocab, cfg.context, width)]
    blocks += [TransformerBlock(width, cfg.heads, cfg.mlp_ratio) for _ in cfg.hidden]
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocab))
    for part in [*blocks, head]:
        part.apply(_init)
    return blocks, head


class TransformerHost(MorphoHost):
    """MorphoHost over a transformer: its slot shapes past the input are token shapes ``(T, D)``."""

    def _boundary_shapes(self) -> list[tuple[int, ...]]:
        shapes = super()._boundary_shapes()
        return [shapes[0], *(TokenShape((s[0], s[1])) for s in shapes[1:])]


def build_transformer(
    cfg: HostConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    lifecycle: LifecycleConfig | None = None,
) -> TransformerHost:
    """The transformer host for sequences of ``input_shape = (T,)`` over ``num_classes`` byte values."""
    blocks, head = transformer_parts(cfg, input_shape, num_classes)
    positions = slot_names(len(blocks))
    if cfg.slots == "all":
        slots = positions[1:]
    else:
        slots = list(cfg.slots)
        if "input" in slots:
            raise EsperError(
                f"a transformer's input is token ids and has no slot; its slots are {', '.join(positions[1:])}"
            )
    return TransformerHost(blocks, head, input_shape, slots=slots, lifecycle=lifecycle)


class PlainTransformer(nn.Module):
    """The same network as a dormant :class:`TransformerHost`, with no slots: ``blocks`` and ``head``
    carry the same parameter names, so ``load_state_dict(host.host_state_dict())`` fits."""

    def __init__(self, cfg: HostConfig, input_shape: tuple[int, ...], vocab: int):
        super().__init__()
        blocks, head = transformer_parts(cfg, input_shape, vocab)
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def bits_per_byte(nats_per_token: float) -> float:
    """Mean cross-entropy in nats per byte -> bits per byte."""
    return nats_per_token / math.log(2.0)
