"""Sweeps and Simic on a cluster where the blueprint pipeline holds its CPUs.

The four detached service actors hold 4 x 0.25 CPU of the test session's 2: a sweep trial or a
set of env runners that does not fit what is left fails at once, in one line with the numbers,
instead of staying PENDING forever; one that fits runs.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from esper_ray.config import ActorsConfig, load_config
from esper_ray.contracts import EsperError
from esper_ray.simic.config import SimicConfig, SweepConfig

pytestmark = pytest.mark.ray

TINY = SimicConfig(
    iterations=1,
    num_env_runners=0,
    checkpoint_every=1,
    ppo={"train_batch_size": 32, "minibatch_size": 16, "num_epochs": 1, "hidden": 16},
    env={
        "run": {"training": {"epochs": 4}, "lineage": {"enabled": False}},
        "train_tasks": [{"family": "mnist1d", "seed": 0, "n_train": 400}],
        "heldout_tasks": [{"family": "mnist1d", "seed": 1, "n_train": 400}],
    },
)


@pytest.fixture(scope="module")
def pipeline(ray_session, tmp_path_factory: pytest.TempPathFactory):
    """The four service actors at their default 0.25 CPU each (Karn slowed: it only holds CPU)."""
    import ray

    from actors.launch import start_pipeline, stop_pipeline

    cfg = ActorsConfig(
        namespace=f"test-busy-{uuid.uuid4().hex[:8]}",
        storage=str(tmp_path_factory.mktemp("urza")),
        compile=False,
        karn_interval_s=60.0,
    )
    p = start_pipeline(cfg)
    ray.get([h.gpu_ids.remote() for h in p.handles().values()], timeout=120)  # all four placed
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) > 1.0 + 1e-9 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0.0) == pytest.approx(1.0)
    yield p
    stop_pipeline(p, kill=True)


def test_sweep_that_does_not_fit_fails_in_one_line_before_any_trial(pipeline, tmp_path: Path) -> None:
    from esper_ray.simic.sweep import run_sweep

    base = TINY.model_copy(update={"num_env_runners": 1, "num_cpus_per_env_runner": 0.5})
    cfg = SweepConfig(name="busy", storage_path=str(tmp_path / "tune"), search={"ppo.lr": [1e-4]}, base=base)
    with pytest.raises(EsperError) as info:
        run_sweep(cfg, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert "needs 1.5 CPU" in message and "1 CPU free of 2" in message and "1 CPU held" in message, message
    assert "num_cpus_per_env_runner" in message
    assert not (tmp_path / "tune").exists()  # no trial was started


def test_simic_env_runners_that_do_not_fit_fail_in_one_line(
    pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from esper_ray.cli import main

    out = tmp_path / "simic"
    rc = main(["simic", "--no-progress", "--out", str(out), "num_env_runners=2", "num_cpus_per_env_runner=0.75"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("esper-ray: error: simic's env runners") and "needs 1.5 CPU" in err[0], err[0]
    assert not out.exists()


def test_override_of_the_search_grid_replaces_it(tmp_path: Path) -> None:
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs/sweep_ppo.yaml", ["search={ppo.lr: [0.001]}"], model=SweepConfig
    )
    assert cfg.search == {"ppo.lr": [0.001]}  # one trial, not the file's grid of four


@pytest.mark.slow
def test_sweep_that_fits_runs_beside_the_pipeline(pipeline, tmp_path: Path) -> None:
    """A trial sized to the free CPU (driver only, sampling in it) runs while the actors live."""
    from esper_ray.simic.sweep import run_sweep

    cfg = SweepConfig(
        name="fits", storage_path=str(tmp_path / "tune"), scheduler="fifo", search={"ppo.lr": [1e-4]}, base=TINY
    )
    result = run_sweep(cfg, progress=False)
    assert len(result["trials"]) == 1 and not result["trials"][0]["error"], result["trials"]
    assert result["trials"][0]["iterations"] == 1


def test_fit_trial_scales_every_process_by_one_factor_or_fails_in_one_line() -> None:
    from esper_ray.simic.sweep import MIN_CPU_PER_PROCESS, fit_trial

    same = fit_trial(1.0, 0.5, 1, free_cpus=2.0)
    assert (same.driver_cpus, same.env_runner_cpus, same.scale) == (1.0, 0.5, 1.0)
    fitted = fit_trial(1.0, 0.5, 1, free_cpus=1.0)  # 1.5 asked, 1 free
    assert fitted.scale == pytest.approx(2 / 3)
    assert fitted.driver_cpus == pytest.approx(2 / 3, abs=1e-4) and fitted.env_runner_cpus == pytest.approx(
        1 / 3, abs=1e-4
    )
    assert fitted.total <= 1.0 and fitted.env_runner_cpus / fitted.driver_cpus == pytest.approx(0.5, abs=1e-3)
    # 13 processes cannot each get MIN_CPU_PER_PROCESS out of 1 CPU.
    with pytest.raises(EsperError) as info:
        fit_trial(1.0, 0.5, 12, free_cpus=1.0)
    message = str(info.value)
    assert "\n" not in message and "7 CPU" in message and "1 CPU free" in message
    assert f"at least {MIN_CPU_PER_PROCESS:g} CPU each" in message and "13 processes" in message


def _wait_for_free_cpus(cpus: float) -> None:
    """An earlier test's trial gives its CPUs back a moment after it ends."""
    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < cpus - 1e-9 and time.monotonic() < deadline:
        time.sleep(0.1)


def test_sweep_fitting_fails_in_one_line_when_even_the_minimum_does_not_fit(pipeline, tmp_path: Path) -> None:
    from esper_ray.simic.sweep import run_sweep

    _wait_for_free_cpus(1.0)

    base = TINY.model_copy(update={"num_env_runners": 12, "num_cpus_per_env_runner": 0.5})
    cfg = SweepConfig(
        name="nofit", storage_path=str(tmp_path / "tune"), search={"ppo.lr": [1e-4]}, base=base, fit_to_cluster=True
    )
    with pytest.raises(EsperError) as info:
        run_sweep(cfg, progress=False)
    assert "\n" not in str(info.value) and "cannot fit the 1 CPU free" in str(info.value), str(info.value)
    assert not (tmp_path / "tune").exists()


@pytest.mark.slow
def test_sweep_with_fit_to_cluster_runs_a_trial_that_would_not_fit(pipeline, tmp_path: Path) -> None:
    """1.5 CPU asked (driver 1 + one env runner x 0.5) with 1 free: scaled to 2/3, it runs beside the actors."""
    import ray

    from esper_ray.simic.sweep import run_sweep

    _wait_for_free_cpus(1.0)
    base = TINY.model_copy(update={"num_env_runners": 1, "num_cpus_per_env_runner": 0.5})
    cfg = SweepConfig(
        name="fitted",
        storage_path=str(tmp_path / "tune"),
        scheduler="fifo",
        search={"ppo.lr": [1e-4]},
        base=base,
        fit_to_cluster=True,
    )
    result = run_sweep(cfg, progress=False)
    fit = result["fit"]
    assert fit.scale == pytest.approx(2 / 3) and fit.total <= 1.0, fit
    assert len(result["trials"]) == 1 and not result["trials"][0]["error"], result["trials"]
    assert result["trials"][0]["iterations"] == 1
    # The service actors lived through it and hold what they held.
    names = {
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == pipeline.cfg.namespace
    }
    assert {"urza", "karn", "tezzeret", "urabrask"} <= names


def test_wait_for_cpus_waits_until_they_are_free_or_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    import esper_ray.cluster as cluster

    free = iter([0.5, 0.5, 1.0, 2.0])
    monkeypatch.setattr(cluster, "free_cpus", lambda: next(free))
    assert cluster.wait_for_cpus(2.0, timeout_s=5, poll_s=0.01)
    assert next(free, None) is None  # it polled until the CPUs were back, and no further
    monkeypatch.setattr(cluster, "free_cpus", lambda: 0.0)
    started = time.monotonic()
    assert not cluster.wait_for_cpus(1.0, timeout_s=0.2, poll_s=0.01)
    assert 0.2 <= time.monotonic() - started < 2


def test_fit_cpus_scales_env_runners_or_fails_in_one_line() -> None:
    from esper_ray.cluster import fit_cpus

    assert fit_cpus(0.5, 2, free=2.0, what="x") == 0.5  # fits as asked
    assert fit_cpus(0.75, 2, free=1.0, what="x") == 0.5
    assert fit_cpus(1.0, 3, free=1.0, what="x") == 0.3333  # rounded down to Ray's precision
    assert fit_cpus(1.0, 0, free=0.0, what="x") == 1.0  # no processes: nothing to fit
    with pytest.raises(EsperError) as info:
        fit_cpus(0.5, 20, free=1.0, what="simic's env runners")
    assert str(info.value).startswith("simic's env runners (20 x 0.5 CPU) cannot fit the 1 CPU free")
    assert "each needs at least 0.1 CPU" in str(info.value)


def test_simic_with_fit_to_cluster_scales_its_env_runners_to_what_is_free(
    pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI hands train_simic env runners scaled to the 1 free CPU (training itself replaced here:
    a real scaled trial runs in the sweep test above), and they pass its free-resource check."""
    import esper_ray.simic.ppo as ppo
    from esper_ray.cli import main
    from esper_ray.cluster import require_free

    _wait_for_free_cpus(1.0)
    seen = []

    def fake_train_simic(cfg, out, **kwargs):
        require_free({"CPU": cfg.num_env_runners * cfg.num_cpus_per_env_runner}, "simic's env runners")
        seen.append(cfg)
        return Path(out) / "checkpoint"

    monkeypatch.setattr(ppo, "train_simic", fake_train_simic)
    out = tmp_path / "simic"
    args = ["simic", "--no-progress", "--out", str(out), "num_env_runners=2", "num_cpus_per_env_runner=0.75"]
    assert main([*args, "fit_to_cluster=true"]) == 0
    assert seen[0].num_cpus_per_env_runner == 0.5 and seen[0].num_env_runners == 2
    capsys.readouterr()
    # Even the least (0.1 CPU each) does not fit: one line, exit 2, no training.
    assert main([*args[:-2], "num_env_runners=20", "num_cpus_per_env_runner=0.5", "fit_to_cluster=true"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot fit the 1 CPU free" in err[0], err
    assert len(seen) == 1
