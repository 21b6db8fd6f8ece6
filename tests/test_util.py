"""The shared helpers: atomic writes, one-line error text, the controller factory, typed records."""

from __future__ import annotations

import json
import os
import threading

import pytest

from esper_ray.config import ControllerConfig
from esper_ray.contracts import (
    AccuracySink,
    BlueprintStatus,
    CompileInfo,
    CompileMode,
    ControllerKind,
    EsperError,
    EventKind,
    FieldReportSink,
    GerminationSink,
)
from esper_ray.tamiyo.baselines import ScheduleController
from esper_ray.tamiyo.controllers import (
    HeuristicController,
    RandomController,
    StaticController,
    controller_factory,
    make_controller,
    policy_label,
)
from esper_ray.util import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    error_line,
    one_line,
    read_parquet,
)


# ---- atomic writes ----------------------------------------------------------------------------------
def test_atomic_writes_replace_the_file_and_leave_no_temporary(tmp_path) -> None:
    path = tmp_path / "f.bin"
    assert atomic_write_bytes(path, b"one") == path and path.read_bytes() == b"one"
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    atomic_write_text(tmp_path / "t.txt", "h\u00e9")
    assert (tmp_path / "t.txt").read_bytes() == "h\u00e9".encode()
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert (tmp_path / "j.json").read_text() == '{"a": [1, 2], "b": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "j.json", "t.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path) -> None:
    path = tmp_path / "keep.json"
    atomic_write_json(path, {"v": 1})

    def broken(fh) -> None:
        fh.write(b'{"v": 2, "half')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]
    with pytest.raises(TypeError):  # not JSON-serialisable: nothing written either
        atomic_write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1} and len(list(tmp_path.iterdir())) == 1


def test_concurrent_writers_never_leave_a_torn_file(tmp_path) -> None:
    path = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write_bytes, args=(path, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in payloads  # one whole payload, whichever came last
    assert os.listdir(tmp_path) == ["shared.bin"]


def test_a_parquet_file_replaced_while_it_is_read_gives_one_whole_version(tmp_path) -> None:
    """pyarrow's read_table(path) opens the file twice (footer, then pages): racing an atomic writer it
    read the footer of one version and the pages of the next ("Couldn't deserialize thrift"; it broke
    the chaos test reading Urza's catalogue). read_parquet reads one version, whole."""
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "catalogue.parquet"

    def version(n: int) -> pa.Table:
        return pa.table({"n": [n] * n, "blob": [os.urandom(64) for _ in range(n)]})

    atomic_write(path, lambda f: pq.write_table(version(50), f))
    stop = threading.Event()

    def writer() -> None:
        n = 50
        while not stop.is_set():
            n = n % 2000 + 37
            atomic_write(path, lambda f, n=n: pq.write_table(version(n), f))

    thread = threading.Thread(target=writer)
    thread.start()
    reads, end = 0, time.monotonic() + 1.5
    try:
        while time.monotonic() < end:
            table = read_parquet(path, columns=["n"])
            assert table.column_names == ["n"]
            ns = table.column("n").to_pylist()
            assert ns and len(ns) == ns[0] and set(ns) == {ns[0]}  # every row of one version, no other
            reads += 1
    finally:
        stop.set()
        thread.join()
    assert reads > 10
    assert read_parquet(path).num_rows == pq.read_table(path).num_rows  # at rest: the same table


def test_temporary_names_look_like_an_interrupted_write(tmp_path, monkeypatch) -> None:
    """A run folder's cleanup recognises leftovers by their name: a dot first, .tmp last."""
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_bytes(tmp_path / "lineage.parquet", b"x")
    assert len(seen) == 1 and seen[0].startswith(".lineage.parquet.") and seen[0].endswith(".tmp")


# ---- one-line error text ----------------------------------------------------------------------------
def test_error_line_is_the_first_nonempty_line_or_the_type() -> None:
    assert error_line(ValueError("bad value\nTraceback detail\nmore")) == "bad value"
    assert error_line(ValueError("\n  padded first  \nsecond")) == "padded first"
    assert error_line(KeyError()) == "KeyError"  # str(err) is empty: "".splitlines()[0] would raise
    assert error_line(RuntimeError("   ")) == "RuntimeError"
    assert error_line("plain text\nrest") == "plain text" and error_line("") == ""


def test_one_line_escapes_control_characters_and_cuts() -> None:
    assert one_line("a\nb\tc\x00") == "a\\nb\\tc\\x00"
    assert one_line("x" * 10, limit=8) == "xxxxx..." and len(one_line("y" * 500, limit=300)) == 300
    assert one_line("short", limit=8) == "short"


# ---- building a controller from config ---------------------------------------------------------------
def test_make_controller_builds_each_kind_from_config() -> None:
    assert isinstance(make_controller(ControllerConfig(kind="static")), StaticController)
    assert isinstance(make_controller(ControllerConfig(kind="random", p_act=0.5), seed=3), RandomController)
    heuristic = make_controller(ControllerConfig(kind="heuristic", plateau_patience=4, cull_below=-0.5))
    assert isinstance(heuristic, HeuristicController)
    fixed = make_controller(ControllerConfig(kind="fixed", schedule=[{"slot": 0, "blueprint": "norm"}]))
    assert isinstance(fixed, ScheduleController) and fixed.name == "fixed" and fixed.fossilize
    replay = make_controller(ControllerConfig(kind="replay", schedule=[{"slot": 0, "blueprint": "norm"}]))
    assert replay.name == "replay" and not replay.fossilize


def test_errors_name_where_the_settings_came_from() -> None:
    with pytest.raises(EsperError, match=r"^controller.kind=fixed needs controller.schedule"):
        make_controller(ControllerConfig(kind="fixed"))
    with pytest.raises(EsperError, match=r"^env.run.controller.kind=fixed needs env.run.controller.schedule"):
        controller_factory(ControllerConfig(kind="fixed"), source="env.run.controller")  # at once, not per episode
    with pytest.raises(EsperError, match="needs the run it plays in"):
        controller_factory(ControllerConfig(kind="trial"))


def test_controller_factory_gives_a_fresh_seeded_controller_per_episode() -> None:
    factory = controller_factory(ControllerConfig(kind="random", p_act=0.5))
    a, b, c = factory(1), factory(1), factory(2)
    assert a is not b and isinstance(a, RandomController)
    draws = [[x.rng.random() for _ in range(5)] for x in (a, b, c)]
    assert draws[0] == draws[1] != draws[2]


def test_policy_factory_labels_like_the_cli(tmp_path) -> None:
    from esper_ray.tamiyo.controllers import policy_factory
    from esper_ray.tamiyo.policy import SHIPPED_POLICY

    label, factory = policy_factory(SHIPPED_POLICY)
    assert label == f"policy:{policy_label(SHIPPED_POLICY)}" == "policy:tamiyo"
    first, again = factory(0), factory(0)
    assert first is not again
    cfg = ControllerConfig(kind="policy", path=str(SHIPPED_POLICY))
    assert type(controller_factory(cfg)(0)) is type(first)
    with pytest.raises(EsperError):
        policy_factory(tmp_path / "missing")


# ---- typed records -----------------------------------------------------------------------------------
def test_enums_equal_and_serialise_as_their_old_strings() -> None:
    assert BlueprintStatus.READY == "ready" and f"{EventKind.GERMINATE}" == "germinate"
    assert json.dumps({"s": BlueprintStatus.REJECTED, "k": CompileMode.EAGER}) == '{"s": "rejected", "k": "eager"}'
    assert {k.value for k in ControllerKind} >= {"static", "random", "heuristic", "trial", "fixed", "best-fixed"}
    assert set(ControllerKind) == set(ControllerConfig.model_fields["kind"].annotation.__args__)


def test_compile_info_drops_its_artifacts_for_progress_notes() -> None:
    info = CompileInfo(CompileMode.COMPILED, 2.0, artifacts=b"\x00" * 1000)
    assert info.without_artifacts() == CompileInfo(CompileMode.COMPILED, 2.0)


def test_optional_collaborators_are_recognised_by_protocol() -> None:
    class Metrics:
        def record_accuracy(self, accuracy: float) -> None:
            pass

    assert isinstance(Metrics(), AccuracySink)
    assert not isinstance(Metrics(), GerminationSink) and not isinstance(Metrics(), FieldReportSink)
    from actors.client import UrzaCatalogue

    for proto in (AccuracySink, GerminationSink, FieldReportSink):  # what the pipeline client offers a run
        assert issubclass(UrzaCatalogue, proto)


# ---- import hygiene ----------------------------------------------------------------------------------
def _fresh_python(code: str) -> str:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_USAGE_STATS_ENABLED"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_pipeline_changes_no_environment() -> None:
    """Ray's usage statistics are turned off where the project starts Ray, not on import."""
    code = "import os, actors, actors.client, esper_ray.cli; print(os.environ.get('RAY_USAGE_STATS_ENABLED'))"
    assert _fresh_python(code) == "None"


def test_offline_training_does_not_import_online_training() -> None:
    """simic.offline and simic.ppo share their module config through simic.config (no import circle)."""
    code = (
        "import sys\nfrom esper_ray.simic import offline\nfrom esper_ray.simic.config import SimicConfig\n"
        "offline._model_config(SimicConfig())  # what a MARWIL run builds its module from\n"
        "print('esper_ray.simic.ppo' in sys.modules)"
    )
    assert _fresh_python(code) == "False"
