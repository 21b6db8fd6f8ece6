"""Gymnasium environments of esper-ray. ``import envs`` registers ``esper/Morphogenesis-v0``."""

import gymnasium as gym

from envs.morphogenesis import SIGNAL_EVERY, EnvConfig, MorphogenesisEnv, RewardConfig

ENV_ID = "esper/Morphogenesis-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.morphogenesis:MorphogenesisEnv")

__all__ = ["ENV_ID", "SIGNAL_EVERY", "EnvConfig", "MorphogenesisEnv", "RewardConfig"]
