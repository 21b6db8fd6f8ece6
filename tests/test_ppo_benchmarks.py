"""The PPO wall-time benchmarks' arithmetic: layouts, the paired comparison, and the page rows.

The benchmarks are scripts, not package modules: they are imported from benchmarks/ here. Running
them is heavy (minutes of PPO); BENCHMARKS.md holds what they measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from page import _ppo_rows, _same_result_rows  # noqa: E402
from ppo_same_result import compare  # noqa: E402
from ppo_wall_time import layout_overrides, parse_layouts  # noqa: E402


def test_layouts_are_runners_by_episodes() -> None:
    assert parse_layouts("0x1, 2x8,") == [(0, 1), (2, 8)]
    assert layout_overrides(0, 16, 1.0) == ["num_env_runners=0", "num_envs_per_env_runner=16"]
    assert layout_overrides(2, 8, 0.5)[-1] == "num_cpus_per_env_runner=0.5"


@pytest.mark.parametrize("bad", ["2x0", "x8", "2*8", "ax8", "2x-1"])
def test_a_bad_layout_is_one_line(bad: str) -> None:
    with pytest.raises(SystemExit, match="--layouts: .* is not RxN"):
        parse_layouts(bad)


def _rows(label: str, accs: list[float]) -> list[dict]:
    return [{"controller": label, "task": f"t{i // 2}", "seed": i % 2, "final_test_acc": a} for i, a in enumerate(accs)]


def test_compare_pairs_the_layouts_on_the_same_episodes() -> None:
    base = [0.5, 0.6, 0.7, 0.8, 0.9, 0.4]
    shifted = [a + 0.05 for a in base]  # better on every episode: a real difference, CI 0 wide
    noisy = [a + d for a, d in zip(base, [0.02, -0.02, 0.01, -0.01, 0.03, -0.03], strict=True)]
    out = compare(_rows("0x1", base) + _rows("2x8", shifted) + _rows("2x1", noisy), ["0x1", "2x8", "2x1"])
    assert out["0x1"]["minus_first"] == 0 and out["0x1"]["same_result"]
    assert out["2x8"]["minus_first"] == pytest.approx(0.05) and out["2x8"]["minus_first_ci95"] == pytest.approx(
        0, abs=1e-9
    )
    assert not out["2x8"]["same_result"]
    assert out["2x1"]["minus_first"] == pytest.approx(0) and out["2x1"]["minus_first_ci95"] > 0
    assert out["2x1"]["same_result"] and out["2x1"]["episodes"] == 6
    assert out["2x8"]["test_acc"] == pytest.approx(sum(shifted) / 6)


def test_compare_reports_growth_and_the_difference_to_no_growth() -> None:
    static = _rows("static", [0.5, 0.5, 0.5, 0.5])
    rows = static + _rows("0x1", [0.6, 0.6, 0.6, 0.6]) + _rows("2x8", [0.5, 0.5, 0.5, 0.5])
    for r in rows:
        r["germinations"] = {"static": 0, "0x1": 2, "2x8": 0}[r["controller"]]
    out = compare(rows, ["0x1", "2x8"])
    assert out["0x1"]["germinations"] == 2 and out["2x8"]["germinations"] == 0
    assert out["0x1"]["minus_static"] == pytest.approx(0.1) and out["2x8"]["minus_static"] == pytest.approx(0)
    assert out["2x8"]["minus_first"] == pytest.approx(-0.1) and not out["2x8"]["same_result"]
    assert "minus_static" not in compare(rows[4:], ["0x1", "2x8"])["2x8"]  # no growth did not play


def test_an_episode_only_one_layout_played_is_not_paired() -> None:
    rows = _rows("0x1", [0.5, 0.6, 0.7]) + _rows("2x8", [0.5, 0.6])
    assert compare(rows, ["0x1", "2x8"])["2x8"]["episodes"] == 2


def _same(ratio: float, same: bool) -> dict:
    row = {"train_seconds": 100 * ratio, "time_ratio_to_first": ratio, "minus_first": 0.001}
    row |= {"minus_first_ci95": 0.01, "episodes": 96, "same_result": same, "test_acc": 0.8, "test_acc_ci95": 0.02}
    first = {"train_seconds": 100.0, "time_ratio_to_first": 1.0, "minus_first": 0.0, "minus_first_ci95": 0.0}
    return {
        "config": "configs/tamiyo.yaml",
        "iterations": 20,
        "warm_start": "runs/tamiyo-bc/checkpoint",
        "eval_seeds": [0, 1],
        "heldout_tasks": 48,
        "by_layout": {"0x1": first | {"episodes": 96, "same_result": True}, "2x8": row},
    }


@pytest.mark.parametrize(("ratio", "same", "verdict"), [(0.45, True, "yes"), (0.45, False, "no"), (0.6, True, "no")])
def test_the_same_result_row_is_met_only_at_half_the_time_and_the_same_accuracy(
    ratio: float, same: bool, verdict: str
) -> None:
    (row,) = _same_result_rows(_same(ratio, same))
    assert row[1].startswith(f"{ratio:.2f}") and row[3] == f"**{verdict}**"
    assert "2x8 against 0x1" in row[0] and "+0.0010 ± 0.0100" in row[0]
    assert "germinations" not in row[0]  # not measured in this result


def test_the_same_result_row_says_what_each_policy_grew() -> None:
    f = _same(0.41, True)
    growth = {"0x1": (1.5, 0.004, 0.006), "2x8": (0.0, -0.001, 0.002)}
    for label, (grown, vs, ci) in growth.items():
        f["by_layout"][label] |= {"germinations": grown, "minus_static": vs, "minus_static_ci95": ci}
    (row,) = _same_result_rows(f)
    assert "germinations per episode 1.50 (0x1) and 0.00 (2x8)" in row[0]
    assert "minus no growth +0.0040 ± 0.0060 and -0.0010 ± 0.0020" in row[0]
    assert row[1] == "0.41 (its policy grows nothing on the held-out tasks)"  # met, and said what it learned


def test_the_wall_time_row_is_the_last_layout_over_the_first() -> None:
    by = {"0x1": {"mean_after_first_s": 20.0}, "2x8": {"mean_after_first_s": 9.0}}
    (row,) = _ppo_rows({"config": "c.yaml", "train_batch_size": 512, "by_layout": by})
    assert row[1] == "0.45" and "0x1 / 2x8: 20.0 / 9.0 s" in row[0]
