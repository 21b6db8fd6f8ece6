"""Trials: short what-if runs of candidate seeds that leave the run as it was.

``run_trials`` trains ``steps`` batches from the host's current weights (a fresh Adam, the run's
learning rates with the seed's times ``seed_lr_scale``, the same batches each time) once with the
host alone and once per (slot, blueprint) with that seed fully in that open slot (as if
fossilized), and reports the validation loss each reaches. The host's weights are put back
exactly afterwards; the run's data order, optimizer and seeds are untouched. Cost:
``(1 + len(plans)) * steps`` training steps. The trial controller decides from these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from esper_ray.blueprints import build_seed
from esper_ray.blueprints.catalogue import CatalogueEntry
from esper_ray.config import TrainingConfig
from esper_ray.contracts import TrialResult
from esper_ray.hosts import MorphoHost, slot_names
from esper_ray.kasmina import SeedSlot
from esper_ray.tasks import TaskData
from esper_ray.tolaria.observation import eval_mode

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run_trials(
    host: MorphoHost,
    data: TaskData,
    loss: Loss,
    plans: list[tuple[SeedSlot, CatalogueEntry]],
    *,
    steps: int,
    training: TrainingConfig,
    max_seed_params: int,
    seed_lr_scale: float,
    epoch: int,
    step: int,
) -> TrialResult:
    """The control run and one run per ``(open slot, candidate)`` of ``plans`` (module docstring).
    Batches are drawn from the run's seed and ``epoch``, each trial seed's weights from the
    run's seed and ``step`` (as a germination now would draw them)."""
    gen = torch.Generator().manual_seed(training.seed * 7919 + epoch)
    x = data.x_train
    bs = min(training.batch_size, len(x))
    batches = torch.randint(len(x), (steps, bs), generator=gen).to(x.device)
    host_lr = 0.0 if training.freeze_host else training.lr
    host_params = [p for p in host.host_parameters()]
    snapshot = host.host_state_dict()
    losses: dict[tuple[str, str], float] = {}
    try:
        control = _one_run(host, data, loss, 0, None, batches, host_params, host_lr, 0.0)
        for target, entry in plans:
            host.load_host_state_dict(snapshot)
            seed = build_seed(
                entry.spec,
                target.shape,
                max_params=max_seed_params,
                generator_seed=training.seed * 1_000_003 + step,
            ).to(x.device)
            lr = training.seed_lr * seed_lr_scale
            losses[(target.name, entry.name)] = _one_run(
                host, data, loss, target.index, seed, batches, host_params, host_lr, lr
            )
    finally:
        host.load_host_state_dict(snapshot)
        for p in host_params:
            p.grad = None
    return TrialResult(steps=steps, control_loss=control, losses=losses)


def _one_run(
    host: MorphoHost,
    data: TaskData,
    loss: Loss,
    index: int,
    seed: torch.nn.Module | None,
    batches: torch.Tensor,
    host_params: list[torch.nn.Parameter],
    host_lr: float,
    seed_lr: float,
) -> float:
    """One trial: train the host (and ``seed`` at boundary ``index``), then the validation loss."""
    names = slot_names(len(host.blocks))

    def forward(h: torch.Tensor) -> torch.Tensor:
        for i in range(len(host.blocks) + 1):
            if i > 0:
                h = host.blocks[i - 1](h)
            if i == index and seed is not None:
                h = seed(h)
            elif names[i] in host.slots:
                h = host.slots[names[i]](h)
        return host.head(h)

    groups: list[dict[str, Any]] = [{"params": host_params, "lr": host_lr}] if host_lr > 0 else []
    if seed is not None:
        groups.append({"params": list(seed.parameters()), "lr": seed_lr})
    if groups:
        opt = torch.optim.Adam(groups)
        x, y = data.x_train, data.y_train
        for idx in batches:
            value = loss(forward(x[idx]), y[idx], idx)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
    with eval_mode(host), torch.no_grad():
        total = 0.0
        for i in range(0, len(data.x_val), 4096):
            logits, labels = forward(data.x_val[i : i + 4096]), data.y_val[i : i + 4096]
            total += float(torch.logsumexp(logits, -1).sum() - logits.gather(-1, labels[..., None]).sum())
    return total / data.y_val.numel()
