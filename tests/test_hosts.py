"""Tests of esper_ray.hosts: host families, slot positions and shapes, germination, host state."""

from __future__ import annotations

import pydantic
import pytest
import torch

from esper_ray.blueprints import STANDARD_BLUEPRINTS, BlueprintShapeError, BlueprintSpec, count_params
from esper_ray.contracts import EsperError, IllegalTransition, SeedStage
from esper_ray.hosts import HostConfig, MorphoHost, build_host, slot_names
from esper_ray.kasmina import LifecycleConfig, SeedSlot

pytestmark = pytest.mark.usefixtures("torch_seed")

INPUT_SHAPES = {"mlp": (40,), "cnn1d": (40,), "cnn2d": (1, 8, 8)}
HOST_KINDS = list(INPUT_SHAPES)
EXPECTED_SLOTS = {
    "mlp": {"input": (40,), "hidden0": (64,), "hidden1": (64,)},
    "cnn1d": {"input": (40,), "hidden0": (64, 20), "hidden1": (64, 10)},
    "cnn2d": {"input": (1, 8, 8), "hidden0": (64, 4, 4), "hidden1": (64, 2, 2)},
}
EXPECTED_KINDS = {
    "mlp": ["vector", "vector", "vector"],
    "cnn1d": ["vector", "seq", "seq"],
    "cnn2d": ["image", "image", "image"],
}
DEFAULT_BP = {"vector": "residual_mlp", "seq": "conv1d", "image": "conv2d"}


def make_host(kind: str, slots="all", lifecycle: LifecycleConfig | None = None) -> MorphoHost:
    return build_host(HostConfig(kind=kind, slots=slots), INPUT_SHAPES[kind], 10, lifecycle=lifecycle)


def x_batch(kind: str, n: int = 5) -> torch.Tensor:
    return torch.randn((n, *INPUT_SHAPES[kind]), generator=torch.Generator().manual_seed(3))


# ---- structure --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HOST_KINDS)
def test_slot_names_shapes_and_kinds(kind):
    host = make_host(kind)
    assert slot_names(2) == ["input", "hidden0", "hidden1"]
    assert {name: s.shape for name, s in host.slots.items()} == EXPECTED_SLOTS[kind]
    assert list(host.slots) == ["input", "hidden0", "hidden1"]
    assert [s.kind for s in host.iter_slots()] == EXPECTED_KINDS[kind]
    assert [s.index for s in host.iter_slots()] == [0, 1, 2]
    assert all(isinstance(s, SeedSlot) and s.stage is SeedStage.DORMANT for s in host.iter_slots())
    assert host.input_shape == INPUT_SHAPES[kind]
    # The activations really have those shapes.
    x = x_batch(kind)
    logits, acts = host.forward_with_activations(x)
    assert logits.shape == (5, 10)
    assert {name: tuple(a.shape[1:]) for name, a in acts.items()} == EXPECTED_SLOTS[kind]
    assert torch.equal(logits, host(x))
    assert torch.equal(acts["input"], x)


def test_mlp_is_40_64_64_10():
    host = make_host("mlp")
    linears = [m for m in host.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 64), (64, 64), (64, 10)]
    assert host.param_count() == {
        "host": 40 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10,
        "seeds": 0,
        "total": 40 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10,
    }


@pytest.mark.parametrize("kind", HOST_KINDS)
def test_slot_subset(kind):
    host = make_host(kind, slots=["hidden1"])
    assert list(host.slots) == ["hidden1"]
    assert host.slot("hidden1").index == 2
    assert host.slot("hidden1").shape == EXPECTED_SLOTS[kind]["hidden1"]
    with pytest.raises(EsperError, match=r"unknown slot 'input' \(slots: hidden1\)"):
        host.slot("input")
    plain = make_host(kind, slots=[])
    assert len(plain.slots) == 0
    with pytest.raises(EsperError, match=r"slots: none"):
        plain.slot("input")
    with pytest.raises(EsperError, match="slots: none"):
        plain.germinate("input", "lowrank")
    _, acts = plain.forward_with_activations(x_batch(kind))
    assert acts == {}


@pytest.mark.parametrize("kind", HOST_KINDS)
def test_unknown_slot_raises_naming_the_slots(kind):
    with pytest.raises(EsperError) as info:
        make_host(kind, slots=["hidden0", "hidden7"])
    assert "'hidden7'" in str(info.value)
    assert "input, hidden0, hidden1" in str(info.value)
    host = make_host(kind)
    for call in (lambda: host.slot("middle"), lambda: host.germinate("middle", "lowrank")):
        with pytest.raises(EsperError) as info:
            call()
        assert "'middle'" in str(info.value) and "input, hidden0, hidden1" in str(info.value)


def test_host_config_validation():
    with pytest.raises(pydantic.ValidationError, match="kernel must be odd"):
        HostConfig(kind="cnn1d", kernel=4)
    with pytest.raises(pydantic.ValidationError, match="non-empty list of positive widths"):
        HostConfig(hidden=[])
    with pytest.raises(pydantic.ValidationError, match="non-empty list of positive widths"):
        HostConfig(hidden=[64, 0])
    with pytest.raises(pydantic.ValidationError):
        HostConfig(kind="transformer9000")
    with pytest.raises(pydantic.ValidationError):
        HostConfig(extra_field=1)
    with pytest.raises(EsperError, match="cnn2d host cannot take inputs of shape"):
        build_host(HostConfig(kind="cnn2d"), (40,), 10)


def test_deeper_and_unpooled_hosts():
    host = build_host(HostConfig(kind="mlp", hidden=[32, 16, 8]), (1, 8, 8), 3)
    assert {n: s.shape for n, s in host.slots.items()} == {
        "input": (1, 8, 8),
        "hidden0": (32,),
        "hidden1": (16,),
        "hidden2": (8,),
    }
    assert host(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    cnn = build_host(HostConfig(kind="cnn1d", hidden=[8, 8], pool=False, kernel=3), (40,), 4)
    assert {n: s.shape for n, s in cnn.slots.items()} == {
        "input": (40,),
        "hidden0": (8, 40),
        "hidden1": (8, 40),
    }


# ---- germination -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HOST_KINDS)
def test_germinate_places_a_seed_in_germinated(kind):
    host = make_host(kind)
    before = host.param_count()
    for slot in host.iter_slots():
        bp = DEFAULT_BP[slot.kind]
        spec = STANDARD_BLUEPRINTS[bp]
        returned = host.germinate(slot.name, bp, reason="test")
        assert returned is slot
        assert slot.stage is SeedStage.GERMINATED
        assert slot.seed is not None
        assert slot.blueprint_hash == spec.content_hash
        assert slot.seed.blueprint_hash == spec.content_hash
        assert slot.blueprint_name == bp
        assert slot.seed_params == count_params(spec, slot.shape)
    after = host.param_count()
    assert after["host"] == before["host"]
    assert after["seeds"] == sum(s.seed_params for s in host.iter_slots()) > 0
    assert host.architecture() == {
        s.name: {"stage": "GERMINATED", "blueprint_hash": s.blueprint_hash} for s in host.iter_slots()
    }
    assert not (
        {id(p) for s in host.iter_slots() for p in s.seed.parameters()} & {id(p) for p in host.host_parameters()}
    )


def test_germinate_accepts_a_spec_and_is_reproducible_with_a_generator_seed():
    spec = BlueprintSpec(
        name="custom",
        kind="vector",
        nodes=(
            {"id": "a", "op": "linear", "args": {"width": 8}},
            {"id": "b", "op": "linear", "inputs": ("a",)},
        ),
    )
    one, two = make_host("mlp"), make_host("mlp")
    s1 = one.germinate("hidden0", spec, generator_seed=11)
    s2 = two.germinate("hidden0", spec, generator_seed=11)
    assert s1.blueprint_hash == spec.content_hash and s1.blueprint_name == "custom"
    for (k1, v1), (k2, v2) in zip(s1.seed.state_dict().items(), s2.seed.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_germinate_unknown_blueprint_raises_listing_known():
    host = make_host("mlp")
    with pytest.raises(EsperError) as info:
        host.germinate("hidden0", "transformer")
    msg = str(info.value)
    assert "unknown blueprint 'transformer'" in msg
    assert all(name in msg for name in STANDARD_BLUEPRINTS)
    assert host.slot("hidden0").stage is SeedStage.DORMANT


@pytest.mark.parametrize(
    ("kind", "slot", "bp"),
    [
        ("mlp", "hidden0", "conv2d"),
        ("mlp", "input", "se2d"),
        ("cnn1d", "hidden1", "dwconv2d"),
        ("cnn2d", "hidden0", "conv1d"),
        ("cnn2d", "input", "se1d"),
    ],
)
def test_germinate_blueprint_that_does_not_fit(kind, slot, bp):
    host = make_host(kind)
    with pytest.raises(BlueprintShapeError) as info:
        host.germinate(slot, bp)
    assert isinstance(info.value, EsperError) and "\n" not in str(info.value)
    assert host.slot(slot).stage is SeedStage.DORMANT and host.slot(slot).seed is None
    assert host._active == [None, None, None]


def test_germinate_over_budget_leaves_slot_dormant():
    host = make_host("mlp")
    n = count_params(STANDARD_BLUEPRINTS["residual_mlp"], (64,))
    with pytest.raises(EsperError, match="over the budget"):
        host.germinate("hidden1", "residual_mlp", max_params=n - 1)
    assert host.slot("hidden1").stage is SeedStage.DORMANT and host.slot("hidden1").seed is None
    host.germinate("hidden1", "residual_mlp", max_params=n)
    assert host.slot("hidden1").stage is SeedStage.GERMINATED


@pytest.mark.parametrize("stage", [SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.CULLED, SeedStage.EMBARGOED])
def test_germinate_in_occupied_slot_raises(stage):
    host = make_host("mlp")
    slot = host.germinate("hidden0", "lowrank")
    path = {
        SeedStage.GERMINATED: [],
        SeedStage.TRAINING: [SeedStage.TRAINING],
        SeedStage.CULLED: [SeedStage.CULLED],
        SeedStage.EMBARGOED: [SeedStage.CULLED, SeedStage.EMBARGOED],
    }[stage]
    for nxt in path:
        slot.transition(nxt)
    seed = slot.seed
    with pytest.raises(IllegalTransition, match=f"slot hidden0: cannot germinate in stage {stage.name}"):
        host.germinate("hidden0", "norm")
    assert slot.stage is stage and slot.seed is seed


# ---- host state --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HOST_KINDS)
def test_host_state_dict_excludes_seeds_and_restores_exactly(kind):
    host = make_host(kind)
    for slot in host.iter_slots():
        host.germinate(slot.name, DEFAULT_BP[slot.kind])
        slot.transition(SeedStage.TRAINING)
    full = host.state_dict()
    assert any(k.startswith("slots.") for k in full)
    state = host.host_state_dict()
    assert not any(k.startswith("slots.") for k in state)
    assert state.keys() == {k for k in full if not k.startswith("slots.")}
    assert state.keys() == make_host(kind, slots=[]).state_dict().keys()
    # Clones: training the host afterwards does not change the snapshot.
    for k, v in state.items():
        assert torch.equal(v, full[k]) and v.data_ptr() != full[k].data_ptr()
    seed_before = {k: v.clone() for k, v in full.items() if k.startswith("slots.")}
    params_before = [id(p) for p in host.host_parameters()]
    with torch.no_grad():
        for p in host.parameters():
            p.add_(torch.randn_like(p))
    assert not all(torch.equal(v, host.state_dict()[k]) for k, v in state.items())
    seed_perturbed = {k: v.clone() for k, v in host.state_dict().items() if k.startswith("slots.")}

    host.load_host_state_dict(state)
    after = host.state_dict()
    for k, v in state.items():
        assert torch.equal(after[k], v)
    # Seeds are not the host's: untouched by the restore (still perturbed).
    for k, v in seed_perturbed.items():
        assert torch.equal(after[k], v) and not torch.equal(v, seed_before[k])
    # Restored in place: optimizers keep pointing at the same tensors.
    assert [id(p) for p in host.host_parameters()] == params_before


def test_load_host_state_dict_rejects_other_architectures():
    host = make_host("mlp")
    state = host.host_state_dict()
    with pytest.raises(EsperError, match="does not match"):
        host.load_host_state_dict({k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(EsperError, match="does not match"):
        host.load_host_state_dict({**state, "slots.hidden0.seed.gamma": torch.zeros(64)})
    with pytest.raises(EsperError, match="does not match"):
        host.load_host_state_dict(make_host("cnn1d").host_state_dict())


def test_consumer():
    host = make_host("mlp")
    assert host.consumer(host.slot("input")) is host.blocks[0]
    assert host.consumer(host.slot("hidden0")) is host.blocks[1]
    assert host.consumer(host.slot("hidden1")) is host.head


@pytest.mark.parametrize("slot_name", ["input", "hidden0"])
def test_absorb_moves_a_fossilized_seed_into_the_block_before_its_slot(slot_name):
    host = make_host("mlp")
    x = x_batch("mlp")
    slot = host.germinate(slot_name, "residual_mlp", generator_seed=1)
    for stage in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.FOSSILIZED):
        slot.transition(stage)
    with torch.no_grad():  # a residual seed starts as the identity: make it compute something
        for p in slot.seed.parameters():
            p.add_(0.1)
    seed, before, host_params = slot.seed, host(x), sum(p.numel() for p in host.host_parameters())
    events: list = []
    host.add_listener(lambda s, t: events.append(t))
    assert host.absorb(slot_name) is seed
    assert torch.equal(host(x), before)  # the network computes the same
    assert torch.equal(host(x), _nested_forward(host, x))
    assert slot.stage is SeedStage.DORMANT and slot.seed is None and slot.is_identity and events == []
    block = host.blocks[0]  # input: (seed, block 0); hidden0: (block 0, seed)
    assert (block[0] if slot_name == "input" else block[1]) is seed
    assert sum(p.numel() for p in host.host_parameters()) == host_params + sum(p.numel() for p in seed.parameters())
    assert host.param_count()["seeds"] == 0
    with pytest.raises(EsperError, match="needs FOSSILIZED"):
        host.absorb(slot_name)  # nothing left to absorb
    live = host.germinate("hidden1", "norm")
    with pytest.raises(EsperError, match="GERMINATED"):
        host.absorb("hidden1")
    assert live.stage is SeedStage.GERMINATED


def _nested_forward(host: MorphoHost, x: torch.Tensor) -> torch.Tensor:
    """What the host computes, written as its blocks and slots nest (no flattening)."""
    slots = {s.index: s for s in host.slots.values()}
    for i in range(len(host.blocks) + 1):
        if i > 0:
            x = host.blocks[i - 1](x)
        if i in slots:
            x = slots[i](x)
    return host.head(x)


@pytest.mark.parametrize("kind", HOST_KINDS)
def test_flat_forward_equals_the_nested_blocks_in_every_stage(kind):
    host = make_host(kind, lifecycle=LifecycleConfig(alpha={"steps": 4}))
    x = x_batch(kind)
    assert torch.equal(host(x), _nested_forward(host, x))
    slot = host.germinate("hidden0", DEFAULT_BP[EXPECTED_KINDS[kind][1]])
    path = list(host._path)
    for stage in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.FOSSILIZED):
        slot.transition(stage)
        slot.blend_steps = 2  # alpha strictly between 0 and 1 while blending
        assert torch.equal(host(x), _nested_forward(host, x)), stage
        assert slot in host._path
    assert len(host._path) == len(path) + 1  # the slot joined the path when it started computing


def test_replacing_a_block_takes_effect_after_refresh():
    host = make_host("mlp")
    x = x_batch("mlp")
    before = host(x)
    host.blocks[1] = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh())
    host.refresh()
    assert torch.equal(host(x), _nested_forward(host, x))
    assert not torch.allclose(host(x), before)


class _CountsTrain(torch.nn.Module):
    """A layer with a train() of its own (like a frozen-BatchNorm wrapper): it must still be called."""

    def __init__(self):
        super().__init__()
        self.calls: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def train(self, mode: bool = True):
        self.calls.append(mode)
        return super().train(mode)


def test_train_and_eval_reach_every_submodule_as_the_tree_changes():
    host = make_host("mlp")

    def modes() -> set[bool]:
        return {m.training for m in host.modules()}

    assert host.eval() is host and modes() == {False}
    assert host.train() is host and modes() == {True}
    slot = host.germinate("hidden0", "residual_mlp")  # a seed joins the tree (a transition)
    host.eval()
    assert modes() == {False} and not slot.seed.training
    host.train()
    custom = _CountsTrain()
    host.blocks[1] = torch.nn.Sequential(host.blocks[1], custom)  # replaced, then refreshed
    host.refresh()
    host.eval()
    assert modes() == {False} and custom.calls == [False]
    host.train()
    assert modes() == {True} and custom.calls == [False, True]
