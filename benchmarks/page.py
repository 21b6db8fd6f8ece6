"""BENCHMARKS.md from the benchmarks' result files and the page's Markdown template.

``benchmarks/BENCHMARKS.template.md`` holds the page's prose (protocols, how to read each figure)
and ``{{placeholders}}``; this module fills each placeholder with tables and sentences built from
the result files (``benchmarks/common.py``: one per script, with its command, date and machine).
Nothing here runs a benchmark or reads printed output: ``benchmarks/run_all.py`` runs the scripts
and calls :func:`render`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import PY, REPO, Result, machine_label, pm

from esper_ray.contracts import EsperError

TEMPLATE = REPO / "benchmarks" / "BENCHMARKS.template.md"
PLACEHOLDER = re.compile(r"\{\{([a-z0-9_.]+)\}\}")


# ---- formatting ------------------------------------------------------------------------------------
def pct(x: float | None, digits: int = 1, sign: bool = False) -> str:
    """A share as a percentage; n/a where undefined."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:{'+' if sign else ''}.{digits}f}%"


def _pm_or_na(row: dict[str, Any], key: str, fmt: str) -> str:
    """``pm`` of ``row[key]`` and its CI; n/a where the figure is missing or undefined."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    ci = row.get(key + "_ci95")
    return pm(value, ci, fmt) if ci is not None and not math.isnan(ci) else f"{value:{fmt}}"


def _pm_pct(value: float | None, ci: float | None) -> str:
    """A share ± its CI as percentages; empty where undefined."""
    if value is None or math.isnan(value):
        return ""
    return pct(value) if ci is None or math.isnan(ci) else f"{pct(value)} ± {pct(ci)}"


def met(ok: bool | None) -> str:
    """The "met?" cell."""
    return "n/a" if ok is None else ("**yes**" if ok else "**no**")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


# ---- the page ----------------------------------------------------------------------------------------
class Page:
    """The placeholders' text, built from ``results`` (result name -> Result).

    ``commands``: result name -> the command that makes it (shown where a result is missing);
    ``failures``: result name -> why its script gave no result this time (run_all).
    """

    def __init__(
        self,
        results: dict[str, Result],
        commands: dict[str, str],
        failures: dict[str, str] | None = None,
        quick: bool = False,
    ) -> None:
        self.r = results
        self.commands = commands
        self.failures = failures or {}
        self.quick = quick
        self.summary: list[list[str]] = []

    def fig(self, name: str) -> dict[str, Any]:
        return self.r[name].figures

    def cmd(self, name: str) -> str:
        res = self.r.get(name)
        return f"`{res.command}`" if res else f"`{self.commands.get(name, f'{PY} benchmarks/{name}.py')}`"

    def meta(self, name: str) -> list[str]:
        """The command, date and machine cells of a result's rows."""
        res = self.r[name]
        return [self.cmd(name), res.date, machine_label(res.machine)]

    def missing(self, name: str) -> str | None:
        """Why ``name`` has no result (None when it has one)."""
        if name in self.r:
            return None
        if name in self.failures:
            return f"failed ({self.failures[name]}; see log)"
        return f"pending: no result yet (run {self.cmd(name)})"

    def rows_with_meta(self, name: str, rows: list[list[str]]) -> str:
        cells = self.meta(name) if name in self.r else [self.cmd(name), "", ""]
        return table(
            ["figure", "measured", "target", "met?", "command", "date", "machine"],
            [row if len(row) == 7 else row + cells for row in rows],
        )

    def values(self) -> dict[str, str]:
        """Every placeholder's text (the summary last: the sections add its rows)."""
        values: dict[str, str] = {}
        for section in (
            fidelity,
            stability,
            efficiency,
            integrity,
            others,
            transformers,
            tamiyo,
            runtimes,
        ):
            values |= section(self)
        values["summary"] = table(["target", "measured", "target", "met?"], self.summary)
        mode = (
            "**quick mode** (`--quick`: fewer seeds, epochs and repeats; smoke values, not results)"
            if self.quick
            else "full settings"
        )
        values["mode"] = mode
        return values


# ---- the sections: each returns its placeholders' text (and adds its row to the summary) ----------------
def fidelity(page: Page) -> dict[str, str]:
    """Target 1: germination fidelity (bottleneck_study.py; the shipped policy's held-out episodes)."""
    name = "bottleneck_study"
    why = page.missing(name)
    if why:
        page.summary.append(["1. germination fidelity", why, "> 90%", "n/a"])
        return {"fidelity": page.rows_with_meta(name, [["germinations at the ground-truth slot", why, "> 90%", ""]])}
    f = page.fig(name)
    tasks = f" ({f['tasks']} tasks)"
    rows = []
    for key, label in (
        ("placed", "germinations placed at the ground-truth slot (heuristic's slot choice at the first decision)"),
        ("resolved", "bottlenecks resolved (true-slot seed ends within 1 point of the unbottlenecked reference)"),
        ("true_slot_best", "the ground-truth slot is the best place to grow (of the 3 single-slot runs)"),
        ("signal", "argmax of the grad-predictability signal is the ground-truth slot"),
    ):
        rows.append([label + tasks, pct(f[key], 0), "> 90%", met(f[key] > 0.9)])
    placed, resolved = f["placed"], f["resolved"]
    measured = f"first decision: placed at the true slot {pct(placed, 0)}, resolved {pct(resolved, 0)}{tasks}"
    verdict = met(placed > 0.9 and resolved > 0.9) + " (first decision)"
    tamiyo = page.r.get("tamiyo_generalization")
    if tamiyo:  # the shipped policy's whole episodes on held-out bottleneck tasks
        for p in tamiyo.figures["policies"]:
            v = p.get("heldout_bottleneck_fidelity")
            if v is None:
                continue
            rows.append(
                [
                    f"germinations at the ground-truth slot over whole env episodes on held-out bottleneck tasks "
                    f"(depth 5, never trained on), {p['policy']}",
                    pct(v, 1),
                    "> 90%",
                    met(v > 0.9),
                    *page.meta("tamiyo_generalization"),
                ]
            )
            measured += f"; whole held-out episodes, {p['policy']}: {pct(v, 1)}"
            verdict += f", {met(v > 0.9)} ({p['policy']}, whole held-out episodes)"
    page.summary.append(["1. germination fidelity", measured, "> 90%", verdict])
    return {"fidelity": page.rows_with_meta(name, rows)}


def stability(page: Page) -> dict[str, str]:
    """Target 2: the original task after 20+ germinations (stability.py), every arm."""
    name = "stability"
    why = page.missing(name)
    if why:
        page.summary.append(["2. stability", why, "< 5% after 20+", "n/a"])
        row = ["relative degradation of the original task", why, "< 5%", "n/a"]
        return {"stability": page.rows_with_meta(name, [row]), "stability.arms": ""}
    fig = page.fig(name)
    n = fig["seeds"]
    rows, detail, summary = [], [], []
    for scenario, sc in fig["scenarios"].items():
        for arm, a in sc["arms"].items():
            grew = a["germinations"] > 0
            verdict = "n/a (bound)" if a.get("bound") else (met(a.get("met_gated", a["met"])) if grew else "n/a")
            foss = f"{a['fossilizations']:.1f} (min {a['min_fossilizations']})" if grew else "0"
            detail.append(
                [
                    scenario,
                    a["label"],
                    pm(a["a0"], a["a0_ci95"]),
                    pm(a["a_end"], a["a_end_ci95"]),
                    f"{pct(a['degradation'], 1, True)} ± {pct(a['degradation_ci95'], 1)}",
                    _pm_or_na(a, "average_accuracy", ".3f"),
                    _pm_or_na(a, "bwt_new", "+.3f"),
                    f"{a['tasks']:.1f}",
                    f"{a['germinations']:.1f}",
                    foss,
                    f"{a['culls']:.1f}",
                    f"{a['new_before']:.3f} → {a['new_after']:.3f}",
                    _pm_or_na(a, "new_gain", "+.3f"),
                    f"{a['added_params']:,.0f}",
                    verdict,
                ]
            )
            tag = " (main figure)" if arm == fig["main_arm"] else ""
            if a.get("bound"):
                tag += ", trivial by construction (each task's seeds act only on that task's inputs)"
            if a.get("replay_examples"):
                tag += f", replaying {a['replay_examples']} original-task training examples"
            if "met_gated" in a:
                tag += (
                    f"; new-task gain {a['gain_vs_full']:.2f} of full fine-tuning's (target >= 0.5), "
                    f"{pct(a['cull_share'], 0)} of its seeds culled (target <= 25%)"
                )
            after = (
                f"after {a['fossilizations']:.1f} fossilized germinations (min {a['min_fossilizations']}) of "
                f"{a['germinations']:.1f}"
                if grew
                else f"after {a['tasks']:.0f} tasks training every weight (contrast)"
            )
            what = f"{scenario}: {a['label']}{tag}: (A0 - A_end) / A0 {after}, mean ± 95% CI over {n} seed(s)"
            rows.append(
                [
                    what,
                    f"{pct(a['degradation'], 1, True)} ± {pct(a['degradation_ci95'], 1)}",
                    "< 5% after 20+",
                    verdict,
                ]
            )
    # The summary: the design's protocol without replay (its miss stays visible) beside the main figure.
    verdicts = []
    for arm in dict.fromkeys([fig["reference_arm"], fig["main_arm"]]):
        got = [(s, sc["arms"][arm]) for s, sc in fig["scenarios"].items() if arm in sc["arms"]]
        if not got:
            continue
        label = got[0][1]["label"]
        buffer = got[0][1].get("replay_examples", 0)
        if buffer:
            guard = "; the guard uses its val split" if "guard" in label else ""
            label += f" ({buffer} original-task training examples replayed{guard})"
        summary.append(
            f"{label}: "
            + ", ".join(
                f"{s} {pct(a['degradation'], 1, True)} (new tasks {a['new_gain']:+.3f}"
                + (
                    f", {a['gain_vs_full']:.2f} of full fine-tuning's, {pct(a['cull_share'], 0)} culled"
                    if "met_gated" in a
                    else ""
                )
                + ")"
                for s, a in got
            )
        )
        verdicts.append(f"{got[0][1]['label']}: " + ", ".join(_stability_verdict(s, a, fig) for s, a in got))
    page.summary.append(["2. stability", "; ".join(summary), "< 5% after 20+", "; ".join(verdicts) or "n/a"])
    arms = "\n".join(
        [
            f"All arms, the accuracy matrix's figures, mean ± 95% CI over {n} seed(s) (A0, A_end: test accuracy "
            "on the original task before and after the whole sequence; avg acc: mean test accuracy over every "
            "task seen, the original included, after the last one; BWT new: backward transfer on the earlier new "
            "tasks, mean of (accuracy after the last task - accuracy right after its own); new tasks: mean test "
            "accuracy on each new task before → after its adaptation, and the gain; added: weights the absorbed "
            "seeds added to the host):",
            "",
            table(
                [
                    "scenario",
                    "arm",
                    "A0",
                    "A_end",
                    "degradation",
                    "avg acc",
                    "BWT new",
                    "tasks",
                    "germ.",
                    "fossilized",
                    "culled",
                    "new tasks",
                    "gain",
                    "added",
                    "met?",
                ],
                detail,
            ),
        ]
    )
    return {"stability": page.rows_with_meta(name, rows), "stability.arms": arms}


def efficiency(page: Page) -> dict[str, str]:
    """Target 3: parameter efficiency (param_efficiency.py, then distill.py's tiny student)."""
    pe, pe_summary, pe_verdict = _efficiency_pe(page)
    distill, d_summary, d_verdict = _efficiency_distill(page)
    page.summary.append(
        ["3. parameter efficiency", f"{pe_summary}; {d_summary}", "10-100x", f"{pe_verdict}; {d_verdict}"]
    )
    return {**pe, **distill}


def _efficiency_pe(page: Page) -> tuple[dict[str, str], str, str]:
    """The primary figure: param_efficiency.py (a 145k-weight host); placeholders, summary, verdict."""
    name = "param_efficiency"
    why = page.missing(name)
    if why:
        row = ["trainable parameters, full fine-tuning / matched seeds", why, "10-100x", "n/a"]
        settings = {"pe.pretrain": "40", "pe.epochs": "20", "pe.lrs": "0.001, 0.003, 0.01"}
        return {"param_efficiency": page.rows_with_meta(name, [row]), **settings}, why, "n/a"
    fig = page.fig(name)
    n, share = fig["seeds"], fig["match"]
    rows, detail, summary, verdicts = [], [], [], []
    for scenario, sc in fig["scenarios"].items():
        arms, m = sc["arms"], sc.get("matched")
        if m is None:
            b = sc.get("best_seeds")
            rows.append(
                [
                    f"{scenario}: trainable parameters, full fine-tuning / smallest seed configuration with "
                    f">= {share:.0%} of its gain",
                    "no seed configuration reaches it"
                    + (
                        f" (best: {b['arm']}, {b['param_ratio']:.1f}x fewer, gain {b['gain']:+.3f} vs "
                        f"{b['full_gain']:+.3f}, {b['gain_vs_full']:.2f} of it)"
                        if b
                        else ""
                    ),
                    "10-100x",
                    met(False),
                ]
            )
            summary.append(
                f"{scenario}: no seed configuration reaches {share:.0%} of full fine-tuning's gain"
                + (
                    f" (best: {b['arm']}, {b['param_ratio']:.1f}x fewer, {b['gain_vs_full']:.2f} of its gain)"
                    if b
                    else ""
                )
            )
            verdicts.append(f"{met(False)} ({scenario})")
        else:
            ok = m["param_ratio"] >= 10
            rows += [
                [
                    f"{scenario}: trainable parameters, full fine-tuning / smallest seed configuration with "
                    f">= {share:.0%} of its gain ({m['arm']}), {n} seed(s)",
                    f"{m['param_ratio']:.1f}x ({m['full_trainable']:,} / {m['trainable']:,})",
                    "10-100x",
                    met(ok),
                ],
                [
                    f"{scenario}: test accuracy gain on the new task, full fine-tuning / that seed configuration "
                    "(per-seed ratio)",
                    f"{pm(m['full_gain'], m['full_gain_ci95'], '+.3f')} / {pm(m['gain'], m['gain_ci95'], '+.3f')} "
                    f"({pm(m['gain_vs_full'], m['gain_vs_full_ci95'], '.2f')})",
                    "same gain",
                    "",
                ],
            ]
            summary.append(
                f"{scenario}: {m['param_ratio']:.1f}x fewer ({m['arm']}, gain {m['gain']:+.3f} vs full "
                f"fine-tuning's {m['full_gain']:+.3f})"
            )
            verdicts.append(f"{met(ok)} ({scenario})")
        m100 = sc.get("matched_100")
        rows.append(
            [
                f"{scenario}: the same at >= 100% of full fine-tuning's gain",
                f"{m100['param_ratio']:.1f}x ({m100['arm']})" if m100 else "no seed configuration reaches it",
                "10-100x",
                met(bool(m100) and m100["param_ratio"] >= 10),
            ]
        )
        for arm_name, a in arms.items():
            detail.append(
                [
                    scenario,
                    arm_name,
                    f"{a['trainable']:,}",
                    f"{a.get('param_ratio', 1.0):.1f}x",
                    f"{pm(a['before'], a['before_ci95'])} → {pm(a['after'], a['after_ci95'])}",
                    pm(a["gain"], a["gain_ci95"], "+.3f"),
                    pm(a["gain_vs_full"], a["gain_vs_full_ci95"], ".2f") if "gain_vs_full" in a else "1",
                ]
            )
    text = "\n".join(
        [
            page.rows_with_meta(name, rows),
            "",
            f"Every arm, mean ± 95% CI over {n} seed(s) (`benchmarks/param_efficiency.py`; ratio: full "
            "fine-tuning's trainable parameters over the arm's; gain / full: the per-seed ratio of the gains):",
            "",
            table(["scenario", "arm", "trainable", "ratio", "new task: before → after", "gain", "gain / full"], detail),
        ]
    )
    values = {
        "param_efficiency": text,
        "pe.pretrain": str(fig["pretrain_epochs"]),
        "pe.epochs": str(fig["epochs"]),
        "pe.lrs": ", ".join(f"{x:g}" for x in fig["lrs"]),
    }
    return values, "; ".join(summary), "; ".join(verdicts)


def _efficiency_distill(page: Page) -> tuple[dict[str, str], str, str]:
    """The second figure: fine-tuning the tiny distilled student (distill.py); placeholders, summary, verdict."""
    name = "distill"
    why = page.missing(name)
    if why:
        row = ["trainable parameters, full fine-tuning / seeds only", why, "10-100x", "n/a"]
        return {"distill": page.rows_with_meta(name, [row]), "distill.reading": ""}, f"distill.py: {why}", "n/a"
    fig = page.fig(name)
    by = {row["row"]: row for row in fig["table"]}
    full, seeds = by["fine-tune: full"], by["fine-tune: seeds only"]
    ratio: float = fig["param_ratio"]
    ppr: float = fig.get("params_per_point_ratio") or math.nan
    ppp = fig["params_per_point"]
    n = fig["seeds"]

    def per_point(v: float | None) -> str:
        return "n/a (no gain)" if not _finite(v) else f"{v:,.0f}"

    ppr_ok = math.isfinite(ppr) and ppr > 0
    rows = [
        [
            "trainable parameters: full fine-tuning / seeds only",
            f"{ratio:.1f}x ({full['trainable_params']:,.0f} / {seeds['trainable_params']:,.0f})",
            "10-100x",
            met(ratio >= 10),
        ],
        ["accuracy gain (test), full fine-tuning", pm(full["gain"], full["gain_ci95"], "+.3f"), "", ""],
        ["accuracy gain (test), seeds only", pm(seeds["gain"], seeds["gain_ci95"], "+.3f"), "", ""],
        [
            "trainable parameters per accuracy point gained: full / seeds only",
            f"{per_point(ppp['full'])} / {per_point(ppp['seeds'])} = " + (f"{ppr:.1f}x" if ppr_ok else "n/a"),
            "10-100x",
            met(ppr >= 10 if ppr_ok else None),
        ],
    ]
    summary = f"tiny 7.4k student (distill.py): {ratio:.1f}x fewer trainable parameters" + (
        f", {ppr:.1f}x fewer per accuracy point" if ppr_ok else ""
    )
    rows2 = []
    for row_name in (
        "teacher",
        "student alone (CE)",
        "student distilled",
        "distilled + heuristic",
        "big static (grown size)",
        "fine-tune: full",
        "fine-tune: seeds only",
    ):
        r = by.get(row_name)
        if not r or not r.get("n"):
            continue
        gain = "" if not _finite(r.get("gain")) else pm(r["gain"], r["gain_ci95"], "+.3f")
        rows2.append(
            [
                row_name,
                pm(r["test_acc"], r["test_acc_ci95"]),
                gain,
                f"{r['trainable_params']:,.0f}",
                f"{r['total_params']:,.0f}",
                (r.get("note") or "").replace("; ", " / ") if row_name != "teacher" else "",
            ]
        )
    if seeds["gain"] > full["gain"]:
        reading = (
            f"Here seeds only gained more ({seeds['gain']:+.3f}) than full fine-tuning ({full['gain']:+.3f}) "
            "with fewer trainable parameters, so the gains are not equal and the per-point ratio (which divides "
            "by unequal gains) is the more favourable, derived figure."
        )
    else:
        reading = (
            f"Here seeds only gained less ({seeds['gain']:+.3f}) than full fine-tuning ({full['gain']:+.3f}), so "
            'the target\'s condition "for the same accuracy gain" does not hold and the raw ratio overstates '
            "the efficiency; the per-point ratio is the fairer figure."
        )
    text = "\n".join(
        [
            page.rows_with_meta(name, rows),
            "",
            f"The distillation table behind it (`benchmarks/distill.py`, mean ± 95% CI over {n} seed(s); "
            f"fine-tuning E = {fig['ft_epochs']} epochs; grown: the seeds present at the end of each seed's run):",
            "",
            table(["run", "test accuracy", "gain", "trainable params", "total params", "grown"], rows2),
        ]
    )
    return {"distill": text, "distill.reading": reading}, summary, f"{met(ratio >= 10)} (tiny student)"


def integrity(page: Page) -> dict[str, str]:
    """Target 4: drift upstream of a seed (overhead.py, part b)."""
    name = "overhead"
    why = page.missing(name)
    if why:
        page.summary.append(["4. representational integrity", why, "< 0.05", "n/a"])
        row = ["cosine drift upstream of a seed, seeded run vs twin", why, "< 0.05", "n/a"]
        return {"integrity": page.rows_with_meta(name, [row])}
    fig = page.fig(name)
    final = fig["drift_final_between"]
    rows = [
        [
            "cosine drift upstream of the seed, seeded run vs seedless twin, end of isolated TRAINING",
            f"{fig['drift_training_between']:.1e}"
            + (" (bitwise equal)" if fig["drift_training_bitwise_equal"] else ""),
            "< 0.05",
            met(fig["drift_training_between"] < 0.05),
        ],
        [
            f"the same after the whole lifecycle (blending, holding, {fig['final_stage'].lower()}, "
            f"+{fig['epoch_steps']} steps)",
            f"{final:.1e}",
            "< 0.05",
            met(final < 0.05),
        ],
        [
            "for scale: the twin's own drift over the same steps (ordinary training)",
            f"{fig['drift_final_twin']:.1e}",
            "",
            "",
        ],
    ]
    during = (
        "0 during isolated training"
        if fig["drift_training_between"] == 0
        else f"{fig['drift_training_between']:.1e} during isolated training"
    )
    page.summary.append(
        [
            "4. representational integrity",
            f"{final:.1e} after the whole lifecycle ({during})",
            "< 0.05",
            met(final < 0.05),
        ]
    )
    return {"integrity": page.rows_with_meta(name, rows)}


def others(page: Page) -> dict[str, str]:
    """The other measurements: dormant-slot overhead, non-blocking pipeline, env throughput, lineage."""
    rows: list[list[str]] = []
    dates: list[str] = []

    def add(name: str, what: str, target: str, make: Callable[[dict[str, Any]], list[list[str]]]) -> None:
        why = page.missing(name)
        if why:
            rows.append([what, why, target, "n/a", page.cmd(name)])
            return
        dates.append(page.r[name].date)
        rows.extend([*row, page.cmd(name)] for row in make(page.fig(name)))

    add("overhead", "dormant-slot overhead", "≤ 1.02", _overhead_rows)
    add("nonblocking", "non-blocking", "< 1%", _nonblocking_rows)
    add("env_throughput", "env throughput", "≥ 0.9", _env_rows)
    batched = "env_batched"
    if batched not in page.r and "batched" in page.r.get("env_throughput", _NO_RESULT).figures:
        batched = "env_throughput"  # a quick run: env_throughput.py --quick measured the batched rows too
    load = page.r[batched].machine.get("load_average") if batched in page.r else None
    add(batched, "batched env", "≥ 3", lambda f: _batched_rows(f, load))
    for name in ("ppo_wall_time_tamiyo", "ppo_wall_time_controller"):
        add(name, "PPO wall time, batched env", "none", _ppo_rows)
    for name in ("ppo_same_result", "ppo_same_result_seed1"):
        add(name, "PPO wall time to the same result", "≤ 0.5", _same_result_rows)
    add("lineage_verify", "lineage verify", "< 1 s", _lineage_rows)
    add("actor_memory", "service actors' resident memory", "bounded", _actor_memory_rows)
    names = ("overhead", "nonblocking", "env_throughput", "env_batched", "lineage_verify", "actor_memory")
    names += ("ppo_wall_time_tamiyo", "ppo_wall_time_controller", "ppo_same_result", "ppo_same_result_seed1")
    machines = sorted({machine_label(page.r[n].machine) for n in names if n in page.r})
    days = sorted(set(dates))
    head = f"{'Date' if len(days) == 1 else 'Dates'} {', '.join(days)}; machine {'; '.join(machines)}."
    return {"others": "\n".join([head, "", table(["figure", "measured", "target", "met?", "command"], rows)])}


def transformers(page: Page) -> dict[str, str]:
    """The byte-level transformer: distillation into a grown student, and adaptation to a shifted domain."""
    out: dict[str, str] = {}
    name = "distill_transformer"
    why = page.missing(name)
    if why:
        out[name] = f"Distillation (`benchmarks/distill_transformer.py`): {why}"
    else:
        f = page.fig(name)
        rows = []
        for r in f["table"]:
            if r["n"] == 0:
                rows.append([r["row"], "0", r["note"], "", "", "", ""])
                continue
            rows.append(
                [
                    r["row"],
                    str(r["n"]),
                    pm(r["test_bpb"], r["test_bpb_ci95"], ".4f"),
                    pm(r["test_acc"], r["test_acc_ci95"], ".4f"),
                    _pm_pct(r.get("gap_closed"), r.get("gap_closed_ci95")),
                    f"{r['params']:,.0f}",
                    r["note"],
                ]
            )
        teacher, student = f["teacher"], f["student"]
        res = page.r[name]
        out[name] = "\n".join(
            [
                f"Distillation on `{f['task']}` (English prose, {f['context']}-byte windows; lower bits per byte "
                f"is better): a transformer teacher with {len(teacher['hidden'])} blocks of d_model "
                f"{teacher['hidden'][0]} into a student with {len(student['hidden'])} blocks of d_model "
                f"{student['hidden'][0]} and seed slots on its residual stream, {f['epochs']} student epochs; "
                f"mean ± 95% CI over {f['seeds']} seed(s); gap closed: the share of the teacher's bits-per-byte "
                f"advantage over the student alone that the arm recovers. {f['seconds']:.0f} s; {page.cmd(name)}, "
                f"{res.date}, {machine_label(res.machine)}.",
                "",
                table(["arm", "n", "test bits/byte", "next-byte accuracy", "gap closed", "weights", "grown"], rows),
            ]
        )
    name = "adapt_transformer"
    why = page.missing(name)
    if why:
        out[name] = f"Parameter efficiency (`benchmarks/adapt_transformer.py`): {why}"
    else:
        f = page.fig(name)
        res = page.r[name]
        rows = [
            [
                r["arm"],
                f"{r['trainable']:,}",
                f"{r['fewer']:.0f}x",
                f"{r['test_bpb']:.4f}",
                pm(r["gain"], r["gain_ci95"], "+.4f"),
                pm(r["share_of_full"], r["share_ci95"], ".2f"),
                ", ".join(f"{v:g}" for v in r["lrs"]),
            ]
            for r in f["table"]
        ]
        out[name] = "\n".join(
            [
                f"Parameter efficiency: the student-sized host pretrained {f['pretrain_epochs']} epochs on the "
                f"prose ({f['docs_bpb']:.4f} bits/byte there) adapted {f['epochs']} epochs to Python source "
                f"(before: {f['before_test_bpb']:.4f} bits/byte); full fine-tuning against seeds only (host "
                "frozen, one seed per slot from the start); learning rates chosen per arm and seed on validation; "
                f"mean ± 95% CI over {f['seeds']} seed(s). {f['seconds']:.0f} s; {page.cmd(name)}, {res.date}, "
                f"{machine_label(res.machine)}.",
                "",
                table(["arm", "trainable", "fewer", "test bits/byte", "gain", "share of full's gain", "lr"], rows),
                "",
                f"Verdict (10-100x fewer trainable weights for >= 90% of full fine-tuning's gain): {f['verdict']}.",
            ]
        )
    return out


def tamiyo(page: Page) -> dict[str, str]:
    """Tamiyo against the baselines on held-out episodes (tamiyo_generalization.py)."""
    name = "tamiyo_generalization"
    why = page.missing(name)
    if why:
        return {name: f"**Pending**: {why} (`--policy esper_ray/policies/tamiyo`)."}
    res = page.r[name]
    report = res.figures
    out = [
        "Every controller plays the same held-out episodes of `configs/tamiyo.yaml` (two whole families "
        "never trained on, hosts of an unseen depth and widths, a catalogue with two blueprints Karn "
        "invented from another seed, shuffled); mean ± 95% CI (Student t) over episodes; paired "
        "differences per episode; *big-static(X)* = X's final architecture trained from epoch 0. "
        f"Written {res.date} (`benchmarks/results/{name}.json`, episodes in `{name}_episodes.csv`).",
        "",
        table(
            ["controller", "episodes", "test accuracy", "germinations", "culls", "s / episode"],
            [
                [
                    t["controller"],
                    str(t["episodes"]),
                    pm(t["test_acc"], t["test_acc_ci95"], ".4f"),
                    f"{t['germinations']:.2f}",
                    f"{t['culls']:.2f}",
                    f"{t['seconds']:.1f}",
                ]
                for t in report["table"]
            ],
        ),
    ]
    for fig in report["policies"]:
        fidelity = fig["heldout_bottleneck_fidelity"]
        out += [
            "",
            f"{fig['policy']} minus each controller (paired, same episodes):",
            "",
            table(
                ["versus", "episodes", "difference in test accuracy"],
                [[p["versus"], str(p["episodes"]), pm(p["mean"], p["ci95"], "+.4f")] for p in fig["pooled"]],
            ),
            "",
            f"Per held-out family, {fig['policy']} minus the strongest heuristic ({fig['strongest_heuristic']}):",
            "",
            table(
                ["family", "episodes", "difference"],
                [[f, str(p["episodes"]), pm(p["mean"], p["ci95"], "+.4f")] for f, p in fig["per_family"].items()],
            ),
            "",
            f"Reversing the catalogue changes its mean accuracy by {fig['reversed_catalogue_change']:+.4f} "
            "(target: less than 0.005). Germination fidelity on the held-out bottleneck tasks (depth 5, "
            f"never trained on): {'n/a' if fidelity is None else f'{fidelity:.1%}'} (target: at least 95%).",
        ]
    return {name: "\n".join(out)}


def runtimes(page: Page) -> dict[str, str]:
    """Each declared script's wall time and date, as its result file records them."""
    rows = []
    for name in page.commands:
        res = page.r.get(name)
        if res is None:
            rows.append([name, page.cmd(name), page.missing(name) or "", ""])
        else:
            seconds = "not recorded" if res.seconds is None else f"{res.seconds:.0f} s"
            rows.append([name, page.cmd(name), seconds, res.date])
    return {"runtimes": table(["benchmark", "command", "wall time", "date"], rows)}


_NO_RESULT = Result(script="", command="", date="", machine={}, seconds=None, figures={})


def _stability_verdict(scenario: str, a: dict[str, Any], fig: dict[str, Any]) -> str:
    ok = a.get("met_gated", a["met"])
    if ok or a["degradation"] >= fig["target"]:
        return f"{met(ok)} ({scenario})"
    if a["min_fossilizations"] < fig["min_fossils"]:
        return f"{met(False)} ({scenario}: within 5%, but a run fossilized only {a['min_fossilizations']})"
    gain, culled = a["gain_vs_full"], pct(a["cull_share"], 0)
    return f"{met(False)} ({scenario}: within 5%, but gain {gain:.2f} of full fine-tuning's, {culled} culled)"


def _overhead_rows(f: dict[str, Any]) -> list[list[str]]:
    rows = []
    for kind in [k for k in ("mlp", "cnn1d", "transformer") if k in f["step_time"]]:
        c = f["step_time"][kind]["cpu"]
        plain = "`PlainTransformer`" if kind == "transformer" else "no slots"
        rows.append(
            [
                f"dormant-slot overhead, {kind} host: step time 3 dormant slots / {plain} (CPU "
                f"time; paired {c['paired']:.3f})",
                f"{c['ratio']:.3f}",
                "≤ 1.02",
                met(c["ratio"] <= 1.02),
            ]
        )
    return rows


def _nonblocking_rows(f: dict[str, Any]) -> list[list[str]]:
    idle, busy = f["runs"]["idle"], f["runs"]["busy"]
    return [
        [
            "non-blocking: share of the training loop spent waiting on the blueprint pipeline "
            f"(worst of idle / busy; waited {busy['waited_s']:.4f} s in {busy['loop_s']:.2f} s busy)",
            pct(f["waiting_fraction"], 2),
            "< 1%",
            met(f["waiting_fraction"] < 0.01),
        ],
        [
            "non-blocking: median epoch time busy / idle (pipeline compiling + "
            f"{f['slow_compile_s']:g} s per compile, {f['extra_specs']} specs queued; the price of "
            "sharing the CPUs, not waiting)",
            f"{f['busy_idle_ratio']:.2f} ({busy['median_epoch_s'] * 1e3:.0f} / {idle['median_epoch_s'] * 1e3:.0f} ms)",
            "none (≈ 1 with cores to spare)",
            "n/a",
        ],
    ]


def _env_rows(f: dict[str, Any]) -> list[list[str]]:
    episodes = f.get("ratio_per_episode")
    return [
        [
            f"env throughput: env steps/s / plain PyTorch epochs/s ({f['env_steps_per_s']:.1f} / "
            f"{f['plain_epochs_per_s']:.1f}; probe signals every {f.get('signal_every', 1)} epochs"
            + (f"; probe kept: {f['ratio_probe_kept']:.2f}" if f.get("ratio_probe_kept") is not None else "")
            + (f"; fresh at every step: {f['ratio_fresh']:.2f}" if f.get("ratio_fresh") is not None else "")
            + f"; with a conv1d seed {f['env_seeded_steps_per_s']:.1f} steps/s; plain epochs and env steps "
            "timed in alternating blocks of 5)",
            f"{f['ratio']:.2f}" + (f" (episodes {min(episodes):.2f}-{max(episodes):.2f})" if episodes else ""),
            "≥ 0.9",
            met(f["ratio"] >= 0.9),
        ]
    ]


def _batched_rows(f: dict[str, Any], load: float | None = None) -> list[list[str]]:
    b = f["batched"]
    wait, seeded = b.get("wait only", {}), b.get("seeds growing", {})
    if "32" not in wait:
        return [["batched env: no N = 32 row in the result", "n/a", "≥ 3", "n/a"]]
    ratio = wait["32"]["ratio"]
    others = ", ".join(f"{n}: {v['ratio']:.2f}" for n, v in wait.items() if n != "32")
    single = wait["32"].get("single_steps_per_s")
    if single:
        others += f"; single env {single:.1f} steps/s, batched {wait['32']['batched_steps_per_s']:.1f} per core"
    grown = "/".join(seeded)
    grown_ratios = "/".join(f"{v['ratio']:.2f}" for v in seeded.values())
    detail = f"N = {others}" + (
        f"; with a conv1d seed growing in every episode N = {grown}: {grown_ratios}" if seeded else ""
    )
    return [
        [
            "batched env (`envs/batched.py`), env steps/s per core, batched / single env, MLP host, wait only, "
            f"N = 32 ({detail}; device {b.get('device', 'cpu')}"
            + (f"; load average {load:g} at the start)" if load is not None else ")"),
            f"{ratio:.2f}",
            f"≥ {b.get('target_ratio_n32_wait_only', 3.0):g}",
            met(ratio >= b.get("target_ratio_n32_wait_only", 3.0)),
        ]
    ]


def _ppo_rows(f: dict[str, Any]) -> list[list[str]]:
    by = f["by_layout"]
    labels = list(by)
    first, last = by[labels[0]], by[labels[-1]]
    seconds = " / ".join(f"{by[k]['mean_after_first_s']:.1f}" for k in labels)
    return [
        [
            f"PPO seconds per iteration on `{f['config']}` (train batch {f['train_batch_size']}, iterations after "
            f"the first), env runners x episodes each {' / '.join(labels)}: {seconds} s; {labels[-1]} / {labels[0]}",
            f"{last['mean_after_first_s'] / first['mean_after_first_s']:.2f}",
            "none (< 1 saves time)",
            "n/a",
        ]
    ]


def _growth(by: dict[str, dict[str, Any]], first: str, label: str) -> str:
    """What the two policies grew on the held-out episodes, and each minus no growth (when measured)."""
    a, b = by[first], by[label]
    if b.get("germinations") is None or "minus_static" not in b:
        return ""
    return (
        f"; germinations per episode {a['germinations']:.2f} ({first}) and {b['germinations']:.2f} ({label}); "
        f"minus no growth {a['minus_static']:+.4f} ± {a['minus_static_ci95']:.4f} and "
        f"{b['minus_static']:+.4f} ± {b['minus_static_ci95']:.4f}"
    )


def _same_result_rows(f: dict[str, Any]) -> list[list[str]]:
    by = f["by_layout"]
    labels = list(by)
    first = labels[0]
    rows = []
    for label in labels[1:]:
        r = by[label]
        same = r["same_result"]
        rows.append(
            [
                f"PPO wall time to the same result: `{f['config']}` (seed {f.get('seed', 0)}), {f['iterations']} "
                "iterations"
                + (" from the cloning checkpoint" if f.get("warm_start") else "")
                + f", {label} against {first} (env runners x episodes each): trained in {r['train_seconds']:.0f} s "
                f"against {by[first]['train_seconds']:.0f} s; held-out test accuracy {label} minus {first} "
                f"{r['minus_first']:+.4f} ± {r['minus_first_ci95']:.4f} ({r['episodes']} paired episodes, "
                f"{f['heldout_tasks']} tasks)" + _growth(by, first, label),
                f"{r['time_ratio_to_first']:.2f}"
                + ("" if same else " (accuracy differs)")
                + (" (its policy grows nothing on the held-out tasks)" if r.get("germinations") == 0 else ""),
                "≤ 0.5 at the same accuracy (95% CI holds 0)",
                met(r["time_ratio_to_first"] <= 0.5 and same),
            ]
        )
    return rows


def _lineage_rows(f: dict[str, Any]) -> list[list[str]]:
    return [
        [
            f"lineage: verify {f['events']:,} events (chain, hashes, Ed25519 signature; "
            f"append {f['append_events_per_s']:,.0f} events/s, flush {f['flush_warm_s'] * 1e3:.0f} ms)",
            f"{f['verify_best_s']:.3f} s",
            "< 1 s per 10,000",
            met(f["verify_per_10k_s"] < 1.0),
        ]
    ]


def _actor_memory_rows(f: dict[str, Any]) -> list[list[str]]:
    rss, urza = f["rss_mb"], f["urza"]
    actors = ", ".join(f"{n} {v['start']:.0f} / {v['after']:.0f} / {v['all_served']:.0f}" for n, v in rss.items())
    return [
        [
            f"service actors' resident memory (VmRSS, MB) at start / after {f['seconds_of_proposals']:g} s of Karn "
            f"proposals / after Urza served all {urza['ready']} ready templates: {actors}",
            f"Urza holds {urza['templates_in_store']} templates in the object store",
            f"≤ {urza['templates_in_memory_max']} (the bound)",
            met(urza["templates_in_store"] <= urza["templates_in_memory_max"]),
        ]
    ]


def fill(template: str, values: dict[str, str]) -> str:
    """``template`` with every ``{{name}}`` replaced; EsperError naming any placeholder without a value."""
    unknown = sorted({m for m in PLACEHOLDER.findall(template) if m not in values})
    if unknown:
        raise EsperError(f"{TEMPLATE.name}: no value for {', '.join('{{' + u + '}}' for u in unknown)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def render(
    results: dict[str, Result],
    commands: dict[str, str],
    failures: dict[str, str] | None = None,
    quick: bool = False,
    template: Path = TEMPLATE,
) -> str:
    """The whole page: ``template`` filled from ``results``."""
    return fill(template.read_text(), Page(results, commands, failures, quick).values())
