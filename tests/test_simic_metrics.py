"""Simic's episode metrics: what each training iteration reports about the host runs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from esper_ray.simic.ppo import _callbacks_class, episode_window


class _Episode:
    def __init__(self, info: dict[str, Any]):
        self.info = info

    def get_infos(self, index: int) -> dict[str, Any]:
        assert index == -1
        return self.info


def _info(val_acc: float, germinated: list[str], truth: str | None = None) -> dict[str, Any]:
    return {
        "val_acc": val_acc,
        "test_acc": None,
        "start_val_acc": 0.5,
        "seed_params": 10 * len(germinated),
        "germinated_slots": germinated,
        "ground_truth_slot": truth,
    }


def _runner(episodes: int, runners: int) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(metrics_num_episodes_for_smoothing=episodes, num_env_runners=runners))


def test_the_window_is_rllibs_episode_window_shared_by_the_runners() -> None:
    assert episode_window(_runner(100, 0).config) == 100
    assert episode_window(_runner(100, 3).config) == 34
    assert episode_window(_runner(1, 4).config) == 1


def test_episode_metrics_are_the_mean_of_the_recent_episodes_not_of_the_first() -> None:
    """Logged without a window, RLlib keeps an EMA with coefficient 0.01: after 20 episodes at 0.9 and
    5 at 0.1 it would still report about 0.86. With the window (5 here) it reports the last 5."""
    from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

    callbacks = _callbacks_class()()
    runner, logger = _runner(10, 2), MetricsLogger()
    for val in [0.9] * 20 + [0.1] * 5:
        callbacks.on_episode_end(episode=_Episode(_info(val, ["s0"])), env_runner=runner, metrics_logger=logger)
    assert logger.peek("esper_final_val_acc") == pytest.approx(0.1)
    assert logger.peek("esper_acc_gain") == pytest.approx(-0.4)
    assert "esper_final_test_acc" not in logger.reduce()  # no finished host run: no test accuracy


def test_fidelity_counts_germinations_at_the_ground_truth_slot() -> None:
    from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

    callbacks = _callbacks_class()()
    runner, logger = _runner(100, 0), MetricsLogger()
    for germinated in (["a", "b"], ["a", "a", "a", "c"]):
        callbacks.on_episode_end(
            episode=_Episode(_info(0.8, germinated, truth="a")), env_runner=runner, metrics_logger=logger
        )
    callbacks.on_episode_end(episode=_Episode(_info(0.8, [], truth="a")), env_runner=runner, metrics_logger=logger)
    assert logger.peek("esper_fidelity") == pytest.approx((0.5 + 0.75) / 2)  # the seedless episode has none
    assert logger.peek("esper_germinations") == pytest.approx((2 + 4 + 0) / 3)
