"""Every shipped config validates, and the Tamiyo recipe plays on the documented task distributions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

import envs
from esper_ray.config import read_yaml, validate_model
from esper_ray.simic.config import SimicConfig, SweepConfig
from esper_ray.tasks import load_distribution, sample_tasks

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_tamiyo_recipe_uses_the_documented_task_distributions():
    """configs/tamiyo.yaml inlines the training distribution of configs/task_families.yaml (they must
    not drift) and holds out the same families."""
    recipe = read_yaml(CONFIGS / "tamiyo.yaml")["env"]
    documented = load_distribution(CONFIGS / "task_families.yaml", key="train")
    assert load_distribution(recipe["train_distribution"]) == documented
    heldout = load_distribution(CONFIGS / "task_families.yaml", key="heldout")
    families = [(f.family, f.count, f.seed) for f in heldout.families]
    assert [(f.family, f.count, f.seed) for f in load_distribution(recipe["heldout_distribution"]).families] == families


def test_tamiyo_recipe_holds_out_families_depths_and_blueprints():
    cfg = validate_model(SimicConfig, read_yaml(CONFIGS / "tamiyo.yaml"), "tamiyo.yaml")
    env = validate_model(envs.EnvConfig, cfg.env, "env")
    train, heldout = env.train_tasks, env.heldout_tasks
    train_families = {t.family for t in train}
    left_out = {t.family for t in heldout} - train_families
    assert len(left_out) >= 2, left_out  # leave-families-out
    assert {len(t.host.hidden) for t in heldout} - {len(t.host.hidden) for t in train}  # unseen depths
    assert max(len(t.host.hidden) + 1 for t in train + heldout) <= env.max_slots  # every host fits the policy
    assert env.shuffle_candidates and env.run.blueprints.max_candidates >= 8 + env.run.blueprints.karn_invented
    kinds = Counter(t.host.kind for t in train)
    assert kinds["mlp"] and kinds["cnn1d"]  # both host kinds are trained on


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_validates(path: Path):
    raw = yaml.safe_load(path.read_text())
    if path.name == "task_families.yaml":
        for split in ("train", "heldout"):
            assert sample_tasks(load_distribution(path, key=split))
    elif path.name.startswith("sweep"):
        validate_model(SweepConfig, raw, path.name)
    elif "env" in raw or "ppo" in raw:
        cfg = validate_model(SimicConfig, raw, path.name)
        validate_model(envs.EnvConfig, cfg.env, f"{path.name}: env")
    elif path.name.startswith("distill"):
        from esper_ray.tolaria.distill import load_distill_config

        load_distill_config(path, [])
    else:
        from esper_ray.config import RunConfig

        validate_model(RunConfig, raw, path.name)
