"""Gymnasium environments of esper-ray. ``import envs`` registers ``esper/Morphogenesis-v0``."""

import gymnasium as gym

from envs.morphogenesis import SIGNAL_EVERY, EnvConfig, MorphogenesisEnv, RewardConfig

ENV_ID = "esper/Morphogenesis-v0"

if ENV_ID not in gym.registry:
    # make_vec(..., vectorization_mode="vector_entry_point") gives N episodes trained as one batch (envs.batched).
    gym.register(
        id=ENV_ID,
        entry_point="envs.morphogenesis:MorphogenesisEnv",
        vector_entry_point="envs.batched:BatchedMorphogenesisEnv",
    )

__all__ = ["ENV_ID", "SIGNAL_EVERY", "EnvConfig", "MorphogenesisEnv", "RewardConfig"]
