"""configs/cluster_gpu.yaml: Karn, Tezzeret and Urabrask on separate GPUs, one left for the trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper_ray.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cluster_gpu.yaml"


def test_cluster_config_asks_one_gpu_per_service_and_the_trainer_uses_it() -> None:
    cfg = load_config(CONFIG)
    assert [getattr(cfg.actors, n).num_gpus for n in ("karn", "tezzeret", "urabrask")] == [1, 1, 1]
    assert cfg.actors.urza.num_gpus == 0 and cfg.training.device == "auto"
    assert cfg.blueprints.source == "urza"


@pytest.mark.ray
def test_cluster_config_places_services_on_distinct_logical_gpus(ray_session, tmp_path) -> None:
    import ray

    from actors.launch import start_pipeline, stop_pipeline

    cfg = load_config(CONFIG).actors
    # The test session has 2 CPUs and 4 logical GPUs: keep the GPUs, shrink the CPUs to fit.
    small = {n: getattr(cfg, n).model_copy(update={"num_cpus": 0.1}) for n in ("urza", "karn", "tezzeret", "urabrask")}
    cfg = cfg.model_copy(
        update={**small, "namespace": "esper-cluster-gpu", "storage": str(tmp_path), "karn_interval_s": 60.0}
    )
    pipeline = start_pipeline(cfg, seed_standard=False)
    try:
        placed = {name: ray.get(h.gpu_ids.remote(), timeout=60) for name, h in pipeline.handles().items()}
        free_gpus = ray.available_resources().get("GPU", 0.0)
    finally:
        stop_pipeline(pipeline, kill=True)
    services = [placed[n] for n in ("karn", "tezzeret", "urabrask")]
    assert all(len(ids) == 1 for ids in services)
    assert len({ids[0] for ids in services}) == 3  # separate GPUs
    assert placed["urza"] == []
    assert free_gpus >= 1  # one GPU left for the trainer (the job's --entrypoint-num-gpus 1)


def test_simic_env_runners_take_fractional_gpus() -> None:
    from esper_ray.simic.config import SimicConfig
    from esper_ray.simic.ppo import build_ppo_config

    ppo = build_ppo_config(SimicConfig(num_env_runners=4, num_cpus_per_env_runner=0.25, num_gpus_per_env_runner=0.25))
    assert ppo.num_gpus_per_env_runner == 0.25 and ppo.num_env_runners == 4
