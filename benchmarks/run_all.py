"""Run every benchmark script, then render BENCHMARKS.md from their result files and the page's template.

Run from the repository root::

    .venv/bin/python benchmarks/run_all.py --render-only        # the page from benchmarks/results/, runs nothing
    .venv/bin/python benchmarks/run_all.py                      # full: reruns every script, then the page
    .venv/bin/python benchmarks/run_all.py --quick              # quick settings -> BENCHMARKS.quick.md
    .venv/bin/python benchmarks/run_all.py --quick --out -      # ... to stdout
    .venv/bin/python benchmarks/run_all.py --only stability,distill --logs runs/bench-logs

Each script in ``BENCHES`` runs as a subprocess with its declared arguments (``quick`` ones with
``--quick``) and ``--json PATH``: it writes one result file (``benchmarks/common.py``: its command,
date, machine, wall time and figures). A full run keeps each new result in ``benchmarks/results/``
(a script that fails or times out leaves the committed one in place, and its rows say "failed");
a quick run keeps its results in ``--logs`` (default: a temporary folder) and never touches the
committed ones. The page is ``benchmarks/BENCHMARKS.template.md`` (the prose) with its
placeholders filled by ``benchmarks/page.py`` from the result files; nothing is parsed from
printed output. A full run takes under an hour on 2 CPU cores, the quick one a few minutes (what
CI runs, through ``tests/test_benchmarks_quick.py``); BENCHMARKS.md says what each took.
``tamiyo_generalization.py`` (about an hour) and ``ppo_same_result.py`` (which starts from a checkpoint
made by hand) are not rerun here: their committed results are rendered.

Exit status: 0 when the page was written (targets missed or not), 1 if a script failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import PY, REPO, RESULTS, Result, read_result
from page import render

from esper_ray.contracts import EsperError

BENCH = REPO / "benchmarks"


@dataclass(frozen=True)
class Bench:
    """One script run: its result's name, its arguments (full and quick), and how long it may take."""

    name: str  # the result file: benchmarks/results/<name>.json
    script: str
    args: list[str] = field(default_factory=list)
    quick: list[str] | None = field(default_factory=lambda: ["--quick"])  # None: not run in quick mode
    timeout: int = 1800
    out_dir: bool = False  # takes --out DIR (for its CSV files)
    rerun: bool = True  # False: rendered from its committed result, run by hand

    def command(self, quick: bool) -> str:
        args = self.quick if quick and self.quick is not None else self.args
        return " ".join([PY, f"benchmarks/{self.script}", *args])


BENCHES = [
    Bench("bottleneck_study", "bottleneck_study.py", timeout=2400),
    Bench("stability", "stability.py"),
    Bench("distill", "distill.py", timeout=2400, out_dir=True),
    Bench("param_efficiency", "param_efficiency.py"),
    Bench("overhead", "overhead.py", timeout=900),
    Bench("nonblocking", "nonblocking.py", timeout=900),
    Bench("env_throughput", "env_throughput.py", timeout=900),
    # The batched env's rows on their own (env_throughput.py --quick measures them too, briefly).
    Bench("env_batched", "env_throughput.py", args=["--batched-only"], quick=None, timeout=900),
    Bench("lineage_verify", "lineage_verify.py", timeout=300),
    # Starts a local Ray with the four service actors and lets Karn propose for a minute: not in quick mode.
    Bench("actor_memory", "actor_memory.py", args=["--seconds", "60"], quick=None, timeout=900),
    Bench("distill_transformer", "distill_transformer.py", timeout=2400, out_dir=True),
    Bench("adapt_transformer", "adapt_transformer.py"),
    # PPO wall time per iteration: env runners x episodes each (heavy: full runs only).
    Bench(
        "ppo_wall_time_tamiyo",
        "ppo_wall_time.py",
        args=["--config", "configs/tamiyo.yaml", "--layouts", "0x1,0x16,2x1,2x8", "--iterations", "4"],
        quick=None,
    ),
    Bench(
        "ppo_wall_time_controller",
        "ppo_wall_time.py",
        args=["--config", "configs/controller_ppo.yaml", "--layouts", "0x1,0x16,2x1,2x8", "--iterations", "4"],
        quick=None,
    ),
    # The Tamiyo recipe's PPO stage in three layouts, each policy evaluated on the held-out episodes
    # (about 25 minutes; it starts from the recipe's cloning checkpoint, made by hand: not rerun here).
    *(
        Bench(
            name,
            "ppo_same_result.py",
            args=[
                *["--config", "configs/tamiyo.yaml", "--warm-start", "runs/tamiyo-bc/checkpoint"],
                *["--layouts", "0x1,2x1,2x8", "--iterations", "20", "--eval-seeds", "2"],
                *["ppo.lr=0.0001", "ppo.entropy_coeff=0.005", f"seed={seed}"],
            ],
            quick=None,
            rerun=False,
        )
        for name, seed in (("ppo_same_result", 0), ("ppo_same_result_seed1", 1))
    ),
    Bench(
        "tamiyo_generalization",
        "tamiyo_generalization.py",
        args=["--policy", "esper_ray/policies/tamiyo"],
        quick=None,
        rerun=False,
    ),
]


def run_bench(bench: Bench, quick: bool, logs: Path) -> tuple[Result | None, str]:
    """Run one script; its result (None if it gave none) and, if so, why."""
    args = bench.quick if quick and bench.quick is not None else bench.args
    json_path = logs / f"{bench.name}.json"
    json_path.unlink(missing_ok=True)
    extra = ["--json", str(json_path)]
    if bench.out_dir:
        extra += ["--out", str(logs / f"{bench.name}-out")]
    log = logs / f"{bench.name}.log"
    print(f"[run_all] {bench.command(quick)}", flush=True)
    started = time.perf_counter()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as f:
        try:
            rc: int | None = subprocess.run(
                [sys.executable, str(BENCH / bench.script), *args, *extra],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                timeout=bench.timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = time.perf_counter() - started
    why = ""
    result = None
    if rc is None:
        why = f"timed out after {bench.timeout} s"
    elif not json_path.exists():
        why = f"exit status {rc}, no result file"
    else:
        # nonblocking.py and lineage_verify.py exit 1 when their target is missed: still a result.
        try:
            result = read_result(json_path)
        except EsperError as exc:
            why = str(exc)
    print(f"[run_all] {bench.name}: {'ok' if result else 'failed'} in {seconds:.0f} s (exit {rc})", flush=True)
    if result is None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        print(f"[run_all] last lines of {log}:\n{tail}", file=sys.stderr, flush=True)
    return result, why


def committed(names: list[str], folder: Path = RESULTS) -> dict[str, Result]:
    """The result files in ``folder`` for ``names`` (those that exist)."""
    return {n: read_result(folder / f"{n}.json") for n in names if (folder / f"{n}.json").exists()}


def write_page(page: str, out: str) -> None:
    if out == "-":
        sys.stdout.write(page)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(page)
    print(f"[run_all] wrote {out}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--render-only", action="store_true", help="run nothing: render the page from the result files")
    p.add_argument("--results", help="with --render-only: the folder of result files (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="each script's quick settings (CI: a few minutes)")
    p.add_argument(
        "--out",
        help="Markdown output: a path, or - for stdout (default BENCHMARKS.md, or BENCHMARKS.quick.md with --quick)",
    )
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(b.name for b in BENCHES if b.rerun))
    p.add_argument("--logs", help="keep each script's log and result file in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    names = [b.name for b in BENCHES]
    runnable = [b.name for b in BENCHES if b.rerun]
    only = [n.strip() for n in args.only.split(",")] if args.only else runnable
    if unknown := [n for n in only if n not in runnable]:
        p.error(f"unknown benchmark(s) {unknown}; choose from {runnable}")
    out = args.out or str(REPO / ("BENCHMARKS.quick.md" if args.quick else "BENCHMARKS.md"))
    commands = {b.name: b.command(args.quick) for b in BENCHES}
    try:
        if args.render_only:
            results = committed(names, Path(args.results) if args.results else RESULTS)
            write_page(render(results, commands, quick=args.quick), out)
            return 0
        # Quick runs never mix with the committed results, but the ones run_all never reruns are shown.
        results = committed([b.name for b in BENCHES if not b.rerun or not args.quick])
    except EsperError as exc:
        print(f"run_all.py: error: {exc}", file=sys.stderr)
        return 2
    tmp = None
    if args.logs:
        logs = Path(args.logs)
        logs.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="esper-bench-")
        logs = Path(tmp)
    failures: dict[str, str] = {}
    try:
        for bench in BENCHES:
            if bench.name not in only or (args.quick and bench.quick is None):
                continue
            result, why = run_bench(bench, args.quick, logs)
            if result is None:
                failures[bench.name] = why
                results.pop(bench.name, None)
                continue
            results[bench.name] = result
            if not args.quick:
                shutil.copyfile(logs / f"{bench.name}.json", RESULTS / f"{bench.name}.json")
        write_page(render(results, commands, failures, args.quick), out)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
