"""Leyline: the records every part of esper-ray shares.

Anything that crosses a boundary (between Kasmina and Tolaria, Tolaria and Tamiyo,
the trainer and the Ray actors, a run and its folder on disk) is one of these
types. They are plain dataclasses or enums so that they pickle across Ray and
turn into Parquet rows with ``dataclasses.asdict``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NotRequired, Protocol, TypedDict, runtime_checkable


class EsperError(Exception):
    """An error caused by bad input; the CLI prints its message as one line."""


class IllegalTransition(EsperError):
    """A seed was asked to move between two lifecycle stages that are not connected."""


class SeedStage(enum.IntEnum):
    """The lifecycle of a seed in one slot.

    DORMANT -> GERMINATED -> TRAINING -> BLENDING -> HOLDING -> FOSSILIZED,
    or, from any live stage, CULLED -> EMBARGOED -> DORMANT.
    """

    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    BLENDING = 3
    HOLDING = 4
    FOSSILIZED = 5
    CULLED = 6
    EMBARGOED = 7

    @property
    def is_live(self) -> bool:
        """A seed exists in the slot and can still be culled."""
        return self in LIVE_STAGES


LIVE_STAGES = frozenset({SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING})

# The only edges of the lifecycle graph; everything else raises IllegalTransition.
LEGAL_TRANSITIONS: dict[SeedStage, frozenset[SeedStage]] = {
    SeedStage.DORMANT: frozenset({SeedStage.GERMINATED}),
    SeedStage.GERMINATED: frozenset({SeedStage.TRAINING, SeedStage.CULLED}),
    SeedStage.TRAINING: frozenset({SeedStage.BLENDING, SeedStage.CULLED}),
    SeedStage.BLENDING: frozenset({SeedStage.HOLDING, SeedStage.CULLED}),
    SeedStage.HOLDING: frozenset({SeedStage.FOSSILIZED, SeedStage.CULLED}),
    SeedStage.FOSSILIZED: frozenset(),
    SeedStage.CULLED: frozenset({SeedStage.EMBARGOED}),
    SeedStage.EMBARGOED: frozenset({SeedStage.DORMANT}),
}


class ActionKind(enum.IntEnum):
    """What a controller (Tamiyo) can decide at a decision point."""

    WAIT = 0
    GERMINATE = 1
    FOSSILIZE = 2
    CULL = 3


@dataclass(frozen=True)
class ControllerAction:
    """One decision: wait, germinate ``blueprint`` in ``slot``, fossilize or cull ``slot``."""

    kind: ActionKind
    slot: str | None = None
    blueprint: str | None = None

    def __post_init__(self) -> None:
        if self.kind is ActionKind.WAIT:
            if self.slot is not None or self.blueprint is not None:
                raise EsperError("a WAIT action takes no slot and no blueprint")
        elif self.slot is None:
            raise EsperError(f"a {self.kind.name} action needs a slot")
        if self.kind is ActionKind.GERMINATE and self.blueprint is None:
            raise EsperError("a GERMINATE action needs a blueprint")

    @classmethod
    def wait(cls) -> ControllerAction:
        return cls(ActionKind.WAIT)

    @classmethod
    def germinate(cls, slot: str, blueprint: str) -> ControllerAction:
        return cls(ActionKind.GERMINATE, slot, blueprint)

    @classmethod
    def fossilize(cls, slot: str) -> ControllerAction:
        return cls(ActionKind.FOSSILIZE, slot)

    @classmethod
    def cull(cls, slot: str) -> ControllerAction:
        return cls(ActionKind.CULL, slot)

    def __str__(self) -> str:
        if self.kind is ActionKind.WAIT:
            return "wait"
        if self.kind is ActionKind.GERMINATE:
            return f"germinate({self.slot}, {self.blueprint})"
        return f"{self.kind.name.lower()}({self.slot})"


@dataclass
class SlotTelemetry:
    """What Tamiyo sees of one slot at a decision point."""

    name: str
    index: int
    stage: SeedStage
    alpha: float
    epochs_in_stage: int
    blueprint: str | None
    seed_params: int
    # Host-side signals at the slot (measured every epoch, seed or not).
    act_mean: float
    act_std: float
    act_dead_frac: float  # share of units that never activate (> 0) on the probe batch
    act_effective_rank: float  # entropy-based effective rank / width, in [0, 1]
    host_grad_norm: float  # gradient norm of the host parameters of the block feeding the slot
    seed_grad_norm: float  # gradient norm of the live seed's parameters (0 if none)
    contribution: float  # val accuracy with seed - without (ablation), 0 if no seed
    grad_rms: float  # RMS of the loss gradient at the slot on the probe batch
    grad_predictability: float  # out-of-sample share of that gradient a smooth f(slot input) predicts
    kind: str  # "vector" | "seq" | "image"
    width: int  # channels at the slot
    # How much better the *next* slot's gradient is predicted from this slot's input than from
    # its own (> 0: the layer in between loses what the loss needs; grow here). 0 for the last slot.
    grad_deficit: float = 0.0


@dataclass
class GlobalTelemetry:
    """Run-wide signals at a decision point."""

    epoch: int
    max_epochs: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    best_val_accuracy: float
    plateau_epochs: int  # epochs since the best validation accuracy improved
    host_params: int
    seed_params: int


@dataclass
class Observation:
    """A decision point's whole picture: global telemetry plus each slot's."""

    global_: GlobalTelemetry
    slots: list[SlotTelemetry]
    candidates: list[str]  # blueprint names a GERMINATE may name right now
    candidate_features: list[list[float]] = field(default_factory=list)  # blueprint_features, per candidate
    candidate_params: list[list[int]] = field(default_factory=list)  # [slot][candidate] cost, -1: no fit
    task_features: list[float] = field(default_factory=list)  # TaskData.features()
    distill: dict[str, float] = field(default_factory=dict)  # per-slot distillation gap (feature mismatch)


@dataclass
class BenchmarkReport:
    """Urabrask's measurement of one compiled blueprint on one device."""

    blueprint_hash: str
    device: str
    params: int
    flops: int
    latency_p50_ms: float
    latency_p95_ms: float
    peak_memory_bytes: int
    grad_norm_ratio: float  # output-grad norm / input-grad norm; far from 1 = hazardous
    nan_under_large_inputs: bool
    low_precision_error: float
    risk: str  # "low" | "medium" | "high"
    passed: bool
    reason: str = ""


@dataclass
class LineageEvent:
    """One architectural change of a host, as written to the ledger."""

    seq: int
    run_id: str
    host_id: str
    # "germinate" | "transition" | "fossilize" | "cull" | "rollback" | "init" | "checkpoint" | "resume"
    kind: str
    slot: str
    blueprint_hash: str
    stage: str
    epoch: int
    step: int
    weights_digest: str
    metrics: dict[str, float]
    prev_hash: str
    event_hash: str = ""
    blueprint_name: str = ""  # human-readable name for timelines; hashed like every other field


@dataclass
class FieldReport:
    """How one seed fared, sent back to Karn when the seed ends."""

    run_id: str
    blueprint_hash: str
    blueprint_name: str
    slot: str
    slot_kind: str
    slot_width: int
    task: str
    stage_reached: str
    outcome: str  # "fossilized" | "culled"
    accuracy_before: float
    accuracy_after: float
    seed_params: int
    epochs_alive: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy_delta(self) -> float:
        return self.accuracy_after - self.accuracy_before


@dataclass(frozen=True)
class HostContext:
    """The static context of a run that a lookup table of schedules could key on, read from the
    host itself: the input's kind (``vector`` | ``seq`` | ``image`` | ``tokens``), the host's kind
    (``mlp`` | ``cnn1d`` | ``cnn2d`` | ``transformer``) and its depth (hidden blocks)."""

    input_kind: str
    host_kind: str
    depth: int

    @property
    def key(self) -> str:
        """``host_kind/depth/input_kind``, e.g. ``mlp/2/vector`` (the best-fixed table's key)."""
        return f"{self.host_kind}/{self.depth}/{self.input_kind}"

    @classmethod
    def from_key(cls, key: str) -> HostContext:
        """The context ``key`` names; EsperError for a malformed key."""
        parts = key.split("/")
        if len(parts) != 3 or not parts[1].isdigit():
            raise EsperError(f"bad host context key {key!r} (expected host_kind/depth/input_kind, e.g. mlp/2/vector)")
        return cls(input_kind=parts[2], host_kind=parts[0], depth=int(parts[1]))


@dataclass
class TrialResult:
    """Short what-if runs (``Trainer.trial_candidates``): the validation loss the host reaches
    alone in ``steps`` batches (``control_loss``) and with each (slot, blueprint) seed grown."""

    steps: int
    control_loss: float
    losses: dict[tuple[str, str], float]

    def gains(self) -> dict[tuple[str, str], float]:
        """Per (slot, blueprint), the share of the control's validation loss the seed removed."""
        base = max(self.control_loss, 1e-12)
        return {key: (self.control_loss - loss) / base for key, loss in self.losses.items()}


# ---- kinds and statuses compared as strings across parts ------------------------------------------
# StrEnum members equal their values ("ready" == BlueprintStatus.READY) and serialise as them in
# JSON and Parquet, so files written before these types existed still load unchanged. (yaml.safe_dump
# refuses str subclasses: write ``str(member)`` where one could reach YAML.)


class EventKind(enum.StrEnum):
    """What happened in a run's event log and lineage ledger (``LineageEvent.kind``)."""

    GERMINATE = "germinate"
    TRANSITION = "transition"
    FOSSILIZE = "fossilize"
    CULL = "cull"
    ROLLBACK = "rollback"
    INIT = "init"
    CHECKPOINT = "checkpoint"
    RESUME = "resume"


class SeedOutcome(enum.StrEnum):
    """How a seed ended (``FieldReport.outcome``)."""

    FOSSILIZED = "fossilized"
    CULLED = "culled"


class BlueprintStatus(enum.StrEnum):
    """Where a blueprint is in the pipeline: ``pending`` -> ``compiled`` -> ``ready`` | ``rejected``."""

    PENDING = "pending"
    COMPILED = "compiled"
    READY = "ready"
    REJECTED = "rejected"


class RejectionStage(enum.StrEnum):
    """Where a blueprint (or a submission that never parsed) was rejected."""

    PARSE = "parse"
    HASH = "hash"
    CONTRACT = "contract"
    COMPILE = "compile"
    BENCHMARK = "benchmark"
    INTERNAL = "internal"
    STORAGE = "storage"


class CompileMode(enum.StrEnum):
    """How Tezzeret ran a blueprint: ``torch.compile``'d, or eagerly (compile off, failed or disagreed)."""

    COMPILED = "compiled"
    EAGER = "eager"


class ControllerKind(enum.StrEnum):
    """The controllers a run or an evaluation can name (``ControllerConfig.kind``)."""

    STATIC = "static"
    RANDOM = "random"
    HEURISTIC = "heuristic"
    TRIAL = "trial"
    FIXED = "fixed"
    BEST_FIXED = "best-fixed"
    REPLAY = "replay"
    POLICY = "policy"


# ---- the blueprint pipeline's records ---------------------------------------------------------------
@dataclass(frozen=True)
class CompileInfo:
    """How a blueprint compiled: mode ``compiled`` or ``eager`` (with why), and the seconds it took."""

    mode: CompileMode | str
    seconds: float
    error: str = ""
    # torch.compile's cache artifacts (torch.compiler.save_cache_artifacts): what compiling
    # produced, kept by Urza so another process can warm its compile caches from it.
    artifacts: bytes = b""

    def without_artifacts(self) -> CompileInfo:
        """The same record without the (possibly large) artifacts: what a progress note carries."""
        return CompileInfo(self.mode, self.seconds, self.error)


@dataclass(frozen=True)
class CatalogueRow:
    """One ready blueprint as Urza serves it to clients: the spec as JSON, the content hash Urza
    vouches for, Urabrask's report and how it compiled. Clients re-check the hash themselves."""

    spec_json: str
    content_hash: str
    report: BenchmarkReport
    compile_mode: str = ""
    compile_seconds: float = 0.0


# ---- optional collaborators --------------------------------------------------------------------------
@runtime_checkable
class AccuracySink(Protocol):
    """Takes the host's validation accuracy after every epoch (a metrics gauge, say)."""

    def record_accuracy(self, accuracy: float) -> None: ...


@runtime_checkable
class GerminationSink(Protocol):
    """Counts germinations as they happen."""

    def record_germination(self) -> None: ...


@runtime_checkable
class SlotGapSource(Protocol):
    """A loss that measures, per slot, what the host still fails to absorb (distillation's teacher gap);
    the trainer adds it to each observation."""

    def slot_gaps(self, trainer: Any) -> dict[str, float]: ...


@runtime_checkable
class FieldReportSink(Protocol):
    """Takes a run's field reports when it ends (Urza and Karn, in the pipeline)."""

    def send_field_reports(self, reports: Iterable[FieldReport]) -> None: ...


# ---- a run's event log --------------------------------------------------------------------------------
class SeedEvent(TypedDict):
    """One row of a run's event log (``Trainer.events``, ``seed_events.parquet``, the checkpoint):
    a seed's stage transition, or a governor rollback (``kind`` rollback: ``slot`` empty and no
    seed fields). Read back from a checkpoint, ``kind`` is the plain string (equal to the member)."""

    epoch: int
    step: int
    val_acc: float  # validation accuracy when it happened
    kind: EventKind | str  # germinate, transition, fossilize, cull or rollback
    slot: str
    reason: str
    old: NotRequired[str]  # SeedStage names
    new: NotRequired[str]
    blueprint: NotRequired[str]
    blueprint_hash: NotRequired[str]
    alpha: NotRequired[float]
    seed_params: NotRequired[int]


# ---- the environment's per-step info ----------------------------------------------------------------
class EnvInfo(TypedDict):
    """The ``info`` dict ``esper/Morphogenesis-v0`` returns from ``reset`` and ``step``."""

    task: str  # the task's name (TaskData.name)
    epoch: int
    val_acc: float
    test_acc: float | None  # scored once, when the episode ends; None before
    start_val_acc: float  # validation accuracy after the warm-up epochs
    seed_params: int  # parameters in seeds now
    actions: int  # non-wait actions taken so far
    germinated_slots: list[str]  # slots germinated in, in order (a slot may repeat)
    ground_truth_slot: str  # the slot a task with a planted bottleneck needs ("" for others)
