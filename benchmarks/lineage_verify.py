"""How fast the lineage ledger appends, flushes and verifies.

Run from the repository root::

    .venv/bin/python benchmarks/lineage_verify.py [--events 10000] [--repeats 5]

It builds a ledger of ``--events`` events (a realistic mix of germinations, stage
transitions, culls, rollbacks and checkpoints, each with a weights digest and two
metrics) in a temporary folder with a temporary key, flushes it (cold, then again after
one more append), and times ``verify_run(check_checkpoint=False)`` (read the Parquet
file, recompute every hash, check every link and the Ed25519 signature), taking the
best of ``--repeats``.

It prints the append rate, the first (cold: pyarrow's one-time imports) and later flush
times, and the verification time against the 1 s target for 10,000 events; the measured
figures are in BENCHMARKS.md ("Other measurements"). The script exits with status 1 if the
target is missed or the ledger fails to verify. ``--quick`` (2 repeats) and ``--json PATH`` (the figures) are for
benchmarks/run_all.py.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

TARGET_S = 1.0  # 10,000 events must verify in under this


build_figures: dict[str, float] = {}  # filled by build() for --json


def build(run_dir: Path, key_path: Path, n: int) -> None:
    """Append ``n`` events to a new ledger in ``run_dir`` and flush it; print the timings.

    The ledger is flushed once cold after ``n - 1`` events (the first flush in a process
    pays pyarrow's one-time imports) and once more after the last event: that second
    figure is what a trainer pays at each epoch end with a ledger this long.
    """
    from esper_ray.lineage import Ledger

    ledger = Ledger(run_dir, "bench-run", "bench-run/host", key_path=key_path)
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(64)]
    bps = [hashlib.sha256(f"bp{i}".encode()).hexdigest() for i in range(8)]
    # One seed's life in a slot, then the slot is reused: 8 events per cycle.
    cycle = [
        ("germinate", "GERMINATED"),
        ("transition", "TRAINING"),
        ("transition", "BLENDING"),
        ("cull", "CULLED"),
        ("rollback", ""),
        ("transition", "EMBARGOED"),
        ("transition", "DORMANT"),
        ("checkpoint", ""),
    ]
    start = time.perf_counter()
    for i in range(n):
        kind, stage = cycle[i % len(cycle)]
        slot = "" if kind in ("rollback", "checkpoint") else f"hidden{(i // len(cycle)) % 4}"
        ledger.append(
            kind,
            slot=slot,
            blueprint_hash=bps[i % len(bps)] if slot else "",
            stage=stage,
            epoch=i // 10,
            step=i * 50,
            weights_digest=digests[i % len(digests)],
            metrics={"val_acc": 0.5 + (i % 1000) / 2000, "loss": 1.0 / (1 + i)},
            blueprint_name="conv1d" if slot else "",
        )
        if i == n - 2:
            append_s = time.perf_counter() - start
            cold = time.perf_counter()
            ledger.flush()
            cold_s = time.perf_counter() - cold
            start = time.perf_counter()
    append_s += time.perf_counter() - start
    warm = time.perf_counter()
    ledger.flush()
    warm_s = time.perf_counter() - warm
    build_figures.update(append_events_per_s=n / append_s, flush_cold_s=cold_s, flush_warm_s=warm_s)
    print(f"append:  {n} events in {append_s:.3f} s ({n / append_s:,.0f} events/s)")
    print(
        f"flush:   {n - 1} events, first flush in the process {cold_s:.3f} s; "
        f"after one more append {warm_s:.3f} s (rewrites all {n})"
    )


def main(argv: list[str] | None = None) -> int:
    """Build, flush and verify a ledger; print the figures; 1 if the target is missed."""
    from esper_ray.lineage import verify_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000, help="at least 2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.quick:
        args.repeats = 2
    if args.events < 2 or args.repeats < 1:
        parser.error("--events must be at least 2 and --repeats at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        run_dir, key_path = Path(tmp) / "run", Path(tmp) / "key.pem"
        build(run_dir, key_path, args.events)
        size = (run_dir / "lineage.parquet").stat().st_size
        print(f"ledger:  {size / 1024:.0f} KiB of Parquet")
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            report = verify_run(run_dir, key_path, check_checkpoint=False)
            times.append(time.perf_counter() - start)
            if not report.ok:
                print(f"verify failed: {report.message}")
                return 1
        best = min(times)
        print(
            f"verify:  {report.events} events in {best:.3f} s best of {args.repeats} "
            f"(first {times[0]:.3f} s), "
            f"{report.events / best:,.0f} events/s; target < {TARGET_S:.1f} s for 10,000"
        )
        print(f"report:  {report.message}")
    scaled = best * 10_000 / max(1, args.events)
    if args.json:
        write_result(
            args.json,
            __file__,
            {
                "events": args.events,
                "repeats": args.repeats,
                "verify_best_s": best,
                "verify_first_s": times[0],
                "verify_per_10k_s": scaled,
                "target_s": TARGET_S,
                "events_per_s": report.events / best,
                "ledger_kib": size / 1024,
                **build_figures,
                "quick": args.quick,
            },
            started,
            argv,
        )
    return 0 if scaled < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
