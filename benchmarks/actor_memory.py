"""Resident memory of each service actor (Urza, Karn, Tezzeret, Urabrask), idle and after work.

Run (it starts a local Ray; run it under the shared lock on a shared machine):

    flock /tmp/esper-heavy.lock .venv/bin/python benchmarks/actor_memory.py [--seconds 60] [--compile] \
        [--json benchmarks/results/actor_memory.json]

Starts the pipeline on an empty library in a temporary folder, waits for the standard
blueprints, reads each actor process's VmRSS from /proc, lets Karn propose for ``--seconds``
(a trainer polling Urza meanwhile, so the pipeline does not idle), and reads them again; prints
one row per actor (MB at start, MB after, growth) and Urza's library counts (entries kept, templates
held in the object store, at most ``actors.urza_templates_in_memory``), and at the end each actor's
VmRSS split into private memory and object-store pages it touched. What to expect: each actor holds
torch (a few hundred MB); the templates Urza keeps in the object store are bounded, but its entries
(in memory) and the catalogue replies it writes grow with the library, so a longer ``--seconds``
(more ready blueprints) shows more growth. ``--json`` also writes the figures to a file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

from common import write_result


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS")


def _split_mb(pid: int) -> dict[str, float]:
    """VmRSS split: private (RssAnon: the process's own heap) and shared memory it touched (RssShmem:
    pages of Ray's object store it wrote, e.g. large call results, counted in VmRSS but not its own)."""
    return {"private": round(_status_mb(pid, "RssAnon"), 1), "object_store": round(_status_mb(pid, "RssShmem"), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long Karn proposes between readings")
    parser.add_argument("--compile", action="store_true", help="Tezzeret tries torch.compile (default: eager)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    started = time.perf_counter()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from actors.launch import start_pipeline, stop_pipeline, wait_until_ready
    from esper_ray.config import ActorResources, ActorsConfig

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    small = ActorResources(num_cpus=0.1)
    with tempfile.TemporaryDirectory() as storage:
        cfg = ActorsConfig(
            namespace=f"bench-{uuid.uuid4().hex[:8]}",
            storage=storage,
            compile=args.compile,
            urza=small,
            karn=small,
            tezzeret=small,
            urabrask=small,
        )
        p = start_pipeline(cfg)
        try:
            wait_until_ready(p, 3, timeout=300)
            handles = p.handles()
            pids = {n: ray.get(h.__ray_call__.remote(lambda self: os.getpid())) for n, h in handles.items()}
            start = {n: _rss_mb(pid) for n, pid in pids.items()}
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                p.client.poll()  # a trainer's demand keeps Karn proposing
                time.sleep(0.5)
            after = {n: _rss_mb(pid) for n, pid in pids.items()}
            # A trainer may ask for any template: ask for every ready one (the bound must hold).
            ready = ray.get(p.urza.entries.remote("ready"))
            for row in ready:
                ray.get(p.urza.template_ref.remote(row.key))
            served = {n: _rss_mb(pid) for n, pid in pids.items()}
            split = {n: _split_mb(pid) for n, pid in pids.items()}
            stats = ray.get(p.urza.stats.remote())
        finally:
            stop_pipeline(p, kill=True)
    print(f"actor resident memory (VmRSS), {args.seconds:g} s of proposals, compile={args.compile}")
    print(f"{'actor':10s} {'start MB':>9s} {'after MB':>9s} {'growth MB':>10s} {'all served MB':>14s}")
    for name in pids:
        print(
            f"{name:10s} {start[name]:9.0f} {after[name]:9.0f} {after[name] - start[name]:10.1f} {served[name]:14.0f}"
        )
    print(
        f"urza library: {stats['entries']} entries ({stats['ready']} ready, {stats.get('rejected', 0)} rejected), "
        f"{stats['templates_in_store']} templates in the object store (at most {stats['templates_in_memory_max']})"
    )
    print(
        "at the end, VmRSS split (MB): "
        + ", ".join(f"{n} {v['private']} private + {v['object_store']} object-store pages" for n, v in split.items())
    )
    if args.json:
        figures = {
            "actor_cpus": 0.1,
            "seconds_of_proposals": args.seconds,
            "compile": args.compile,
            "rss_mb": {
                n: {"start": round(start[n], 1), "after": round(after[n], 1), "all_served": round(served[n], 1)}
                for n in pids
            },
            "rss_split_end_mb": split,  # actor -> {"private", "object_store"} when all were served
            "urza": {
                k: stats[k] for k in ("entries", "ready", "rejected", "templates_in_store", "templates_in_memory_max")
            },
        }
        write_result(args.json, __file__, figures, started)
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
