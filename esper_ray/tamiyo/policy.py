"""The learned Tamiyo at inference time: plain torch, no RLlib.

An exported policy is a folder with ``policy.safetensors`` (the actor network's
Linear layers) and ``policy.json`` (layer order, activation, and the encoding it was
trained with: slot names, K candidates, task-feature size). Loading it needs no
pickles and no RLlib; the controller picks the most likely legal action.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from esper_ray.contracts import ControllerAction, EsperError, Observation
from esper_ray.tamiyo.encoding import ActionSpace, ObsEncoder

FORMAT = "esper-ray-tamiyo-policy/1"
_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU}


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def export_rl_module(rl_module: nn.Module, env, path: str | Path, activation: str = "tanh") -> Path:
    """Write an RLlib PPO module's actor (encoder + pi head) for torch-only inference."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = _linears(rl_module.encoder.actor_encoder) + _linears(rl_module.pi)
    tensors = {}
    for i, layer in enumerate(layers):
        tensors[f"layers.{i}.weight"] = layer.weight.detach().cpu().contiguous().clone()
        tensors[f"layers.{i}.bias"] = layer.bias.detach().cpu().contiguous().clone()
    save_file(tensors, path / "policy.safetensors")
    meta = {
        "format": FORMAT,
        "activation": activation,
        "n_layers": len(layers),
        "slots": list(env.space.slots),
        "k": env.space.k,
        "task_dim": env.encoder.task_dim,
        "obs_size": env.encoder.size,
        "n_actions": env.space.n,
    }
    (path / "policy.json").write_text(json.dumps(meta, indent=1))
    return path


class PolicyController:
    """A trained Tamiyo: observation -> the legal action with the highest logit."""

    name = "policy"

    def __init__(self, net: nn.Sequential, space: ActionSpace, encoder: ObsEncoder, source: str = ""):
        self.net = net.eval()
        self.space = space
        self.encoder = encoder
        self.source = source

    def logits(self, obs: Observation) -> np.ndarray:
        x = torch.from_numpy(self.encoder.encode(obs)).unsqueeze(0)
        with torch.no_grad():
            return self.net(x)[0].numpy()

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        mask = self.space.mask(legal, obs.candidates).astype(bool)
        logits = np.where(mask, self.logits(obs), -np.inf)
        return self.space.decode(int(np.argmax(logits)), obs.candidates)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def load_policy(path: str | Path | None) -> PolicyController:
    """Load an exported policy folder; one-line EsperError if missing, corrupt or mismatched."""
    if path is None:
        raise EsperError("controller.kind=policy needs controller.path (an exported policy folder)")
    path = Path(path)
    meta_file, weights_file = path / "policy.json", path / "policy.safetensors"
    if not meta_file.exists() or not weights_file.exists():
        raise EsperError(f"no exported policy at {path} (expected policy.json and policy.safetensors)")
    try:
        meta = json.loads(meta_file.read_text())
        tensors = load_file(weights_file)
    except (OSError, ValueError, SafetensorError) as err:
        raise EsperError(f"policy at {path} is unreadable: {str(err).splitlines()[0]}") from None
    if meta.get("format") != FORMAT:
        raise EsperError(f"policy at {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        layers: list[nn.Module] = []
        for i in range(meta["n_layers"]):
            w, b = tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"]
            linear = nn.Linear(w.shape[1], w.shape[0])
            linear.load_state_dict({"weight": w, "bias": b})
            layers.append(linear)
            if i < meta["n_layers"] - 1:
                layers.append(_ACTIVATIONS[meta["activation"]]())
        space = ActionSpace(tuple(meta["slots"]), int(meta["k"]))
        encoder = ObsEncoder(space.slots, space.k, int(meta["task_dim"]))
    except (KeyError, RuntimeError, ValueError) as err:
        raise EsperError(f"policy at {path} is inconsistent: {str(err).splitlines()[0]}") from None
    net = nn.Sequential(*layers)
    if net[0].in_features != encoder.size or net[-1].out_features != space.n:
        raise EsperError(
            f"policy at {path} expects {net[0].in_features} inputs / {net[-1].out_features} actions, "
            f"its encoding gives {encoder.size} / {space.n}"
        )
    return PolicyController(net, space, encoder, source=str(path))
