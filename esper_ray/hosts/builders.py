"""The host families: MLP, 1-D CNN, 2-D CNN and a decoder-only transformer, each with seed slots
between blocks."""

from __future__ import annotations

import math

from torch import nn

from esper_ray.contracts import EsperError
from esper_ray.hosts.base import HostConfig, MorphoHost
from esper_ray.hosts.transformer import build_transformer
from esper_ray.kasmina.lifecycle import LifecycleConfig


def _mlp(cfg: HostConfig, input_shape: tuple[int, ...], num_classes: int) -> tuple[list, nn.Module]:
    width = math.prod(input_shape)
    blocks: list[nn.Module] = []
    for i, w in enumerate(cfg.hidden):
        layers: list[nn.Module] = [nn.Flatten()] if i == 0 and len(input_shape) > 1 else []
        blocks.append(nn.Sequential(*layers, nn.Linear(width, w), nn.ReLU()))
        width = w
    return blocks, nn.Linear(width, num_classes)


def _cnn(cfg: HostConfig, input_shape: tuple[int, ...], num_classes: int, dims: int) -> tuple[list, nn.Module]:
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if dims == 1 else (nn.Conv2d, nn.MaxPool2d)
    # A 1-D CNN accepts flat vectors (MNIST-1D) as one channel; a 2-D CNN needs (C, H, W).
    if dims == 1 and len(input_shape) == 1:
        channels, spatial = 1, list(input_shape)
        lead: list[nn.Module] = [nn.Unflatten(1, (1, input_shape[0]))]
    elif len(input_shape) == dims + 1:
        channels, spatial = input_shape[0], list(input_shape[1:])
        lead = []
    else:
        raise EsperError(f"a cnn{dims}d host cannot take inputs of shape {input_shape}")
    blocks: list[nn.Module] = []
    for i, c in enumerate(cfg.hidden):
        layers = [
            *(lead if i == 0 else []),
            conv(channels, c, cfg.kernel, padding=cfg.kernel // 2),
            nn.ReLU(),
        ]
        if cfg.pool and min(spatial) >= 4:
            layers.append(pool(2))
            spatial = [s // 2 for s in spatial]
        blocks.append(nn.Sequential(*layers))
        channels = c
    head = nn.Sequential(nn.Flatten(), nn.Linear(channels * math.prod(spatial), num_classes))
    return blocks, head


def build_host(
    cfg: HostConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    lifecycle: LifecycleConfig | None = None,
) -> MorphoHost:
    """Build the host ``cfg`` describes for inputs of ``input_shape`` (no batch dim)."""
    if cfg.kind == "transformer":
        return build_transformer(cfg, input_shape, num_classes, lifecycle)
    if cfg.kind == "mlp":
        blocks, head = _mlp(cfg, input_shape, num_classes)
    else:
        blocks, head = _cnn(cfg, input_shape, num_classes, dims=1 if cfg.kind == "cnn1d" else 2)
    return MorphoHost(blocks, head, input_shape, slots=cfg.slots, lifecycle=lifecycle)
