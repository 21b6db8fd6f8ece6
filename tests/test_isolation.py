"""Isolation while TRAINING holds for any seed output: NaN and inf included.

The host's output and gradients are bit for bit those of the plain host, while the seed still
receives the global loss's gradient at the slot (the cotangent of the slot's output).
"""

from __future__ import annotations

import pytest
import torch

from esper_ray.contracts import SeedStage
from esper_ray.hosts import HostConfig, MorphoHost, build_host

pytestmark = pytest.mark.usefixtures("torch_seed")

INPUT_SHAPES = {"mlp": (40,), "cnn1d": (40,), "cnn2d": (1, 8, 8)}
DEFAULT_BP = {"vector": "residual_mlp", "seq": "conv1d", "image": "conv2d"}


def _host(kind: str, slots="all") -> MorphoHost:
    return build_host(HostConfig(kind=kind, slots=slots), INPUT_SHAPES[kind], 10)


def _poison(seed: torch.nn.Module, value: float) -> None:
    """Make the seed's output non-finite: every parameter becomes ``value`` (NaN or inf)."""
    with torch.no_grad():
        for p in seed.parameters():
            p.fill_(value)


def _out_and_grads(model: torch.nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    return out.detach(), [x.grad.clone()] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", list(INPUT_SHAPES))
@pytest.mark.parametrize("slot_name", ["input", "hidden0", "hidden1"])
def test_training_seed_with_non_finite_output_leaves_host_bit_for_bit(kind: str, slot_name: str, value: float) -> None:
    host = _host(kind)
    plain = _host(kind, slots=[])
    plain.load_state_dict(host.host_state_dict(), strict=True)
    slot = host.slot(slot_name)
    slot = host.germinate(slot_name, DEFAULT_BP[slot.kind], generator_seed=5)
    slot.transition(SeedStage.TRAINING)
    _poison(slot.seed, value)

    captured: dict[str, torch.Tensor] = {}

    def keep(_module, inputs, output):
        seed_out = slot.seed(inputs[0].detach())
        captured["h"], captured["out"], captured["seed"] = inputs[0], output, seed_out
        output.retain_grad()

    handle = slot.register_forward_hook(keep)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((6, *INPUT_SHAPES[kind]), generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    out_h, grads_h = _out_and_grads(host, list(host.host_parameters()), x, y)
    handle.remove()
    out_p, grads_p = _out_and_grads(plain, list(plain.host_parameters()), x, y)

    assert not torch.isfinite(captured["seed"]).all(), "the poisoned seed should compute non-finite values"
    assert torch.isfinite(out_h).all()
    assert torch.equal(out_h, out_p)
    assert torch.equal(captured["out"], captured["h"])
    for gh, gp in zip(grads_h, grads_p, strict=True):
        assert torch.isfinite(gh).all()
        assert torch.equal(gh, gp)
    # The seed is still in the graph: every parameter got a gradient (non-finite, as its output is).
    for p in slot.seed.parameters():
        assert p.grad is not None


def test_isolated_seed_receives_the_slot_output_gradient_exactly() -> None:
    """The seed's gradient equals ``d seed(h) / d params`` under the slot output's cotangent."""
    host = _host("mlp")
    slot = host.germinate("hidden0", "residual_mlp", generator_seed=5)
    slot.transition(SeedStage.TRAINING)
    with torch.no_grad():
        for p in slot.seed.parameters():
            p.add_(0.3 * torch.randn_like(p))
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, inputs, output):
        captured["h"], captured["out"] = inputs[0], output
        output.retain_grad()

    handle = slot.register_forward_hook(keep)
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    host.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(host(x), y).backward()
    handle.remove()
    params = list(slot.seed.parameters())
    expected = torch.autograd.grad(slot.seed(captured["h"].detach()), params, captured["out"].grad)
    for p, e in zip(params, expected, strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0
        assert torch.allclose(p.grad, e, rtol=1e-6, atol=1e-8)


def test_isolated_output_takes_in_place_ops() -> None:
    """A layer after the slot may modify its output in place (the output is a fresh tensor)."""
    host = _host("mlp")
    slot = host.germinate("hidden0", "residual_mlp", generator_seed=5)
    slot.transition(SeedStage.TRAINING)
    h = torch.randn(4, 64, requires_grad=True)
    out = slot(h)
    assert out.data_ptr() != h.data_ptr()
    out.relu_().sum().backward()
    assert torch.equal(h.grad, (h > 0).float())
