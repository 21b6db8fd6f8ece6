"""benchmarks/run_all.py renders BENCHMARKS.md from the committed result files and the template,
running nothing; the result files (benchmarks/common.py) keep their schema.

The benchmark scripts are not a package: they are imported from benchmarks/ here, as they import
each other when run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import run_all  # noqa: E402
from common import RESULTS, read_result, shown_command, write_result  # noqa: E402
from page import Page, fill, render  # noqa: E402

from esper_ray.contracts import EsperError  # noqa: E402

COMMANDS = {b.name: b.command(False) for b in run_all.BENCHES}


def test_rendering_the_committed_results_gives_the_committed_page() -> None:
    """BENCHMARKS.md is exactly what the template and benchmarks/results/ render to: edit those, not the page."""
    results = run_all.committed([b.name for b in run_all.BENCHES])
    assert sorted(results) == sorted(COMMANDS), "every declared benchmark has a committed result"
    assert render(results, COMMANDS) == (REPO / "BENCHMARKS.md").read_text()


def test_render_only_cli_writes_the_page_without_running_anything(tmp_path: Path) -> None:
    out = tmp_path / "page.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--render-only", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert page == (REPO / "BENCHMARKS.md").read_text()
    assert "{{" not in page and "[run_all] wrote" in proc.stdout


def test_the_committed_figures_are_the_ones_the_page_shows() -> None:
    """A few figures read back from the result files, as the page states them."""
    page = (REPO / "BENCHMARKS.md").read_text()
    stability = read_result(RESULTS / "stability.json").figures["scenarios"]["shift"]["arms"]["gated"]
    assert stability["degradation"] == pytest.approx(0.044) and "+4.4% ± 5.9%" in page
    distill = read_result(RESULTS / "distill.json").figures
    assert distill["param_ratio"] == pytest.approx(7434 / 2350) and "3.2x (7,434 / 2,350)" in page
    lineage = read_result(RESULTS / "lineage_verify.json").figures
    assert lineage["verify_best_s"] < 1.0 and f"| {lineage['verify_best_s']:.3f} s |" in page


def test_a_missing_result_is_pending_not_an_error() -> None:
    results = run_all.committed(["overhead", "lineage_verify"])
    page = Page(results, COMMANDS)
    values = page.values()
    rows = {r[0]: r for r in page.summary}
    assert rows["2. stability"][1].startswith("pending: no result yet (run `.venv/bin/python benchmarks/stability.py`)")
    assert rows["2. stability"][3] == "n/a"
    assert rows["4. representational integrity"][3] == "**yes**"  # overhead.json is there
    assert "pending" in values["tamiyo_generalization"]
    # run_all drops the result of a script that failed this time: its rows say so.
    gone = Page({}, COMMANDS, failures={"overhead": "timed out after 900 s"}).values()
    assert "failed (timed out after 900 s; see log)" in gone["integrity"]


def test_a_placeholder_without_a_value_is_a_one_line_error() -> None:
    with pytest.raises(EsperError, match=r"no value for \{\{nope\}\}") as err:
        fill("a {{summary}} b {{nope}}", {"summary": "x"})
    assert "\n" not in str(err.value)
    assert fill("{{{a.b}}} {{a.b}}", {"a.b": "1"}) == "{1} 1"


def test_result_files_round_trip_with_their_metadata(tmp_path: Path) -> None:
    path = tmp_path / "lineage_verify.json"
    figures = {
        "events": 10,
        "verify_best_s": 0.5,
        "verify_per_10k_s": math.nan,
        "append_events_per_s": math.inf,
        "flush_warm_s": 0.01,
    }
    written = write_result(path, "benchmarks/lineage_verify.py", figures, 0.0, ["--events", "10", "--json", str(path)])
    raw = json.loads(path.read_text())  # strict JSON: NaN and inf became null
    assert raw["figures"]["verify_per_10k_s"] is None and raw["figures"]["append_events_per_s"] is None
    back = read_result(path)
    assert back.command == ".venv/bin/python benchmarks/lineage_verify.py --events 10" == written.command
    assert back.script == "benchmarks/lineage_verify.py" and len(back.date) == 10
    assert back.machine["cores"] >= 1 and back.machine["torch"] and back.machine["device"]
    assert not list(tmp_path.glob(".*")), "no temporary file left behind"


def test_shown_command_leaves_out_where_the_output_went() -> None:
    cmd = shown_command("benchmarks/distill.py", ["--quick", "--out=/tmp/x", "--json", "/tmp/y.json", "--seeds", "2"])
    assert cmd == ".venv/bin/python benchmarks/distill.py --quick --seeds 2"
    cmd = shown_command("benchmarks/ppo_same_result.py", ["--work", "/tmp/runs", "--iterations", "2", "--work=/x"])
    assert cmd == ".venv/bin/python benchmarks/ppo_same_result.py --iterations 2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not a benchmark result file"),
        ('{"script": "benchmarks/overhead.py"}', "not a benchmark result file"),
        (
            json.dumps(
                {
                    "script": "benchmarks/overhead.py",
                    "command": "c",
                    "date": "d",
                    "machine": {},
                    "seconds": 1.0,
                    "figures": {"step_time": {}},
                }
            ),
            "overhead figures lack drift_final_between",
        ),
        (
            json.dumps(
                {"script": "benchmarks/nope.py", "command": "", "date": "", "machine": {}, "seconds": 1, "figures": {}}
            ),
            "no result schema for benchmarks/nope.py",
        ),
    ],
)
def test_a_bad_result_file_is_a_one_line_error_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "overhead.json"
    path.write_text(text)
    with pytest.raises(EsperError, match=message) as err:
        read_result(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_render_only_with_a_bad_result_file_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "overhead.json").write_text("{}")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run_all.py"),
            "--render-only",
            "--results",
            str(tmp_path),
            "--out",
            str(tmp_path / "page.md"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("run_all.py: error: ") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "page.md").exists()


def test_every_declared_script_exists_and_takes_json() -> None:
    for bench in run_all.BENCHES:
        text = (REPO / "benchmarks" / bench.script).read_text()
        assert "write_result(" in text, bench.script
        takes_json = '"--json"' in text or "distill_arguments(" in text  # common.distill_arguments adds it
        assert takes_json or not bench.rerun, f"run_all passes --json to {bench.script}"


def _fake_script(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(
        "import json, sys\nargs = sys.argv[1:]\npath = args[args.index('--json') + 1]\n" + body
    )


def test_a_full_run_keeps_new_results_and_a_failed_script_keeps_the_committed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_all with two stand-in scripts: one writes a result (it replaces the committed file), one fails
    (its committed file stays as it was, and the page says it failed instead of showing old figures)."""
    scripts, results = tmp_path / "scripts", tmp_path / "results"
    scripts.mkdir()
    results.mkdir()
    good = read_result(RESULTS / "lineage_verify.json")
    figures = {**good.figures, "verify_best_s": 0.25, "verify_per_10k_s": 0.25}
    envelope = {"script": "benchmarks/lineage_verify.py", "command": "x", "date": "2099-01-01", "machine": {},
                "seconds": 1.0, "figures": figures}  # fmt: skip
    _fake_script(scripts, "lineage_verify", f"open(path, 'w').write(json.dumps({envelope!r}))\n")
    _fake_script(scripts, "overhead", "print('boom'); sys.exit(3)\n")
    committed_overhead = (RESULTS / "overhead.json").read_text()
    (results / "overhead.json").write_text(committed_overhead)
    monkeypatch.setattr(run_all, "BENCH", scripts)
    monkeypatch.setattr(run_all, "RESULTS", results)
    monkeypatch.setattr(
        run_all,
        "BENCHES",
        [run_all.Bench("lineage_verify", "lineage_verify.py", timeout=60), run_all.Bench("overhead", "overhead.py")],
    )
    out = tmp_path / "page.md"
    assert run_all.main(["--out", str(out), "--logs", str(tmp_path / "logs")]) == 1
    assert read_result(results / "lineage_verify.json").figures["verify_best_s"] == 0.25
    assert (results / "overhead.json").read_text() == committed_overhead
    page = out.read_text()
    assert "| 0.250 s | < 1 s per 10,000 | **yes** |" in page and "2099-01-01" in page
    assert "failed (exit status 3, no result file; see log)" in page
    assert "boom" in (tmp_path / "logs" / "overhead.log").read_text()
