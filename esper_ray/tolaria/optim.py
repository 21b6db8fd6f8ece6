"""Optimizer bookkeeping: one param group per seed, and host-state snapshots for rollback.

The host's Adam state (moments, step counts) belongs to the host's parameters; a
seed joining or leaving the optimizer never touches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


class RollbackPoint:
    """The governor's last known good state: every weight and buffer of the host and its seeds,
    the optimizer's state, and each slot's lifecycle counters. ``Trainer`` takes one at every
    healthy epoch end and goes back to it when a loss explodes.

    Taken every epoch, so a take refills the previous take's tensors with one fused copy while
    nothing changed shape: the host has the same ``version`` (no transition or refresh since,
    so its module tree holds the same tensors) and the optimizer holds the same parameters and
    state tensors, checked by identity. Anything else (a seed joined or left, a rollback or a
    cull replaced the optimizer's state, a parameter's first step created its moments) takes
    fresh clones: a few times cheaper a take (BENCHMARKS.md, "Measurements behind the code").
    """

    def __init__(self, host, opt: torch.optim.Optimizer):
        self.host, self.opt = host, opt
        self.model: dict[str, torch.Tensor] = {}  # host.state_dict() layout
        self.opt_state: dict[str, Any] = {}  # opt.state_dict() layout
        self.slots: dict[str, dict] = {}  # slot name -> lifecycle_state()
        self._live: list[Any] = []  # the optimizer's parameters and state tensors at the last full take
        self._version = -1
        self._sources: list[torch.Tensor] = []  # live tensors, in the order of
        self._copies: list[torch.Tensor] = []  # their copies in model and opt_state

    def take(self) -> None:
        live = self._optimizer_tensors()
        same = self.host.version == self._version and len(live) == len(self._live)
        if same and all(a is b for a, b in zip(live, self._live, strict=True)):
            torch._foreach_copy_(self._copies, self._sources)
            for saved, group in zip(self.opt_state["param_groups"], self.opt.param_groups, strict=True):
                saved.update((k, v) for k, v in group.items() if k != "params")  # hyperparameters may move
        else:
            self._take_all(live)
        self.slots = {name: slot.lifecycle_state() for name, slot in self.host.slots.items()}

    def _take_all(self, live: list[Any]) -> None:
        model, opt_state = self.host.state_dict(), self.opt.state_dict()  # views of the live tensors
        self.model = {k: v.clone() for k, v in model.items()}
        self.opt_state = clone_opt_state(opt_state)
        self._sources = [*model.values(), *_state_tensors(opt_state)]
        self._copies = [*self.model.values(), *_state_tensors(self.opt_state)]
        self._live, self._version = live, self.host.version

    def _optimizer_tensors(self) -> list[Any]:
        """Every parameter of the optimizer and every tensor of its state, group by group."""
        state = self.opt.state
        out: list[Any] = []
        for group in self.opt.param_groups:
            for p in group["params"]:
                out.append(p)
                if p in state:
                    out.extend(state[p].values())
        return out

    def restore(self) -> None:
        """Put the weights, the optimizer state and the slots' counters back as taken."""
        self.host.load_state_dict(self.model)
        # load_state_dict keeps the tensors it is given: hand it a copy, not the snapshot itself.
        self.opt.load_state_dict(clone_opt_state(self.opt_state))
        for name, state in self.slots.items():  # counters such as the alpha ramp's step
            slot = self.host.slots[name]
            slot.load_lifecycle_state(state, slot.seed)
        self.host.refresh()  # loaded silently: recompute which slots compute, and the counts


def clone_opt_state(state: dict) -> dict:
    """A deep copy of an ``opt.state_dict()`` whose tensors do not alias the live ones."""
    return {
        "state": {i: _clone_state(s) for i, s in state["state"].items()},
        "param_groups": [dict(g) for g in state["param_groups"]],
    }


def _state_tensors(opt_state: dict) -> list[torch.Tensor]:
    return [v for s in opt_state["state"].values() for v in s.values() if torch.is_tensor(v)]
