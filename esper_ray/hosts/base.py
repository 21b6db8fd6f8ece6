"""Host models with seed slots between their blocks.

A host is ``head(block_n(... block_1(block_0(x))))`` with a slot allowed at every
boundary: position 0 is the input (slot ``input``), position ``i + 1`` the output of
block ``i`` (slot ``hidden{i}``). Dormant slots are not even called, so a host with
all slots dormant computes exactly, and as fast as, the same host without slots: ``forward``
runs a flat list of modules (the layers of plain ``nn.Sequential`` blocks, the active slots,
the head), rebuilt whenever a slot's stage changes, like an ``nn.Sequential`` of the whole net.
(Each nested module call has a fixed cost that is a noticeable share of a small MLP's forward
pass: BENCHMARKS.md, "Measurements behind the code".)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Literal, cast

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from esper_ray.blueprints.builder import build_seed
from esper_ray.blueprints.library import named_blueprint
from esper_ray.blueprints.spec import BlueprintSpec
from esper_ray.contracts import EsperError, IllegalTransition, SeedStage
from esper_ray.kasmina.lifecycle import LifecycleConfig
from esper_ray.kasmina.slot import Listener, SeedSlot, Transition


def _odd(kernel: int) -> int:
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd, got {kernel}")
    return kernel


OddKernel = Annotated[int, Field(ge=1), AfterValidator(_odd)]  # a convolution kernel size ('same' padding)


class HostConfig(BaseModel):
    """Which host to build and where its slots are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mlp", "cnn1d", "cnn2d", "transformer"] = "mlp"
    hidden: list[int] = Field(
        default_factory=lambda: [64, 64],
        description="mlp: hidden widths; cnn: channels of each conv block; transformer: d_model of each "
        "block (all equal: one residual stream)",
    )
    kernel: OddKernel = Field(5, description="cnn kernel size (odd)")
    pool: bool = Field(True, description="cnn: halve the spatial size after each block")
    slots: list[str] | Literal["all"] = Field("all", description='slot names ("input", "hidden0", ...) or "all"')
    # transformer only (ignored by the others)
    heads: int = Field(4, ge=1, description="transformer: attention heads per block (divides d_model)")
    context: int = Field(128, ge=1, le=8192, description="transformer: longest sequence (learned positions)")
    mlp_ratio: int = Field(4, ge=1, le=16, description="transformer: feed-forward width / d_model")

    @field_validator("hidden")
    @classmethod
    def _widths(cls, hidden: list[int]) -> list[int]:
        if not hidden or any(w < 1 for w in hidden):
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden}")
        return hidden

    @model_validator(mode="after")
    def _one_stream(self) -> HostConfig:
        if self.kind == "transformer":
            if len(set(self.hidden)) != 1:
                raise ValueError(
                    f"a transformer's blocks share one residual stream: equal widths, got hidden={self.hidden}"
                )
            if self.hidden[0] % self.heads:
                raise ValueError(f"heads={self.heads} must divide d_model={self.hidden[0]}")
        return self


def _layers(module: nn.Module) -> list[nn.Module]:
    """A plain ``nn.Sequential``'s layers (calling them in turn is its forward), else ``[module]``."""
    return list(module) if type(module) is nn.Sequential else [module]


# A reopened slot's lifecycle state (``absorb``): DORMANT, counters and telemetry at zero.
_DORMANT = {"stage": "DORMANT", "epochs_in_stage": 0, "blend_steps": 0, "seed_grad_norm": 0.0, "contribution": 0.0}


def slot_names(n_blocks: int) -> list[str]:
    """All slot positions of a host with ``n_blocks`` blocks."""
    return ["input"] + [f"hidden{i}" for i in range(n_blocks)]


class SlotDict(nn.ModuleDict):
    """A ``ModuleDict`` of seed slots that says so to the type checker."""

    def __getitem__(self, key: str) -> SeedSlot:
        return cast(SeedSlot, super().__getitem__(key))

    def values(self) -> Iterable[SeedSlot]:  # type: ignore[override]
        return cast("Iterable[SeedSlot]", super().values())

    def items(self) -> Iterable[tuple[str, SeedSlot]]:  # type: ignore[override]
        return cast("Iterable[tuple[str, SeedSlot]]", super().items())


class MorphoHost(nn.Module):
    """A host network: blocks, a head, and seed slots at chosen block boundaries."""

    def __init__(
        self,
        blocks: list[nn.Module],
        head: nn.Module,
        input_shape: tuple[int, ...],
        slots: list[str] | Literal["all"] = "all",
        lifecycle: LifecycleConfig | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.input_shape = tuple(input_shape)
        self.lifecycle = lifecycle or LifecycleConfig()
        positions = slot_names(len(self.blocks))
        wanted = positions if slots == "all" else list(slots)
        for name in wanted:
            if name not in positions:
                raise EsperError(f"unknown slot {name!r} (this host has: {', '.join(positions)})")
        shapes = self._boundary_shapes()
        self.slots = SlotDict()
        for index, name in enumerate(positions):
            if name in wanted:
                slot = SeedSlot(name, index, shapes[index], self.lifecycle)
                slot.add_listener(self._on_transition)
                self.slots[name] = slot
        # _active[i] is the slot at boundary i if it computes anything, else None.
        self._active: list[SeedSlot | None] = [None] * len(positions)
        self._path: list[nn.Module] = []  # what forward calls in turn (see _rebuild_path)
        self.version = 0  # counts the rebuilds of the path: every transition and refresh
        self._modes: tuple[int, list[nn.Module], list[nn.Module]] = (-1, [], [])  # see train()
        self._listeners: list[Listener] = []
        self._counts: dict[str, int] | None = None  # param_count, until a slot's seed changes
        self._rebuild_path()

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self._path:
            x = module(x)
        return x

    def train(self, mode: bool = True) -> MorphoHost:
        """``nn.Module.train``, over a list of the submodules kept until the next transition or
        refresh instead of a recursive walk (cheaper: BENCHMARKS.md), and the trainer switches
        twice an epoch. A submodule with a ``train`` of its own gets it called."""
        if self._modes[0] != self.version:
            subs = list(self.modules())[1:]
            custom = [m for m in subs if type(m).train is not nn.Module.train]
            self._modes = (self.version, [m for m in subs if type(m).train is nn.Module.train], custom)
        self.training = mode
        for module in self._modes[1]:  # what nn.Module.__setattr__ ends in for a bool, without its checks
            object.__setattr__(module, "training", mode)
        for module in self._modes[2]:
            module.train(mode)
        return self

    def _rebuild_path(self) -> None:
        """The modules ``forward`` chains: each block (a plain ``nn.Sequential`` block as its
        layers, which is what its own forward would call), each active slot after its boundary's
        block, then the head."""
        path: list[nn.Module] = []
        for i in range(len(self.blocks) + 1):
            if i > 0:
                path.extend(_layers(self.blocks[i - 1]))
            active = self._active[i]
            if active is not None:
                path.append(active)
        path.extend(_layers(self.head))
        self._path = path
        self.version += 1

    def forward_with_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the host activation entering each slot (for telemetry)."""
        acts: dict[str, torch.Tensor] = {}
        names = slot_names(len(self.blocks))
        for i in range(len(self.blocks) + 1):
            if i > 0:
                x = self.blocks[i - 1](x)
            if names[i] in self.slots:
                acts[names[i]] = x
            active = self._active[i]
            if active is not None:
                x = active(x)
        return self.head(x), acts

    def _boundary_shapes(self) -> list[tuple[int, ...]]:
        with torch.no_grad():
            x = torch.zeros((1, *self.input_shape))
            shapes = [tuple(x.shape[1:])]
            for block in self.blocks:
                was_training = block.training
                block.eval()
                x = block(x)
                block.train(was_training)
                shapes.append(tuple(x.shape[1:]))
        return shapes

    # ---- slots -----------------------------------------------------------------------------
    def slot(self, name: str) -> SeedSlot:
        """The slot called ``name``; EsperError naming the slots there are otherwise."""
        if name not in self.slots:
            raise EsperError(f"unknown slot {name!r} (slots: {', '.join(self.slots) or 'none'})")
        return self.slots[name]

    def iter_slots(self) -> Iterator[SeedSlot]:
        yield from self.slots.values()

    def add_listener(self, listener: Listener) -> None:
        """Called on every stage transition of every slot."""
        self._listeners.append(listener)

    def _on_transition(self, slot: SeedSlot, event: Transition) -> None:
        self._active[slot.index] = None if slot.is_identity else slot
        self._rebuild_path()
        self._counts = None
        for listener in self._listeners:
            listener(slot, event)

    def refresh(self) -> None:
        """Recompute which slots are active and what forward calls (after loading slot states
        silently, or after replacing a block or the head)."""
        self._counts = None
        for slot in self.slots.values():
            self._active[slot.index] = None if slot.is_identity else slot
        self._rebuild_path()

    def germinate(
        self,
        slot: str,
        blueprint: str | BlueprintSpec,
        *,
        max_params: int | None = None,
        generator_seed: int | None = None,
        reason: str = "",
    ) -> SeedSlot:
        """Build ``blueprint`` for ``slot`` and place it there (stage GERMINATED).

        ``blueprint`` is a BlueprintSpec or the name of a standard (or transformer) blueprint.
        """
        target = self.slot(slot)
        if isinstance(blueprint, str):
            blueprint = named_blueprint(blueprint)
        if not target.is_open:
            raise IllegalTransition(f"slot {slot}: cannot germinate in stage {target.stage.name} (needs DORMANT)")
        seed = build_seed(blueprint, target.shape, max_params=max_params, generator_seed=generator_seed)
        seed.to(next(self.head.parameters()).device)  # on the host's device before joining an optimizer
        target.germinate(seed, reason)
        return target

    def absorb(self, slot: str, wrap: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
        """Make the FOSSILIZED seed in ``slot`` part of the host proper and reopen the slot.

        The seed (``wrap(seed)`` if given) moves into the host block before the slot (``input``:
        before block 0) and the slot goes back to DORMANT silently (no lifecycle event: the
        network computes the same). Returns the module that joined the block: its parameters
        are host parameters from now on (``host_parameters``), so a caller's optimizer moves
        them from the seed's param group to the host's. EsperError if the slot holds no
        fossilized seed.
        """
        target = self.slot(slot)
        if target.stage is not SeedStage.FOSSILIZED or target.seed is None:
            raise EsperError(f"slot {slot}: cannot absorb a seed in stage {target.stage.name} (needs FOSSILIZED)")
        module = target.seed if wrap is None else wrap(target.seed)
        if target.index == 0:
            self.blocks[0] = nn.Sequential(module, self.blocks[0])
        else:
            self.blocks[target.index - 1] = nn.Sequential(self.blocks[target.index - 1], module)
        target.load_lifecycle_state(_DORMANT, None)
        self.refresh()
        return module

    # ---- views -----------------------------------------------------------------------------
    def host_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the host itself: blocks, head, and fossilized seeds excluded."""
        yield from self.blocks.parameters()
        yield from self.head.parameters()

    def host_state_dict(self) -> dict[str, torch.Tensor]:
        """Cloned host weights and buffers, without any seed (for rollback)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("slots.")}

    def load_host_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore host weights in place (optimizers keep pointing at the same tensors)."""
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("slots.")}
        if own.keys() != state.keys():
            raise EsperError("host state does not match this host's architecture")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    def param_count(self) -> dict[str, int]:
        """Parameters of the host and of its seeds (kept until a transition or ``refresh``)."""
        if self._counts is None:
            host = sum(p.numel() for p in self.host_parameters())
            seeds = sum(s.seed_params for s in self.slots.values())
            self._counts = {"host": host, "seeds": seeds, "total": host + seeds}
        return dict(self._counts)

    def architecture(self) -> dict[str, dict[str, str]]:
        """Each slot's stage and blueprint hash (what the lineage ledger replays to)."""
        return {name: {"stage": s.stage.name, "blueprint_hash": s.blueprint_hash} for name, s in self.slots.items()}

    def consumer(self, slot: SeedSlot) -> nn.Module:
        """The host module that reads this slot's output."""
        return self.blocks[slot.index] if slot.index < len(self.blocks) else self.head
