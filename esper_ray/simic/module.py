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
from esper_ray.simic.config import module_config
from esper_ray.tamiyo.encoding import SetLayout
from esper_ray.tamiyo.setnet import SetPolicyNet

__all__ = ["TamiyoSetModule", "module_config"]


class TamiyoSetModule(TorchRLModule, ValueFunctionAPI):
    """PPO/MARWIL module: masked set-policy logits and a value from the same observation."""

    def setup(self) -> None:
        cfg = self.model_config
        if not isinstance(cfg, dict):  # module_config() builds a plain dict; RLlib passes it through
            raise EsperError(f"TamiyoSetModule needs a model_config dict (module_config), got {type(cfg).__name__}")
        self.layout = SetLayout(int(cfg["max_slots"]), int(cfg["k"]))
        space, actions = self.observation_space, self.action_space
        if not isinstance(space, gym.spaces.Dict) or set(space.spaces) != {"observations", "action_mask"}:
            raise EsperError("TamiyoSetModule needs a Dict observation space of observations and action_mask")
        if not isinstance(actions, gym.spaces.Discrete):
            raise EsperError(f"TamiyoSetModule needs a Discrete action space, got {type(actions).__name__}")
        shape = space["observations"].shape or ()
        if shape != (self.layout.size,) or actions.n != self.layout.n_actions:
            raise EsperError(
                f"TamiyoSetModule(max_slots={self.layout.max_slots}, k={self.layout.k}) expects "
                f"{self.layout.size} observations and {self.layout.n_actions} actions, the env gives "
                f"{shape[0] if shape else 0} and {actions.n}"
            )
        self.net = SetPolicyNet(self.layout, int(cfg.get("hidden", 64)))

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        return {Columns.ACTION_DIST_INPUTS: self.net.policy_logits(obs["observations"], obs["action_mask"])}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None):
        return self.net.value(batch[Columns.OBS]["observations"])
