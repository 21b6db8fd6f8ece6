"""Contract checks: what a built blueprint must satisfy before any host may use it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esper_ray.blueprints.builder import SeedModule, build_seed
from esper_ray.blueprints.spec import BlueprintSpec
from esper_ray.contracts import EsperError
from esper_ray.util import error_line


@dataclass(frozen=True)
class ContractResult:
    """The outcome of checking one spec in one slot shape."""

    ok: bool
    reason: str
    params: int = 0


def check_contract(
    spec: BlueprintSpec,
    slot_shape: tuple[int, ...],
    *,
    max_params: int | None = None,
    batch: int = 8,
) -> ContractResult:
    """Build ``spec`` for ``slot_shape`` and check its contract; never raises on bad specs.

    The contract: it builds within the parameter budget; its output has the slot's
    shape; it is function-preserving at birth (output == input, exactly); outputs are
    finite; and once it leaves identity, the loss's gradient reaches every parameter.
    """
    try:
        seed = build_seed(spec, slot_shape, max_params=max_params, generator_seed=0)
    except EsperError as err:
        return ContractResult(False, str(err))
    except (RuntimeError, ValueError) as err:  # torch refusing a shape we did not foresee
        return ContractResult(False, f"build failed: {error_line(err)}")
    params = sum(p.numel() for p in seed.parameters())
    gen = torch.Generator().manual_seed(0)
    h = torch.randn((batch, *slot_shape), generator=gen)
    reason = _check_module(seed, h)
    return ContractResult(reason == "", reason, params)


def _check_module(seed: SeedModule, h: torch.Tensor) -> str:
    with torch.no_grad():
        out = seed(h)
    if out.shape != h.shape:
        return f"output shape {tuple(out.shape)} != input shape {tuple(h.shape)}"
    if not torch.equal(out, h):
        return "not function-preserving at birth (output differs from input)"
    # Leave identity (as after a first optimizer step) and check gradients reach everything.
    with torch.no_grad():
        seed.gamma.fill_(1.0)
    out = seed(h)
    if not torch.isfinite(out).all():
        return "non-finite output on a standard normal input"
    out.square().mean().backward()
    total = 0.0
    for name, param in seed.named_parameters():
        # Connected and finite; a zero gradient at one parameter can be a dead ReLU on this
        # probe batch, so only an all-zero gradient counts as disconnected.
        if param.grad is None or not torch.isfinite(param.grad).all():
            return f"no finite gradient reaches parameter {name}"
        total += float(param.grad.abs().sum())
    if total == 0.0:
        return "the loss's gradient is zero at every parameter"
    return ""
