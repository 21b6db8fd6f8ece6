"""Synthetic bottleneck tasks: labels from a random teacher MLP that is wide at one known slot,
and a pre-trained host that is the same teacher with that wide map cut out.

The teacher has the layer structure of a student host MLP (``input_dim -> hidden[0] -> ... ->
hidden[-1] -> num_classes`` with ReLU), so its slots are named the same way: ``"input"`` on the
input vector, ``"hiddenI"`` on the (post-ReLU) output of hidden layer I. At one slot, the ground
truth, it adds a strongly nonlinear wide residual map ``h -> h + scale * W2 relu(W1 h + b)`` with
``W1: width -> wide``.

**The damaged pre-trained host.** ``TaskData.host_init`` holds the teacher's own layer weights
(float32, keys as in ``MorphoHost.state_dict``: ``blocks.{i}.0.weight/bias``, ``head.weight/bias``)
for an MLP host of the task's widths, i.e. the teacher with the wide map removed. Run it with
``training.host_init: task`` and ``training.freeze_host: true``: the host is then exactly right
except for one missing piece at one slot, so

* a seed at the ground-truth slot (``residual_mlp``) only has to learn the missing map ``r(h)``
  from its own input, and recovers much of the lost accuracy (mostly the map's affine part: in
  a trial with that part projected out of the map, no seed gained much; BENCHMARKS.md,
  "Measurements behind the code");
* a seed *after* the slot cannot: the layer that reads the slot is lossy (its ReLUs are off on
  half of the inputs, see ``_KINK_Z``), so what the map needed is gone from the damaged host's
  later activations;
* a seed *before* the slot has to push the correction through frozen lossy ReLU layers (it can
  move only the units that are on, and must invert them), which a small seed does much worse.

``benchmarks/bottleneck_study.py`` measures it (BENCHMARKS.md, section 1, and "What the configs
give"): with a frozen host the seed at the ground-truth slot beats every other slot and nearly
reaches the same seed present from the start; before anything germinates,
``grad_predictability`` (the share of the loss gradient at a slot that a smooth function of the
slot's input predicts out of sample, ``esper_ray.tolaria.telemetry.gradient_predictability``)
is highest at the ground-truth slot on almost every task (the misses are input-slot tasks), and
``gradient_information_deficit`` (is a slot's gradient better predicted from the previous slot's
input than from its own?) finds it on every task measured.
With a *trainable* host the damaged host repairs itself from everywhere and the slots blur:
freeze it. Trained from scratch (this family's earlier use, then with a near-linear teacher:
kinks 1.5 sd below the mean) the map was true by construction but not observable: a seed at
the true slot did no better than elsewhere (BENCHMARKS.md, "Measurements behind the code").
``training.host_init: random`` still trains from scratch.

Everything is calibrated on a fixed sample of inputs so that it holds for any widths:

* hidden biases put each unit's kink ``_KINK_Z`` standard deviations from its mean (0: at the
  mean), so each unit is on for about half of the inputs: the layers lose information, which is
  what pins the missing capacity to one slot;
* ``W1`` rows are rescaled so every pre-activation of the map has unit variance, and ``b`` is
  N(0, 1) on that scale, so the map's kinks fall inside the data, not beside it;
* ``scale`` makes the residual's per-feature std ``_RESIDUAL_GAIN`` times that of ``h``;
* the output layer is z-scored per class (a per-class affine folded into its weights), which
  keeps argmax classes balanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esper_ray.tasks.base import (
    TEST_FRACTION,
    TaskConfig,
    TaskData,
    class_shares,
    finish,
    slot_names,
    split_pool,
    task_name,
)

_RESIDUAL_GAIN = 2.0  # the map dominates the representation at its slot, so labels depend on it
_KINK_Z = 0.0  # P(N(0,1) > 0) = 0.5 of inputs activate each hidden unit (lossy layers)
_N_CALIBRATION = 10_000  # inputs used to calibrate the teacher and measure the label change
_EPS = 1e-12


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).mean().sqrt()


@dataclass(frozen=True)
class BottleneckTeacher:
    """The calibrated teacher (float64). ``slot`` indexes ``slot_names(hidden)``."""

    weights: tuple[torch.Tensor, ...]  # (out, in) per layer, the last one is the classifier
    biases: tuple[torch.Tensor, ...]
    slot: int
    w1: torch.Tensor  # (wide, width)
    b1: torch.Tensor  # (wide,)
    w2: torch.Tensor  # (width, wide)
    scale: float

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        """The wide map's contribution at the ground-truth slot (without the skip)."""
        return self.scale * (torch.relu(h @ self.w1.T + self.b1) @ self.w2.T)

    def penultimate(self, x: torch.Tensor, with_map: bool = True) -> torch.Tensor:
        """Output of the last hidden layer, optionally with the wide map removed."""
        h = x.to(torch.float64)
        for i, (w, b) in enumerate(zip(self.weights[:-1], self.biases[:-1], strict=True)):
            if i == self.slot and with_map:
                h = h + self.residual(h)
            h = torch.relu(h @ w.T + b)
        if self.slot == len(self.weights) - 1 and with_map:
            h = h + self.residual(h)
        return h

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores; labels are their argmax."""
        return self.penultimate(x) @ self.weights[-1].T + self.biases[-1]


def build_teacher(cfg: TaskConfig, generator: torch.Generator) -> tuple[BottleneckTeacher, torch.Tensor]:
    """Draw and calibrate the teacher; returns it and the calibration inputs it was fit on."""
    f64 = torch.float64
    dims = [cfg.input_dim, *cfg.hidden, cfg.num_classes]
    # He-scaled random layers: the same family of weights a student host starts from.
    weights = [
        torch.randn(dims[i + 1], dims[i], generator=generator, dtype=f64) * math.sqrt(2 / dims[i])
        for i in range(len(dims) - 1)
    ]
    width = dims[cfg.bottleneck_slot]
    w1 = torch.randn(cfg.wide, width, generator=generator, dtype=f64)
    b1 = torch.randn(cfg.wide, generator=generator, dtype=f64)
    w2 = torch.randn(width, cfg.wide, generator=generator, dtype=f64)
    x_cal = torch.randn(_N_CALIBRATION, cfg.input_dim, generator=generator, dtype=f64)

    biases: list[torch.Tensor] = []
    scale = 0.0
    h = x_cal
    for i, w in enumerate(weights):
        if i == cfg.bottleneck_slot:
            pre = h @ w1.T
            mu, sd = pre.mean(0), pre.std(0).clamp_min(_EPS)
            w1 = w1 / sd[:, None]
            b1 = b1 - mu / sd
            r = torch.relu(h @ w1.T + b1) @ w2.T
            scale = float(_RESIDUAL_GAIN * _rms(h.std(0)) / _rms(r.std(0)).clamp_min(_EPS))
            h = h + scale * r
        pre = h @ w.T
        mu, sd = pre.mean(0), pre.std(0).clamp_min(_EPS)
        if i < len(weights) - 1:
            biases.append(-mu + _KINK_Z * sd)
            h = torch.relu(pre + biases[-1])
        else:
            weights[i] = w / sd[:, None]
            biases.append(-mu / sd)
    teacher = BottleneckTeacher(
        weights=tuple(weights),
        biases=tuple(biases),
        slot=cfg.bottleneck_slot,
        w1=w1,
        b1=b1,
        w2=w2,
        scale=scale,
    )
    return teacher, x_cal


def label_change_if_removed(teacher: BottleneckTeacher, x: torch.Tensor) -> float:
    """Share of labels on ``x`` that change when the wide map is removed.

    The map-free teacher gets its own per-class output z-scoring (fit on ``x``), so a change
    counts only what the map decides, not a shift of every input toward one class.
    """
    y = teacher.logits(x).argmax(1)
    pre = teacher.penultimate(x, with_map=False) @ teacher.weights[-1].T
    y_removed = ((pre - pre.mean(0)) / pre.std(0).clamp_min(_EPS)).argmax(1)
    return float((y != y_removed).double().mean())


def host_init_state(teacher: BottleneckTeacher) -> dict[str, torch.Tensor]:
    """The teacher without its wide map, as float32 weights for an MLP host of its widths.

    Keys are those of ``build_host(HostConfig(kind="mlp", hidden=cfg.hidden), (input_dim,),
    num_classes).state_dict()`` without slots: ``blocks.{i}.0.weight/bias`` and ``head.*``.
    """
    n_hidden = len(teacher.weights) - 1
    state: dict[str, torch.Tensor] = {}
    for i, (w, b) in enumerate(zip(teacher.weights, teacher.biases, strict=True)):
        prefix = "head" if i == n_hidden else f"blocks.{i}.0"
        state[f"{prefix}.weight"] = finish(w, torch.float32)
        state[f"{prefix}.bias"] = finish(b, torch.float32)
    return state


def load_bottleneck(cfg: TaskConfig) -> TaskData:
    """A bottleneck task: x ~ N(0, I), labels from the teacher; test 20 %, val from the rest.

    Everything (teacher, calibration sample, data, splits) is drawn from one torch.Generator
    seeded with ``cfg.seed``, so the task is a pure function of the config. ``host_init`` is the
    teacher without its wide map (see the module docstring); ``meta["host_init_test_accuracy"]``
    is that damaged host's accuracy on the test split.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    teacher, x_cal = build_teacher(cfg, gen)
    x = torch.randn(cfg.n_samples, cfg.input_dim, generator=gen, dtype=torch.float64)
    y = teacher.logits(x).argmax(1)

    perm = torch.randperm(cfg.n_samples, generator=gen)
    n_test = round(TEST_FRACTION * cfg.n_samples)
    test_idx, pool_idx = perm[:n_test], perm[n_test:]
    train_pos, val_pos = split_pool(pool_idx.numel(), cfg, gen)
    train_idx, val_idx = pool_idx[train_pos], pool_idx[val_pos]

    slot = slot_names(cfg.hidden)[cfg.bottleneck_slot]
    damaged = teacher.penultimate(x[test_idx], with_map=False) @ teacher.weights[-1].T + teacher.biases[-1]
    return TaskData(
        name=task_name(cfg, f"bottleneck/k{cfg.bottleneck_slot}"),
        x_train=finish(x[train_idx], torch.float32),
        y_train=finish(y[train_idx], torch.int64),
        x_val=finish(x[val_idx], torch.float32),
        y_val=finish(y[val_idx], torch.int64),
        x_test=finish(x[test_idx], torch.float32),
        y_test=finish(y[test_idx], torch.int64),
        input_shape=(cfg.input_dim,),
        num_classes=cfg.num_classes,
        meta={
            "family": "bottleneck",
            "seed": cfg.seed,
            "bottleneck_slot": slot,
            "ground_truth_slot": slot,
            "bottleneck_index": cfg.bottleneck_slot,
            "slots": slot_names(cfg.hidden),
            "input_dim": cfg.input_dim,
            "hidden": list(cfg.hidden),
            "num_classes": cfg.num_classes,
            "wide": cfg.wide,
            "n_samples": cfg.n_samples,
            "residual_gain": _RESIDUAL_GAIN,
            "residual_scale": round(teacher.scale, 6),
            "label_change_if_removed": round(label_change_if_removed(teacher, x_cal), 6),
            "class_shares": class_shares(y, cfg.num_classes),
            "n_train": int(train_idx.numel()),
            "n_val": int(val_idx.numel()),
            "n_test": int(test_idx.numel()),
            "host_init": "teacher without the wide map",
            "host_init_test_accuracy": round(float((damaged.argmax(1) == y[test_idx]).double().mean()), 6),
        },
        host_init=host_init_state(teacher),
    )
