"""The learned Tamiyo at inference time: plain torch, no RLlib.

An exported policy is a folder with ``policy.safetensors`` (the ``SetPolicyNet`` weights) and
``policy.json`` (the format, the set maxima ``max_slots`` and ``k``, and the hidden width).
Loading it needs no pickles and no RLlib; the controller picks the most likely legal action.
A host with more slots, or a catalogue showing more candidates, than the policy's maxima is
refused with one line, never truncated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from esper_ray.contracts import ControllerAction, EsperError, Observation
from esper_ray.tamiyo.encoding import ActionSpace, ObsEncoder, SetLayout
from esper_ray.tamiyo.setnet import SetPolicyNet
from esper_ray.util import error_line

FORMAT = "esper-ray-tamiyo-policy/2"
SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "policies" / "tamiyo"
"""The Tamiyo that ships with the package (``controller.kind: policy`` without a path)."""


def export_net(net: SetPolicyNet, path: str | Path) -> Path:
    """Write ``net`` as ``policy.safetensors`` + ``policy.json`` in the folder ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(tensors, path / "policy.safetensors")
    meta = {"format": FORMAT, "max_slots": net.layout.max_slots, "k": net.layout.k, "hidden": net.hidden}
    (path / "policy.json").write_text(json.dumps(meta, indent=1))
    return path


def export_rl_module(rl_module: Any, path: str | Path) -> Path:
    """Write a trained ``esper_ray.simic.module.TamiyoSetModule``'s network for torch-only inference."""
    return export_net(rl_module.net, path)


class PolicyController:
    """A trained Tamiyo: observation -> an action of the policy's distribution over the legal ones.

    ``sample=True`` (the default) draws the action from that distribution with a generator seeded
    by ``seed``, as in training: PPO optimises the stochastic policy, whose most likely action at
    every single step can differ from what it does on average (a policy that germinates once per
    run, at a moment it cannot foresee, has "wait" as its most likely action at every step).
    ``sample=False`` takes the most likely legal action.
    """

    name = "policy"

    def __init__(self, net: SetPolicyNet, source: str = "", *, sample: bool = True, seed: int = 0):
        self.net = net.eval()
        self.layout = net.layout
        self.encoder = ObsEncoder(net.layout)
        self.source = source
        self.sample = sample
        self.rng = np.random.default_rng(seed)

    def episode(self, seed: int) -> PolicyController:
        """This policy with its own generator seeded ``seed`` (the same network): one per episode, so an
        episode's draws do not depend on which episodes were played before it."""
        return PolicyController(self.net, self.source, sample=self.sample, seed=seed)

    def space(self, obs: Observation) -> ActionSpace:
        """The action codec for the host ``obs`` describes (its slots, in host order)."""
        self.layout.check_fits(len(obs.slots), len(obs.candidates), f"the policy {self.source}".strip())
        return ActionSpace(tuple(s.name for s in obs.slots), self.layout.k, self.layout.max_slots)

    def logits(self, obs: Observation, legal: list[ControllerAction]) -> np.ndarray:
        """The policy's logits over the action space of ``obs``'s host (illegal actions very negative)."""
        mask = self.space(obs).mask(legal, obs.candidates).astype(np.float32)
        x = torch.from_numpy(self.encoder.encode(obs)).unsqueeze(0)
        with torch.no_grad():
            return self.net.policy_logits(x, torch.from_numpy(mask).unsqueeze(0))[0].numpy()

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        space = self.space(obs)
        mask = space.mask(legal, obs.candidates).astype(bool)
        logits = np.where(mask, self.logits(obs, legal), -np.inf)
        if not self.sample:
            return space.decode(int(np.argmax(logits)), obs.candidates)
        p = np.exp(logits - logits.max())
        return space.decode(int(self.rng.choice(len(p), p=p / p.sum())), obs.candidates)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]


# Far above any trained policy; they bound what a policy file can make us allocate.
_MAXIMA = {"max_slots": 64, "k": 256, "hidden": 4096}


def _positive_int(meta: dict[str, Any], key: str, path: Path) -> int:
    value = meta.get(key)
    if type(value) is not int or not 1 <= value <= _MAXIMA[key]:
        raise EsperError(
            f"policy at {path}: policy.json {key} must be an integer in [1, {_MAXIMA[key]}], got {value!r}"
        )
    return value


def load_policy(path: str | Path | None, *, sample: bool = True, seed: int = 0) -> PolicyController:
    """Load an exported policy folder (None: the shipped one) as a controller (``sample``, ``seed``: see
    PolicyController); one-line EsperError if missing, corrupt or mismatched."""
    path = SHIPPED_POLICY if path is None else Path(path)
    meta_file, weights_file = path / "policy.json", path / "policy.safetensors"
    if not meta_file.is_file() or not weights_file.is_file():
        raise EsperError(f"no exported policy at {path} (expected policy.json and policy.safetensors)")
    try:
        meta = json.loads(meta_file.read_text())
        tensors = load_file(weights_file)
    except (OSError, ValueError, SafetensorError) as err:
        raise EsperError(f"policy at {path} is unreadable: {error_line(err)}") from None
    if not isinstance(meta, dict):
        raise EsperError(f"policy at {path}: policy.json is not a JSON object")
    if meta.get("format") != FORMAT:
        raise EsperError(
            f"policy at {path} has format {meta.get('format')!r}, expected {FORMAT!r} (retrain it with esper-ray simic)"
        )
    layout = SetLayout(_positive_int(meta, "max_slots", path), _positive_int(meta, "k", path))
    net = SetPolicyNet(layout, _positive_int(meta, "hidden", path))
    try:
        net.load_state_dict(tensors)
    except RuntimeError as err:
        raise EsperError(f"policy at {path} is inconsistent with its policy.json: {error_line(err)}") from None
    return PolicyController(net, source=str(path), sample=sample, seed=seed)
