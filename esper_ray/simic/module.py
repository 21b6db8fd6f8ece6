"""The RLModule Simic trains: Tamiyo's set network on RLlib's new API stack.

``TamiyoSetModule`` wraps ``esper_ray.tamiyo.setnet.SetPolicyNet`` (which knows nothing of
RLlib) and applies the env's action mask: illegal actions get the float32 minimum as logit,
so PPO never samples them and entropies count the legal actions only. Its ``model_config``
holds ``max_slots``, ``k`` and ``hidden``; the observation space must be the env's Dict of
``observations`` (a flat ``SetLayout`` vector of that size) and ``action_mask``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule

from esper_ray.contracts import EsperError
from esper_ray.tamiyo.encoding import SetLayout
from esper_ray.tamiyo.setnet import SetPolicyNet


def module_config(max_slots: int, k: int, hidden: int) -> dict[str, Any]:
    """The ``model_config`` of a ``TamiyoSetModule``."""
    return {"max_slots": max_slots, "k": k, "hidden": hidden}


class TamiyoSetModule(TorchRLModule, ValueFunctionAPI):
    """PPO/MARWIL module: masked set-policy logits and a value from the same observation."""

    def setup(self) -> None:
        cfg = self.model_config
        self.layout = SetLayout(int(cfg["max_slots"]), int(cfg["k"]))
        space = self.observation_space
        if not isinstance(space, gym.spaces.Dict) or set(space.spaces) != {"observations", "action_mask"}:
            raise EsperError("TamiyoSetModule needs a Dict observation space of observations and action_mask")
        if space["observations"].shape != (self.layout.size,) or self.action_space.n != self.layout.n_actions:
            raise EsperError(
                f"TamiyoSetModule(max_slots={self.layout.max_slots}, k={self.layout.k}) expects "
                f"{self.layout.size} observations and {self.layout.n_actions} actions, the env gives "
                f"{space['observations'].shape[0]} and {self.action_space.n}"
            )
        self.net = SetPolicyNet(self.layout, int(cfg.get("hidden", 64)))

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        return {Columns.ACTION_DIST_INPUTS: self.net.policy_logits(obs["observations"], obs["action_mask"])}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None):
        return self.net.value(batch[Columns.OBS]["observations"])
