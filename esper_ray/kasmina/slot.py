"""Kasmina: a seed slot inside a host, and the seed's lifecycle in it.

A slot sits on one host activation ``h``. What it outputs depends on the stage:

- no seed (DORMANT, CULLED, EMBARGOED) or GERMINATED: ``h`` itself, the same tensor;
- TRAINING (isolated, alpha 0): ``h`` bit for bit, whatever ``s = seed(h.detach())`` computes
  (NaN and inf included), and so is the gradient reaching the host; the seed still gets the
  global loss's gradient at the slot (``_Isolated`` hands the output's gradient to both);
- BLENDING / HOLDING: ``lerp(h, seed(h.detach()), alpha)``, i.e.
  ``alpha * seed + (1 - alpha) * host``: the host upstream only gets gradient through
  the ``(1 - alpha) * h`` path, never through the seed;
- FOSSILIZED: ``seed(h)``; the seed is part of the host now and trains with it.

A gated seed (``kasmina.gate``) is blended by the same rules: its own output is
``h + g(h) * (seed(h) - h)``, so BLENDING / HOLDING give ``h + g(h) * alpha * (seed(h) - h)``
with the gate reading ``h.detach()`` like the body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from esper_ray.blueprints.builder import SeedModule, TokenShape, slot_kind
from esper_ray.contracts import LEGAL_TRANSITIONS, EsperError, IllegalTransition, SeedStage
from esper_ray.kasmina.gate import check_gate_fits
from esper_ray.kasmina.lifecycle import LifecycleConfig


class GateClosed(EsperError):
    """A legal transition whose gate (epochs, improvement, gradient health) is not met."""


@dataclass(frozen=True)
class Transition:
    """A stage change, as reported to listeners (the trainer's ledger and event log)."""

    slot: str
    old: SeedStage
    new: SeedStage
    blueprint_hash: str
    reason: str


Listener = Callable[["SeedSlot", Transition], None]

# Forward modes, precomputed on each transition so that forward does one int compare.
_IDENTITY, _ISOLATED, _BLEND, _FOSSIL = range(4)
_MODE = {
    SeedStage.DORMANT: _IDENTITY,
    SeedStage.GERMINATED: _IDENTITY,
    SeedStage.TRAINING: _ISOLATED,
    SeedStage.BLENDING: _BLEND,
    SeedStage.HOLDING: _BLEND,
    SeedStage.FOSSILIZED: _FOSSIL,
    SeedStage.CULLED: _IDENTITY,
    SeedStage.EMBARGOED: _IDENTITY,
}

# The steps ``advance`` takes on its own when their gates open (fossilizing never is one).
_AUTOMATIC = {
    SeedStage.GERMINATED: SeedStage.TRAINING,
    SeedStage.TRAINING: SeedStage.BLENDING,
    SeedStage.BLENDING: SeedStage.HOLDING,
    SeedStage.CULLED: SeedStage.EMBARGOED,
    SeedStage.EMBARGOED: SeedStage.DORMANT,
}


class _Isolated(torch.autograd.Function):
    """Forward: a copy of the host activation ``h``, never touched by the seed's output ``s``
    (``h + (s - s.detach())`` is NaN where ``s`` is). Backward: the output's gradient goes to
    ``h`` unchanged and to ``s`` as if ``s`` had been added, so the isolated seed still learns."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.s_shape = s.shape
        # A copy, not ``h`` itself: a later in-place op on a custom Function's view is an error.
        return h.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        return grad, grad if grad.shape == ctx.s_shape else grad.sum_to_size(ctx.s_shape)


class SeedSlot(nn.Module):
    """One place in a host where a seed can grow."""

    def __init__(self, name: str, index: int, shape: tuple[int, ...], config: LifecycleConfig):
        super().__init__()
        self.name = name
        self.index = index
        self.shape = shape if isinstance(shape, TokenShape) else tuple(shape)  # its type is its kind
        self.kind = slot_kind(self.shape)
        self.config = config
        self.seed: SeedModule | None = None
        self.stage = SeedStage.DORMANT
        self.epochs_in_stage = 0
        self.blend_steps = 0
        self.seed_grad_norm = 0.0  # set by the trainer after backward
        self.contribution = 0.0  # set by the trainer from an ablation
        self._mode = _IDENTITY
        self._ablated = False
        self._listeners: list[Listener] = []

    # ---- forward -------------------------------------------------------------------------
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mode = self._mode
        if mode == _IDENTITY or self._ablated:
            return h
        seed = cast(SeedModule, self.seed)  # every mode but identity has a seed
        if mode == _FOSSIL:
            return seed(h)
        s = seed(h.detach())
        if mode == _ISOLATED:
            return _Isolated.apply(h, s)
        return torch.lerp(h, s, self.alpha)

    @contextmanager
    def ablated(self) -> Iterator[None]:
        """Within this block the slot outputs ``h`` whatever its seed (for counterfactuals)."""
        self._ablated = True
        try:
            yield
        finally:
            self._ablated = False

    # ---- state -----------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        """The seed's weight in the blend: 0 before blending, 1 from HOLDING on."""
        if self.stage is SeedStage.BLENDING:
            return self.config.alpha(self.blend_steps)
        if self.stage in (SeedStage.HOLDING, SeedStage.FOSSILIZED):
            return 1.0
        return 0.0

    @property
    def blueprint_hash(self) -> str:
        return self.seed.blueprint_hash if self.seed is not None else ""

    @property
    def blueprint_name(self) -> str:
        return self.seed.spec.name if self.seed is not None else ""

    @property
    def seed_params(self) -> int:
        return 0 if self.seed is None else sum(p.numel() for p in self.seed.parameters())

    @property
    def seed_diverged(self) -> bool:
        """The seed's weights hold a NaN or inf (it cannot recover: Adam keeps them non-finite)."""
        return self.seed is not None and any(not bool(torch.isfinite(p).all()) for p in self.seed.parameters())

    @property
    def is_open(self) -> bool:
        """A seed can germinate here now."""
        return self.stage is SeedStage.DORMANT

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # ---- lifecycle -------------------------------------------------------------------------
    def transition(self, new: SeedStage, reason: str = "") -> None:
        """Move to ``new``; raises IllegalTransition unless the lifecycle has that edge."""
        old = self.stage
        if new not in LEGAL_TRANSITIONS[old]:
            raise IllegalTransition(f"slot {self.name}: illegal transition {old.name} -> {new.name}")
        if new is SeedStage.GERMINATED and self.seed is None:
            raise IllegalTransition(f"slot {self.name}: GERMINATED needs a seed (use germinate())")
        blueprint_hash = self.blueprint_hash
        if new in (SeedStage.CULLED, SeedStage.EMBARGOED, SeedStage.DORMANT):
            self.seed = None
        self.stage = new
        self._mode = _MODE[new]
        self.epochs_in_stage = 0
        if new is SeedStage.BLENDING:
            self.blend_steps = 0
        if new is not SeedStage.FOSSILIZED and self.seed is None:
            self.contribution = 0.0
            self.seed_grad_norm = 0.0
        event = Transition(self.name, old, new, blueprint_hash, reason)
        for listener in self._listeners:
            listener(self, event)

    def germinate(self, seed: SeedModule, reason: str = "") -> None:
        """Place a built seed in this DORMANT slot (stage GERMINATED)."""
        if self.stage is not SeedStage.DORMANT:
            raise IllegalTransition(f"slot {self.name}: cannot germinate in stage {self.stage.name} (needs DORMANT)")
        if tuple(seed.slot_shape) != self.shape:
            raise EsperError(f"slot {self.name}: seed built for shape {seed.slot_shape}, slot has {self.shape}")
        check_gate_fits(seed.spec, self.name, self.shape)  # a gated blend needs a slot its gate can read
        self.seed = seed
        self.transition(SeedStage.GERMINATED, reason)

    def gate(self, new: SeedStage) -> str:
        """Why ``new`` cannot be entered now ('' when its gate is open). Legality aside."""
        cfg = self.config
        if new is SeedStage.BLENDING:
            if self.epochs_in_stage < cfg.min_training_epochs:
                return f"{self.epochs_in_stage}/{cfg.min_training_epochs} epochs of isolated training"
            g = self.seed_grad_norm
            if not (0.0 < g < cfg.max_seed_grad_norm):  # also False for NaN
                return f"unhealthy seed gradient norm {g:.3g}"
        if new is SeedStage.HOLDING and self.alpha < 1.0:
            return f"alpha {self.alpha:.3f} has not reached 1"
        if new is SeedStage.FOSSILIZED:
            if self.epochs_in_stage < cfg.min_holding_epochs:
                return f"{self.epochs_in_stage}/{cfg.min_holding_epochs} epochs of holding"
            if self.contribution < cfg.min_improvement:
                return f"contribution {self.contribution:+.4f} below {cfg.min_improvement:+.4f}"
        if new is SeedStage.DORMANT and self.epochs_in_stage < cfg.embargo_epochs:
            return f"embargo {self.epochs_in_stage}/{cfg.embargo_epochs} epochs"
        return ""

    def advance(self) -> SeedStage | None:
        """Take the next automatic step if its gate is open; return the new stage or None.

        Automatic: GERMINATED -> TRAINING, TRAINING -> BLENDING, BLENDING -> HOLDING,
        CULLED -> EMBARGOED, EMBARGOED -> DORMANT. Fossilizing is never automatic.

        A TRAINING seed whose weights went non-finite is culled here: isolation keeps it from the
        host's output, so no loss would ever show it, and it could never blend in.
        """
        if self.stage is SeedStage.TRAINING and self.seed_diverged:
            self.cull("diverged: non-finite seed weights")
            return SeedStage.CULLED
        nxt = _AUTOMATIC.get(self.stage)
        if nxt is None or self.gate(nxt):
            return None
        self.transition(nxt, "gate passed")
        return nxt

    def fossilize(self, reason: str = "decision") -> None:
        """Make the seed permanent; only from HOLDING, and only through its gate."""
        if self.stage is not SeedStage.HOLDING:
            raise IllegalTransition(f"slot {self.name}: cannot fossilize in stage {self.stage.name} (needs HOLDING)")
        why = self.gate(SeedStage.FOSSILIZED)
        if why:
            raise GateClosed(f"slot {self.name}: cannot fossilize yet: {why}")
        self.transition(SeedStage.FOSSILIZED, reason)

    def cull(self, reason: str = "decision") -> None:
        """Remove the live seed (the trainer restores the host if it had blended)."""
        if not self.stage.is_live:
            raise IllegalTransition(f"slot {self.name}: nothing to cull in stage {self.stage.name}")
        self.transition(SeedStage.CULLED, reason)

    def on_step(self) -> None:
        """One optimizer step passed (advances the alpha ramp while blending)."""
        if self.stage is SeedStage.BLENDING:
            self.blend_steps += 1

    def on_epoch_end(self) -> None:
        self.epochs_in_stage += 1

    @property
    def is_identity(self) -> bool:
        """Whether the slot passes its input through unchanged in its stage (no seed acts: DORMANT,
        GERMINATED, CULLED, EMBARGOED); a host leaves such a slot out of its forward path."""
        return self._mode == _IDENTITY

    # ---- persistence -------------------------------------------------------------------------
    def lifecycle_state(self) -> dict:
        """Everything but tensors needed to restore this slot (JSON-serialisable)."""
        return {
            "stage": self.stage.name,
            "epochs_in_stage": self.epochs_in_stage,
            "blend_steps": self.blend_steps,
            "seed_grad_norm": self.seed_grad_norm,
            "contribution": self.contribution,
            "blueprint_hash": self.blueprint_hash,
            "spec": self.seed.spec_json if self.seed is not None else None,
        }

    def load_lifecycle_state(self, state: dict, seed: SeedModule | None) -> None:
        """Restore stage and counters silently (no listener events: nothing changed)."""
        self.seed = seed
        self.stage = SeedStage[state["stage"]]
        self._mode = _MODE[self.stage]
        self.epochs_in_stage = int(state["epochs_in_stage"])
        self.blend_steps = int(state["blend_steps"])
        self.seed_grad_norm = float(state["seed_grad_norm"])
        self.contribution = float(state["contribution"])

    def extra_repr(self) -> str:
        bp = f", blueprint={self.blueprint_name}" if self.seed is not None else ""
        return f"name={self.name}, shape={self.shape}, stage={self.stage.name}{bp}"
