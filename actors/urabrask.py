"""Urabrask: the crucible that measures a built blueprint and judges its risk.

For one spec in one reference slot shape it measures, on its own device (CPU here, CUDA
when the actor was given a GPU):

- forward+backward latency, p50 and p95 over ``iters`` timed iterations;
- peak memory: measured on a GPU (``torch.cuda.max_memory_allocated`` during the step, less
  what the process held before it, plus the seed's parameters and input); on a CPU an *estimate*
  (parameters and their gradients, plus the input, the output and every tensor autograd
  saves for backward), and the report's ``reason`` says it is an estimate;
- FLOPs (``flops_per_example``) and the parameter count;

and runs three hazard probes on the seed after it has left identity (``gamma = 1``, as
after its first optimizer steps):

- gradient scaling: ``||dL/d out|| / ||dL/d in||`` for a random output gradient
  (1 = the seed neither amplifies nor damps gradients; far from 1 = explosion/vanishing);
- NaN/inf in the output or gradients under large inputs (``x * 1e4``);
- low-precision error: relative error of the body's output in bfloat16 against float32.

The risk band is ``high`` if any probe crosses a high threshold (such a blueprint is
rejected and never offered to a trainer), ``medium`` if one crosses a medium threshold,
else ``low``. ``measure()`` is a plain function; the actor only wraps it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import ray
import torch

from esper_ray.blueprints import BlueprintSpec, SeedModule, build_seed, flops_per_example
from esper_ray.contracts import BenchmarkReport
from esper_ray.util import error_line

log = logging.getLogger("esper_ray.actors.urabrask")

# Thresholds of the risk bands (|log10| of the gradient ratio, relative bf16 error).
GRAD_RATIO_MEDIUM = 10.0  # outside [1/10, 10]: medium
GRAD_RATIO_HIGH = 100.0  # outside [1/100, 100]: high
LOW_PRECISION_MEDIUM = 0.05
LOW_PRECISION_HIGH = 0.5
LARGE_INPUT_SCALE = 1e4


def probe_seed(spec: BlueprintSpec, slot_shape: tuple[int, ...], device: torch.device) -> SeedModule:
    """The seed with fixed weights, moved off identity (gamma = 1) so its body matters."""
    seed = build_seed(spec, slot_shape, generator_seed=0).to(device)
    with torch.no_grad():
        seed.gamma.fill_(1.0)
    return seed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(seed: SeedModule, h: torch.Tensor) -> None:
    """One forward+backward pass, as a trainer would run it."""
    seed.zero_grad(set_to_none=True)
    seed(h).square().mean().backward()


def latency_ms(seed: SeedModule, h: torch.Tensor, iters: int, warmup: int = 3) -> tuple[float, float]:
    """p50 and p95 of forward+backward wall time in milliseconds."""
    for _ in range(warmup):
        _step(seed, h)
    times = []
    for _ in range(iters):
        _sync(h.device)
        start = time.perf_counter()
        _step(seed, h)
        _sync(h.device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)]


def peak_memory_bytes(seed: SeedModule, h: torch.Tensor) -> tuple[int, bool]:
    """(peak bytes of one forward+backward, whether it was measured rather than estimated).

    On a GPU: the seed's parameters and the input, plus the most the step allocated on top of
    what was allocated before it (gradients, activations, the output). Whatever else the
    process holds on the device (a trainer's data, cuBLAS's workspace) is not the seed's and
    is left out, as the CPU estimate leaves it out.
    """
    if h.device.type == "cuda":
        seed.zero_grad(set_to_none=True)  # the gradients are counted when the step makes them
        _sync(h.device)
        before = torch.cuda.memory_allocated(h.device)
        torch.cuda.reset_peak_memory_stats(h.device)
        _step(seed, h)
        _sync(h.device)
        resident = sum(p.numel() * p.element_size() for p in seed.parameters()) + h.numel() * h.element_size()
        return int(torch.cuda.max_memory_allocated(h.device) - before + resident), True
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Count each storage once: a parameter saved by two ops is still one tensor.
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = seed(h)
    params = sum(p.numel() * p.element_size() for p in seed.parameters())
    io = (h.numel() + out.numel()) * h.element_size()
    return 2 * params + io + sum(saved.values()), False


def grad_norm_ratio(seed: SeedModule, h: torch.Tensor) -> float:
    """``||dL/d out|| / ||dL/d in||`` for a fixed random output gradient."""
    x = h.detach().clone().requires_grad_(True)
    out = seed(x)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (g_in,) = torch.autograd.grad(out, x, g_out)
    g_in_norm = float(g_in.norm())
    if not math.isfinite(g_in_norm):
        return 0.0  # an infinite input gradient: as far from 1 as it gets
    return float(g_out.norm()) / max(g_in_norm, 1e-30)


def nan_under_large_inputs(seed: SeedModule, h: torch.Tensor) -> bool:
    """Whether the output or any gradient goes NaN/inf on inputs scaled by 1e4."""
    seed.zero_grad(set_to_none=True)
    out = seed(h * LARGE_INPUT_SCALE)
    if not torch.isfinite(out).all():
        return True
    out.square().mean().backward()
    return any(p.grad is not None and not torch.isfinite(p.grad).all() for p in seed.parameters())


@torch.no_grad()
def low_precision_error(seed: SeedModule, h: torch.Tensor) -> float:
    """Relative L2 error of the body's output run in bfloat16 against float32.

    The body, not the whole seed: the residual ``h`` would hide the body's error.
    """
    exact = seed.body(h).float()
    low = copy.deepcopy(seed).to(torch.bfloat16).body(h.to(torch.bfloat16)).float()
    err = float((low - exact).norm()) / (float(exact.norm()) + 1e-8)
    return err if math.isfinite(err) else float("inf")


def risk_band(ratio: float, nan: bool, lowp: float) -> tuple[str, list[str]]:
    """("low" | "medium" | "high", the findings that set it)."""
    high, medium = [], []
    if nan:
        high.append(f"NaN/inf under inputs x{LARGE_INPUT_SCALE:g}")
    spread = max(ratio, 1e-30)
    spread = max(spread, 1 / spread)
    if spread > GRAD_RATIO_HIGH:
        high.append(f"gradient scale {ratio:.3g} (out/in) beyond x{GRAD_RATIO_HIGH:g}")
    elif spread > GRAD_RATIO_MEDIUM:
        medium.append(f"gradient scale {ratio:.3g} (out/in) beyond x{GRAD_RATIO_MEDIUM:g}")
    if lowp > LOW_PRECISION_HIGH:
        high.append(f"bfloat16 relative error {lowp:.3g} > {LOW_PRECISION_HIGH}")
    elif lowp > LOW_PRECISION_MEDIUM:
        medium.append(f"bfloat16 relative error {lowp:.3g} > {LOW_PRECISION_MEDIUM}")
    if high:
        return "high", high + medium
    return ("medium", medium) if medium else ("low", [])


def measure(
    spec: BlueprintSpec,
    slot_shape: tuple[int, ...],
    *,
    device: str | torch.device = "cpu",
    iters: int = 20,
    batch: int = 16,
) -> BenchmarkReport:
    """Benchmark and hazard-probe ``spec`` in a slot of ``slot_shape``; never raises on a bad seed."""
    device = torch.device(device)
    seed = probe_seed(spec, tuple(slot_shape), device)
    h = torch.randn((batch, *slot_shape), generator=torch.Generator().manual_seed(0)).to(device)
    params = sum(p.numel() for p in seed.parameters())
    p50, p95 = latency_ms(seed, h, iters)
    memory, measured = peak_memory_bytes(seed, h)
    ratio = grad_norm_ratio(seed, h)
    nan = nan_under_large_inputs(seed, h)
    lowp = low_precision_error(seed, h)
    risk, findings = risk_band(ratio, nan, lowp)
    notes = findings + ([] if measured else ["peak memory estimated (cpu): params+grads+io+saved activations"])
    return BenchmarkReport(
        blueprint_hash=spec.content_hash,
        device=str(device),
        params=params,
        flops=flops_per_example(seed),
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        peak_memory_bytes=memory,
        grad_norm_ratio=ratio,
        nan_under_large_inputs=nan,
        low_precision_error=lowp,
        risk=risk,
        passed=risk != "high",
        reason="; ".join(notes),
    )


def failed_report(spec: BlueprintSpec, device: str, why: str) -> BenchmarkReport:
    """The report of a blueprint whose benchmark itself crashed: high risk, not passed."""
    return BenchmarkReport(
        blueprint_hash=spec.content_hash,
        device=device,
        params=0,
        flops=0,
        latency_p50_ms=0.0,
        latency_p95_ms=0.0,
        peak_memory_bytes=0,
        grad_norm_ratio=0.0,
        nan_under_large_inputs=False,
        low_precision_error=0.0,
        risk="high",
        passed=False,
        reason=f"benchmark failed: {why}",
    )


def actor_device() -> torch.device:
    """CUDA when this actor was given a GPU that torch can see, else the CPU."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs
    return torch.device("cpu")


@ray.remote(max_concurrency=2)  # type: ignore[call-overload]  # Ray's stubs omit actor options
class Urabrask:
    """The benchmark actor, named ``urabrask``; Tezzeret hands it each built blueprint."""

    def __init__(self, iters: int = 20, batch: int = 16, threads: int = 1):
        from ray.util.metrics import Counter, Histogram

        torch.set_num_threads(threads)  # share the machine with the trainer, do not take it
        self.iters, self.batch = iters, batch
        self.device = actor_device()
        self._counts = {"benchmarks": 0, "passed": 0, "rejected": 0, "crashed": 0}
        self._benchmarks = Counter("esper_benchmarks", description="blueprints benchmarked")
        self._latency = Histogram(
            "esper_benchmark_latency_ms",
            description="forward+backward p50 of benchmarked blueprints",
            boundaries=[0.1, 0.3, 1, 3, 10, 30, 100],
        )

    def benchmark(self, spec_json: str, slot_shape: tuple[int, ...]) -> BenchmarkReport:
        """Measure one spec (already validated by Tezzeret) in ``slot_shape``."""
        spec = BlueprintSpec.from_json(spec_json)
        self._counts["benchmarks"] += 1
        self._benchmarks.inc()
        try:
            report = measure(spec, tuple(slot_shape), device=self.device, iters=self.iters, batch=self.batch)
        except Exception as err:  # a bad blueprint must not take the crucible down
            log.warning("benchmark of %s crashed: %s", spec.short_hash, err)
            self._counts["crashed"] += 1
            report = failed_report(spec, str(self.device), error_line(err))
        self._latency.observe(report.latency_p50_ms)
        if report.passed:
            self._counts["passed"] += 1
        else:
            self._counts["rejected"] += 1  # the metric: Tezzeret's esper_rejections{stage=benchmark}
        return report

    def stats(self) -> dict[str, Any]:
        return {**self._counts, "device": str(self.device)}

    def gpu_ids(self) -> list:
        return ray.get_gpu_ids()
