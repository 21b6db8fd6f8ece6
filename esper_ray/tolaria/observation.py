"""What a controller sees at a decision point: the ``Observation`` and the probe telemetry in it.

An ``Observer`` holds the probe batch of the run's task (the first ``training.probe_size``
validation examples), the task's feature vector, and the per-slot probe-batch signals last
measured (``SlotProbe``: activation statistics, gradient RMS, ``grad_predictability``, the
downstream ``grad_deficit``). The probe is the costly part of a decision point, so with
``training.signal_every`` > 1 the signals are reused for up to that many epochs: they are
measured at the first observation, whenever ``signal_every`` epochs have passed, and at once
after any lifecycle transition or rollback (the network changed, so they would be stale
exactly when a decision is likeliest to depend on them). Deterministic, and a checkpoint
carries them (``state_dict``).

Everything else it reads (the host, the run's counters, the candidate book) comes in as
arguments from the ``Trainer``, which holds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from esper_ray.blueprints.builder import slot_channels, slot_kind
from esper_ray.contracts import GlobalTelemetry, HostContext, Observation, SlotTelemetry
from esper_ray.hosts import MorphoHost
from esper_ray.tasks import TaskData
from esper_ray.tolaria.candidates import CandidateBook
from esper_ray.tolaria.telemetry import SlotProbe


@contextlib.contextmanager
def eval_mode(host: MorphoHost) -> Iterator[None]:
    """``host`` in eval mode within, back in train mode after (the mode it trains in), also on error."""
    host.eval()
    try:
        yield
    finally:
        host.train()


def host_context(host: MorphoHost) -> HostContext:
    """The run's static context (``HostContext``), read from the host itself: its input's kind,
    whether its blocks convolve (``cnn1d`` / ``cnn2d``) or not (``mlp``), and how many hidden
    blocks it has. Whatever config or task built the host."""
    from esper_ray.hosts.transformer import TransformerHost

    modules = list(host.blocks.modules())
    if isinstance(host, TransformerHost):
        return HostContext(input_kind="tokens", host_kind="transformer", depth=len(host.blocks))
    kind = (
        "cnn2d"
        if any(isinstance(m, torch.nn.Conv2d) for m in modules)
        else "cnn1d"
        if any(isinstance(m, torch.nn.Conv1d) for m in modules)
        else "mlp"
    )
    return HostContext(input_kind=slot_kind(host.input_shape), host_kind=kind, depth=len(host.blocks))


class Observer:
    """Builds a run's ``Observation``s; keeps the probe batch and the probe signals between them."""

    def __init__(self, data: TaskData, probe_size: int, signal_every: int):
        self.probe_size = probe_size
        self.signal_every = signal_every
        self.probe_x, self.probe_y = data.x_val[:probe_size], data.y_val[:probe_size]
        self.task_features = data.features()
        self.signals: dict[str, dict[str, float]] = {}  # per slot, see ``measure``
        self.epoch = -1  # the epoch they were measured at (-1: never)
        self.events = 0  # the run's event count then: a transition or rollback since makes them stale
        self.slot_probe = SlotProbe()  # keeps the kernel fits of slots whose activations did not move

    def set_task(self, data: TaskData) -> None:
        """Observe ``data`` from now on: its probe batch and task features (signals measured anew)."""
        self.probe_x, self.probe_y = data.x_val[: self.probe_size], data.y_val[: self.probe_size]
        self.task_features = data.features()
        self.epoch = -1

    def is_stale(self, epoch: int, events: int) -> bool:
        """Whether the signals must be measured again at ``epoch`` with ``events`` events so far."""
        return self.epoch < 0 or epoch - self.epoch >= self.signal_every or events != self.events

    def measure(self, host: MorphoHost, epoch: int, events: int) -> None:
        """Per slot of ``host``, the probe-batch signals of SlotTelemetry (``telemetry.SlotProbe``),
        noted as measured at ``epoch`` after ``events`` events."""
        acts, grads = self.probe(host)
        signals = self.slot_probe.measure(acts, grads)
        scale = len(self.probe_x)
        self.signals = {
            name: {"grad_rms": float(grads[name].square().mean().sqrt()) * scale, **signals[name]}
            for name in host.slots
        }
        self.epoch = epoch
        self.events = events

    def probe(self, host: MorphoHost) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each slot's input activation on the probe batch, and the loss gradient there."""
        with eval_mode(host):
            x = self.probe_x.clone().requires_grad_(True)
            logits, acts = host.forward_with_activations(x)
            loss = F.cross_entropy(logits.flatten(0, -2), self.probe_y.flatten())  # also (B, T, classes) logits
            names = list(acts)
            grads = torch.autograd.grad(loss, [acts[n] for n in names], allow_unused=True)
        out_acts = {n: a.detach() for n, a in acts.items()}
        out_grads = {n: torch.zeros_like(acts[n]) if g is None else g for n, g in zip(names, grads, strict=True)}
        for n in names:  # the probe reads (B, C, *positions); a token slot's (B, T, D) is channels last
            if host.slots[n].kind == "tokens":
                out_acts[n], out_grads[n] = out_acts[n].transpose(1, 2), out_grads[n].transpose(1, 2)
        return out_acts, out_grads

    def observe(
        self,
        host: MorphoHost,
        *,
        epoch: int,
        max_epochs: int,
        last: Mapping[str, float],
        best_val: float,
        plateau: int,
        events: int,
        host_grad: Mapping[str, float],
        book: CandidateBook,
        distill: dict[str, float],
    ) -> Observation:
        """Global and per-slot telemetry of ``host`` at this decision point (probe signals measured
        first if stale), with the candidates of ``book`` in their current order."""
        if self.is_stale(epoch, events):
            self.measure(host, epoch, events)
        counts = host.param_count()
        glob = GlobalTelemetry(
            epoch=epoch,
            max_epochs=max_epochs,
            train_loss=last.get("train_loss", 0.0),
            val_loss=last.get("val_loss", 0.0),
            val_accuracy=last.get("val_acc", 0.0),
            best_val_accuracy=best_val,
            plateau_epochs=plateau,
            host_params=counts["host"],
            seed_params=counts["seeds"],
        )
        slots = [
            SlotTelemetry(
                name=slot.name,
                index=slot.index,
                stage=slot.stage,
                alpha=slot.alpha,
                epochs_in_stage=slot.epochs_in_stage,
                blueprint=slot.blueprint_name or None,
                seed_params=slot.seed_params,
                host_grad_norm=host_grad.get(slot.name, 0.0),
                seed_grad_norm=slot.seed_grad_norm,
                contribution=slot.contribution,
                kind=slot.kind,
                width=slot_channels(slot.shape),
                **self.signals[slot.name],
            )
            for slot in host.slots.values()
        ]
        params = [list(row) for row in book.table(host.slots)[0]]
        return Observation(
            glob,
            slots,
            candidates=[e.name for e in book.entries],
            candidate_features=[book.features(e) for e in book.entries],
            candidate_params=params,
            task_features=self.task_features,
            distill=distill,
        )

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The probe signals and when they were measured (JSON-able)."""
        return {"probe_signals": self.signals, "probe_epoch": self.epoch, "probe_events": self.events}

    def load_state_dict(self, state: Mapping[str, Any], events: int) -> None:
        """Back to ``state_dict``'s state; a state without it (an older checkpoint) reads as never
        measured, with no change seen since ``events`` events."""
        self.signals = state.get("probe_signals", {})
        self.epoch = state.get("probe_epoch", -1)
        self.events = state.get("probe_events", events)
