"""Evaluate controllers on held-out tasks: the same episodes for every controller.

Every controller (baselines and learned policies) plays the same held-out episodes
(task x seed) of ``esper/Morphogenesis-v0``. For each episode we also train a "big
static" reference: the host with the final seeds of the controller's run present,
fossilized, from the first epoch (capacity without growth). The table reports
mean ± 95% confidence interval (Student t) per controller, and paired differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esper_ray.contracts import SeedStage
from esper_ray.reports import write_table
from esper_ray.tamiyo.controllers import Controller

ControllerFactory = Callable[[int], Controller]


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


def play_episode(env, controller: Controller, task_index: int, seed: int) -> dict[str, Any]:
    """Run one episode of ``env`` with ``controller``; return the episode's outcome row."""
    env.reset(seed=seed, options={"task_index": task_index, "train_seed": seed})
    trainer = env.trainer
    done = False
    while not done:
        obs = trainer.observe()
        action = controller.act(obs, trainer.legal_actions())
        _, _, done, _, info = env.step(env.space.encode(action, obs.candidates))
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
        "fidelity_hits": sum(s == truth for s in slots) if truth else None,
        "ground_truth_slot": truth,
        "grown": grown,
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


def evaluate_controllers(
    controllers: dict[str, ControllerFactory],
    env_config: dict[str, Any],
    seeds: Sequence[int],
    *,
    big_static_of: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows of (controller, task, seed) outcomes on the held-out tasks of ``env_config``."""
    import envs

    env = envs.MorphogenesisEnv({**env_config, "split": "heldout"})
    rows = []
    for name, factory in controllers.items():
        for t in range(len(env.config.tasks)):
            for seed in seeds:
                row = {"controller": name, **play_episode(env, factory(seed), t, seed)}
                rows.append(row)
                if progress:
                    progress(f"{name:>12} {row['task']:<22} seed {seed}: test {row['final_test_acc']:.4f}")
                if name == big_static_of:
                    acc = train_big_static(env, t, seed, row["grown"])
                    rows.append(
                        {
                            **row,
                            "controller": f"big-static({name})",
                            "final_test_acc": acc,
                            "germinations": 0,
                            "fidelity_hits": None,
                        }
                    )
    return rows


def summary_table(rows: list[dict[str, Any]], baseline: str | None = "heuristic") -> list[dict[str, Any]]:
    """Per controller: final test accuracy, seed params, germinations (mean ± 95% CI), fidelity,
    and the paired difference in test accuracy against ``baseline`` over the same episodes."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["controller"], []).append(r)
    base = {(r["task"], r["seed"]): r["final_test_acc"] for r in by.get(baseline, [])}
    table = []
    for name, rs in by.items():
        acc = mean_ci([r["final_test_acc"] for r in rs])
        params = mean_ci([r["seed_params"] for r in rs])
        germ = mean_ci([r["germinations"] for r in rs])
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
                "fidelity": sum(h for h, _ in hits) / placed if placed else math.nan,
                f"diff_vs_{baseline}": d.mean if d else math.nan,
                f"diff_vs_{baseline}_ci95": d.half_width if d else math.nan,
            }
        )
    return table


def format_table(table: list[dict[str, Any]], baseline: str = "heuristic") -> str:
    width = max([24, *(len(t["controller"]) for t in table)])
    lines = [
        f"{'controller':<{width}} {'n':>3}  {'test acc':>17}  {'seed params':>17}  {'germ.':>11}  "
        f"{'fidelity':>8}  {'diff vs ' + baseline:>19}"
    ]
    for t in table:
        diff = t[f"diff_vs_{baseline}"]
        diff_s = "" if math.isnan(diff) else f"{diff:+.4f} ± {t[f'diff_vs_{baseline}_ci95']:.4f}"
        fid = "" if math.isnan(t["fidelity"]) else f"{t['fidelity']:.2%}"
        lines.append(
            f"{t['controller']:<{width}} {t['episodes']:>3}  {t['test_acc']:.4f} ± {t['test_acc_ci95']:.4f}  "
            f"{t['seed_params']:>8.0f} ± {t['seed_params_ci95']:<6.0f}  "
            f"{t['germinations']:.2f} ± {t['germinations_ci95']:.2f}  {fid:>8}  {diff_s:>19}"
        )
    return "\n".join(lines)


def write_evaluation(rows: list[dict[str, Any]], table: list[dict[str, Any]], out: str | Path) -> Path:
    """episodes.parquet, summary.csv + summary.parquet, and summary.png in ``out``."""
    import csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_table([{k: v for k, v in r.items() if k != "grown"} for r in rows], out / "episodes.parquet")
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
