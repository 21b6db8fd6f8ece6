"""Optimizer bookkeeping: one param group per seed, and host-state snapshots for rollback.

The host's Adam state (moments, step counts) belongs to the host's parameters; a
seed joining or leaving the optimizer never touches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

HOST_GROUP = "host"


def seed_group_name(slot: str) -> str:
    return f"seed:{slot}"


def add_seed_group(opt: torch.optim.Optimizer, slot: str, seed: nn.Module, lr: float) -> None:
    """The seed's parameters join ``opt`` as their own param group."""
    opt.add_param_group({"params": list(seed.parameters()), "lr": lr, "name": seed_group_name(slot)})


def remove_seed_group(opt: torch.optim.Optimizer, slot: str) -> None:
    """The seed's group and its optimizer state leave ``opt``; other groups are untouched."""
    name = seed_group_name(slot)
    keep = []
    for group in opt.param_groups:
        if group.get("name") == name:
            for p in group["params"]:
                opt.state.pop(p, None)
        else:
            keep.append(group)
    opt.param_groups[:] = keep


def group_names(opt: torch.optim.Optimizer) -> list[str]:
    return [g.get("name", "") for g in opt.param_groups]


@dataclass
class HostSnapshot:
    """Host weights and the host group's optimizer state at one moment."""

    weights: dict[str, torch.Tensor]
    opt_state: list[dict[str, torch.Tensor]]  # per host parameter, in group order


def _clone_state(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def take_host_snapshot(host, opt: torch.optim.Optimizer) -> HostSnapshot:
    params = opt.param_groups[0]["params"]
    return HostSnapshot(host.host_state_dict(), [_clone_state(opt.state.get(p, {})) for p in params])


def restore_host_snapshot(host, opt: torch.optim.Optimizer, snap: HostSnapshot) -> None:
    """Put the host's weights and its optimizer state back exactly as they were."""
    host.load_host_state_dict(snap.weights)
    for p, state in zip(opt.param_groups[0]["params"], snap.opt_state, strict=True):
        if state:
            # Adam keeps its scalar ``step`` on the CPU; moments live with the parameter.
            opt.state[p] = {
                k: v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in _clone_state(state).items()
            }
        else:
            opt.state.pop(p, None)
