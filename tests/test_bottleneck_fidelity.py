"""Germination fidelity on the synthetic bottleneck tasks (damaged pre-trained host, frozen).

Numbers, not just "it ran": the per-slot telemetry signal points at the ground-truth slot
before anything germinates, and a seed there beats seeds elsewhere by a clear margin.
The full study (5 seeds x 3 slots, lifecycle, reference runs) is benchmarks/bottleneck_study.py.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.nn.functional as F

from esper_ray.blueprints.library import STANDARD_BLUEPRINTS
from esper_ray.config import RunConfig
from esper_ray.contracts import ControllerAction
from esper_ray.hosts import HostConfig, build_host
from esper_ray.tamiyo.controllers import HeuristicController
from esper_ray.tasks import TaskConfig, load_task
from esper_ray.tolaria.telemetry import gradient_information_deficit, gradient_predictability
from esper_ray.tolaria.trainer import Trainer

SLOTS = ("input", "hidden0", "hidden1")


def _task(k: int, seed: int) -> TaskConfig:
    return TaskConfig(family="bottleneck", seed=seed, bottleneck_slot=k, input_dim=40)


@functools.cache
def _data(k: int, seed: int):
    """Each task is built once per test session (the trainer never modifies it)."""
    return load_task(_task(k, seed))


def _cfg(task: TaskConfig, epochs: int = 5) -> RunConfig:
    return RunConfig(
        task=task,
        training={"epochs": epochs, "seed": task.seed, "host_init": "task", "freeze_host": True, "seed_lr": 3e-3},
        blueprints={"names": ["residual_mlp"]},
        lineage={"enabled": False},
    )


def test_host_init_is_the_teacher_without_its_map() -> None:
    d = _data(1, 0)
    host = build_host(HostConfig(kind="mlp", hidden=[64, 64]), (40,), 10)
    own = {k for k in host.state_dict() if not k.startswith("slots.")}
    assert set(d.host_init) == own
    host.load_host_state_dict(d.host_init)
    with torch.no_grad():
        acc = float((host(d.x_test).argmax(1) == d.y_test).double().mean())
    assert acc == pytest.approx(d.meta["host_init_test_accuracy"], abs=0.005)
    assert acc < 0.35  # the missing map really matters: most labels are wrong without it


@pytest.mark.parametrize("k", [0, 1, 2])
def test_signal_and_heuristic_point_at_the_ground_truth_slot(k: int) -> None:
    for seed in (0, 1):
        task = _task(k, seed)
        trainer = Trainer(_cfg(task), _data(k, seed))
        obs = trainer.observe()  # the first decision point: nothing has germinated
        signal = {s.name: s.grad_predictability for s in obs.slots}
        truth = SLOTS[k]
        others = max(v for n, v in signal.items() if n != truth)
        assert signal[truth] > others, (task, signal)
        scores = HeuristicController.bottleneck_scores(obs.slots)
        assert max(scores, key=scores.get) == truth


@pytest.mark.parametrize("k", [0, 1, 2])
def test_information_deficit_rule_finds_the_slot_where_argmax_is_weakest(k: int) -> None:
    # Seed 101 (a held-out env task) is one where argmax(grad_predictability) misses the input
    # slot; the deficit rule (first slot whose next slot has a positive deficit) does not.
    for seed in (0, 101):
        task = _task(k, seed)
        trainer = Trainer(_cfg(task), _data(k, seed))
        x = trainer.probe_x.clone().requires_grad_(True)
        logits, acts = trainer.host.forward_with_activations(x)
        loss = F.cross_entropy(logits, trainer.probe_y)
        grads = dict(zip(SLOTS, torch.autograd.grad(loss, [acts[n] for n in SLOTS]), strict=True))
        deficit = [gradient_information_deficit(acts[SLOTS[j - 1]], acts[SLOTS[j]], grads[SLOTS[j]]) for j in (1, 2)]
        chosen = next((j for j in (0, 1) if deficit[j] > 0), 2)
        assert chosen == k, (task, deficit)


def test_signal_is_cheap_and_zero_without_structure() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(960, 64, generator=gen)
    noise = torch.randn(960, 64, generator=gen)
    started = time.perf_counter()
    value = gradient_predictability(h, noise)
    assert time.perf_counter() - started < 0.5  # ~7 ms on one thread; loose for busy machines
    assert value < 0.02  # gradient unrelated to the slot's input: nothing to predict
    smooth = torch.tanh(h[:, :8] @ torch.randn(8, 64, generator=gen))
    assert gradient_predictability(h, smooth + 0.1 * noise) > 0.5
    assert gradient_predictability(h, torch.zeros_like(h)) == 0.0


def _final_accuracy(task: TaskConfig, data, slot: str, epochs: int) -> float:
    trainer = Trainer(_cfg(task, epochs), data)
    trainer.graft_fossilized(slot, STANDARD_BLUEPRINTS["residual_mlp"])
    while not trainer.done:
        trainer.train_epoch()
        trainer.end_epoch(ControllerAction.wait())
    return trainer.last["test_acc"]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_a_seed_at_the_ground_truth_slot_beats_seeds_elsewhere(k: int) -> None:
    task = _task(k, 0)
    data = _data(k, 0)
    acc = {slot: _final_accuracy(task, data, slot, epochs=4) for slot in SLOTS}
    none = data.meta["host_init_test_accuracy"]
    truth = SLOTS[k]
    best_other = max(v for n, v in acc.items() if n != truth)
    # Measured (seed 0, 4 epochs): the true slot leads the best other slot by +0.095 to +0.10
    # and the damaged host by +0.15 to +0.40.
    assert acc[truth] > best_other + 0.05, acc
    assert acc[truth] > none + 0.10, (acc, none)
