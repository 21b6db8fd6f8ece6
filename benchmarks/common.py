"""What the benchmark scripts share: the result file each one writes, the machine it ran on, the
shifted tasks of the continual-learning benchmarks, and the small CSV and text-table writers.

Every script in ``benchmarks/`` takes ``--json PATH`` and writes one result file through
:func:`write_result`: ``{"script", "command", "date", "machine", "seconds", "figures"}``, where
``figures`` follows that script's schema below (a ``TypedDict`` naming its top-level keys).
``benchmarks/run_all.py`` renders BENCHMARKS.md from these files (committed under
``benchmarks/results/``) and ``benchmarks/BENCHMARKS.template.md``; :func:`read_result` checks a file
against its schema, so a renamed figure fails loudly instead of rendering "n/a".

The scripts import this module as ``common`` (Python puts a script's own folder first on
``sys.path``); the tests import it the same way.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from esper_ray.contracts import EsperError
from esper_ray.util import atomic_write_text, error_line

if TYPE_CHECKING:  # the page renders without the training library: these load where they are used
    from esper_ray.config import RunConfig
    from esper_ray.tasks import TaskData
    from esper_ray.tolaria.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PY = ".venv/bin/python"  # how commands are written on the page


# ---- the result file -------------------------------------------------------------------------------
class Machine(TypedDict, total=False):
    """Where a result was measured."""

    platform: str
    machine: str  # the CPU architecture, e.g. x86_64
    cores: int
    python: str
    torch: str
    ray: str | None
    device: str  # "cpu", or the CUDA device's name
    load_average: float | None  # 1-minute load average when the script started (shared machines)


def machine_info(device: str | None = None) -> Machine:
    """The machine this process runs on (cores, versions, device, load)."""
    try:
        import ray

        ray_version: str | None = ray.__version__
    except ImportError:  # the benchmarks that do not need Ray still run without it
        ray_version = None
    if device is None or device.startswith("cuda"):
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return Machine(
        platform=platform.platform(),
        machine=platform.machine(),
        cores=os.cpu_count() or 0,
        python=platform.python_version(),
        torch=torch.__version__,
        ray=ray_version,
        device=device,
        load_average=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    )


def machine_label(m: Machine) -> str:
    """The short form the page shows beside each figure, e.g. ``x86_64, 2 CPUs, torch 2.13.0+cpu``."""
    label = f"{m.get('machine', '?')}, {m.get('cores', '?')} CPUs, torch {m.get('torch', '?')}"
    device = m.get("device", "cpu")
    return label if device == "cpu" else f"{label}, {device}"


@dataclasses.dataclass(frozen=True)
class Result:
    """One script's result file: what ran, when, where, and its figures."""

    script: str  # e.g. "benchmarks/stability.py"
    command: str  # the command line as a user would type it (without --json / --out)
    date: str  # YYYY-MM-DD
    machine: Machine
    seconds: float | None  # the script's wall time
    figures: dict[str, Any]


def shown_command(script: str, argv: Sequence[str]) -> str:
    """``.venv/bin/python benchmarks/x.py ARGS``, leaving out where the output went (``--json``, ``--out``,
    ``--work``)."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--json", "--out", "--work"):
            skip = True
            continue
        if arg.startswith(("--json=", "--out=", "--work=")):
            continue
        args.append(arg)
    return " ".join([PY, script, *args])


def write_result(
    path: str | Path,
    script_file: str,
    figures: dict[str, Any],
    started: float,
    argv: Sequence[str] | None = None,
    device: str | None = None,
) -> Result:
    """Write ``figures`` as ``script_file``'s result file at ``path`` (atomically; NaN and inf as null).

    ``started`` is ``time.perf_counter()`` at the script's start; ``argv`` defaults to ``sys.argv[1:]``.
    """
    name = Path(script_file).stem
    check_figures(name, figures)
    script = f"benchmarks/{Path(script_file).name}"
    result = Result(
        script=script,
        command=shown_command(script, sys.argv[1:] if argv is None else argv),
        date=time.strftime("%Y-%m-%d"),
        machine=machine_info(device),
        seconds=round(time.perf_counter() - started, 1),
        figures=figures,
    )
    write_json(path, dataclasses.asdict(result))
    return result


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, written to a temporary file first (a crash leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_finite(data), indent=2, default=str) + "\n")


def _finite(value: Any) -> Any:
    """JSON has no NaN or inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def read_result(path: str | Path) -> Result:
    """A result file, checked against its script's schema (EsperError naming the file if it does not fit)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        result = Result(**raw)
    except (OSError, ValueError, TypeError) as exc:
        raise EsperError(f"{path}: not a benchmark result file ({error_line(exc)})") from exc
    try:
        check_figures(Path(result.script).stem, result.figures)
    except EsperError as exc:
        raise EsperError(f"{path}: {exc}") from exc
    return result


# ---- the schemas: one per script, the top-level keys of its figures ---------------------------------
class BottleneckFigures(TypedDict):
    """bottleneck_study.py: shares of tasks (0-1)."""

    tasks: int
    placed: float  # HeuristicController.choose_slot picks the ground-truth slot
    resolved: float  # the true-slot seed ends within 1 point of the unbottlenecked reference
    true_slot_best: float
    signal: float  # argmax(grad_predictability) is the ground-truth slot


class StabilityFigures(TypedDict):
    """stability.py: per scenario, per arm, the summary of the accuracy matrices over seeds."""

    seeds: int
    target: float
    min_fossils: int
    main_arm: str
    reference_arm: str
    scenarios: dict[str, Any]  # scenario -> {"arms": {arm: figures}}


class ParamEfficiencyFigures(TypedDict):
    """param_efficiency.py: per scenario, every arm's trainable parameters and gain; the matched arm."""

    seeds: int
    match: float
    pretrain_epochs: int
    epochs: int
    lrs: list[float]
    scenarios: dict[str, Any]


class DistillFigures(TypedDict):
    """distill.py: the distillation table and the fine-tuning ratios."""

    seeds: int
    ft_epochs: int
    table: list[dict[str, Any]]
    param_ratio: float
    params_per_point: dict[str, float | None]
    params_per_point_ratio: float | None


class OverheadFigures(TypedDict):
    """overhead.py: dormant-slot step time ratios per host, and the upstream drift."""

    step_time: dict[str, Any]  # host -> clock -> {dormant, plain, ratio, paired}
    drift_training_between: float
    drift_training_bitwise_equal: bool
    drift_final_between: float
    drift_final_twin: float
    final_stage: str
    epoch_steps: int


class NonblockingFigures(TypedDict):
    """nonblocking.py: the share of the loop spent waiting on the pipeline, idle and busy."""

    waiting_fraction: float
    busy_idle_ratio: float
    runs: dict[str, Any]  # "idle" / "busy" -> loop_s, waited_s, median_epoch_s, ...
    slow_compile_s: float
    extra_specs: int


class EnvThroughputFigures(TypedDict, total=False):
    """env_throughput.py: env steps/s against a plain loop; ``batched``: the batched env's rows."""

    ratio: float
    env_steps_per_s: float
    plain_epochs_per_s: float
    env_seeded_steps_per_s: float
    signal_every: int
    ratio_probe_kept: float | None
    ratio_fresh: float | None
    ratio_per_episode: list[float]
    batched: dict[str, Any]


class LineageFigures(TypedDict):
    """lineage_verify.py: verifying a ledger end to end."""

    events: int
    verify_best_s: float
    verify_per_10k_s: float
    append_events_per_s: float
    flush_warm_s: float


class DistillTransformerFigures(TypedDict):
    """distill_transformer.py: the distillation table on text."""

    seeds: int
    task: str
    context: int
    epochs: int
    teacher: dict[str, Any]
    student: dict[str, Any]
    table: list[dict[str, Any]]
    seconds: float


class AdaptTransformerFigures(TypedDict):
    """adapt_transformer.py: seeds against full fine-tuning on a shifted text domain."""

    seeds: int
    pretrain_epochs: int
    epochs: int
    docs_bpb: float
    before_test_bpb: float
    table: list[dict[str, Any]]
    verdict: str
    seconds: float


class TamiyoGeneralizationFigures(TypedDict):
    """tamiyo_generalization.py: every controller on held-out episodes, and the policies' paired differences."""

    table: list[dict[str, Any]]
    policies: list[dict[str, Any]]


class ActorMemoryFigures(TypedDict):
    """actor_memory.py: each service actor's resident memory (MB) at start, after proposals, after serving all."""

    seconds_of_proposals: float
    rss_mb: dict[str, dict[str, float]]  # actor -> {"start", "after", "all_served"}
    urza: dict[str, int]  # entries, ready, rejected, templates_in_store, templates_in_memory_max


class PpoWallTimeFigures(TypedDict):
    """ppo_wall_time.py: PPO seconds per iteration of a recipe, per layout (env runners x episodes each)."""

    config: str
    train_batch_size: int
    # "RxN" -> env_runners, episodes_per_runner, iteration_seconds, mean_after_first_s, ratio_to_first, grouping
    by_layout: dict[str, dict[str, Any]]


class PpoSameResultFigures(TypedDict):
    """ppo_same_result.py: a recipe trained in several layouts; wall time and held-out accuracy of each."""

    config: str
    seed: int
    iterations: int
    warm_start: str | None
    eval_seeds: list[int]
    heldout_tasks: int
    # "RxN" -> train_seconds, time_ratio_to_first, test_acc(_ci95), minus_first(_ci95), episodes, same_result
    by_layout: dict[str, dict[str, Any]]


class TaskFamiliesFigures(TypedDict):
    """task_families.py: per family and growth, the mean accuracy and gain."""

    rows: list[dict[str, Any]]


SCHEMAS: dict[str, type] = {
    "bottleneck_study": BottleneckFigures,
    "stability": StabilityFigures,
    "param_efficiency": ParamEfficiencyFigures,
    "distill": DistillFigures,
    "overhead": OverheadFigures,
    "nonblocking": NonblockingFigures,
    "env_throughput": EnvThroughputFigures,
    "lineage_verify": LineageFigures,
    "distill_transformer": DistillTransformerFigures,
    "adapt_transformer": AdaptTransformerFigures,
    "tamiyo_generalization": TamiyoGeneralizationFigures,
    "task_families": TaskFamiliesFigures,
    "actor_memory": ActorMemoryFigures,
    "ppo_wall_time": PpoWallTimeFigures,
    "ppo_same_result": PpoSameResultFigures,
}


def check_figures(name: str, figures: dict[str, Any]) -> None:
    """EsperError when ``figures`` lacks a key its script's schema requires (or the script has none)."""
    schema = SCHEMAS.get(name)
    if schema is None:
        raise EsperError(f"no result schema for benchmarks/{name}.py (add one to benchmarks/common.py)")
    missing = sorted(k for k in schema.__required_keys__ if k not in figures)  # type: ignore[attr-defined]
    if missing:
        raise EsperError(f"{name} figures lack {', '.join(missing)}")


# ---- the continual-learning tasks (stability.py, param_efficiency.py) ------------------------------
SCENARIOS = {"shift": 10, "permuted": 40}  # features permuted per task
NOISE = 0.25


def shifted_task(base: TaskData, seed: int, t: int, permuted: int, noise: float = NOISE) -> TaskData:
    """``base`` seen through task ``t``'s fixed input shift (drawn from ``(seed, t)``)."""
    gen = torch.Generator().manual_seed(1_000_003 * seed + t)
    d = base.input_shape[0]
    perm = torch.arange(d)
    chosen = torch.randperm(d, generator=gen)[:permuted]
    perm[chosen] = chosen[torch.randperm(len(chosen), generator=gen)]
    gain = 0.75 + 0.5 * torch.rand(d, generator=gen)
    offset = 0.25 * torch.randn(d, generator=gen)

    def shift(x: torch.Tensor) -> torch.Tensor:
        return (x[:, perm] * gain + offset + noise * torch.randn(x.shape, generator=gen)).contiguous()

    return dataclasses.replace(
        base,
        name=f"{base.name}/shift{seed}.{t}.p{permuted}",
        x_train=shift(base.x_train),
        x_val=shift(base.x_val),
        x_test=shift(base.x_test),
        meta={**base.meta, "shift": {"seed": seed, "task": t, "permuted": permuted, "noise": noise}},
    )


# ---- output --------------------------------------------------------------------------------------
def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` as CSV, the columns in first-seen order."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a printed table: its header, width, and how a row's cell is written."""

    header: str
    width: int
    cell: Callable[[dict[str, Any]], str]


def text_table(rows: list[dict[str, Any]], columns: Sequence[Column], label_width: int, note: str = "note") -> str:
    """A fixed-width table of summary rows: the row name, the columns, then the row's ``note``.

    A row with ``n == 0`` (an arm that did not run) shows its note only.
    """
    lines = [f"{'':<{label_width}}{'n':>2}  " + "  ".join(f"{c.header:>{c.width}}" for c in columns) + f"  {note}"]
    for r in rows:
        if r["n"] == 0:
            lines.append(f"{r['row']:<{label_width}}{0:>2}  {r['note']}")
            continue
        cells = "  ".join(f"{c.cell(r):>{c.width}}" for c in columns)
        lines.append(f"{r['row']:<{label_width}}{r['n']:>2}  {cells}  {r['note']}")
    return "\n".join(lines)


def pm(mean: float | None, ci: float, fmt: str = ".3f") -> str:
    """``mean ± ci``; empty where the mean is undefined."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    return f"{mean:{fmt}} ± {ci:{fmt.lstrip('+')}}"


# ---- the distillation arms (distill.py, distill_transformer.py) --------------------------------------
def run_config(base: RunConfig, seed: int, controller: str, **training: Any) -> RunConfig:
    """``base`` for one arm: its seed, controller kind and training overrides; no lineage ledger."""
    return base.model_copy(
        update={
            "training": base.training.model_copy(update={"seed": seed, **training}),
            "controller": base.controller.model_copy(update={"kind": controller}),
            "lineage": base.lineage.model_copy(update={"enabled": False}),
        }
    )


def play(trainer: Trainer, controller: Any) -> Trainer:
    """Train ``trainer`` to the end of its budget, ``controller`` deciding after every epoch."""
    while not trainer.done:
        trainer.train_epoch()
        trainer.end_epoch(trainer.apply_decision(controller))
    return trainer


def grown(trainer: Trainer) -> dict[str, str]:
    """The seeds present at the end (culled ones left out): slot -> blueprint spec JSON."""
    from esper_ray.contracts import SeedStage

    return {
        s.name: s.seed.spec_json
        for s in trainer.host.slots.values()
        if s.seed is not None and s.stage is not SeedStage.CULLED
    }


def grown_label(trainer: Trainer) -> str:
    """``slot:blueprint,...`` of the seeds present at the end."""
    from esper_ray.blueprints import BlueprintSpec

    return ",".join(f"{k}:{BlueprintSpec.from_json(v).name}" for k, v in grown(trainer).items())


DISTILL_ROWS = (
    "teacher",
    "student alone (CE)",
    "student distilled",
    "distilled + heuristic",
    "distilled + tamiyo",
    "big static (grown size)",
)
"""The rows of a distillation table, in order (``student_arms`` makes all but the teacher's)."""

RowMaker = Callable[[str, "Trainer", float], dict[str, Any]]


def student_arms(
    base: RunConfig, data: TaskData, loss: Any, seed: int, policy: Any, row: RowMaker
) -> tuple[list[dict[str, Any]], Trainer]:
    """The student arms of a distillation benchmark for one seed; the rows and the distilled student.

    ``student alone (CE)``, ``student distilled`` (``loss``), ``distilled + heuristic``,
    ``distilled + tamiyo`` (when ``policy`` is given) and ``big static (grown size)`` (the heuristic
    run's final seeds fossilized from epoch 0). ``row(name, trainer, started)`` makes each row.
    """
    from esper_ray.blueprints import BlueprintSpec
    from esper_ray.tamiyo.controllers import HeuristicController, StaticController
    from esper_ray.tolaria.trainer import Trainer

    rows = []
    t = time.perf_counter()
    rows.append(row("student alone (CE)", play(Trainer(run_config(base, seed, "static"), data), StaticController()), t))
    t = time.perf_counter()
    distilled = play(Trainer(run_config(base, seed, "static"), data, loss_fn=loss), StaticController())
    rows.append(row("student distilled", distilled, t))
    t = time.perf_counter()
    cfg_h = run_config(base, seed, "heuristic")
    heuristic = HeuristicController(cfg_h.controller.plateau_patience, cfg_h.controller.cull_below)
    heuristic_run = play(Trainer(cfg_h, data, loss_fn=loss), heuristic)
    rows.append(row("distilled + heuristic", heuristic_run, t))
    if policy is not None:
        t = time.perf_counter()
        tamiyo = play(Trainer(run_config(base, seed, "static"), data, loss_fn=loss), policy)
        rows.append(row("distilled + tamiyo", tamiyo, t))
    t = time.perf_counter()
    big = Trainer(run_config(base, seed, "static"), data, loss_fn=loss)
    for slot, spec_json in grown(heuristic_run).items():
        big.graft_fossilized(slot, BlueprintSpec.from_json(spec_json))
    rows.append(row("big static (grown size)", play(big, StaticController()), t))
    return rows, distilled


def distill_arguments(doc: str, config: str, out: str, quick: str, json: str) -> argparse.ArgumentParser:
    """The command line both distillation benchmarks share (``--config``, ``--seeds``, ``--policy``,
    ``--out``, overrides, ``--quick``, ``--json``); each adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--config", default=config)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--policy", help="an exported Tamiyo policy folder (else the row says 'not given')")
    p.add_argument("--out", default=out, help="folder for the CSV files")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. training.epochs=30")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--json", help=json)
    return p


def load_policy_arg(path: str | None) -> Any:
    """The exported Tamiyo policy at ``path`` (None when not given)."""
    if not path:
        return None
    from esper_ray.tamiyo.policy import load_policy

    return load_policy(path)


def missing_row(name: str, policy_given: bool) -> dict[str, Any]:
    """The summary row of an arm that did not run."""
    note = "not given (--policy PATH)" if name == "distilled + tamiyo" and not policy_given else "no runs"
    return {"row": name, "n": 0, "note": note}


def seed_runs(
    scenario: str,
    seeds: int,
    one_seed: Callable[[int], list[dict[str, Any]]],
    describe: Callable[[dict[str, Any]], str],
) -> list[dict[str, Any]]:
    """Every row of ``one_seed(seed)`` for seeds ``0..seeds-1``, each printed as it comes (``describe``)."""
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        rows = one_seed(seed)
        runs += rows
        for r in rows:
            print(f"{scenario} seed {seed} {describe(r)}", flush=True)
    return runs
