"""Tests of the blueprint pipeline on Ray: Urza, Tezzeret, Urabrask, the client, the launcher.

The first part needs no Ray (validation, benchmarking, the library on disk); the second
uses the shared local Ray session (``ray_session`` in conftest.py) and one pipeline per
namespace. Most pipelines run with ``compile=False`` for speed; one slow test compiles.
No test asserts on wall-clock time: "never blocks" is checked through what the client
did (the version it saw while work was in flight, and how little time it spent inside
its calls compared with the work it did not wait for).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time

import pytest
import safetensors.torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_support import small_pipeline_config, wait_for

from actors.tezzeret import MAX_SPEC_CHARS, REFERENCE_SLOT_SHAPES, check_spec, parse_spec, validate_spec
from actors.urabrask import measure, risk_band
from actors.urza import PENDING, READY, REJECTED, Entry, UrzaLibrary
from esper_ray.blueprints import STANDARD_BLUEPRINTS, BlueprintSpec, build_seed
from esper_ray.config import ActorResources, ActorsConfig
from esper_ray.contracts import BenchmarkReport, CatalogueRow, CompileInfo, CompileMode, EsperError, FieldReport

# ---- specs used throughout ------------------------------------------------------------------------
BASE = {name: spec.model_dump(mode="json") for name, spec in STANDARD_BLUEPRINTS.items()}


def spec_json(name: str = "tiny", width: int = 8) -> str:
    """A small valid vector spec (a low-rank adapter of the given width)."""
    return BlueprintSpec.model_validate(
        {
            "name": name,
            "kind": "vector",
            "nodes": [
                {"id": "n0", "op": "linear", "args": {"width": width}},
                {"id": "n1", "op": "linear", "inputs": ["n0"], "args": {"width": None}},
            ],
        }
    ).to_json()


def power_spec() -> str:
    """Valid and contract-clean on normal inputs, but x**32 overflows under inputs x 1e4."""
    nodes = [{"id": "n0", "op": "mul", "inputs": ["input", "input"]}]
    nodes += [{"id": f"n{i}", "op": "mul", "inputs": [f"n{i - 1}", f"n{i - 1}"]} for i in range(1, 5)]
    nodes.append({"id": "out", "op": "linear", "inputs": ["n4"], "args": {"width": None}})
    return json.dumps({"name": "power", "kind": "vector", "nodes": nodes})


def _dumps(d: dict) -> str:
    return json.dumps(d)


def _with(base: str, change) -> str:
    d = copy.deepcopy(BASE[base])
    change(d)
    return _dumps(d)


# ---- malformed and hostile specs (each one invalid by construction) ------------------------------------
def unknown_op(op: str) -> str:
    return _with("residual_mlp", lambda d: d["nodes"][1].update(op=op, args={}))


def bad_width(width: int) -> str:
    return _with("residual_mlp", lambda d: d["nodes"][0]["args"].update(width=width))


def cycle(self_loop: bool) -> str:
    def change(d):
        d["nodes"][0]["inputs"] = [d["nodes"][0]["id"] if self_loop else d["nodes"][-1]["id"]]

    return _with("conv1d", change)


def extra_field(key: str) -> str:
    return _with("lowrank", lambda d: d.update({key: "x"}))


def bad_kind(kind: str) -> str:
    return _with("lowrank", lambda d: d.update(kind=kind))


def bad_kernel(kernel: int) -> str:
    return _with("conv2d", lambda d: d["nodes"][0]["args"].update(kernel=kernel))


def wrong_arity() -> str:
    return _with("se1d", lambda d: d["nodes"][-1].update(inputs=["input"]))


def duplicate_ids() -> str:
    return _with("residual_mlp", lambda d: d["nodes"][1].update(id="n0"))


def wrong_end_width(width: int) -> str:
    """Structurally valid, but the body ends with the wrong channel count: fits no slot."""
    return _with("lowrank", lambda d: d["nodes"][-1]["args"].update(width=width))


def vector_conv() -> str:
    return _with("lowrank", lambda d: d["nodes"][0].update(op="conv", args={"kernel": 3}))


def too_many_nodes() -> str:
    nodes = [{"id": f"n{i}", "op": "act", "inputs": [f"n{i - 1}" if i else "input"]} for i in range(65)]
    return _dumps({"name": "long", "kind": "vector", "nodes": nodes})


def non_integer_width(width) -> str:
    return _with("residual_mlp", lambda d: d["nodes"][0]["args"].update(width=width))


OPS = {"linear", "conv", "act", "norm", "pool", "add", "mul"}
KINDS = {"vector", "seq", "image"}


@st.composite
def malformed(draw) -> tuple[object, str | None]:
    """(submitted text, stated hash or None): never a valid, honestly hashed spec."""
    valid = draw(st.sampled_from(sorted(BASE)))
    text = _dumps(BASE[valid])
    case = draw(
        st.one_of(
            st.text(min_size=1).filter(lambda s: s not in OPS).map(unknown_op),
            st.integers(max_value=0).map(bad_width),
            st.integers(min_value=4097, max_value=10**18).map(bad_width),
            st.integers(min_value=300, max_value=4096).map(bad_width),  # within limits, over budget
            st.booleans().map(cycle),
            st.text(min_size=1)
            .filter(lambda k: k not in {"name", "kind", "nodes", "origin", "parents"})
            .map(extra_field),
            st.text().filter(lambda k: k not in KINDS).map(bad_kind),
            st.one_of(st.integers(max_value=0), st.integers(16, 10**6), st.integers(1, 14).map(lambda k: 2 * k)).map(
                bad_kernel
            ),
            st.just(wrong_arity()),
            st.just(duplicate_ids()),
            st.integers(2, 63).map(wrong_end_width),
            st.just(vector_conv()),
            st.just(too_many_nodes()),
            st.one_of(st.floats(allow_nan=False, allow_infinity=False).filter(lambda w: w != int(w)), st.text()).map(
                non_integer_width
            ),
            st.integers(0, len(text) - 1).map(lambda cut: text[:cut]),  # truncated JSON
            st.text(max_size=200).filter(lambda s: not s.strip().startswith("{")),  # not an object
            st.binary(max_size=64),
            st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=3)),
            st.just("[" * 5000 + "]" * 5000),  # deep nesting
            st.just(" " * (MAX_SPEC_CHARS + 1)),
        )
    )
    if draw(st.integers(0, 9)) == 0:  # a valid spec with a lying stated hash
        return text, draw(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
    return case, None


# ---- no Ray -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(STANDARD_BLUEPRINTS))
def test_standard_specs_pass_validation(name: str) -> None:
    spec = STANDARD_BLUEPRINTS[name]
    verdict = validate_spec(spec.to_json(), expected_hash=spec.content_hash)
    assert verdict.ok, verdict.reason
    assert verdict.key == spec.content_hash
    assert verdict.shapes and set(verdict.shapes) <= set(REFERENCE_SLOT_SHAPES[spec.kind])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=malformed())
def test_malformed_specs_are_rejected_with_a_reason(case: tuple[object, str | None]) -> None:
    text, stated = case
    verdict = validate_spec(text, expected_hash=stated)  # must not raise, whatever the input
    assert not verdict.ok
    assert verdict.reason and "\n" not in verdict.reason
    assert verdict.stage in ("parse", "hash", "contract")
    if verdict.stage in ("parse", "hash"):
        assert verdict.key.startswith("raw:")  # never pins a rejection on an honest spec's hash


def test_rejection_reasons_name_the_problem() -> None:
    assert "unknown op" in validate_spec(unknown_op("evil")).reason
    assert "over the budget" in validate_spec(bad_width(2000)).reason
    assert "cycle" in validate_spec(cycle(False)).reason
    assert "fits none" in validate_spec(wrong_end_width(7)).reason
    assert "Invalid JSON" in validate_spec("{not json").reason
    text = STANDARD_BLUEPRINTS["norm"].to_json()
    verdict = parse_spec(text, expected_hash="0" * 64)
    assert verdict.stage == "hash" and "content hash" in verdict.reason


def test_urabrask_passes_standard_and_flags_overflow() -> None:
    spec = STANDARD_BLUEPRINTS["lowrank"]
    report = measure(spec, (64,), iters=3)
    assert report.passed and report.risk == "low"
    assert report.blueprint_hash == spec.content_hash
    assert report.params == sum(p.numel() for p in build_seed(spec, (64,)).parameters())
    assert report.flops == 64 * 4 + 4 * 64
    assert report.latency_p95_ms >= report.latency_p50_ms > 0
    assert report.peak_memory_bytes > 0 and "estimated" in report.reason  # CPU: an estimate, said so
    assert 0.1 < report.grad_norm_ratio < 10 and not report.nan_under_large_inputs
    assert 0 <= report.low_precision_error < 0.05

    hazard = BlueprintSpec.from_json(power_spec())
    assert check_spec(hazard).ok  # the contract alone does not see it...
    report = measure(hazard, (64,), iters=3)
    assert report.nan_under_large_inputs and report.risk == "high" and not report.passed  # ...Urabrask does
    assert "NaN" in report.reason


def test_risk_bands() -> None:
    assert risk_band(1.0, False, 0.01) == ("low", [])
    assert risk_band(20.0, False, 0.01)[0] == "medium"
    assert risk_band(1 / 200, False, 0.01)[0] == "high"
    assert risk_band(1.0, False, 0.1)[0] == "medium"
    assert risk_band(1.0, False, 0.9)[0] == "high"
    assert risk_band(1.0, True, 0.0)[0] == "high"


def _report_for(spec: BlueprintSpec) -> BenchmarkReport:
    return measure(spec, REFERENCE_SLOT_SHAPES[spec.kind][0], iters=2)


def _field_report(spec: BlueprintSpec, run: str, gain: float) -> FieldReport:
    return FieldReport(
        run_id=run,
        blueprint_hash=spec.content_hash,
        blueprint_name=spec.name,
        slot="input",
        slot_kind="vector",
        slot_width=40,
        task="mnist1d",
        stage_reached="FOSSILIZED",
        outcome="fossilized",
        accuracy_before=0.5,
        accuracy_after=0.5 + gain,
        seed_params=100,
        epochs_alive=10,
        extra={"contribution": gain},
    )


def test_library_persists_and_refuses_tampering(tmp_path) -> None:
    lib = UrzaLibrary(tmp_path)
    specs = [STANDARD_BLUEPRINTS["lowrank"], STANDARD_BLUEPRINTS["norm"]]
    for spec in specs:
        key, status = lib.register(spec.to_json())
        assert (key, status) == (spec.content_hash, PENDING)
    assert lib.pending_specs() == [s.to_json() for s in specs]
    v0 = lib.version
    for spec in specs:
        template = safetensors.torch.save(build_seed(spec, (64,), generator_seed=0).state_dict())
        info = CompileInfo(CompileMode.EAGER, 0.0, "compile disabled by config")
        entry = lib.complete(
            spec.to_json(), template=template, slot_shape=(64,), compile_info=info, report=_report_for(spec)
        )
        assert entry.status == READY
    assert lib.version > v0 and lib.pending_specs() == []
    with pytest.raises(EsperError, match="refused"):  # a report for another spec is refused
        lib.complete(
            specs[0].to_json(),
            template=b"",
            slot_shape=(64,),
            compile_info=CompileInfo(CompileMode.EAGER, 0.0),
            report=_report_for(specs[1]),
        )
    lib.add_field_reports([_field_report(specs[1], "run1", 0.05)])

    again = UrzaLibrary(tmp_path)  # a restarted Urza
    assert again.catalogue() == lib.catalogue()
    assert again.version != lib.version  # a reload is a new generation for clients
    assert again.reports == lib.reports
    assert json.loads(again.top_specs(1)[0])["name"] == "norm"  # the one that helped in the field

    # Tamper with a stored spec: the entry is refused on load, never served.
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "catalogue.parquet").to_pylist()
    table[0]["spec_json"] = table[0]["spec_json"].replace('"width":4', '"width":5')
    import pyarrow as pa

    pq.write_table(
        pa.Table.from_pylist(table, schema=pq.read_schema(tmp_path / "catalogue.parquet")),
        tmp_path / "catalogue.parquet",
    )
    tampered = UrzaLibrary(tmp_path)
    assert [e.content_hash for e in tampered.catalogue()] == [specs[1].content_hash]
    assert tampered.entries[specs[0].content_hash].status == REJECTED
    assert tampered.refused


def test_rejecting_a_ready_blueprint_removes_its_files(tmp_path) -> None:
    """A rejected blueprint leaves no template or compiled artifacts behind, on disk or in a reload."""
    lib = UrzaLibrary(tmp_path)
    spec = STANDARD_BLUEPRINTS["lowrank"]
    template = safetensors.torch.save(build_seed(spec, (64,), generator_seed=0).state_dict())
    info = CompileInfo(CompileMode.COMPILED, 1.5, artifacts=b"compiled cache bytes")
    lib.complete(spec.to_json(), template=template, slot_shape=(64,), compile_info=info, report=_report_for(spec))
    key = spec.content_hash
    stored = sorted(p.name for p in (tmp_path / "templates").iterdir())
    assert stored == [f"{key}.compiled", f"{key}.safetensors"]
    assert lib.compiled_bytes(key) == b"compiled cache bytes"
    row = lib.catalogue()[0]
    assert isinstance(row, CatalogueRow) and (row.compile_mode, row.compile_seconds) == ("compiled", 1.5)
    assert lib.entries[key].compile_mode == "compiled"  # stored as a plain column

    version = lib.version
    entry = lib.reject(key, spec.to_json(), "withdrawn", "benchmark")
    assert entry.status == REJECTED and lib.version == version + 1
    assert list((tmp_path / "templates").iterdir()) == []
    assert lib.compiled_bytes(key) == b"" and lib.catalogue() == []
    again = UrzaLibrary(tmp_path)
    assert again.entries[key].status == REJECTED and again.refused == []


def test_probe_fails_fast_on_a_dead_address() -> None:
    from esper_ray.cluster import _probe

    with pytest.raises(EsperError, match="no Ray cluster answers"):
        _probe("127.0.0.1:1", 2.0)
    with pytest.raises(EsperError, match="not host:port"):
        _probe("nonsense", 2.0)


# ---- Ray ------------------------------------------------------------------------------------------------
ray_mark = pytest.mark.usefixtures("ray_session")
make_cfg = small_pipeline_config


def entry_of(pipeline, key: str) -> Entry | None:
    import ray

    return ray.get(pipeline.urza.entry.remote(key), timeout=30)


@pytest.fixture(scope="module")
def pipeline(ray_session, tmp_path_factory):
    """One pipeline (no Karn, compile off) shared by the tests that do not kill anything."""
    from actors.launch import start_pipeline, stop_pipeline, wait_until_ready

    p = start_pipeline(make_cfg(tmp_path_factory.mktemp("urza")), with_karn=False)
    wait_until_ready(p, len(STANDARD_BLUEPRINTS), timeout=120)
    yield p
    stop_pipeline(p, kill=True)


@ray_mark
def test_standard_blueprints_come_through_the_pipeline(pipeline) -> None:
    import ray

    entries = pipeline.client.sync()
    assert sorted(e.name for e in entries) == sorted(STANDARD_BLUEPRINTS)
    for e in entries:
        assert e.content_hash == STANDARD_BLUEPRINTS[e.name].content_hash
        assert e.report.passed and e.report.blueprint_hash == e.content_hash and e.report.risk != "high"
        row = entry_of(pipeline, e.content_hash)
        assert row.status == READY and row.compile_mode == "eager"
        assert row.compile_error == "compile disabled by config"
    # The weight template is served from the object store: the seed's birth weights.
    spec = STANDARD_BLUEPRINTS["conv1d"]
    ref = ray.get(pipeline.urza.template_ref.remote(spec.content_hash))
    weights = safetensors.torch.load(ray.get(ref))
    birth = build_seed(spec, REFERENCE_SLOT_SHAPES["seq"][0], generator_seed=0).state_dict()
    assert weights.keys() == birth.keys() and all((weights[k] == birth[k]).all() for k in birth)
    assert pipeline.client.resolve("conv1d").content_hash == spec.content_hash
    with pytest.raises(EsperError):
        pipeline.client.resolve("no_such_blueprint")


class _GrowThenCull:
    """Germinates ``lowrank`` at hidden0 at the first decision and culls it two decisions later."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls = 0

    def act(self, obs, legal):
        from esper_ray.contracts import ControllerAction

        self.calls += 1
        wanted = {1: ControllerAction.germinate("hidden0", "lowrank"), 3: ControllerAction.cull("hidden0")}
        action = wanted.get(self.calls, ControllerAction.wait())
        return action if action in legal else ControllerAction.wait()

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


@pytest.fixture
def own_pipeline(ray_session, tmp_path):
    """A pipeline of its own (its field reports must not steer the shared one's top_specs)."""
    from actors.launch import start_pipeline, stop_pipeline, wait_until_ready

    p = start_pipeline(make_cfg(tmp_path / "urza"), with_karn=False)
    wait_until_ready(p, len(STANDARD_BLUEPRINTS), timeout=120)
    yield p
    stop_pipeline(p, kill=True)


@ray_mark
def test_a_training_run_germinates_from_the_pipeline_and_reports_back(own_pipeline, tmp_path, monkeypatch) -> None:
    """The trainer uses the catalogue the actors serve, and its field reports reach Urza for Karn."""
    import ray

    from esper_ray.config import RunConfig
    from esper_ray.tolaria.run import run_training

    pipeline = own_pipeline

    monkeypatch.setenv("ESPER_RAY_LINEAGE_KEY", str(tmp_path / "key.pem"))
    before = len(ray.get(pipeline.urza.field_reports.remote()))
    cfg = RunConfig(
        training={"epochs": 5},
        task={"n_train": 400},
        blueprints={"source": "urza"},
        lifecycle={"min_training_epochs": 1},
    )
    result = run_training(
        cfg, out=tmp_path / "run", controller=_GrowThenCull(), catalogue=pipeline.client, progress=False
    )
    assert result.summary["germinations"] == 1 and result.summary["culls"] == 1
    germinated = next(e for e in result.trainer.events if e["kind"] == "germinate")
    assert germinated["blueprint_hash"] == STANDARD_BLUEPRINTS["lowrank"].content_hash
    deadline = time.monotonic() + 30
    while len(ray.get(pipeline.urza.field_reports.remote())) == before and time.monotonic() < deadline:
        time.sleep(0.2)  # sent fire-and-forget
    reports = ray.get(pipeline.urza.field_reports.remote())
    assert len(reports) == before + 1
    assert reports[-1].blueprint_hash == germinated["blueprint_hash"] and reports[-1].outcome == "culled"


HOSTILE = [
    ("garbage", "}{ not json", None),
    ("empty", "", None),
    ("bytes", b"\x00\xff", None),
    ("none", None, None),
    ("list", "[1, 2, 3]", None),
    ("unknown op", unknown_op("exec"), None),
    ("negative width", bad_width(-5), None),
    ("zero width", bad_width(0), None),
    ("absurd width", bad_width(10**12), None),
    ("over budget", bad_width(4096), None),
    ("self loop", cycle(True), None),
    ("cycle", cycle(False), None),
    ("duplicate ids", duplicate_ids(), None),
    ("wrong arity", wrong_arity(), None),
    ("extra field", extra_field("__class__"), None),
    ("bad kind", bad_kind("tensor"), None),
    ("even kernel", bad_kernel(4), None),
    ("fits no slot", wrong_end_width(3), None),
    ("too long", "x" * (MAX_SPEC_CHARS + 1), None),
    ("lying hash", STANDARD_BLUEPRINTS["norm"].to_json(), "f" * 64),
    ("overflows", power_spec(), None),  # passes the contract, rejected by Urabrask
]


@ray_mark
def test_hostile_specs_are_rejected_and_the_actors_live(pipeline) -> None:
    import ray

    from actors.launch import wait_until_idle

    keys = ray.get([pipeline.tezzeret.submit.remote(text, stated) for _, text, stated in HOSTILE])
    wait_until_idle(pipeline, timeout=60)
    for (label, _, _), key in zip(HOSTILE, keys, strict=True):
        row = entry_of(pipeline, key)
        assert row is not None, label
        assert row.status == REJECTED and row.reason, (label, row)
    assert entry_of(pipeline, keys[-1]).stage == "benchmark"
    assert "NaN" in entry_of(pipeline, keys[-1]).reason
    # The honest "norm" blueprint is untouched by the submission that lied about its hash.
    assert entry_of(pipeline, STANDARD_BLUEPRINTS["norm"].content_hash).status == READY
    for handle in pipeline.handles().values():  # everyone still answers
        assert ray.get(handle.stats.remote(), timeout=10)
    assert sorted(e.name for e in pipeline.client.sync()) == sorted(STANDARD_BLUEPRINTS)


@ray_mark
def test_poll_never_waits_for_a_slow_compile(pipeline) -> None:
    import ray

    slow_s = 5.0
    ray.get(pipeline.tezzeret.configure.remote(slow_compile_s=slow_s))
    client = pipeline.client
    client.sync()
    old_version, waited_before = client.version, client.waited_s
    key = ray.get(pipeline.tezzeret.submit.remote(spec_json("slowpoke", width=6)))
    seen_while_pending, polls = [], 0
    try:
        while True:
            for _ in range(20):
                entries = client.poll()
                polls += 1
            # Read after the polls (the test may wait; a poll may not): still not ready now
            # means it was not ready while they ran either.
            if entry_of(pipeline, key).status != READY:
                seen_while_pending.append((client.version, len(entries)))
            elif any(e.content_hash == key for e in entries):
                break
            time.sleep(0.02)
            assert polls < 100_000, "the new blueprint never reached the client"
    finally:
        ray.get(pipeline.tezzeret.configure.remote(slow_compile_s=0.0))
    assert len(seen_while_pending) > 10  # we really polled while the compile was in flight
    assert {v for v, _ in seen_while_pending} == {old_version}  # the cached catalogue, not a wait
    assert {n for _, n in seen_while_pending} == {len(STANDARD_BLUEPRINTS)}
    # All those polls together took a small fraction of the compile they did not wait for.
    assert client.waited_s - waited_before < 0.1 * slow_s


@ray_mark
def test_field_reports_steer_top_specs(pipeline) -> None:
    import ray

    norm = STANDARD_BLUEPRINTS["norm"]
    pipeline.client.send_field_reports([_field_report(norm, "run-a", 0.2)])
    reports = wait_for(lambda: ray.get(pipeline.urza.field_reports.remote()), 10, "field reports")
    assert reports[0].blueprint_hash == norm.content_hash and reports[0].extra == {"contribution": 0.2}
    top = ray.get(pipeline.urza.top_specs.remote(3))
    assert json.loads(top[0])["name"] == "norm"


@ray_mark
def test_metrics_and_counters(pipeline) -> None:
    import ray

    from actors import client as client_module

    urza = ray.get(pipeline.urza.stats.remote())
    tez = ray.get(pipeline.tezzeret.stats.remote())
    bench = ray.get(pipeline.urabrask.stats.remote())
    assert urza["ready"] >= len(STANDARD_BLUEPRINTS) and urza["completed"] >= len(STANDARD_BLUEPRINTS)
    assert tez["mode_eager"] >= len(STANDARD_BLUEPRINTS) and tez["submitted"] > 0 and tez["rejected"] > 0
    assert bench["benchmarks"] >= len(STANDARD_BLUEPRINTS) and bench["device"] == "cpu"
    before = dict(client_module.DRIVER_COUNTS)
    pipeline.client.record_germination()
    pipeline.client.record_accuracy(0.8)
    assert client_module.DRIVER_COUNTS["germinations"] == before["germinations"] + 1
    assert client_module.DRIVER_COUNTS["accuracy_updates"] == before["accuracy_updates"] + 1


@ray_mark
def test_cpu_default_asks_for_no_gpu(pipeline) -> None:
    import ray

    assert ActorsConfig().tezzeret.num_gpus == 0
    for handle in pipeline.handles().values():
        assert ray.get(handle.gpu_ids.remote()) == []


def _karn_available() -> bool:
    try:
        import actors.karn  # noqa: F401
    except ImportError:
        return False
    return True


@ray_mark
def test_placement_on_logical_gpus(tmp_path) -> None:
    import ray

    from actors.launch import start_pipeline, stop_pipeline

    gpu = ActorResources(num_cpus=0.1, num_gpus=1)
    with_karn = _karn_available()
    cfg = make_cfg(tmp_path, karn=gpu, tezzeret=gpu, urabrask=gpu, karn_interval_s=60.0)
    p = start_pipeline(cfg, with_karn=with_karn, seed_standard=False)
    try:
        placed = {name: ray.get(h.gpu_ids.remote(), timeout=60) for name, h in p.handles().items()}
    finally:
        stop_pipeline(p, kill=True)
    assert placed["urza"] == []
    on_gpus = [name for name in ("karn", "tezzeret", "urabrask") if name in placed]
    assert len(on_gpus) == (3 if with_karn else 2)
    ids = [placed[name] for name in on_gpus]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids)  # distinct GPUs


@ray_mark
def test_over_asking_fails_fast(tmp_path) -> None:
    import ray

    from actors.launch import start_pipeline

    cfg = make_cfg(tmp_path, tezzeret=ActorResources(num_cpus=0.1, num_gpus=8))
    with pytest.raises(EsperError, match=r"actors.tezzeret.num_gpus=8 .* 4 GPUs"):
        start_pipeline(cfg, with_karn=False)
    with pytest.raises(ValueError):  # nothing was created
        ray.get_actor("urza", namespace=cfg.namespace)
    cfg = make_cfg(tmp_path, urza=ActorResources(num_cpus=3))
    with pytest.raises(EsperError, match="CPUs"):
        start_pipeline(cfg, with_karn=False)


@ray_mark
def test_library_survives_urza_and_field_reports_accumulate(tmp_path) -> None:
    import ray

    from actors.launch import start_pipeline, stop_pipeline, wait_until_ready

    cfg = make_cfg(tmp_path)
    first = start_pipeline(cfg, with_karn=False, seed_standard=False)
    for width in (2, 3):
        ray.get(first.tezzeret.submit.remote(spec_json(f"keep{width}", width)))
    wait_until_ready(first, 2, timeout=120)
    before = ray.get(first.urza.catalogue.remote())[1]
    assert len(before) == 2
    norm = STANDARD_BLUEPRINTS["norm"]
    ray.get(first.urza.add_field_reports.remote([_field_report(norm, "run-1", 0.1)]))
    stop_pipeline(first, kill=True)  # every actor gone for good; only the files remain
    wait_for(lambda: _gone("urza", cfg.namespace), 30, "urza to be gone")

    second = start_pipeline(cfg, with_karn=False)  # the next job: a fresh Urza on the same storage
    try:
        after = ray.get(second.urza.catalogue.remote(), timeout=60)[1]
        assert after == before  # same hashes, same reports, same order
        n = ray.get(second.urza.add_field_reports.remote([_field_report(norm, "run-2", 0.2)]))
        assert n == 2
        runs = {r.run_id for r in ray.get(second.urza.field_reports.remote())}
        assert runs == {"run-1", "run-2"}
        assert ray.get(second.tezzeret.stats.remote()).get("submitted", 0) == 0  # nothing redone
        # The first job's client finds the new Urza by name and gets the same catalogue.
        client, old_version = first.client, first.client.version
        wait_for(lambda: client.poll() and client.version != old_version, 30, "the old client to reconnect")
        entries = client.poll()
        assert client.stats.reconnects >= 1
        assert sorted(e.content_hash for e in entries) == sorted(r.content_hash for r in before)
    finally:
        stop_pipeline(second, kill=True)


def _gone(name: str, namespace: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return True
    return False


@pytest.fixture(scope="module")
def fault_pipeline(ray_session, tmp_path_factory):
    """A pipeline (empty library, every compile 1.5 s long) for the tests that kill actors."""
    from actors.launch import start_pipeline, stop_pipeline

    storage = tmp_path_factory.mktemp("faults")
    p = start_pipeline(make_cfg(storage), with_karn=False, seed_standard=False, slow_compile_s=1.5)
    yield p
    stop_pipeline(p, kill=True)


@ray_mark
def test_killing_tezzeret_mid_compile_loses_nothing(fault_pipeline) -> None:
    import ray

    p = fault_pipeline
    key = ray.get(p.tezzeret.submit.remote(spec_json("survivor", width=5)))
    wait_for(lambda: ray.get(p.tezzeret.stats.remote())["current"] == key, 30, "the compile to start")
    ray.kill(p.tezzeret, no_restart=False)  # Ray restarts it (max_restarts); its queue was in memory
    row = wait_for(lambda: (r := entry_of(p, key)) and r.status == READY and r, 60, "the blueprint")
    assert row.report.passed
    stats = ray.get(p.tezzeret.stats.remote())
    # Done once: by the restarted Tezzeret, or by the first one when the kill landed just after its
    # report (a race on a loaded machine); either way nothing is left queued or done twice.
    assert stats.get("submitted", 0) == 0 and stats.get("ready", 0) <= 1


@ray_mark
def test_killing_urza_mid_run_keeps_the_catalogue(fault_pipeline) -> None:
    import ray

    p = fault_pipeline
    first = ray.get(p.tezzeret.submit.remote(spec_json("before", width=3)))
    wait_for(lambda: any(e.content_hash == first for e in p.client.poll()), 60, "the first blueprint")
    known = {e.content_hash for e in p.client.poll()}
    version = p.client.version
    second = ray.get(p.tezzeret.submit.remote(spec_json("during", width=2)))
    ray.kill(p.urza, no_restart=False)  # mid-run: the second spec is in Tezzeret's hands
    for _ in range(50):  # the trainer keeps polling: it gets the cached catalogue meanwhile
        assert {e.content_hash for e in p.client.poll()} == known
    entries = wait_for(lambda: len(p.client.poll()) > len(known) and p.client.poll(), 60, "the second")
    assert {e.content_hash for e in entries} == known | {second}
    assert p.client.version != version
    assert ray.get(p.urza.stats.remote())["registered"] == 0  # a restarted Urza...
    assert entry_of(p, first).status == READY  # ...that reloaded the library from disk


@ray_mark
@pytest.mark.slow
def test_compile_mode_is_recorded(tmp_path) -> None:
    import ray

    from actors.launch import start_pipeline, stop_pipeline

    p = start_pipeline(make_cfg(tmp_path, compile=True), with_karn=False, seed_standard=False)
    try:
        key = ray.get(p.tezzeret.submit.remote(spec_json("compiled", width=4)))
        row = wait_for(
            lambda: (r := entry_of(p, key)) and r.status in (READY, REJECTED) and r,
            300,
            "the compile",
            every=0.5,
        )
        compiled_ref = ray.get(p.urza.compiled_ref.remote(key))
        artifacts = ray.get(compiled_ref) if compiled_ref is not None else b""
    finally:
        stop_pipeline(p, kill=True)
    assert row.status == READY, row.reason
    assert row.compile_mode == "compiled" or (row.compile_mode == "eager" and row.compile_error)
    if row.compile_mode == "compiled":  # the compile's cache artifacts are in the object store
        assert artifacts and hashlib.sha256(artifacts).hexdigest() == row.compiled_sha256
        assert (tmp_path / "templates" / f"{key}.compiled").read_bytes() == artifacts  # and persisted
    assert row.compile_seconds > 0
    assert row.report is not None and row.report.passed
