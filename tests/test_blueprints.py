"""Tests of esper_ray.blueprints: specs, hashing, validation, builder, contracts, catalogue."""

from __future__ import annotations

import contextlib
import hashlib
import resource
import time

import pydantic
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from esper_ray.blueprints import (
    STANDARD_BLUEPRINTS,
    BlueprintCatalogue,
    BlueprintShapeError,
    BlueprintSpec,
    ContractResult,
    LocalCatalogue,
    Node,
    build_seed,
    check_contract,
    count_params,
    flops_per_example,
    slot_kind,
)
from esper_ray.blueprints.spec import MAX_NODES, MAX_WIDTH
from esper_ray.contracts import EsperError

pytestmark = pytest.mark.usefixtures("torch_seed")

# Every slot shape the three standard hosts have (mlp 40-64-64, cnn1d on (40,), cnn2d on (1,8,8)).
SLOT_SHAPES: list[tuple[int, ...]] = [
    (40,),
    (64,),  # vector
    (64, 20),
    (64, 10),  # seq
    (1, 8, 8),
    (64, 4, 4),
    (64, 2, 2),  # image
]
# Which slot kinds a blueprint of each kind fits.
FITS = {
    "vector": {"vector", "seq", "image"},
    "seq": {"vector", "seq"},
    "image": {"image"},
}

FITTING = [
    pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
    for name, spec in STANDARD_BLUEPRINTS.items()
    for shape in SLOT_SHAPES
    if slot_kind(shape) in FITS[spec.kind]
]
NOT_FITTING = [
    pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
    for name, spec in STANDARD_BLUEPRINTS.items()
    for shape in SLOT_SHAPES
    if slot_kind(shape) not in FITS[spec.kind]
]


def _spec(kind: str, *nodes: dict, name: str = "t") -> BlueprintSpec:
    return BlueprintSpec(name=name, kind=kind, nodes=nodes)


# ---- the standard library -------------------------------------------------------------------
def test_standard_library_names_and_kinds():
    assert {name: spec.kind for name, spec in STANDARD_BLUEPRINTS.items()} == {
        "residual_mlp": "vector",
        "lowrank": "vector",
        "norm": "vector",
        "conv1d": "seq",
        "conv2d": "image",
        "dwconv2d": "image",
        "se1d": "seq",
        "se2d": "image",
    }
    assert all(spec.name == name for name, spec in STANDARD_BLUEPRINTS.items())
    assert len({spec.content_hash for spec in STANDARD_BLUEPRINTS.values()}) == len(STANDARD_BLUEPRINTS)


def test_fitting_matrix_is_not_trivial():
    # Guards the parametrisation below: each kind is exercised on each slot kind it fits.
    assert len(FITTING) == 3 * 7 + 2 * 4 + 3 * 3
    assert len(NOT_FITTING) == 2 * 3 + 3 * 4


@pytest.mark.parametrize(("name", "shape"), FITTING)
def test_standard_blueprint_passes_contract(name, shape):
    spec = STANDARD_BLUEPRINTS[name]
    result = check_contract(spec, shape)
    assert result == ContractResult(True, "", result.params)
    seed = build_seed(spec, shape)
    n = sum(p.numel() for p in seed.parameters())
    assert result.params == n == count_params(spec, shape) > 0


@pytest.mark.parametrize(("name", "shape"), FITTING)
def test_standard_blueprint_is_identity_at_birth(name, shape):
    spec = STANDARD_BLUEPRINTS[name]
    seed = build_seed(spec, shape, generator_seed=1)
    assert seed.blueprint_hash == spec.content_hash
    assert tuple(seed.slot_shape) == shape
    assert torch.equal(seed.gamma, torch.zeros_like(seed.gamma))
    gen = torch.Generator().manual_seed(2)
    for scale in (1.0, 1e3):
        h = torch.randn((5, *shape), generator=gen) * scale
        with torch.no_grad():
            assert torch.equal(seed(h), h)
    # ...and it leaves identity once gamma moves: the body really computes something.
    with torch.no_grad():
        seed.gamma.fill_(1.0)
        h = torch.randn((5, *shape), generator=gen)
        assert not torch.equal(seed(h), h)


@pytest.mark.parametrize(("name", "shape"), NOT_FITTING)
def test_standard_blueprint_wrong_slot_kind_raises_shape_error(name, shape):
    spec = STANDARD_BLUEPRINTS[name]
    with pytest.raises(BlueprintShapeError) as info:
        build_seed(spec, shape)
    assert isinstance(info.value, EsperError)
    msg = str(info.value)
    assert "\n" not in msg
    assert name in msg and spec.kind in msg and slot_kind(shape) in msg
    with pytest.raises(BlueprintShapeError):
        count_params(spec, shape)
    result = check_contract(spec, shape)
    assert not result.ok and result.reason == msg


def test_builder_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    spec = STANDARD_BLUEPRINTS["residual_mlp"]
    state = torch.random.get_rng_state()
    a = build_seed(spec, (64,), generator_seed=7)
    b = build_seed(spec, (64,), generator_seed=7)
    c = build_seed(spec, (64,), generator_seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb), (_, vc) in zip(
        a.state_dict().items(), b.state_dict().items(), c.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
        if ka != "gamma":
            assert not torch.equal(va, vc)


def test_param_count_and_flops_known_values():
    spec = STANDARD_BLUEPRINTS["residual_mlp"]
    # 64 -> 64 -> 64 linears plus a per-channel gamma.
    assert count_params(spec, (64,)) == (64 * 64 + 64) * 2 + 64
    assert flops_per_example(build_seed(spec, (64,))) == 64 * 64 * 2
    lowrank = STANDARD_BLUEPRINTS["lowrank"]
    assert count_params(lowrank, (40,)) == (40 * 4 + 4) + (4 * 40 + 40) + 40
    # On a seq slot a vector blueprint mixes channels at every position (1x1 convs).
    assert count_params(spec, (64, 20)) == (64 * 64 + 64) * 2 + 64
    assert flops_per_example(build_seed(spec, (64, 20))) == 64 * 64 * 2 * 20


def test_seq_blueprint_on_vector_slot_sees_one_channel():
    seed = build_seed(STANDARD_BLUEPRINTS["conv1d"], (40,), generator_seed=0)
    assert seed.gamma.shape == (1,)
    with torch.no_grad():
        seed.gamma.fill_(0.5)
        h = torch.randn(3, 40)
        out = seed(h)
        expected = h + 0.5 * seed.body(h).squeeze(1)
    assert out.shape == (3, 40)
    assert torch.allclose(out, expected, atol=1e-6)


# ---- hashing and serialisation ----------------------------------------------------------------
def test_content_hash_known_value_and_canonical_form():
    spec = _spec("vector", {"id": "a", "op": "linear", "args": {"width": 8}})
    canonical = '{"kind":"vector","nodes":[{"args":{"width":8},"id":"a","inputs":["input"],"op":"linear"}]}'
    assert spec.content_hash == hashlib.sha256(canonical.encode()).hexdigest()
    assert spec.short_hash == spec.content_hash[:12]
    # Pinned: hashes are stored in ledgers and catalogues, so the canonical form must not drift.
    assert STANDARD_BLUEPRINTS["residual_mlp"].content_hash == (
        "04659fd2d78bcc512115d9b9084c14d0d95231a18ee49c2f7584031fcc7dbaa1"
    )


def test_content_hash_stable_and_name_independent():
    nodes = (
        {"id": "a", "op": "linear", "args": {"width": 16}},
        {"id": "b", "op": "act", "inputs": ("a",), "args": {"fn": "gelu"}},
        {"id": "c", "op": "linear", "inputs": ("b",)},
    )
    one, two = _spec("vector", *nodes), _spec("vector", *nodes)
    assert one is not two and one.content_hash == two.content_hash
    assert len(one.content_hash) == 64 and int(one.content_hash, 16) >= 0
    renamed = BlueprintSpec(name="other", kind="vector", nodes=nodes, origin="karn", parents=("x",))
    assert renamed.content_hash == one.content_hash
    changes = [
        _spec("vector", {**nodes[0], "args": {"width": 17}}, *nodes[1:]),
        _spec("vector", nodes[0], {**nodes[1], "args": {"fn": "relu"}}, nodes[2]),
        _spec("seq", *nodes),
        _spec("vector", *nodes[:2], {**nodes[2], "op": "norm", "args": {}}),
    ]
    hashes = {one.content_hash, *(c.content_hash for c in changes)}
    assert len(hashes) == 1 + len(changes)


@pytest.mark.parametrize("name", sorted(STANDARD_BLUEPRINTS))
def test_json_round_trip(name):
    spec = STANDARD_BLUEPRINTS[name]
    text = spec.to_json()
    back = BlueprintSpec.from_json(text)
    assert back == spec and back.content_hash == spec.content_hash
    assert back.to_json() == text


def test_json_round_trip_keeps_arg_types_and_metadata():
    spec = BlueprintSpec(
        name="x.y-z_1",
        kind="seq",
        origin="karn",
        parents=("ab" * 32,),
        nodes=(
            {"id": "a", "op": "conv", "args": {"width": None, "kernel": 3, "groups": None}},
            {"id": "b", "op": "act", "inputs": ("a",), "args": {"fn": "tanh"}},
            {"id": "c", "op": "mul", "inputs": ("input", "b")},
        ),
    )
    back = BlueprintSpec.from_json(spec.to_json())
    assert back == spec
    assert back.nodes[0].args == {"width": None, "kernel": 3, "groups": None}
    assert type(back.nodes[0].args["kernel"]) is int
    assert back.origin == "karn" and back.parents == spec.parents


def test_spec_is_frozen():
    spec = STANDARD_BLUEPRINTS["lowrank"]
    with pytest.raises(pydantic.ValidationError):
        spec.name = "x"
    with pytest.raises(pydantic.ValidationError):
        spec.nodes[0].op = "act"


# ---- malformed specs ------------------------------------------------------------------------------
def _n(id_: str, op: str, inputs=("input",), **args) -> dict:
    return {"id": id_, "op": op, "inputs": inputs, "args": args}


MALFORMED = [
    ("unknown-op", "vector", [_n("a", "softmax")], "unknown op 'softmax'"),
    ("zero-width", "vector", [_n("a", "linear", width=0)], "width must be >= 1, got 0"),
    ("negative-width", "vector", [_n("a", "linear", width=-3)], "width must be >= 1, got -3"),
    ("absurd-width", "vector", [_n("a", "linear", width=MAX_WIDTH + 1)], "over the limit 4096"),
    ("float-width", "vector", [_n("a", "linear", width=2.5)], "width must be an integer"),
    ("string-width", "vector", [_n("a", "linear", width="8")], "width must be an integer"),
    ("even-kernel", "seq", [_n("a", "conv", kernel=4)], "kernel must be odd"),
    ("huge-kernel", "seq", [_n("a", "conv", kernel=17)], "kernel must be odd and <= 15"),
    ("zero-groups", "seq", [_n("a", "conv", groups=0)], "groups must be >= 1"),
    ("add-one-input", "vector", [_n("a", "add")], "op add takes 2 input(s), got 1"),
    ("act-two-inputs", "vector", [_n("a", "act", ("input", "input"))], "takes 1 input(s), got 2"),
    ("no-inputs", "vector", [_n("a", "linear", ())], "takes 1 input(s), got 0"),
    (
        "forward-ref",
        "vector",
        [_n("a", "act", ("b",)), _n("b", "linear", ("a",))],
        "node a reads 'b': cycle or undefined input",
    ),
    ("self-loop", "vector", [_n("a", "act", ("a",))], "node a reads 'a': cycle or undefined input"),
    ("undefined", "vector", [_n("a", "act", ("nope",))], "cycle or undefined input"),
    ("duplicate-id", "vector", [_n("a", "linear"), _n("a", "act", ("a",))], "duplicate node id 'a'"),
    ("shadow-input", "vector", [_n("input", "linear")], "duplicate node id 'input'"),
    ("conv-in-vector", "vector", [_n("a", "conv")], "op conv needs a seq or image blueprint"),
    ("pool-in-vector", "vector", [_n("a", "pool")], "op pool needs a seq or image blueprint"),
    ("unknown-arg", "vector", [_n("a", "linear", kernel=3)], "takes no argument ['kernel']"),
    ("unknown-act", "vector", [_n("a", "act", fn="swish")], "unknown activation 'swish'"),
    ("bad-node-id", "vector", [_n("Bad id", "linear")], "String should match pattern"),
    ("no-nodes", "vector", [], "at least 1 item"),
    (
        "too-many-nodes",
        "vector",
        [_n(f"n{i}", "act", (f"n{i - 1}" if i else "input",)) for i in range(MAX_NODES + 1)],
        f"at most {MAX_NODES} items",
    ),
    ("bad-kind", "graph", [_n("a", "linear")], "'vector', 'seq' or 'image'"),
]


@pytest.mark.parametrize(("kind", "nodes", "needle"), [pytest.param(*c[1:], id=c[0]) for c in MALFORMED])
def test_malformed_spec_rejected_with_named_problem(kind, nodes, needle):
    with pytest.raises(pydantic.ValidationError) as info:
        BlueprintSpec(name="bad", kind=kind, nodes=nodes)
    assert needle in str(info.value)
    # The same through the JSON path that specs from storage take.
    text = pydantic.TypeAdapter(dict).dump_json({"name": "bad", "kind": kind, "nodes": nodes})
    with pytest.raises(pydantic.ValidationError) as info:
        BlueprintSpec.from_json(text)
    assert needle in str(info.value)


def test_malformed_top_level_fields():
    ok = [_n("a", "linear")]
    with pytest.raises(pydantic.ValidationError, match="String should match pattern"):
        BlueprintSpec(name="has space", kind="vector", nodes=ok)
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        BlueprintSpec(name="x", kind="vector", nodes=ok, code="import os")
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        Node(id="a", op="linear", module="torch.nn.Linear")


def test_builder_shape_errors_are_one_line_esper_errors():
    cases = [
        # body ends with the wrong channel count
        (_spec("vector", _n("a", "linear", width=8)), (64,), "ends with 8 channels"),
        # add of incompatible widths
        (
            _spec("vector", _n("a", "linear", width=8), _n("b", "add", ("input", "a"))),
            (64,),
            "inputs have 64 and 8 channels",
        ),
        # conv groups that do not divide
        (_spec("seq", _n("a", "conv", groups=3)), (64, 10), "groups 3 must divide 64"),
        # vector norm with groups
        (_spec("vector", _n("a", "norm", groups=2)), (64,), "a vector norm takes groups=1"),
        # seq blueprint on an image slot
        (STANDARD_BLUEPRINTS["conv1d"], (1, 8, 8), "does not fit a image slot"),
    ]
    for spec, shape, needle in cases:
        with pytest.raises(BlueprintShapeError) as info:
            build_seed(spec, shape)
        assert needle in str(info.value) and "\n" not in str(info.value)
        result = check_contract(spec, shape)
        assert result.ok is False and needle in result.reason


# ---- budget -----------------------------------------------------------------------------------
def _huge_spec() -> BlueprintSpec:
    """A chain of 4096-wide linears: about 1.07e9 parameters (4.3 GB if ever allocated)."""
    nodes = [_n("n0", "linear", width=MAX_WIDTH)]
    nodes += [_n(f"n{i}", "linear", (f"n{i - 1}",), width=MAX_WIDTH) for i in range(1, MAX_NODES - 1)]
    nodes.append(_n(f"n{MAX_NODES - 1}", "linear", (f"n{MAX_NODES - 2}",)))
    return _spec("vector", *nodes, name="huge")


def test_over_budget_counts_on_meta_and_never_allocates():
    spec = _huge_spec()
    w = MAX_WIDTH
    expected = (64 * w + w) + (MAX_NODES - 2) * (w * w + w) + (w * 64 + 64) + 64
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    assert count_params(spec, (64,)) == expected
    with pytest.raises(EsperError) as info:
        build_seed(spec, (64,), max_params=1_000_000)
    result = check_contract(spec, (64,), max_params=1_000_000)
    elapsed = time.perf_counter() - start
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert not isinstance(info.value, BlueprintShapeError)
    msg = str(info.value)
    assert "over the budget of 1,000,000" in msg and f"{expected:,}" in msg and "\n" not in msg
    assert result.ok is False and "over the budget" in result.reason and result.params == 0
    assert elapsed < 5.0, f"budget check took {elapsed:.1f} s: was the spec allocated?"
    assert peak_after - peak_before < 1_000_000, "peak RSS grew by > 1 GB: the spec was allocated"


def test_budget_is_inclusive():
    spec = STANDARD_BLUEPRINTS["lowrank"]
    n = count_params(spec, (64,))
    assert build_seed(spec, (64,), max_params=n) is not None
    with pytest.raises(EsperError, match="over the budget"):
        build_seed(spec, (64,), max_params=n - 1)
    assert check_contract(spec, (64,), max_params=n).ok
    assert not check_contract(spec, (64,), max_params=n - 1).ok


# ---- contract checks that must fail -------------------------------------------------------------
def test_contract_rejects_a_dead_branch():
    # Node a is built but never reaches the output: its parameters get no gradient.
    dead = _spec("vector", _n("a", "linear", width=8), _n("b", "act", fn="tanh"))
    result = check_contract(dead, (16,))
    assert result.ok is False
    assert result.reason == "no finite gradient reaches parameter ops.a.weight"
    assert result.params == 8 * 16 + 8 + 16
    # The same body with the branch joined in passes.
    joined = _spec("vector", _n("a", "linear", width=16), _n("b", "act", fn="tanh"), _n("c", "add", ("a", "b")))
    assert check_contract(joined, (16,)).ok


# ---- catalogue ---------------------------------------------------------------------------------
def test_local_catalogue_resolve_and_poll():
    cat = LocalCatalogue()
    assert isinstance(cat, BlueprintCatalogue)
    entries = cat.poll()
    assert [e.name for e in entries] == list(STANDARD_BLUEPRINTS)
    entries.clear()  # poll hands out a copy
    assert len(cat.poll()) == len(STANDARD_BLUEPRINTS)
    for name, spec in STANDARD_BLUEPRINTS.items():
        assert cat.resolve(name).spec is spec
        assert cat.resolve(spec.content_hash).spec is spec
        assert cat.resolve(spec.short_hash).name == name
        assert cat.resolve(name).content_hash == spec.content_hash


def test_local_catalogue_unknown_names_known_ones():
    cat = LocalCatalogue.from_names(["lowrank", "norm"])
    assert [e.name for e in cat.poll()] == ["lowrank", "norm"]
    with pytest.raises(EsperError) as info:
        cat.resolve("residual_mlp")
    assert "unknown blueprint 'residual_mlp'" in str(info.value)
    assert "lowrank, norm" in str(info.value)
    # A hash prefix shorter than 12 characters is not an address.
    with pytest.raises(EsperError):
        cat.resolve(STANDARD_BLUEPRINTS["lowrank"].content_hash[:6])
    with pytest.raises(EsperError) as info:
        LocalCatalogue.from_names(["nope"])
    assert all(name in str(info.value) for name in STANDARD_BLUEPRINTS)
    with pytest.raises(EsperError, match="none"):
        LocalCatalogue([]).resolve("norm")


def test_local_catalogue_custom_specs():
    spec = _spec("vector", _n("a", "linear", width=8), _n("b", "linear", ("a",)), name="mine")
    cat = LocalCatalogue([spec])
    assert cat.resolve("mine").spec == spec
    assert cat.resolve(spec.content_hash).name == "mine"


# ---- property test: malformed specs fail cleanly ----------------------------------------------------
_OPS = ["linear", "conv", "act", "norm", "pool", "add", "mul", "softmax"]
_GOOD_ARGS = {
    "width": st.sampled_from([None, 1, 2, 3, 8, 16]),
    "kernel": st.sampled_from([None, 1, 3, 5, 15]),
    "groups": st.sampled_from([None, 1, 2, 3, 4]),
    "fn": st.sampled_from(["relu", "gelu", "tanh", "sigmoid", "silu"]),
    "bogus": st.just(1),
}
_BAD_ARGS = {
    "width": st.sampled_from([-1, 0, MAX_WIDTH + 1, 2.5, "8", True]),
    "kernel": st.sampled_from([-1, 0, 2, 17, 2.5]),
    "groups": st.sampled_from([0, -2, 1.0]),
    "fn": st.sampled_from(["swish", None, 3]),
    "bogus": st.just(1),
}
_OP_KEYS = {
    "linear": ["width"],
    "conv": ["width", "kernel", "groups"],
    "act": ["fn"],
    "norm": ["groups"],
    "pool": [],
    "add": [],
    "mul": [],
    "softmax": [],
}


@st.composite
def _spec_dicts(draw) -> dict:
    """Chains of nodes, most with one or more mutations: ids, inputs, arity, args, kind."""

    def rarely() -> bool:
        return draw(st.sampled_from(range(25))) == 24

    nodes: list[dict] = []
    for i in range(draw(st.integers(0, 5))):
        op = draw(st.sampled_from(_OPS[:-1])) if not rarely() else "softmax"
        defined = ["input"] + [n["id"] for n in nodes]
        arity = {"add": 2, "mul": 2}.get(op, 1)
        if rarely():
            arity = draw(st.integers(0, 3))
        sources = defined + ["later", "nope"] if rarely() else defined
        inputs = [defined[-1]] + [draw(st.sampled_from(sources)) for _ in range(arity - 1)]
        if rarely():  # forward reference or self reference
            inputs = [draw(st.sampled_from(["later", f"n{i}"]))] + inputs[1:]
        keys = _OP_KEYS[op] + (["bogus", "fn", "width"] if rarely() else [])
        args = {k: draw((_BAD_ARGS if rarely() else _GOOD_ARGS)[k]) for k in keys if draw(st.booleans())}
        node_id = draw(st.sampled_from(["n0", "input", "Bad"])) if rarely() else f"n{i}"
        nodes.append({"id": node_id, "op": op, "inputs": inputs[:arity], "args": args})
    return {
        "name": draw(st.sampled_from(["p", "q-1", "bad name"])) if rarely() else "p",
        "kind": "graph" if rarely() else draw(st.sampled_from(["vector", "seq", "image"])),
        "nodes": nodes,
    }


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
@given(d=_spec_dicts(), shape=st.sampled_from([(8,), (4, 6), (2, 4, 4), (1, 5)]), budget=st.sampled_from([None, 200]))
def test_property_specs_fail_cleanly(d, shape, budget):
    try:
        spec = BlueprintSpec.model_validate(d)
    except pydantic.ValidationError:
        event("rejected by validation")
        return
    assert BlueprintSpec.from_json(spec.to_json()) == spec
    result = check_contract(spec, shape, max_params=budget)  # must not raise
    assert isinstance(result, ContractResult)
    assert result.ok == (result.reason == "")
    assert "\n" not in result.reason
    event(f"valid spec, contract {'passed' if result.ok else 'failed'}")
    if result.ok:
        seed = build_seed(spec, shape, max_params=budget, generator_seed=0)
        h = torch.randn(3, *shape)
        with torch.no_grad():
            assert torch.equal(seed(h), h)
    else:
        # A clean refusal, or it builds and the contract failed afterwards; nothing else.
        with contextlib.suppress(EsperError):
            build_seed(spec, shape, max_params=budget)


# ---- regressions (bugs found by these tests, fixed in spec.py) ---------------------------------
@pytest.mark.parametrize(
    "node",
    [
        _n("a", "conv", kernel=None),
        _n("a", "norm", groups=None),
    ],
    ids=["conv-kernel-null", "norm-groups-null"],
)
def test_null_kernel_or_norm_groups_rejected(node):
    # Used to pass validation and then crash the builder with a TypeError inside check_contract.
    with pytest.raises(pydantic.ValidationError, match="cannot be null"):
        _spec("seq", node)


def test_null_where_null_has_a_meaning_is_accepted():
    spec = _spec("seq", _n("a", "conv", width=None, groups=None), _n("b", "linear", ("a",), width=None))
    assert check_contract(spec, (4, 10)).ok


@pytest.mark.parametrize("value", [True, False])
def test_boolean_width_is_rejected(value):
    # true used to be coerced to width 1 before the bool guard ran.
    with pytest.raises(pydantic.ValidationError, match=r"args\.width") as info:
        Node(id="a", op="linear", args={"width": value})
    assert f"input_value={value}" in str(info.value)


@pytest.mark.parametrize("value", ["8", 8.0, 2.5])
def test_non_integer_width_is_rejected(value):
    with pytest.raises(pydantic.ValidationError, match="width must be an integer"):
        Node(id="a", op="linear", args={"width": value})
