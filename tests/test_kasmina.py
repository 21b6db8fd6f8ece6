"""Tests of esper_ray.kasmina: the lifecycle state machine, gates, alpha schedules, and the
invariants a seed slot promises its host (dormant = plain, gradient isolation, blending)."""

from __future__ import annotations

import itertools
import math

import pydantic
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper_ray.blueprints import STANDARD_BLUEPRINTS, build_seed, slot_kind
from esper_ray.blueprints.spec import BlueprintSpec
from esper_ray.contracts import (
    LEGAL_TRANSITIONS,
    LIVE_STAGES,
    EsperError,
    IllegalTransition,
    SeedStage,
)
from esper_ray.hosts import HostConfig, MorphoHost, build_host
from esper_ray.kasmina import (
    AlphaSchedule,
    GateClosed,
    GateShapeError,
    LifecycleConfig,
    SeedSlot,
    Transition,
    gate_logits,
    gated_blueprint,
    set_gate,
)

pytestmark = pytest.mark.usefixtures("torch_seed")

S = SeedStage
INPUT_SHAPES = {"mlp": (40,), "cnn1d": (40,), "cnn2d": (1, 8, 8)}
HOST_KINDS = list(INPUT_SHAPES)
FITS = {"vector": {"vector", "seq", "image"}, "seq": {"vector", "seq"}, "image": {"image"}}
SLOT_NAMES = ["input", "hidden0", "hidden1"]
_SLOT_SHAPES = {
    "mlp": {"input": (40,), "hidden0": (64,), "hidden1": (64,)},
    "cnn1d": {"input": (40,), "hidden0": (64, 20), "hidden1": (64, 10)},
    "cnn2d": {"input": (1, 8, 8), "hidden0": (64, 4, 4), "hidden1": (64, 2, 2)},
}
BLENDS = ("lerp", "gated")


def gate_reads(kind: str, slot: str, bp: str = "residual_mlp") -> bool:
    """A gated seed of ``bp`` can grow in this slot: a vector blueprint in a vector slot."""
    return slot_kind(_SLOT_SHAPES[kind][slot]) == "vector" and STANDARD_BLUEPRINTS[bp].kind == "vector"


def spec_for(bp: str, blend: str = "lerp") -> BlueprintSpec:
    """The standard blueprint ``bp``, gated when ``blend`` is "gated"."""
    spec = STANDARD_BLUEPRINTS[bp]
    return gated_blueprint(spec) if blend == "gated" else spec


# Every (host kind, slot, blueprint, blend) where the blueprint fits the slot (gated: where the gate reads it).
HOST_SLOT_BLUEPRINT = [
    pytest.param(kind, slot, bp, blend, id=f"{kind}-{slot}-{bp}-{blend}")
    for kind in HOST_KINDS
    for slot in SLOT_NAMES
    for bp, spec in STANDARD_BLUEPRINTS.items()
    for blend in BLENDS
    if slot_kind(_SLOT_SHAPES[kind][slot]) in FITS[spec.kind] and (blend == "lerp" or gate_reads(kind, slot, bp))
]
# (host kind, slot, blend) for the slot's default blueprint, gated only where the gate reads the slot.
HOST_SLOT_BLEND = [
    pytest.param(kind, slot, blend, id=f"{kind}-{slot}-{blend}")
    for kind in HOST_KINDS
    for slot in SLOT_NAMES
    for blend in BLENDS
    if blend == "lerp" or gate_reads(kind, slot)
]
# One fitting blueprint per slot kind, for tests that are about slots rather than blueprints.
DEFAULT_BP = {"vector": "residual_mlp", "seq": "conv1d", "image": "conv2d"}


def make_host(kind: str, lifecycle: LifecycleConfig | None = None, slots="all") -> MorphoHost:
    return build_host(HostConfig(kind=kind, slots=slots), INPUT_SHAPES[kind], 10, lifecycle=lifecycle)


def plain_twin(host: MorphoHost, kind: str) -> MorphoHost:
    """The same host architecture built with ``slots=[]``, loaded with the host's own weights."""
    twin = make_host(kind, slots=[])
    twin.load_state_dict(host.host_state_dict(), strict=True)
    assert len(twin.slots) == 0
    return twin


def batch(kind: str, n: int = 6, gen_seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(gen_seed)
    return torch.randn((n, *INPUT_SHAPES[kind]), generator=gen), torch.randint(0, 10, (n,), generator=gen)


def out_and_grads(model: torch.nn.Module, params, x, y) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits, then the gradients of the cross-entropy w.r.t. the input and each of ``params``."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    grads = [x.grad] + [p.grad for p in params]
    assert all(g is not None for g in grads)
    return out.detach(), [g.clone() for g in grads]


def perturb_seed(seed: torch.nn.Module, gen_seed: int) -> None:
    """Move a seed away from identity: gamma around 1, every weight randomised."""
    gen = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        for name, p in seed.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name == "gamma":
                p.copy_(1.0 + 0.5 * noise)
            else:
                p.add_(0.3 * noise)


def to_stage(slot: SeedSlot, stage: SeedStage, blueprint: str = "residual_mlp", blend: str = "lerp") -> None:
    """Drive a DORMANT slot legally (via germinate and legal edges, gates bypassed) to ``stage``."""
    path = {
        S.DORMANT: [],
        S.GERMINATED: [],
        S.TRAINING: [S.TRAINING],
        S.BLENDING: [S.TRAINING, S.BLENDING],
        S.HOLDING: [S.TRAINING, S.BLENDING, S.HOLDING],
        S.FOSSILIZED: [S.TRAINING, S.BLENDING, S.HOLDING, S.FOSSILIZED],
        S.CULLED: [S.CULLED],
        S.EMBARGOED: [S.CULLED, S.EMBARGOED],
    }[stage]
    if stage is not S.DORMANT:
        slot.germinate(build_seed(spec_for(blueprint, blend), slot.shape, generator_seed=0))
    for nxt in path:
        slot.transition(nxt, "test")
    assert slot.stage is stage


def lone_slot(config: LifecycleConfig | None = None, shape=(16,)) -> SeedSlot:
    return SeedSlot("s", 1, shape, config or LifecycleConfig())


# ---- 1. dormant = plain ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HOST_KINDS)
def test_dormant_host_equals_plain_host(kind):
    host = make_host(kind)
    assert set(host.slots) == set(SLOT_NAMES)
    assert all(s.stage is S.DORMANT for s in host.iter_slots())
    plain = plain_twin(host, kind)
    assert host.state_dict().keys() == plain.state_dict().keys()
    x, y = batch(kind)
    out_h, grads_h = out_and_grads(host, list(host.parameters()), x, y)
    out_p, grads_p = out_and_grads(plain, list(plain.parameters()), x, y)
    assert torch.equal(out_h, out_p)
    assert len(grads_h) == len(grads_p) == 1 + len(list(host.host_parameters()))
    for gh, gp in zip(grads_h, grads_p, strict=True):
        assert torch.equal(gh, gp)


@pytest.mark.parametrize("kind", HOST_KINDS)
def test_dormant_again_after_germinate_cull_embargo_equals_plain(kind):
    cfg = LifecycleConfig(min_training_epochs=0, embargo_epochs=2)
    host = make_host(kind, cfg)
    x, y = batch(kind)
    for slot in host.iter_slots():
        host.germinate(slot.name, DEFAULT_BP[slot.kind], generator_seed=3)
        assert slot.advance() is S.TRAINING
        perturb_seed(slot.seed, 4)
    # A training step of the seeds only, so they are not at birth when culled.
    seeds = [p for s in host.iter_slots() for p in s.seed.parameters()]
    opt = torch.optim.SGD(seeds, lr=0.1)
    torch.nn.functional.cross_entropy(host(x), y).backward()
    opt.step()
    for slot in host.iter_slots():
        slot.cull("test")
        assert slot.advance() is S.EMBARGOED
        assert slot.advance() is None
        slot.on_epoch_end()
        assert slot.advance() is None
        slot.on_epoch_end()
        assert slot.advance() is S.DORMANT
        assert slot.seed is None and slot.is_open
    assert host._active == [None, None, None]
    assert host.param_count()["seeds"] == 0
    plain = plain_twin(host, kind)
    assert host.state_dict().keys() == plain.state_dict().keys()
    out_h, grads_h = out_and_grads(host, list(host.parameters()), x, y)
    out_p, grads_p = out_and_grads(plain, list(plain.parameters()), x, y)
    assert torch.equal(out_h, out_p)
    for gh, gp in zip(grads_h, grads_p, strict=True):
        assert torch.equal(gh, gp)


# ---- 2. isolation while TRAINING ----------------------------------------------------------------
@pytest.mark.parametrize(("kind", "slot_name", "bp", "blend"), HOST_SLOT_BLUEPRINT)
def test_isolated_training_leaves_host_exactly_unchanged(kind, slot_name, bp, blend):
    host = make_host(kind)
    plain = plain_twin(host, kind)
    slot = host.germinate(slot_name, spec_for(bp, blend), generator_seed=5)
    slot.transition(S.TRAINING)
    perturb_seed(slot.seed, 6)
    x, y = batch(kind)
    # The seed is far from identity: on its own it changes the activation.
    h_probe = torch.randn((4, *slot.shape))
    with torch.no_grad():
        assert not torch.allclose(slot.seed(h_probe), h_probe)

    captured = {}

    def keep_output(_module, _inputs, output):
        output.retain_grad()
        captured["h"], captured["out"] = _inputs[0], output

    handle = slot.register_forward_hook(keep_output)
    out_h, grads_h = out_and_grads(host, list(host.host_parameters()), x, y)
    handle.remove()
    out_p, grads_p = out_and_grads(plain, list(plain.host_parameters()), x, y)
    assert torch.equal(out_h, out_p)
    for gh, gp in zip(grads_h, grads_p, strict=True):
        assert torch.equal(gh, gp)
    # The slot's value is exactly the host activation.
    assert torch.equal(captured["out"], captured["h"])
    # The seed learns from the global loss's gradient at the slot: its grads are exactly those of
    # seed(h.detach()) under the cotangent the host's loss puts on the slot output.
    seed_params = list(slot.seed.parameters())
    for p in seed_params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0, "a seed parameter got no gradient"
    expected = torch.autograd.grad(slot.seed(captured["h"].detach()), seed_params, captured["out"].grad)
    for p, e in zip(seed_params, expected, strict=True):
        assert torch.allclose(p.grad, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", HOST_KINDS)
def test_germinated_seed_is_not_run(kind):
    host = make_host(kind)
    slot = host.germinate("hidden0", DEFAULT_BP[host.slot("hidden0").kind])
    assert host._active[slot.index] is None

    def boom(*_args, **_kwargs):
        raise AssertionError("a GERMINATED seed must not run")

    slot.seed.forward = boom
    x, _ = batch(kind)
    host(x)


# ---- 3. isolation while BLENDING / HOLDING -------------------------------------------------------
def _upstream_grads(host: MorphoHost, slot: SeedSlot | None, index: int, x, g) -> list[torch.Tensor]:
    """Backprop cotangent ``g`` from the slot's output (or the raw activation if slot is None)
    and return the gradients of the input and of every host parameter upstream of the slot."""
    host.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    h = xx
    for block in host.blocks[:index]:
        h = block(h)
    out = h if slot is None else slot(h)
    out.backward(g)
    upstream = [p for block in host.blocks[:index] for p in block.parameters()]
    return [xx.grad.clone()] + [p.grad.clone() for p in upstream]


BLEND_STEPS = 8


@pytest.mark.parametrize(("kind", "slot_name", "blend"), HOST_SLOT_BLEND)
def test_upstream_gets_only_scaled_host_gradient_while_blending(kind, slot_name, blend):
    cfg = LifecycleConfig(alpha=AlphaSchedule(kind="linear", steps=BLEND_STEPS))
    host = make_host(kind, cfg)
    slot = host.slot(slot_name)
    host.germinate(slot_name, spec_for(DEFAULT_BP[slot.kind], blend), generator_seed=7)
    slot.transition(S.TRAINING)
    slot.transition(S.BLENDING)
    x, _ = batch(kind)
    g = torch.randn((x.shape[0], *slot.shape))
    reference = _upstream_grads(host, None, slot.index, x, g)
    assert any(r.abs().sum() > 0 for r in reference)
    seen_alphas = []
    for t in range(BLEND_STEPS + 1):
        if t == BLEND_STEPS:
            slot.transition(S.HOLDING)
        alpha = slot.alpha
        seen_alphas.append(alpha)
        perturb_seed(slot.seed, 100 + t)
        first = _upstream_grads(host, slot, slot.index, x, g)
        seed_grads = [p.grad.clone() for p in slot.seed.parameters()]
        perturb_seed(slot.seed, 200 + t)
        second = _upstream_grads(host, slot, slot.index, x, g)
        for a, b, r in zip(first, second, reference, strict=True):
            assert torch.equal(a, b), f"upstream gradient depends on the seed at alpha {alpha}"
            # Same up to float rounding, relative to the gradient's scale (entries near 0 included).
            assert torch.allclose(a, (1 - alpha) * r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))
        if alpha == 1.0:
            assert all(not a.any() for a in first)
        # The seed's own gradient is alpha-scaled.
        if alpha > 0:
            assert any(s.abs().sum() > 0 for s in seed_grads)
        slot.on_step()
    assert seen_alphas == [t / BLEND_STEPS for t in range(BLEND_STEPS + 1)]


@pytest.mark.parametrize(("kind", "slot_name", "blend"), HOST_SLOT_BLEND)
def test_blending_seed_gradient_is_alpha_scaled(kind, slot_name, blend):
    cfg = LifecycleConfig(alpha=AlphaSchedule(kind="linear", steps=4))
    host = make_host(kind, cfg)
    slot = host.slot(slot_name)
    host.germinate(slot_name, spec_for(DEFAULT_BP[slot.kind], blend), generator_seed=7)
    slot.transition(S.TRAINING)
    slot.transition(S.BLENDING)
    for _ in range(3):
        slot.on_step()
    perturb_seed(slot.seed, 9)
    h = torch.randn((5, *slot.shape), requires_grad=True)
    g = torch.randn((5, *slot.shape))
    slot.zero_grad(set_to_none=True)
    slot(h).backward(g)
    params = list(slot.seed.parameters())
    expected = torch.autograd.grad(slot.seed(h.detach()), params, 0.75 * g)
    for p, e in zip(params, expected, strict=True):
        assert torch.allclose(p.grad, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("blend", BLENDS)
def test_fossilized_seed_is_part_of_the_host(blend):
    """Contrast: once fossilized, gradient does flow through the seed to upstream layers."""
    host = make_host("mlp")
    slot = host.germinate("hidden1", spec_for("residual_mlp", blend), generator_seed=1)
    for stage in (S.TRAINING, S.BLENDING, S.HOLDING, S.FOSSILIZED):
        slot.transition(stage)
    x, _ = batch("mlp")
    g = torch.randn(x.shape[0], 64)
    perturb_seed(slot.seed, 1)
    first = _upstream_grads(host, slot, slot.index, x, g)
    perturb_seed(slot.seed, 2)
    second = _upstream_grads(host, slot, slot.index, x, g)
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    h = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(slot(h), slot.seed(h))
    assert slot.alpha == 1.0
    seed_ids = {id(p) for p in slot.seed.parameters()}
    assert not seed_ids & {id(p) for p in host.host_parameters()}


# ---- 4. blending formula and schedules ---------------------------------------------------------
@pytest.mark.parametrize(
    "schedule",
    [
        AlphaSchedule(kind="linear", steps=10),
        AlphaSchedule(kind="sigmoid", steps=10),
        AlphaSchedule(kind="sigmoid", steps=10, t_mid=3.0, temperature=0.7),
    ],
    ids=["linear", "sigmoid", "sigmoid-custom"],
)
@pytest.mark.parametrize(("kind", "slot_name", "blend"), HOST_SLOT_BLEND)
def test_blend_output_formula(kind, slot_name, blend, schedule):
    host = make_host(kind, LifecycleConfig(alpha=schedule))
    slot = host.slot(slot_name)
    host.germinate(slot_name, spec_for(DEFAULT_BP[slot.kind], blend), generator_seed=2)
    slot.transition(S.TRAINING)
    slot.transition(S.BLENDING)
    perturb_seed(slot.seed, 3)
    h = torch.randn((7, *slot.shape))
    with torch.no_grad():
        s = slot.seed(h)
    assert not torch.allclose(s, h, atol=1e-2)
    # atol 1e-6 on O(1) values: a few float32 ulps, scaled up where the seed's output is larger.
    atol = 1e-6 * max(1.0, float(s.abs().max()), float(h.abs().max()))
    for t in range(0, 14):
        assert slot.blend_steps == t
        alpha = slot.alpha
        assert alpha == schedule(t)
        with torch.no_grad():
            out = slot(h)
            assert torch.allclose(out, alpha * s + (1 - alpha) * h, rtol=0, atol=atol)
            with slot.ablated():
                assert torch.equal(slot(h), h)
        slot.on_step()
    slot.transition(S.HOLDING)
    with torch.no_grad():
        assert torch.allclose(slot(h), s, rtol=0, atol=atol)


def test_linear_schedule_values():
    sched = AlphaSchedule(kind="linear", steps=16)
    for t in range(0, 16):
        assert sched(t) == t / 16
    for t in (16, 17, 1000):
        assert sched(t) == 1.0
    assert sched(-3) == 0.0


@pytest.mark.parametrize("steps", [1, 2, 7, 10, 160])
def test_sigmoid_schedule_values(steps):
    sched = AlphaSchedule(kind="sigmoid", steps=steps)
    assert AlphaSchedule().kind == "sigmoid" and AlphaSchedule().steps == 160
    for t in range(steps):
        expected = 1.0 / (1.0 + math.exp(-(t - steps / 2) / (steps / 10)))
        assert sched(t) == pytest.approx(expected, rel=1e-12, abs=0)
        assert sched(t) < 1.0
    assert sched(steps // 2) == pytest.approx(0.5 if steps % 2 == 0 else sched(steps // 2))
    for t in (steps, steps + 1, 10 * steps):
        assert sched(t) == 1.0
    values = [sched(t) for t in range(-2, 2 * steps + 2)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b for a, b in itertools.pairwise(values))


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.integers(1, 300),
    kind=st.sampled_from(["linear", "sigmoid"]),
    mid_frac=st.none() | st.floats(0, 1),
    temperature=st.none() | st.floats(0.01, 100),
)
def test_schedules_monotone_and_end_at_one(steps, kind, mid_frac, temperature):
    sched = AlphaSchedule(
        kind=kind, steps=steps, t_mid=None if mid_frac is None else mid_frac * steps, temperature=temperature
    )
    values = [sched(t) for t in range(0, steps + 3)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[steps:] == [1.0, 1.0, 1.0]


def test_schedule_validation():
    with pytest.raises(pydantic.ValidationError):
        AlphaSchedule(steps=0)
    with pytest.raises(pydantic.ValidationError, match="t_mid must lie in"):
        AlphaSchedule(steps=10, t_mid=11)
    with pytest.raises(pydantic.ValidationError, match="t_mid must lie in"):
        AlphaSchedule(steps=10, t_mid=-1)
    with pytest.raises(pydantic.ValidationError):
        AlphaSchedule(temperature=0)
    with pytest.raises(pydantic.ValidationError):
        AlphaSchedule(kind="cosine")
    with pytest.raises(pydantic.ValidationError):
        LifecycleConfig(min_training_epochs=-1)
    with pytest.raises(pydantic.ValidationError):
        LifecycleConfig(max_seed_grad_norm=0)


def test_sigmoid_schedule_small_temperature_does_not_overflow():
    # Regression: math.exp(-(t - t_mid) / temperature) used to overflow far before t_mid.
    sched = AlphaSchedule(kind="sigmoid", steps=160, temperature=0.1)
    assert sched(0) == pytest.approx(0.0, abs=1e-300)
    assert sched(80) == 0.5
    assert sched(159) == 1.0  # saturated in float, still <= 1
    values = [sched(t) for t in range(161)]
    assert all(a <= b for a, b in itertools.pairwise(values))


# ---- 5. lifecycle legality ----------------------------------------------------------------------
ALL_PAIRS = list(itertools.product(SeedStage, SeedStage))
ILLEGAL = [(a, b) for a, b in ALL_PAIRS if b not in LEGAL_TRANSITIONS[a]]
LEGAL = [(a, b) for a, b in ALL_PAIRS if b in LEGAL_TRANSITIONS[a]]


def test_transition_table_shape():
    assert len(ALL_PAIRS) == 64 and len(LEGAL) == 11 and len(ILLEGAL) == 53
    assert LEGAL_TRANSITIONS[S.FOSSILIZED] == frozenset()
    assert set(LIVE_STAGES) == {S.GERMINATED, S.TRAINING, S.BLENDING, S.HOLDING}


@pytest.mark.parametrize(("old", "new"), ILLEGAL, ids=[f"{a.name}->{b.name}" for a, b in ILLEGAL])
def test_illegal_transition_raises(old, new):
    slot = lone_slot()
    to_stage(slot, old)
    events = []
    slot.add_listener(lambda _s, e: events.append(e))
    seed, epochs, blend = slot.seed, slot.epochs_in_stage, slot.blend_steps
    with pytest.raises(IllegalTransition) as info:
        slot.transition(new, "test")
    assert isinstance(info.value, EsperError)
    assert f"{old.name} -> {new.name}" in str(info.value)
    assert slot.stage is old and slot.seed is seed
    assert (slot.epochs_in_stage, slot.blend_steps) == (epochs, blend)
    assert events == []


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize(("old", "new"), LEGAL, ids=[f"{a.name}->{b.name}" for a, b in LEGAL])
def test_legal_transition_succeeds(old, new, blend):
    slot = lone_slot()
    to_stage(slot, old, blend=blend)
    slot.on_epoch_end()
    events = []
    slot.add_listener(lambda _s, e: events.append(e))
    if (old, new) == (S.DORMANT, S.GERMINATED):
        seed = build_seed(STANDARD_BLUEPRINTS["lowrank"], slot.shape)
        slot.germinate(seed, "test")
        assert slot.seed is seed
    else:
        slot.transition(new, "test")
    assert slot.stage is new
    assert slot.epochs_in_stage == 0
    assert [(e.old, e.new) for e in events] == [(old, new)]
    if new in (S.CULLED, S.EMBARGOED, S.DORMANT):
        assert slot.seed is None and slot.seed_params == 0
    else:
        assert slot.seed is not None


@pytest.mark.parametrize("stage", [s for s in SeedStage if s is not S.DORMANT])
def test_germinate_outside_dormant_raises(stage):
    slot = lone_slot()
    to_stage(slot, stage)
    seed_before = slot.seed
    with pytest.raises(IllegalTransition, match=f"cannot germinate in stage {stage.name}"):
        slot.germinate(build_seed(STANDARD_BLUEPRINTS["lowrank"], slot.shape))
    assert slot.stage is stage and slot.seed is seed_before


def test_germinate_wrong_shape_raises():
    slot = lone_slot(shape=(16,))
    with pytest.raises(EsperError, match="seed built for shape"):
        slot.germinate(build_seed(STANDARD_BLUEPRINTS["lowrank"], (32,)))
    assert slot.stage is S.DORMANT and slot.seed is None


@pytest.mark.parametrize("stage", [s for s in SeedStage if s is not S.HOLDING])
def test_fossilize_outside_holding_raises(stage):
    slot = lone_slot(LifecycleConfig(min_holding_epochs=0))
    to_stage(slot, stage)
    with pytest.raises(IllegalTransition, match="needs HOLDING"):
        slot.fossilize()
    assert slot.stage is stage


def test_fossilize_with_gate_closed_raises_gate_closed():
    slot = lone_slot(LifecycleConfig(min_holding_epochs=1, min_improvement=0.0))
    to_stage(slot, S.HOLDING)
    with pytest.raises(GateClosed, match="0/1 epochs of holding") as info:
        slot.fossilize()
    assert isinstance(info.value, EsperError) and not isinstance(info.value, IllegalTransition)
    assert slot.stage is S.HOLDING
    slot.on_epoch_end()
    slot.fossilize()
    assert slot.stage is S.FOSSILIZED


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("stage", list(SeedStage))
def test_cull(stage, blend):
    slot = lone_slot()
    to_stage(slot, stage, blend=blend)
    if stage.is_live:
        slot.cull()
        assert slot.stage is S.CULLED and slot.seed is None
    else:
        with pytest.raises(IllegalTransition, match=f"nothing to cull in stage {stage.name}"):
            slot.cull()
        assert slot.stage is stage


# ---- 6. gates ------------------------------------------------------------------------------------
def test_gates_through_a_whole_life():
    cfg = LifecycleConfig(
        min_training_epochs=3,
        max_seed_grad_norm=10.0,
        min_holding_epochs=2,
        min_improvement=0.01,
        embargo_epochs=2,
        alpha=AlphaSchedule(kind="linear", steps=4),
    )
    slot = lone_slot(cfg)
    assert slot.advance() is None  # DORMANT: germination is never automatic
    slot.germinate(build_seed(STANDARD_BLUEPRINTS["lowrank"], slot.shape))
    assert slot.advance() is S.TRAINING

    # TRAINING -> BLENDING: epochs first.
    slot.seed_grad_norm = 1.0
    for epoch in range(3):
        assert slot.epochs_in_stage == epoch
        assert slot.gate(S.BLENDING) == f"{epoch}/3 epochs of isolated training"
        assert slot.advance() is None and slot.stage is S.TRAINING
        slot.on_step()  # steps do not count as epochs, nor as blend steps yet
        assert slot.blend_steps == 0
        slot.on_epoch_end()
    # ... then a healthy gradient: finite, > 0, < max.
    for bad in (0.0, -1.0, float("nan"), float("inf"), 10.0, 1e6):
        slot.seed_grad_norm = bad
        assert "unhealthy seed gradient norm" in slot.gate(S.BLENDING)
        assert slot.advance() is None and slot.stage is S.TRAINING
    slot.seed_grad_norm = 9.99
    assert slot.gate(S.BLENDING) == ""
    assert slot.advance() is S.BLENDING
    assert slot.blend_steps == 0 and slot.epochs_in_stage == 0

    # BLENDING -> HOLDING only once alpha reaches 1; epochs do not help, blend steps do.
    for _ in range(10):
        slot.on_epoch_end()
    for t in range(4):
        assert slot.alpha == t / 4
        assert slot.advance() is None and slot.stage is S.BLENDING
        slot.on_step()
    assert slot.alpha == 1.0
    assert slot.advance() is S.HOLDING

    # HOLDING: never automatic; fossilizing needs epochs and contribution.
    slot.on_epoch_end()
    slot.on_epoch_end()
    assert slot.advance() is None and slot.stage is S.HOLDING
    slot.contribution = 0.009
    with pytest.raises(GateClosed, match="contribution"):
        slot.fossilize()
    slot.contribution = 0.01
    slot.fossilize()
    assert slot.stage is S.FOSSILIZED
    assert slot.advance() is None  # terminal


def test_holding_epochs_gate_before_contribution():
    slot = lone_slot(LifecycleConfig(min_holding_epochs=2, min_improvement=0.0))
    to_stage(slot, S.HOLDING)
    slot.contribution = 1.0
    slot.on_epoch_end()
    with pytest.raises(GateClosed, match="1/2 epochs of holding"):
        slot.fossilize()
    slot.on_epoch_end()
    slot.fossilize()
    assert slot.stage is S.FOSSILIZED


def test_negative_contribution_blocks_fossilize_at_default_threshold():
    slot = lone_slot(LifecycleConfig(min_holding_epochs=0))
    to_stage(slot, S.HOLDING)
    slot.contribution = -0.001
    with pytest.raises(GateClosed):
        slot.fossilize()
    slot.contribution = 0.0
    slot.fossilize()


def test_sigmoid_blend_reaches_holding_exactly_at_steps():
    slot = lone_slot(LifecycleConfig(alpha=AlphaSchedule(kind="sigmoid", steps=20)))
    to_stage(slot, S.BLENDING)
    for _ in range(19):
        slot.on_step()
    assert 0.98 < slot.alpha < 1.0
    assert slot.advance() is None
    slot.on_step()
    assert slot.advance() is S.HOLDING


def test_embargo_gate():
    slot = lone_slot(LifecycleConfig(embargo_epochs=3))
    to_stage(slot, S.TRAINING)
    slot.cull()
    assert not slot.is_open
    slot.on_epoch_end()  # epochs in CULLED do not count towards the embargo
    assert slot.advance() is S.EMBARGOED
    for epoch in range(3):
        assert slot.gate(S.DORMANT) == f"embargo {epoch}/3 epochs"
        assert slot.advance() is None and not slot.is_open
        slot.on_epoch_end()
    assert slot.advance() is S.DORMANT
    assert slot.is_open and slot.seed is None


def test_zero_gates_pass_immediately():
    cfg = LifecycleConfig(
        min_training_epochs=0, min_holding_epochs=0, embargo_epochs=0, alpha=AlphaSchedule(kind="linear", steps=1)
    )
    slot = lone_slot(cfg)
    slot.germinate(build_seed(STANDARD_BLUEPRINTS["lowrank"], slot.shape))
    assert slot.advance() is S.TRAINING
    assert slot.advance() is None  # a zero gradient norm is still unhealthy
    slot.seed_grad_norm = 0.5
    assert slot.advance() is S.BLENDING
    slot.on_step()
    assert slot.advance() is S.HOLDING
    slot.fossilize()


def test_stage_counters_reset_and_cull_clears_signals():
    slot = lone_slot(LifecycleConfig(min_training_epochs=0))
    to_stage(slot, S.TRAINING)
    slot.seed_grad_norm, slot.contribution = 3.0, 0.2
    slot.on_epoch_end()
    slot.transition(S.BLENDING)
    assert slot.epochs_in_stage == 0 and slot.seed_grad_norm == 3.0
    slot.cull()
    assert (slot.seed_grad_norm, slot.contribution, slot.alpha) == (0.0, 0.0, 0.0)
    assert slot.blueprint_hash == "" and slot.blueprint_name == ""


# ---- 7. listeners and host bookkeeping ---------------------------------------------------------
def test_listeners_see_every_transition():
    cfg = LifecycleConfig(
        min_training_epochs=0, embargo_epochs=0, min_holding_epochs=0, alpha=AlphaSchedule(kind="linear", steps=1)
    )
    host = make_host("mlp", cfg)
    host_events: list[tuple[str, Transition]] = []
    slot_events: list[Transition] = []
    host.add_listener(lambda s, e: host_events.append((s.name, e)))
    slot = host.slot("hidden1")
    slot.add_listener(lambda s, e: slot_events.append(e))
    spec = STANDARD_BLUEPRINTS["lowrank"]

    host.germinate("hidden1", "lowrank", reason="why not")
    slot.advance()
    slot.seed_grad_norm = 1.0
    slot.advance()
    slot.on_step()
    slot.advance()
    slot.cull("bad seed")
    slot.advance()
    slot.advance()
    host.germinate("hidden1", "norm")
    slot.advance()
    slot.seed_grad_norm = 1.0
    slot.advance()
    slot.on_step()
    slot.advance()
    slot.fossilize("good seed")
    norm_hash = STANDARD_BLUEPRINTS["norm"].content_hash

    expected = [
        (S.DORMANT, S.GERMINATED, spec.content_hash),
        (S.GERMINATED, S.TRAINING, spec.content_hash),
        (S.TRAINING, S.BLENDING, spec.content_hash),
        (S.BLENDING, S.HOLDING, spec.content_hash),
        (S.HOLDING, S.CULLED, spec.content_hash),  # the culled seed's hash, not ""
        (S.CULLED, S.EMBARGOED, ""),
        (S.EMBARGOED, S.DORMANT, ""),
        (S.DORMANT, S.GERMINATED, norm_hash),
        (S.GERMINATED, S.TRAINING, norm_hash),
        (S.TRAINING, S.BLENDING, norm_hash),
        (S.BLENDING, S.HOLDING, norm_hash),
        (S.HOLDING, S.FOSSILIZED, norm_hash),
    ]
    assert [(e.old, e.new, e.blueprint_hash) for e in slot_events] == expected
    assert [e for _, e in host_events] == slot_events
    assert {name for name, _ in host_events} == {"hidden1"}
    assert all(e.slot == "hidden1" for e in slot_events)
    assert slot_events[0].reason == "why not"
    assert slot_events[4].reason == "bad seed"
    assert slot_events[-1].reason == "good seed"
    assert slot_events[1].reason == "gate passed"


def test_listener_sees_new_state_during_callback():
    slot = lone_slot()
    seen = []
    slot.add_listener(lambda s, e: seen.append((s.stage, e.new, s.epochs_in_stage)))
    to_stage(slot, S.BLENDING)
    assert seen == [(S.GERMINATED, S.GERMINATED, 0), (S.TRAINING, S.TRAINING, 0), (S.BLENDING, S.BLENDING, 0)]


@pytest.mark.parametrize("kind", HOST_KINDS)
def test_dormant_slot_is_never_called(kind):
    cfg = LifecycleConfig(embargo_epochs=0)
    host = make_host(kind, cfg)
    x, _ = batch(kind)
    originals = {}

    def boom(*_args, **_kwargs):
        raise AssertionError("a slot that computes nothing was called")

    for slot in host.iter_slots():
        originals[slot.name] = slot.forward
        slot.forward = boom
    assert host._active == [None, None, None]
    expected = host(x)
    host.forward_with_activations(x)
    slot = host.slot("hidden0")
    host.germinate("hidden0", DEFAULT_BP[slot.kind])  # GERMINATED: identity, not called either
    assert torch.equal(host(x), expected)
    slot.transition(S.TRAINING)
    assert host._active[slot.index] is slot
    with pytest.raises(AssertionError, match="was called"):
        host(x)
    slot.forward = originals["hidden0"]
    assert torch.equal(host(x), expected)  # isolated: same value
    slot.cull()
    assert host._active[slot.index] is None
    slot.forward = boom
    assert torch.equal(host(x), expected)
    slot.advance()
    slot.advance()
    assert slot.stage is S.DORMANT and host._active == [None, None, None]
    assert torch.equal(host(x), expected)


def test_lifecycle_state_round_trip_needs_refresh():
    cfg = LifecycleConfig(alpha=AlphaSchedule(kind="linear", steps=4))
    host = make_host("mlp", cfg)
    slot = host.germinate("hidden0", "residual_mlp", generator_seed=1)
    slot.transition(S.TRAINING)
    slot.transition(S.BLENDING)
    slot.on_step()
    slot.on_epoch_end()
    slot.seed_grad_norm, slot.contribution = 2.5, 0.125
    perturb_seed(slot.seed, 1)
    state = slot.lifecycle_state()
    assert state == {
        "stage": "BLENDING",
        "epochs_in_stage": 1,
        "blend_steps": 1,
        "seed_grad_norm": 2.5,
        "contribution": 0.125,
        "blueprint_hash": STANDARD_BLUEPRINTS["residual_mlp"].content_hash,
        "spec": STANDARD_BLUEPRINTS["residual_mlp"].to_json(),
    }

    other = make_host("mlp", cfg)
    other.load_host_state_dict(host.host_state_dict())
    seed = build_seed(STANDARD_BLUEPRINTS["residual_mlp"], (64,))
    seed.load_state_dict(slot.seed.state_dict())
    events = []
    other.add_listener(lambda s, e: events.append(e))
    other.slot("hidden0").load_lifecycle_state(state, seed)
    assert events == []
    other.refresh()
    x, _ = batch("mlp")
    with torch.no_grad():
        assert torch.equal(other(x), host(x))
    assert other.slot("hidden0").alpha == slot.alpha == 0.25
    assert other.slot("hidden0").lifecycle_state() == state


# ---- 9. gated blending ---------------------------------------------------------------------------
GATE_STAGES = [S.BLENDING, S.HOLDING, S.FOSSILIZED]


def _host_with_gated_seeds(stage: SeedStage, blend_steps: int = 3) -> MorphoHost:
    """An MLP host with a perturbed gated seed in every slot, each in ``stage`` (BLENDING: at
    ``blend_steps`` of a linear 8-step ramp)."""
    host = make_host("mlp", LifecycleConfig(alpha=AlphaSchedule(kind="linear", steps=8)))
    for i, name in enumerate(SLOT_NAMES):
        slot = host.germinate(name, spec_for(DEFAULT_BP["vector"], "gated"), generator_seed=10 + i)
        for nxt in [S.TRAINING, S.BLENDING, S.HOLDING, S.FOSSILIZED][: [S.TRAINING, *GATE_STAGES].index(stage) + 1]:
            slot.transition(nxt)
        for _ in range(blend_steps if stage is S.BLENDING else 0):
            slot.on_step()
        perturb_seed(slot.seed, 20 + i)
    return host


@pytest.mark.parametrize("stage", GATE_STAGES)
def test_a_gate_at_zero_leaves_the_host_output_bit_identical(stage):
    host = _host_with_gated_seeds(stage)
    plain = plain_twin(host, "mlp")
    x, _ = batch("mlp", n=32)
    with torch.no_grad():
        assert not torch.equal(host(x), plain(x))  # open gates: the seeds change the output
        for slot in host.slots.values():
            set_gate(slot.seed, -math.inf)
            assert torch.equal(torch.sigmoid(gate_logits(slot.seed, torch.randn(4, *slot.shape))), torch.zeros(4))
        assert torch.equal(host(x), plain(x))


@pytest.mark.parametrize("stage", GATE_STAGES)
def test_a_gate_at_one_equals_the_ungated_blend(stage):
    gated = _host_with_gated_seeds(stage)
    ungated = make_host("mlp", LifecycleConfig(alpha=AlphaSchedule(kind="linear", steps=8)))
    ungated.load_state_dict(gated.host_state_dict(), strict=False)
    for name, slot in gated.slots.items():
        twin = ungated.germinate(name, DEFAULT_BP["vector"], generator_seed=0)
        twin_state = {k: v for k, v in slot.seed.state_dict().items() if not k.startswith("ops.gate")}
        twin.seed.load_state_dict(twin_state, strict=True)  # the same body and gamma, no gate
        for nxt in [S.TRAINING, S.BLENDING, S.HOLDING, S.FOSSILIZED][: [S.TRAINING, *GATE_STAGES].index(stage) + 1]:
            twin.transition(nxt)
        twin.blend_steps = slot.blend_steps
        set_gate(slot.seed, math.inf)
        assert twin.alpha == slot.alpha
    x, _ = batch("mlp", n=32)
    with torch.no_grad():
        assert torch.equal(gated(x), ungated(x))


def test_a_gated_seed_adds_its_gate_times_the_ungated_change():
    spec = gated_blueprint(STANDARD_BLUEPRINTS["residual_mlp"])
    seed = build_seed(spec, (24,), generator_seed=3)
    perturb_seed(seed, 4)
    plain = build_seed(STANDARD_BLUEPRINTS["residual_mlp"], (24,), generator_seed=3)
    plain.load_state_dict({k: v for k, v in seed.state_dict().items() if not k.startswith("ops.gate")})
    h = torch.randn(9, 24)
    with torch.no_grad():
        g = torch.sigmoid(gate_logits(seed, h))
        assert float(g.min()) > 0 and float(g.max()) < 1 and float(g.std()) > 0  # per example, in (0, 1)
        assert torch.allclose(seed(h), h + g[:, None] * (plain(h) - h), atol=1e-6)
    # The slot's blend: h + g(h) * alpha * (seed(h) - h).
    slot = SeedSlot("s", 1, (24,), LifecycleConfig(alpha=AlphaSchedule(kind="linear", steps=4)))
    slot.germinate(seed)
    slot.transition(S.TRAINING)
    slot.transition(S.BLENDING)
    slot.on_step()
    with torch.no_grad():
        assert torch.allclose(slot(h), h + g[:, None] * 0.25 * (plain(h) - h), atol=1e-6)


def test_gated_specs_are_validated_and_hashed_apart():
    base = STANDARD_BLUEPRINTS["residual_mlp"]
    gated = gated_blueprint(base, width=8)
    assert gated.blend == "gated" and gated.name == "residual_mlp.gated" and gated.parents == (base.content_hash,)
    assert gated.content_hash != base.content_hash and gated_blueprint(gated) is gated
    assert BlueprintSpec.from_json(gated.to_json()).content_hash == gated.content_hash
    # The same nodes marked lerp build the same module but are another blueprint.
    assert gated.model_copy(update={"blend": "lerp"}).content_hash != gated.content_hash
    with pytest.raises(pydantic.ValidationError, match="needs a node 'gate'"):
        base.model_copy(update={"blend": "gated"})
    with pytest.raises(GateShapeError, match="reads vector blueprints only"):
        gated_blueprint(STANDARD_BLUEPRINTS["conv1d"])
    with pytest.raises(EsperError, match="gate width 0 out of range"):
        gated_blueprint(base, width=0)


@pytest.mark.parametrize(("kind", "slot_name"), [("cnn1d", "hidden0"), ("cnn2d", "hidden1"), ("cnn2d", "input")])
def test_a_gated_blend_on_a_slot_the_gate_cannot_read_is_refused(kind, slot_name):
    host = make_host(kind)
    slot = host.slot(slot_name)
    with pytest.raises(GateShapeError, match="a gated blend reads one vector per example") as info:
        host.germinate(slot_name, spec_for("residual_mlp", "gated"))
    assert "\n" not in str(info.value) and isinstance(info.value, EsperError)
    assert slot.stage is S.DORMANT and slot.seed is None
