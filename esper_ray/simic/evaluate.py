"""Evaluate controllers on held-out tasks: the same episodes for every controller.

Every controller (baselines and learned policies) plays the same held-out episodes
(task x seed) of ``esper/Morphogenesis-v0``. For each episode we also train a "big
static" reference: the host with the final seeds of the controller's run present,
fossilized, from the first epoch (capacity without growth). The table reports
mean ± 95% confidence interval (Student t) per controller, and paired differences, beside
seed parameters, germinations, culls and seconds per episode.

``run_evaluation`` is ``esper-ray evaluate``: the baselines (``baseline_factories``, settings from
the env's ``run.controller``), ``best-fixed`` (``search_best_fixed`` on the training tasks, cached),
policies, and ``replay`` of a policy's modal action sequence on the same episodes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from esper_ray.config import ScheduledAction
from esper_ray.contracts import (
    ActionKind,
    ControllerAction,
    ControllerKind,
    EnvInfo,
    EsperError,
    EventKind,
    HostContext,
    Observation,
    SeedStage,
    TrialResult,
)
from esper_ray.reports import write_table
from esper_ray.tamiyo.baselines import BestFixedTable, ScheduleController, modal_sequence, replay_schedule
from esper_ray.tamiyo.controllers import Controller, ControllerFactory, EpisodeFactory, controller_factory


@dataclass(frozen=True)
class Stat:
    mean: float
    half_width: float  # 95% CI half-width
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.half_width:.4f}"


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Stat:
    """Mean and Student-t confidence half-width (0 for a single value)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return Stat(float(x.mean()) if len(x) else math.nan, 0.0, len(x))
    sem = x.std(ddof=1) / math.sqrt(len(x))
    return Stat(float(x.mean()), float(sem * stats.t.ppf((1 + confidence) / 2, len(x) - 1)), len(x))


@runtime_checkable
class ActionEncoder(Protocol):
    """An env that turns a controller's action into its own action index (``MorphogenesisEnv``)."""

    def encode_action(self, action: ControllerAction, obs: Observation) -> int: ...


def encode_action(env: Any, action: ControllerAction, obs: Observation) -> int:
    """The env's index of ``action``: ``env.encode_action`` where the env has it, else its action space's."""
    if isinstance(env, ActionEncoder):
        return env.encode_action(action, obs)
    return env.space.encode(action, obs.candidates)


def play_episode(env, controller: Controller, task_index: int, seed: int) -> dict[str, Any]:
    """Run one episode of ``env`` with ``controller``; return the episode's outcome row (with the
    non-wait ``actions`` as (decision index, action) pairs, culls and wall seconds)."""
    started = time.perf_counter()
    env.reset(seed=seed, options={"task_index": task_index, "train_seed": seed})
    trainer = env.trainer
    done = False
    actions: list[tuple[int, ControllerAction]] = []
    decision = 0
    info: EnvInfo
    while not done:
        obs = trainer.observe()
        action = controller.act(obs, trainer.legal_actions())
        if action.kind is not ActionKind.WAIT:
            actions.append((decision, action))
        decision += 1
        _, _, done, _, info = env.step(encode_action(env, action, obs))
    grown = {
        s.name: s.seed.spec_json
        for s in trainer.host.slots.values()
        if s.seed is not None and s.stage is not SeedStage.CULLED
    }
    truth = info["ground_truth_slot"]
    slots = info["germinated_slots"]
    return {
        "task": info["task"],
        "seed": seed,
        "final_test_acc": info["test_acc"],
        "final_val_acc": info["val_acc"],
        "seed_params": info["seed_params"],
        "germinations": len(slots),
        "culls": sum(e.get("kind") == EventKind.CULL for e in trainer.events),
        "seconds": time.perf_counter() - started,
        "fidelity_hits": sum(s == truth for s in slots) if truth else None,
        "ground_truth_slot": truth,
        "grown": grown,
        "actions": actions,
    }


def train_big_static(env, task_index: int, seed: int, grown: dict[str, str]) -> float:
    """Test accuracy of the host trained from epoch 0 with the ``grown`` seeds fossilized."""
    from esper_ray.blueprints import BlueprintSpec
    from esper_ray.tamiyo.controllers import StaticController

    trainer = env.make_trainer(task_index, seed)
    for slot, spec_json in grown.items():
        trainer.graft_fossilized(slot, BlueprintSpec.from_json(spec_json))
    static = StaticController()
    while not trainer.done:
        trainer.train_epoch()
        trainer.end_epoch(trainer.apply_decision(static))
    return trainer.last["test_acc"]


class EpisodeRun:
    """The trainer of the episode ``env`` is playing, as the collaborator that controllers which
    read more than the observation take (``baselines.HostContextSource``, ``CandidateTrials``).
    ``evaluate_controllers`` points it at its env."""

    def __init__(self, env=None):
        self.env = env

    def host_context(self) -> HostContext:
        return self.env.trainer.host_context()

    def trial_candidates(
        self, candidates: list[tuple[str, str]], steps: int, seed_lr_scale: float = 1.0
    ) -> TrialResult:
        return self.env.trainer.trial_candidates(candidates, steps, seed_lr_scale)


def evaluate_controllers(
    controllers: dict[str, ControllerFactory],
    env_config: dict[str, Any],
    seeds: Sequence[int],
    *,
    big_static_of: str | None = None,
    progress: Callable[[str], None] | None = None,
    run: EpisodeRun | None = None,
    replay_of: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Rows of (controller, task, seed) outcomes on the held-out tasks of ``env_config``.

    ``run`` (if given) is pointed at the env, so factories may hand it to controllers that need
    the episode's trainer. For each name in ``replay_of``, once that controller has played every
    episode, ``replay(<name>)`` replays its most frequent (decision, action) sequence open-loop on
    the same episodes.
    """
    import envs

    env = envs.MorphogenesisEnv({**env_config, "split": "heldout"})
    if run is not None:
        run.env = env
    rows: list[dict[str, Any]] = []
    plan: list[tuple[str, ControllerFactory]] = list(controllers.items())
    i = 0
    while i < len(plan):
        name, factory = plan[i]
        mine = []
        for t in range(len(env.config.tasks)):
            for seed in seeds:
                row = {"controller": name, **play_episode(env, factory(seed), t, seed)}
                rows.append(row)
                mine.append(row)
                if progress:
                    progress(
                        f"{name:>12} {row['task']:<22} seed {seed}: test {row['final_test_acc']:.4f} "
                        f"({row['seconds']:.1f} s)"
                    )
                if name == big_static_of:
                    acc = train_big_static(env, t, seed, row["grown"])
                    rows.append(
                        {
                            **row,
                            "controller": f"big-static({name})",
                            "final_test_acc": acc,
                            "germinations": 0,
                            "culls": 0,
                            "fidelity_hits": None,
                            "actions": [],
                        }
                    )
        if name in replay_of:
            schedule = replay_schedule(modal_sequence([r["actions"] for r in mine]))
            plan.insert(i + 1, (f"replay({name})", _replayer(schedule)))
        i += 1
    return rows


def _replayer(schedule: list[ScheduledAction]) -> ControllerFactory:
    """factory(seed) playing ``schedule`` exactly (the ``replay`` of a controller's modal actions)."""
    return lambda seed: ScheduleController(schedule, fossilize=False, name="replay")


def summary_table(rows: list[dict[str, Any]], baseline: str | None = "heuristic") -> list[dict[str, Any]]:
    """Per controller: final test accuracy, seed params, germinations (mean ± 95% CI), mean culls
    and seconds per episode, fidelity, and the paired difference in test accuracy against
    ``baseline`` over the same episodes."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["controller"], []).append(r)
    base = {(r["task"], r["seed"]): r["final_test_acc"] for r in (by.get(baseline, []) if baseline else [])}
    table = []
    for name, rs in by.items():
        acc = mean_ci([r["final_test_acc"] for r in rs])
        params = mean_ci([r["seed_params"] for r in rs])
        germ = mean_ci([r["germinations"] for r in rs])
        culls = mean_ci([r.get("culls", 0) for r in rs])
        seconds = mean_ci([r.get("seconds", math.nan) for r in rs])
        hits = [(r["fidelity_hits"], r["germinations"]) for r in rs if r["fidelity_hits"] is not None]
        placed = sum(g for _, g in hits)
        diffs = [r["final_test_acc"] - base[(r["task"], r["seed"])] for r in rs if (r["task"], r["seed"]) in base]
        d = mean_ci(diffs) if diffs and name != baseline else None
        table.append(
            {
                "controller": name,
                "episodes": len(rs),
                "test_acc": acc.mean,
                "test_acc_ci95": acc.half_width,
                "seed_params": params.mean,
                "seed_params_ci95": params.half_width,
                "germinations": germ.mean,
                "germinations_ci95": germ.half_width,
                "culls": culls.mean,
                "seconds": seconds.mean,
                "fidelity": sum(h for h, _ in hits) / placed if placed else math.nan,
                f"diff_vs_{baseline}": d.mean if d else math.nan,
                f"diff_vs_{baseline}_ci95": d.half_width if d else math.nan,
            }
        )
    return table


def format_table(table: list[dict[str, Any]], baseline: str = "heuristic") -> str:
    """``summary_table`` as aligned text (the paired difference against ``baseline``)."""
    width = max([24, *(len(t["controller"]) for t in table)])
    lines = [
        f"{'controller':<{width}} {'n':>3}  {'test acc':>17}  {'seed params':>17}  {'germ.':>11}  "
        f"{'culls':>5}  {'s/ep':>6}  {'fidelity':>8}  {'diff vs ' + baseline:>19}"
    ]
    for t in table:
        diff = t.get(f"diff_vs_{baseline}", math.nan)
        diff_s = "" if math.isnan(diff) else f"{diff:+.4f} ± {t[f'diff_vs_{baseline}_ci95']:.4f}"
        fid = "" if math.isnan(t["fidelity"]) else f"{t['fidelity']:.2%}"
        lines.append(
            f"{t['controller']:<{width}} {t['episodes']:>3}  {t['test_acc']:.4f} ± {t['test_acc_ci95']:.4f}  "
            f"{t['seed_params']:>8.0f} ± {t['seed_params_ci95']:<6.0f}  "
            f"{t['germinations']:.2f} ± {t['germinations_ci95']:.2f}  {t.get('culls', 0.0):>5.2f}  "
            f"{t.get('seconds', math.nan):>6.1f}  {fid:>8}  {diff_s:>19}"
        )
    return "\n".join(lines)


def write_evaluation(
    rows: list[dict[str, Any]], table: list[dict[str, Any]], out: str | Path, ran: dict[str, Any] | None = None
) -> Path:
    """episodes.parquet, summary.csv + summary.parquet, and summary.png in ``out``; with ``ran``
    (the tasks and seeds played, see ``episodes_ran``) also ran.json."""
    import csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    episodes = [
        {**{k: v for k, v in r.items() if k not in ("grown", "actions")}, "actions": _actions_json(r)} for r in rows
    ]
    write_table(episodes, out / "episodes.parquet")
    if ran is not None:
        (out / "ran.json").write_text(json.dumps(ran, indent=2))
    write_table(table, out / "summary.parquet")
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    _plot(table, out / "summary.png")
    return out


def _plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(table)), 4))
    names = [t["controller"] for t in table]
    ax.bar(
        names,
        [t["test_acc"] for t in table],
        yerr=[t["test_acc_ci95"] for t in table],
        capsize=4,
        color="tab:blue",
        alpha=0.8,
    )
    lo = min(t["test_acc"] - t["test_acc_ci95"] for t in table)
    ax.set_ylim(max(0.0, lo - 0.05), None)
    ax.set_ylabel("final test accuracy (mean ± 95% CI)")
    ax.set_title("controllers on held-out tasks")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _actions_json(row: dict[str, Any]) -> str:
    """An episode's non-wait actions as JSON: ``[[decision, "germinate(input, conv1d)"], ...]``."""
    return json.dumps([[d, str(a)] for d, a in row.get("actions", [])])


BASELINE_KINDS = tuple(k for k in ControllerKind if k is not ControllerKind.POLICY)
"""What ``esper-ray evaluate --baselines`` takes (``replay`` replays the policies given, else ``trial``)."""


def baseline_factories(
    names: Sequence[str], settings, run: EpisodeRun, table: BestFixedTable | None = None
) -> dict[str, ControllerFactory]:
    """name -> factory(seed) for the baselines ``names`` (not ``replay``), with the settings of
    ``settings`` (a ControllerConfig: the env's ``run.controller``). ``best-fixed`` needs ``table``."""
    factories: dict[str, ControllerFactory] = {}
    for name in names:
        if name not in BASELINE_KINDS or name == ControllerKind.REPLAY:
            raise EsperError(f"unknown baseline {name!r} (known: {', '.join(BASELINE_KINDS)})")
        if name == ControllerKind.BEST_FIXED and table is None:
            raise EsperError("baseline best-fixed needs its table (search_best_fixed)")
        cfg = settings.model_copy(update={"kind": name})
        factories[name] = controller_factory(cfg, run, table=table, source="env.run.controller")
    return factories


def _fits(trainer, position: int, blueprint: str) -> bool:
    """Whether ``blueprint`` may grow at slot ``position`` of ``trainer``'s host (shape and budget)."""
    slot = next((s for s in trainer.host.slots.values() if s.index == position), None)
    entry = next((e for e in trainer.candidates if e.name == blueprint), None)
    if slot is None or entry is None:
        return False
    cost = trainer.seed_cost(entry, slot)
    return cost is not None and cost <= trainer.cfg.blueprints.max_seed_params


def best_fixed_cache_key(env_config: dict[str, Any], settings) -> str:
    """What the search's result depends on: the env (its training tasks and run) and the grid."""
    from envs import EnvConfig

    cfg = EnvConfig.model_validate({**env_config, "split": "train"})
    # The other baselines' settings do not change what a schedule scores.
    others = {"trial", "schedule", "best_fixed", "kind", "path", "p_act", "plateau_patience", "cull_below"}
    payload = {
        "env": cfg.model_dump(
            mode="json", exclude={"heldout_tasks": True, "split": True, "run": {"controller": others}}
        ),
        "grid": settings.model_dump(mode="json", exclude={"table"}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def search_best_fixed(
    env_config: dict[str, Any],
    settings,
    *,
    cache: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[BestFixedTable, bool]:
    """The best open-loop schedule per static context of the env's *training* tasks.

    ``settings`` is a BestFixedConfig. Per context (the trainer's ``host_context``), every
    schedule of the grid plays ``settings.seeds`` seeds of each of the context's training tasks
    (at most ``settings.max_tasks``): no growth; one germination of each fitting (slot position,
    blueprint) at each of ``settings.decisions``; then pairs of germinations at two different
    slots among the best ``settings.pair_top`` single schedules (when the run allows two). The
    schedule with the highest mean final validation accuracy wins (ties: the earlier in that order).
    Returns (table, whether it came from ``cache``, a folder keyed by ``best_fixed_cache_key``).
    """
    import envs

    key = best_fixed_cache_key(env_config, settings)
    path = Path(cache) / f"best_fixed-{key}.json" if cache is not None else None
    if path is not None and path.exists():
        return BestFixedTable.read(path), True
    env = envs.MorphogenesisEnv({**env_config, "split": "train"})
    groups, probes = _contexts(env)
    known = {e.name for trainer in probes.values() for e in trainer.candidates}
    for name in settings.blueprints or []:
        if name not in known:
            raise EsperError(
                f"best_fixed.blueprints: unknown blueprint {name!r} (candidates: {', '.join(sorted(known))})"
            )
    entries = {
        context: _best_for_context(env, probes[context], context, tasks[: settings.max_tasks], settings, progress)
        for context, tasks in groups.items()
    }
    table = BestFixedTable(entries=entries, meta={"cache_key": key, "grid": settings.model_dump(mode="json")})
    if path is not None:
        table.write(path)
    return table, False


def _contexts(env) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """The env's training tasks grouped by static host context, and one trainer of each context."""
    groups: dict[str, list[int]] = {}
    probes: dict[str, Any] = {}
    for t in range(len(env.config.tasks)):
        trainer = env.make_trainer(t, 0)
        context = trainer.host_context().key
        groups.setdefault(context, []).append(t)
        probes.setdefault(context, trainer)
    return groups, probes


def _best_for_context(
    env, trainer, context: str, tasks: list[int], settings, progress: Callable[[str], None] | None
) -> dict[str, Any]:
    """Score the grid of ``search_best_fixed`` on one context's ``tasks``: its table entry."""
    budget = env.config.run.controller.max_germinations
    positions = sorted(s.index for s in trainer.host.slots.values())
    positions = [p for p in positions if settings.slots is None or p in settings.slots]
    names = [e.name for e in trainer.candidates if settings.blueprints is None or e.name in settings.blueprints]
    singles = [
        (ScheduledAction(decision=d, slot=p, blueprint=b),)
        for p in positions
        for b in names
        if _fits(trainer, p, b)
        for d in settings.decisions
    ]
    if not singles:
        raise EsperError(f"best-fixed: no (slot, blueprint) of the grid fits the {context} host")
    grid: list[tuple] = []
    scores: list[float] = []

    def score(schedule: tuple) -> float:
        accs = [
            play_episode(env, ScheduleController(list(schedule), fossilize=True), t, seed)["final_val_acc"]
            for t in tasks
            for seed in range(settings.seeds)
        ]
        grid.append(schedule)
        scores.append(float(np.mean(accs)))
        if progress:
            shown = ", ".join(f"{s.blueprint}@{s.slot}/d{s.decision}" for s in schedule) or "no growth"
            progress(f"best-fixed {context} [{len(grid)}] {shown}: val {scores[-1]:.4f}")
        return scores[-1]

    single_scores = {i: score(schedule) for i, schedule in enumerate([(), *singles])}
    if settings.pair_top >= 2 and (budget is None or budget >= 2):
        ranked = sorted(range(1, len(single_scores)), key=lambda i: -single_scores[i])[: settings.pair_top]
        top = [grid[i][0] for i in ranked]
        for i, a in enumerate(top):
            for b in top[i + 1 :]:
                if a.slot != b.slot:
                    score(tuple(sorted((a, b), key=lambda s: s.decision)))
    best_i = int(np.argmax(scores))  # the first of equals, in grid order
    return {
        "schedule": [s.model_dump(mode="json") for s in grid[best_i]],
        "val_acc": scores[best_i],
        "episodes": len(tasks) * settings.seeds,
        "tasks": [env.config.tasks[t].model_dump(mode="json") for t in tasks],
        "grid": [
            {"schedule": [s.model_dump(mode="json") for s in k], "val_acc": v}
            for k, v in zip(grid, scores, strict=True)
        ],
    }


def episodes_ran(env_config: dict[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    """The held-out tasks and seeds an evaluation plays (what ran.json records)."""
    from envs import EnvConfig

    cfg = EnvConfig.model_validate({**env_config, "split": "heldout"})
    return {"heldout_tasks": [t.model_dump(mode="json") for t in cfg.heldout_tasks], "seeds": list(seeds)}


def _episodes_of(controller: Controller) -> ControllerFactory:
    """factory(seed) for a given controller: a learned policy draws with a generator per episode seed."""
    if isinstance(controller, EpisodeFactory):
        return controller.episode
    return lambda seed: controller


def run_evaluation(
    env_config: dict[str, Any],
    baselines: Sequence[str],
    policies: dict[str, Controller],
    seeds: Sequence[int],
    out: str | Path,
    *,
    progress: Callable[[str], None] | None = None,
    cache: str | Path | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Path]:
    """``esper-ray evaluate``: baselines (settings from ``env_config``'s ``run.controller``) and
    ``policies`` (label -> controller) on the held-out episodes; ``best-fixed`` searched on the
    training tasks first (cached in ``cache``; its table also written to ``out``/best_fixed.json);
    ``replay`` after each policy (or after ``trial`` when no policy is given). Bad input fails
    before any episode plays and before anything is written. Returns (rows, table, out)."""
    from envs import EnvConfig
    from esper_ray.config import validate_model

    env = validate_model(EnvConfig, {**env_config, "split": "heldout"}, "env config")
    if not env.heldout_tasks:
        raise EsperError("nothing to evaluate on: env.heldout_tasks is empty")
    for name in baselines:
        if name not in BASELINE_KINDS:
            raise EsperError(f"unknown baseline {name!r} (known: {', '.join(BASELINE_KINDS)})")
    settings = env.run.controller
    replay_of: list[str] = []
    if ControllerKind.REPLAY in baselines:
        replay_of = list(policies) or ([ControllerKind.TRIAL.value] if ControllerKind.TRIAL in baselines else [])
        if not replay_of:
            raise EsperError("replay replays a policy's modal actions: give --policy (or the trial baseline)")
    if ControllerKind.BEST_FIXED in baselines and not env.train_tasks:
        raise EsperError("best-fixed searches the training tasks: env.train_tasks is empty")
    if not baselines and not policies:
        raise EsperError("nothing to evaluate: give --baselines and/or --policy")
    run = EpisodeRun()
    table = None
    if ControllerKind.BEST_FIXED in baselines:
        table, cached = search_best_fixed(env_config, settings.best_fixed, cache=cache, progress=progress)
        if progress:
            chosen = {k: v["schedule"] for k, v in table.entries.items()}
            progress(f"best-fixed table ({'cached' if cached else 'searched'}): {json.dumps(chosen)}")
    factories = baseline_factories([n for n in baselines if n != ControllerKind.REPLAY], settings, run, table)
    factories.update({label: _episodes_of(policy) for label, policy in policies.items()})
    heuristic = ControllerKind.HEURISTIC.value
    big_static_of = next(iter(policies), heuristic if heuristic in factories else None)
    rows = evaluate_controllers(
        factories, env_config, seeds, big_static_of=big_static_of, progress=progress, run=run, replay_of=replay_of
    )
    summary = summary_table(rows)
    ran = {**episodes_ran(env_config, seeds), "controllers": sorted({r["controller"] for r in rows})}
    out = write_evaluation(rows, summary, out, ran)
    if table is not None:
        table.write(out / "best_fixed.json")
    return rows, summary, out
