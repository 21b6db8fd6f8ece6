"""Does host training ever wait for the blueprint pipeline? And how much does its work slow training?

Run from the repository root::

    .venv/bin/python benchmarks/nonblocking.py [--epochs 30] [--slow-compile-s 20]
        [--no-compile] [--extra-specs 6] [--no-karn]

It starts a local Ray (all of this machine's cores) and the pipeline (Urza, Tezzeret,
Urabrask and, if ``actors/karn.py`` is there and ``--no-karn`` is not given, Karn) on a
fresh temporary library, lets the standard blueprints through with compile off, and then
trains an MLP host on MNIST-1D twice with ``esper_ray.tolaria.Trainer``, an
``UrzaCatalogue`` as its catalogue and the heuristic controller, one decision per epoch
(``trainer.apply_decision(controller)``, ``trainer.end_epoch(action)``):

1. idle: nothing in the pipeline's queue, Karn not started (the baseline);
2. busy: Tezzeret compiling for real (``torch.compile`` on, one inductor thread) and every
   compile slowed by ``--slow-compile-s`` more seconds, ``--extra-specs`` new specs in
   its queue, Urabrask benchmarking what comes out, Karn proposing.

It measures, for each run, the seconds the training loop spent inside catalogue calls
(``client.waited_s``: every ``poll`` and ``resolve``) as a share of the loop's time
(target < 1%: the trainer only ever looks at a request with ``ray.wait(timeout=0)``),
and the median seconds per epoch (train + evaluation). The busy/idle ratio of the
latter is the price of sharing the CPUs with the pipeline, not waiting: on 2 shared
cores expect it above 1 while a compile runs (the actors take 1 thread each, the
trainer 1), and near 1 on a machine with cores to spare.

It prints one line per run (epochs, loop seconds, median epoch, seconds waited and their
share of the loop, candidates seen), the pipeline's state during and after the busy run, and
the waiting fraction with the busy/idle ratio (the trainer polls once per epoch, and the
client asks Urza for news at most once a second). The figures vary with the machine's load;
the measured ones are in BENCHMARKS.md ("Other measurements").

The exit status is 1 if the waiting fraction misses the 1% target. ``--quick`` (15 epochs,
compiles slowed by 3 s, 2 extra specs) and ``--json PATH`` (the figures) are for
benchmarks/run_all.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from common import write_result  # noqa: E402

from actors.client import UrzaCatalogue  # noqa: E402
from actors.launch import ensure_ray, start_pipeline, stop_pipeline, wait_until_ready  # noqa: E402
from esper_ray.blueprints import STANDARD_BLUEPRINTS, BlueprintSpec  # noqa: E402
from esper_ray.config import ActorsConfig, RunConfig  # noqa: E402
from esper_ray.contracts import ActionKind  # noqa: E402
from esper_ray.tamiyo.controllers import make_controller  # noqa: E402
from esper_ray.tasks import load_task  # noqa: E402
from esper_ray.tolaria import Trainer  # noqa: E402


@dataclass
class RunResult:
    label: str
    epochs: int
    loop_s: float
    waited_s: float
    epoch_s: list[float]
    candidates: int
    germinations: int

    @property
    def waiting_fraction(self) -> float:
        return self.waited_s / self.loop_s

    @property
    def median_epoch_s(self) -> float:
        return statistics.median(self.epoch_s)

    def line(self) -> str:
        return (
            f"{self.label}: {self.epochs} epochs in {self.loop_s:.2f} s, "
            f"median epoch {self.median_epoch_s:.3f} s, "
            f"waited {self.waited_s:.4f} s ({100 * self.waiting_fraction:.2f}%), "
            f"{self.candidates} candidates, {self.germinations} germination(s)"
        )


def train(label: str, run_cfg: RunConfig, data, client: UrzaCatalogue) -> RunResult:
    """One training run polling ``client``; only the loop itself is timed."""
    trainer = Trainer(run_cfg, data, catalogue=client, run_id=label)
    controller = make_controller(run_cfg.controller, seed=run_cfg.training.seed)
    client.waited_s = 0.0  # count only the loop's catalogue calls, not the Trainer's construction
    epoch_s, germinations = [], 0
    start = time.perf_counter()
    while not trainer.done:
        epoch_s.append(trainer.train_epoch()["epoch_seconds"])
        action = trainer.apply_decision(controller)
        if action.kind is ActionKind.GERMINATE:
            germinations += 1
            client.record_germination()
        client.record_accuracy(trainer.last["val_acc"])
        trainer.end_epoch(action)
    loop_s = time.perf_counter() - start
    return RunResult(label, trainer.epoch, loop_s, client.waited_s, epoch_s, len(trainer.candidates), germinations)


def variants(n: int) -> list[str]:
    """``n`` new specs for the busy phase: low-rank adapters and residual MLPs of other widths."""
    specs = []
    for i in range(n):
        base = STANDARD_BLUEPRINTS["lowrank" if i % 2 else "residual_mlp"].model_dump(mode="json")
        base["name"] = f"bench_{i}"
        base["nodes"][0]["args"]["width"] = 5 + i if i % 2 else 24 + 8 * i
        specs.append(BlueprintSpec.model_validate(base).to_json())
    return specs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--slow-compile-s", type=float, default=20.0, help="extra seconds per compile")
    ap.add_argument("--no-compile", action="store_true", help="busy phase without torch.compile")
    ap.add_argument("--extra-specs", type=int, default=6, help="specs queued for the busy phase")
    ap.add_argument("--no-karn", action="store_true", help="do not start Karn")
    ap.add_argument("--quick", action="store_true", help="15 epochs, compiles slowed by 3 s, 2 extra specs")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    if args.quick:
        args.epochs, args.slow_compile_s, args.extra_specs = 15, 3.0, 2

    ensure_ray(num_cpus=os.cpu_count())
    try:
        import actors.karn  # noqa: F401

        with_karn = not args.no_karn
    except ImportError:
        with_karn = False
    storage = tempfile.mkdtemp(prefix="esper-nonblocking-")
    cfg = ActorsConfig(namespace=f"bench-{uuid.uuid4().hex[:8]}", storage=storage, compile=False)
    pipeline = start_pipeline(cfg, with_karn=False)  # Karn joins for the busy phase only
    try:
        wait_until_ready(pipeline, len(STANDARD_BLUEPRINTS), timeout=300)
        run_cfg = RunConfig(training={"epochs": args.epochs, "threads": 1})
        data = load_task(run_cfg.task)
        new_client = lambda: UrzaCatalogue(pipeline.urza, namespace=cfg.namespace)  # noqa: E731

        idle_client = new_client()
        idle_client.sync()  # startup: the first catalogue, outside the timed loop
        idle = train("idle", run_cfg, data, idle_client)
        print(idle.line(), flush=True)

        ray.get(pipeline.tezzeret.configure.remote(slow_compile_s=args.slow_compile_s, compile=not args.no_compile))
        for spec in variants(args.extra_specs):
            pipeline.tezzeret.submit.remote(spec)
        if with_karn:
            pipeline = start_pipeline(cfg.model_copy(update={"karn_interval_s": 1.0}), with_karn=True)
        deadline = time.monotonic() + 30
        while ray.get(pipeline.tezzeret.stats.remote())["current"] is None and time.monotonic() < deadline:
            time.sleep(0.05)  # start training once Tezzeret is really at work
        busy_client = new_client()
        busy_client.sync()
        busy = train("busy", run_cfg, data, busy_client)
        print(busy.line(), flush=True)

        tez = ray.get(pipeline.tezzeret.stats.remote())
        urza = ray.get(pipeline.urza.stats.remote())
        karn = ray.get(pipeline.karn.stats.remote()) if pipeline.karn is not None else {}
        print(
            f"pipeline during/after the busy run: tezzeret queue {tez['queue_len']} "
            f"(working on {str(tez['current'])[:12]}), "
            f"compile={tez['compile']} + {tez['slow_compile_s']:g} s each; "
            f"urza {urza['ready']} ready / {urza['pending'] + urza['compiled']} pending; "
            f"karn {'submitted ' + str(karn.get('submitted', 0)) if karn else 'off'}; "
            f"busy client polls {busy_client.stats.polls}, requests {busy_client.stats.requests}",
            flush=True,
        )
        ratio = busy.median_epoch_s / idle.median_epoch_s
        fraction = max(idle.waiting_fraction, busy.waiting_fraction)
        print(f"waiting fraction {100 * fraction:.2f}% (target < 1%), step-time ratio busy/idle {ratio:.2f}")
        if args.json:
            runs = {
                r.label: {
                    "epochs": r.epochs,
                    "loop_s": r.loop_s,
                    "waited_s": r.waited_s,
                    "waiting_fraction": r.waiting_fraction,
                    "median_epoch_s": r.median_epoch_s,
                    "candidates": r.candidates,
                    "germinations": r.germinations,
                }
                for r in (idle, busy)
            }
            write_result(
                args.json,
                __file__,
                {
                    "waiting_fraction": fraction,
                    "waiting_target": 0.01,
                    "busy_idle_ratio": ratio,
                    "runs": runs,
                    "slow_compile_s": args.slow_compile_s,
                    "compile": not args.no_compile,
                    "extra_specs": args.extra_specs,
                    "karn": with_karn,
                    "quick": args.quick,
                    "tezzeret": {k: tez[k] for k in ("queue_len", "compile", "slow_compile_s") if k in tez},
                },
                started,
                argv,
            )
        return 0 if fraction < 0.01 else 1
    finally:
        stop_pipeline(pipeline, kill=True)


if __name__ == "__main__":
    sys.exit(main())
