"""`esper-ray evaluate`'s engine: the same held-out episodes for every controller, big static, CIs."""

from __future__ import annotations

import math

import pytest

from esper_ray.simic.evaluate import evaluate_controllers, mean_ci, summary_table, write_evaluation
from esper_ray.tamiyo.controllers import HeuristicController, StaticController

ENV = {
    "run": {
        "host": {"kind": "mlp", "hidden": [64, 64], "slots": "all"},
        "training": {"epochs": 6, "signal_every": 2},
        "lifecycle": {"min_training_epochs": 1, "min_holding_epochs": 1, "alpha": {"steps": 12}},
        "blueprints": {"names": ["residual_mlp", "lowrank"]},
        "lineage": {"enabled": False},
    },
    "heldout_tasks": [
        {"family": "bottleneck", "seed": 100, "bottleneck_slot": 0, "input_dim": 40, "n_samples": 1500},
        {"family": "mnist1d", "seed": 100, "n_train": 600},
    ],
}


def test_mean_ci_is_the_student_t_interval() -> None:
    s = mean_ci([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.n == 3
    assert s.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) * sd / sqrt(n)
    assert mean_ci([0.5]).half_width == 0.0 and math.isnan(mean_ci([]).mean)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    controllers = {"static": lambda s: StaticController(), "heuristic": lambda s: HeuristicController(1, 0.0)}
    return evaluate_controllers(controllers, ENV, seeds=[0, 1], big_static_of="heuristic")


def test_every_controller_plays_the_same_episodes_and_big_static_is_scored(rows) -> None:
    by = {}
    for r in rows:
        by.setdefault(r["controller"], []).append(r)
    assert set(by) == {"static", "heuristic", "big-static(heuristic)"}
    episodes = {c: [(r["task"], r["seed"]) for r in rs] for c, rs in by.items()}
    assert episodes["static"] == episodes["heuristic"] == episodes["big-static(heuristic)"]
    assert len(episodes["static"]) == 4
    for r in rows:
        assert 0.0 < r["final_test_acc"] <= 1.0, r  # finite: the env scores the test split at the end
    assert all(r["germinations"] == 0 and r["seed_params"] == 0 for r in by["static"])
    assert sum(r["germinations"] for r in by["heuristic"]) >= 1
    for r in by["heuristic"]:
        if r["task"].startswith("bottleneck"):
            assert r["ground_truth_slot"] == "input" and 0 <= r["fidelity_hits"] <= r["germinations"]
        else:
            assert r["fidelity_hits"] is None  # MNIST-1D has no ground truth slot


def test_summary_pairs_differences_per_episode_and_counts_fidelity(rows, tmp_path) -> None:
    table = {t["controller"]: t for t in summary_table(rows)}
    static = {(r["task"], r["seed"]): r["final_test_acc"] for r in rows if r["controller"] == "static"}
    heur = {(r["task"], r["seed"]): r["final_test_acc"] for r in rows if r["controller"] == "heuristic"}
    diffs = [static[k] - heur[k] for k in static]
    assert table["static"]["diff_vs_heuristic"] == pytest.approx(sum(diffs) / len(diffs))
    assert table["static"]["diff_vs_heuristic_ci95"] == pytest.approx(mean_ci(diffs).half_width)
    assert math.isnan(table["heuristic"]["diff_vs_heuristic"])
    h = [r for r in rows if r["controller"] == "heuristic" and r["fidelity_hits"] is not None]
    placed = sum(r["germinations"] for r in h)
    if placed:
        assert table["heuristic"]["fidelity"] == pytest.approx(sum(r["fidelity_hits"] for r in h) / placed)
    out = write_evaluation(rows, list(table.values()), tmp_path / "ev")
    assert {p.name for p in out.iterdir()} == {"episodes.parquet", "summary.csv", "summary.parquet", "summary.png"}


def test_fidelity_is_hits_over_germinations_placed() -> None:
    rows = [
        {"controller": "c", "task": "t", "seed": 0, "final_test_acc": 0.5, "seed_params": 1, "germinations": 2,
         "fidelity_hits": 1},
        {"controller": "c", "task": "t", "seed": 1, "final_test_acc": 0.6, "seed_params": 1, "germinations": 1,
         "fidelity_hits": 1},
        {"controller": "c", "task": "u", "seed": 0, "final_test_acc": 0.7, "seed_params": 0, "germinations": 3,
         "fidelity_hits": None},
    ]  # fmt: skip
    assert summary_table(rows, baseline=None)[0]["fidelity"] == pytest.approx(2 / 3)


def test_policy_label_names_the_run_or_the_folder(tmp_path) -> None:
    from esper_ray.tamiyo.controllers import policy_label

    assert policy_label(tmp_path / "tamiyo-ppo" / "policy") == "tamiyo-ppo"  # what simic exports
    assert policy_label("policies/tamiyo-mnist1d") == "tamiyo-mnist1d"  # a committed policy folder


def _evaluate_cli(tmp_path, capsys, *args: str) -> tuple[int, str]:
    import yaml

    from esper_ray.cli import main

    config = tmp_path / "ev.yaml"
    config.write_text(yaml.safe_dump({"env": {**ENV, "train_tasks": ENV["heldout_tasks"]}}))
    code = main(["evaluate", "--config", str(config), "--seeds", "1", "--no-progress", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--baselines", "static", "env.heldout_tasks=[]"), "env.heldout_tasks is empty"),
        (("--baselines", "static,bestest",), "unknown baseline 'bestest'"),
        (("--baselines", "fixed",), "needs env.run.controller.schedule"),
        (("--baselines", "replay",), "replay replays a policy"),
        (("--baselines", "fixed", "env.run.controller.schedule=[{slot: hidden9, blueprint: lowrank}]"),
         "unknown slot 'hidden9'"),
        (("--baselines", "fixed", "env.run.controller.schedule=[{slot: 1, blueprint: conv9d}]"),
         "unknown blueprint 'conv9d'"),
    ],
)  # fmt: skip
def test_evaluate_bad_input_is_one_line_and_keeps_what_was_written(tmp_path, capsys, args, message) -> None:
    out = tmp_path / "ev"
    out.mkdir()
    (out / "summary.csv").write_text("an earlier evaluation\n")
    code, err = _evaluate_cli(tmp_path, capsys, "--out", str(out), *args)
    assert code == 2
    assert err.startswith("esper-ray: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]
    assert (out / "summary.csv").read_text() == "an earlier evaluation\n"


def test_evaluate_lists_the_tasks_and_seeds_it_ran_and_reports_culls_and_seconds(tmp_path, capsys) -> None:
    import json

    from esper_ray.simic.evaluate import format_table

    code, _ = _evaluate_cli(tmp_path, capsys, "--out", str(tmp_path / "ev"), "--baselines", "static")
    assert code == 0
    ran = json.loads((tmp_path / "ev" / "ran.json").read_text())
    assert ran["seeds"] == [0] and ran["heldout_tasks"] == [
        {**t, **{k: v for k, v in ran["heldout_tasks"][i].items() if k not in t}}
        for i, t in enumerate(ENV["heldout_tasks"])
    ]
    assert ran["controllers"] == ["static"]
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "ev" / "summary.parquet").to_pylist()
    assert rows[0]["culls"] == 0.0 and rows[0]["seconds"] > 0
    assert "culls" in format_table(rows) and "s/ep" in format_table(rows)
