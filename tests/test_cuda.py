"""The GPU path, on a real GPU: training on CUDA, probe telemetry, checkpoints across devices,
Tezzeret's torch.compile, Urabrask's CUDA measurements and Ray placement on a GPU.

Every test is skipped where CUDA is not available (CI and the development machines have no
GPU). ``benchmarks/gpu_check.sh`` runs this file on a lent GPU machine, on its own: the Ray
test starts a local Ray that declares the machine's one GPU, and skips itself when another
Ray (the shared ``ray_session`` of conftest.py) is already up in this process.

``ESPER_RAY_TEST_DEVICE=cpu`` runs the same checks on the CPU, to try this file itself on a
machine without a GPU. The checks that only mean something on a GPU (the peak memory is
measured, not estimated; actors report a cuda device) then expect the CPU's answers.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from esper_ray.blueprints import STANDARD_BLUEPRINTS, BlueprintSpec, build_seed
from esper_ray.config import ActorResources, ActorsConfig, RunConfig, load_config
from esper_ray.contracts import ControllerAction, EsperError, Observation, SeedStage
from esper_ray.tasks import TaskData, load_task
from esper_ray.tolaria.checkpoint import load_checkpoint, save_checkpoint
from esper_ray.tolaria.telemetry import activation_stats, slot_signals
from esper_ray.tolaria.trainer import Trainer

DEVICE = torch.device(os.environ.get("ESPER_RAY_TEST_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"

pytestmark = pytest.mark.skipif(
    ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)

S = SeedStage
WAIT = ControllerAction.wait()
# One epoch of isolated training, a one-epoch (32-step) alpha ramp: a seed blends within a short run.
FAST = [
    "lifecycle.min_training_epochs=1",
    "lifecycle.min_holding_epochs=1",
    "lifecycle.embargo_epochs=1",
    "lifecycle.alpha.steps=32",
]
METRICS = ("train_loss", "val_loss", "val_acc", "test_acc")
# Blueprints in the reference slot shape Tezzeret builds and Urabrask benchmarks them in.
KIND_SHAPES = {"vector": (64,), "seq": (16, 32), "image": (16, 8, 8)}


# ---- helpers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data() -> TaskData:
    """MNIST-1D (default split) on the CPU; each Trainer moves its own copy to its device."""
    return load_task(RunConfig().task)


def make_cfg(*overrides: str, device: torch.device | str = DEVICE, fast: bool = True) -> RunConfig:
    return load_config(None, [*(FAST if fast else []), f"training.device={device}", *overrides])


class GrowAt:
    """A controller that germinates ``blueprint`` in ``slot`` at the decision point of ``epoch``."""

    name = "grow-at"

    def __init__(self, epoch: int, slot: str = "hidden0", blueprint: str = "residual_mlp"):
        self.epoch, self.slot, self.blueprint = epoch, slot, blueprint
        self.calls = 0

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        self.calls += 1
        if obs.global_.epoch != self.epoch:
            return WAIT
        action = ControllerAction.germinate(self.slot, self.blueprint)
        assert action in legal, f"{action} is not legal at epoch {self.epoch}: {legal}"
        return action

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]


def run_epochs(trainer: Trainer, controller: GrowAt, n: int) -> list[dict[str, Any]]:
    """``n`` epochs the way run_training does them: train, decide (observe + apply), record."""
    rows = []
    for _ in range(n):
        trainer.train_epoch()
        action = trainer.apply_decision(controller)
        rows.append(trainer.end_epoch(action))
    return rows


def metrics(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [{k: r[k] for k in METRICS} for r in rows]


def on(t: torch.Tensor) -> bool:
    return t.device.type == DEVICE.type


def assert_on_device(trainer: Trainer) -> None:
    """Host, seeds, optimizer state, snapshots and data all live on DEVICE."""
    assert trainer.device.type == DEVICE.type
    for name, t in [*trainer.host.named_parameters(), *trainer.host.named_buffers()]:
        assert on(t), f"{name} is on {t.device}"
    for split in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert on(getattr(trainer.data, split)), split
    assert on(trainer.probe_x) and on(trainer.probe_y)
    in_opt = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
    for slot in trainer.host.slots.values():
        if slot.seed is not None:
            assert all(on(p) for p in slot.seed.parameters()), f"seed in {slot.name} is not on {DEVICE}"
            assert {id(p) for p in slot.seed.parameters()} <= in_opt, f"seed in {slot.name} is not optimized"
    for p, state in trainer.opt.state.items():
        assert on(p)
        for k, v in state.items():
            # Adam keeps the scalar ``step`` on the CPU (not capturable, not fused); moments live with p.
            if torch.is_tensor(v) and v.dim() > 0:
                assert on(v), f"Adam {k} of a {tuple(p.shape)} parameter is on {v.device}"
    for slot, snap in trainer.state_dict()["blend_snapshots"].items():
        assert all(on(v) for v in snap.weights.values()), f"blend snapshot of {slot}"


def assert_finite(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        for k in ("train_loss", "val_loss", "val_acc"):
            assert math.isfinite(r[k]), f"epoch {r['epoch']}: {k} = {r[k]}"
        assert 0.0 <= r["val_acc"] <= 1.0


def probe(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each slot's input activation on the probe batch and the loss gradient there (as observe() does)."""
    host = trainer.host
    host.eval()
    x = trainer.probe_x.clone().requires_grad_(True)
    logits, acts = host.forward_with_activations(x)
    loss = F.cross_entropy(logits, trainer.probe_y)
    names = list(acts)
    grads = torch.autograd.grad(loss, [acts[n] for n in names], allow_unused=True)
    host.train()
    return (
        {n: a.detach() for n, a in acts.items()},
        {n: torch.zeros_like(acts[n]) if g is None else g for n, g in zip(names, grads, strict=True)},
    )


# ---- a. training on the GPU ------------------------------------------------------------------------
def test_training_on_cuda_keeps_everything_there_and_isolates_the_seed(data: TaskData) -> None:
    cfg = make_cfg("training.epochs=5")
    grower, plain = Trainer(cfg, data), Trainer(cfg, data)
    grow, wait = GrowAt(1), GrowAt(-1)
    assert_on_device(grower)

    rows = run_epochs(grower, grow, 1)  # the decision after epoch 1 germinates in hidden0
    plain_rows = run_epochs(plain, wait, 1)
    slot = grower.host.slots["hidden0"]
    assert slot.stage is S.TRAINING and slot.seed is not None
    assert [e["kind"] for e in grower.events] == ["germinate", "transition"]
    assert_on_device(grower)
    birth = {k: v.clone() for k, v in slot.seed.state_dict().items()}
    before = grower.host.host_state_dict()
    assert all(on(v) for v in before.values())

    # Isolation on one batch, with the seed moved far from identity (and put back after): the
    # host's output and every host gradient equal those with the slot ablated (the plain host),
    # and the seed gets a gradient of its own.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(6)
        for name, p in slot.seed.named_parameters():
            noise = torch.randn(p.shape, generator=gen).to(p.device)
            p.copy_(1.0 + 0.5 * noise if name == "gamma" else p + 0.3 * noise)
    x, y = grower.data.x_train[:100], grower.data.y_train[:100]
    out_seed, grads_seed, seed_grads = _out_and_grads(grower, slot, x, y)
    with slot.ablated():
        out_plain, grads_plain, _ = _out_and_grads(grower, slot, x, y)
    assert torch.equal(out_seed, out_plain)
    assert all(torch.equal(a, b) for a, b in zip(grads_seed, grads_plain, strict=True))
    assert all(g is not None and on(g) and torch.isfinite(g).all() for g in seed_grads)
    assert any(float(g.abs().sum()) > 0 for g in seed_grads), "the isolated seed got no gradient"
    slot.seed.load_state_dict(birth)

    # Epoch 2: the seed trains in isolation. The host computes and learns exactly what the same
    # host without the seed does (same data order, same Adam steps), bit for bit, on the GPU too.
    rows += run_epochs(grower, grow, 1)
    plain_rows += run_epochs(plain, wait, 1)
    assert metrics(rows) == metrics(plain_rows)
    mine, theirs = grower.host.host_state_dict(), plain.host.host_state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), f"host weight {k} moved differently with an isolated seed"
        assert not torch.equal(mine[k], before[k]) or k.endswith("num_batches_tracked"), f"{k} did not train"
    # ...while the seed learned from the loss: its weights left their birth values.
    assert 0.0 < slot.seed_grad_norm < math.inf
    assert any(not torch.equal(birth[k], v) for k, v in slot.seed.state_dict().items()), "the seed did not train"
    seed_params = list(slot.seed.parameters())
    assert all(p in grower.opt.state and on(grower.opt.state[p]["exp_avg"]) for p in seed_params)

    rows += run_epochs(grower, grow, 3)  # blending, holding: whatever the gates allow
    stages = [e["new"] for e in grower.events if e["slot"] == "hidden0"]
    print(f"\n[{DEVICE}] hidden0 went through {stages}; val_acc per epoch {[round(r['val_acc'], 3) for r in rows]}")
    assert S.TRAINING.name in stages
    assert_on_device(grower)
    assert_finite(rows)
    assert rows[-1]["val_acc"] > 0.2, "MNIST-1D MLP learned next to nothing in 5 epochs on the GPU"


def _out_and_grads(trainer: Trainer, slot, x: torch.Tensor, y: torch.Tensor):
    """Logits, every host parameter's gradient and the seed's gradients of one batch's loss."""
    host = trainer.host
    host.zero_grad(set_to_none=True)
    out = host(x)
    F.cross_entropy(out, y).backward()
    grads = [p.grad.clone() for p in host.host_parameters()]
    seed_grads = [None if p.grad is None else p.grad.clone() for p in slot.seed.parameters()]
    host.zero_grad(set_to_none=True)
    return out.detach(), grads, seed_grads


@pytest.mark.skipif(not ON_GPU, reason="compares the GPU with the CPU")
def test_cuda_and_cpu_runs_agree(data: TaskData) -> None:
    """The same run on both devices: the same lifecycle, and metrics equal up to float rounding."""
    rows, events = {}, {}
    for device in ("cuda", "cpu"):
        tr = Trainer(make_cfg("training.epochs=5", device=device), data)
        rows[device] = run_epochs(tr, GrowAt(1), 5)
        events[device] = [(e["epoch"], e["kind"], e["slot"], e.get("new", "")) for e in tr.events]
    assert events["cuda"] == events["cpu"]
    first_gpu, first_cpu = rows["cuda"][0], rows["cpu"][0]
    assert first_gpu["train_loss"] == pytest.approx(first_cpu["train_loss"], rel=1e-3)
    for gpu, cpu in zip(rows["cuda"], rows["cpu"], strict=True):
        assert gpu["train_loss"] == pytest.approx(cpu["train_loss"], rel=0.02), (gpu, cpu)
        assert abs(gpu["val_acc"] - cpu["val_acc"]) <= 0.03, (gpu, cpu)


# ---- b. probe telemetry on the GPU -------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "blueprint"), [("mlp", "residual_mlp"), ("cnn1d", "conv1d")])
def test_probe_telemetry_on_cuda_equals_the_cpu_computation(data: TaskData, kind: str, blueprint: str) -> None:
    # The default lifecycle: the seed stays in TRAINING (isolated) for the whole test.
    cfg = make_cfg("training.epochs=4", f"host.kind={kind}", fast=False)
    tr = Trainer(cfg, data)
    tr.train_epoch()
    tr.apply(ControllerAction.germinate("hidden0", blueprint))
    tr.train_epoch()
    assert tr.host.slots["hidden0"].stage is S.TRAINING
    obs = tr.observe()  # the first observation: measured now, on this model
    acts, grads = probe(tr)
    assert all(on(a) for a in acts.values()) and all(on(g) for g in grads.values())
    cpu_acts = {n: a.cpu() for n, a in acts.items()}
    cpu_grads = {n: g.cpu() for n, g in grads.items()}
    reference = slot_signals(cpu_acts, cpu_grads)
    # GPU tensors go into the kernel fit as they are and give the same numbers (today the fit
    # moves them to the CPU first, so they are in fact equal bit for bit).
    direct = slot_signals(acts, grads)
    for name, (predictability, deficit) in reference.items():
        assert direct[name][0] == pytest.approx(predictability, abs=1e-5), name
        assert direct[name][1] == pytest.approx(deficit, abs=1e-5), name

    seen = {s.name: s for s in obs.slots}
    assert set(seen) == set(reference)
    for name, (predictability, deficit) in reference.items():
        got = seen[name]
        stats = activation_stats(cpu_acts[name])
        where = f"{kind} slot {name}"
        assert got.grad_predictability == pytest.approx(predictability, abs=1e-5), where
        assert got.grad_deficit == pytest.approx(deficit, abs=1e-5), where
        assert got.act_mean == pytest.approx(stats["act_mean"], rel=1e-4, abs=1e-6), where
        assert got.act_std == pytest.approx(stats["act_std"], rel=1e-4, abs=1e-6), where
        assert got.act_dead_frac == pytest.approx(stats["act_dead_frac"], abs=1e-6), where
        assert got.act_effective_rank == pytest.approx(stats["act_effective_rank"], rel=1e-4, abs=1e-6), where
        rms = float(cpu_grads[name].square().mean().sqrt()) * len(tr.probe_x)
        assert got.grad_rms == pytest.approx(rms, rel=1e-4), where
        assert 0.0 <= got.grad_predictability <= 1.0 and -1.0 <= got.grad_deficit <= 1.0, where
    assert any(s.grad_predictability > 0 for s in obs.slots), "every kernel fit read 0: did it run?"

    # The same model on the CPU (a twin with the GPU host's weights): same activations and
    # gradients up to float rounding, and so the same signals up to a small tolerance. cuDNN runs
    # convolutions in TF32 by default (measured on an H200: the cnn1d input gradient then differs
    # from the CPU's by more than 1e-3 relative), so the GPU side of this comparison runs in full
    # float32.
    twin = Trainer(make_cfg("training.epochs=4", f"host.kind={kind}", device="cpu", fast=False), data)
    twin.apply(ControllerAction.germinate("hidden0", blueprint))
    twin.host.load_state_dict({k: v.cpu() for k, v in tr.host.state_dict().items()})
    twin_acts, twin_grads = probe(twin)
    twin_signals = slot_signals(twin_acts, twin_grads)
    if DEVICE.type == "cuda":
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
            acts, grads = probe(tr)
        cpu_acts = {n: a.cpu() for n, a in acts.items()}
        cpu_grads = {n: g.cpu() for n, g in grads.items()}
        reference = slot_signals(cpu_acts, cpu_grads)
    for name in acts:
        assert torch.allclose(twin_acts[name], cpu_acts[name], rtol=1e-4, atol=1e-5), name
        scale = float(cpu_grads[name].abs().max())
        assert torch.allclose(twin_grads[name], cpu_grads[name], rtol=1e-3, atol=1e-4 * scale), name
        assert twin_signals[name][0] == pytest.approx(reference[name][0], abs=2e-3), name
        assert twin_signals[name][1] == pytest.approx(reference[name][1], abs=2e-3), name


# ---- c. checkpoints -------------------------------------------------------------------------------
def test_checkpoint_resumes_exactly_on_cuda_and_moves_between_devices(
    data: TaskData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg("training.epochs=6")
    tr, grow = Trainer(cfg, data), GrowAt(1)
    run_epochs(tr, grow, 3)  # germinated, trained in isolation, blending: a host snapshot is kept
    assert tr.host.slots["hidden0"].stage is not S.DORMANT
    ckpt = save_checkpoint(tr, tmp_path / "ckpt", grow.state_dict())
    on_disk = load_file(ckpt / "model.safetensors")  # GPU tensors written as they are
    for k, v in tr.host.state_dict().items():
        assert torch.equal(on_disk[k], v.cpu()), k
    rest = run_epochs(tr, grow, 3)
    final = tr.host.state_dict()

    # Exact resume on the same device.
    resumed, state = load_checkpoint(ckpt, data)
    assert_on_device(resumed)
    again = GrowAt(1)
    again.load_state_dict(state)
    assert metrics(run_epochs(resumed, again, 3)) == metrics(rest)
    for k, v in resumed.host.state_dict().items():
        assert torch.equal(v, final[k]), f"{k} differs after resuming on {DEVICE}"

    if ON_GPU:
        # The checkpoint keeps its config's device: where CUDA is missing it refuses in one line.
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: False)
            with pytest.raises(EsperError, match="CUDA is not available"):
                load_checkpoint(ckpt, data)

    # load_checkpoint(device=...) (`esper-ray train --resume RUN --device cpu`) resumes the same
    # checkpoint on the other device and continues the run up to float rounding.
    other = "cpu" if ON_GPU else DEVICE.type
    there, state = load_checkpoint(ckpt, data, device=other)
    assert all(p.device.type == other for p in there.host.parameters())
    assert all(t.device.type == other for s in there.opt.state.values() for t in s.values() if t.dim() > 0)
    cont = GrowAt(1)
    cont.load_state_dict(state)
    moved_rows = run_epochs(there, cont, 3)
    assert_finite(moved_rows)
    for a, b in zip(moved_rows, rest, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.02), (a, b)
        assert abs(a["val_acc"] - b["val_acc"]) <= 0.03, (a, b)

    # And the reverse: a CPU run's checkpoint resumes on the GPU.
    cpu_tr = Trainer(make_cfg("training.epochs=6", device="cpu"), data)
    cpu_grow = GrowAt(1)
    run_epochs(cpu_tr, cpu_grow, 3)
    cpu_ckpt = save_checkpoint(cpu_tr, tmp_path / "ckpt-cpu", cpu_grow.state_dict())
    cpu_rest = run_epochs(cpu_tr, cpu_grow, 2)
    up, state = load_checkpoint(cpu_ckpt, data, device=DEVICE.type)
    assert_on_device(up)
    up_grow = GrowAt(1)
    up_grow.load_state_dict(state)
    up_rows = run_epochs(up, up_grow, 2)
    for a, b in zip(up_rows, cpu_rest, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.02), (a, b)
        assert abs(a["val_acc"] - b["val_acc"]) <= 0.03, (a, b)


def test_distillation_student_on_cuda_with_its_teacher_on_the_cpu(data: TaskData, tmp_path: Path) -> None:
    """The teacher is built on the CPU data; the student trains on the GPU, and its slot gaps
    (teacher stages on the CPU, student activations on the GPU) equal a CPU student's."""
    from esper_ray.tolaria import distill

    distill.clear_memory_cache()
    dcfg = distill.DistillConfig(
        teacher={"kind": "cnn1d", "hidden": [8, 16], "slots": []},
        teacher_epochs=3,
        cache_dir=str(tmp_path / "teachers"),
        gap_probe=256,
    )
    cfg = make_cfg("training.epochs=4", "training.probe_size=256")
    loss = distill.make_distillation(dcfg, data, cfg)
    student = Trainer(cfg, data, loss_fn=loss)
    rows = run_epochs(student, GrowAt(1, "input", "conv1d"), 2)
    assert_finite(rows)
    assert_on_device(student)
    gaps = student.observe().distill
    assert set(gaps) == set(student.host.slots) and all(math.isfinite(v) and v >= 0 for v in gaps.values()), gaps

    twin = Trainer(make_cfg("training.epochs=4", "training.probe_size=256", device="cpu"), data, loss_fn=loss)
    twin.apply(ControllerAction.germinate("input", "conv1d"))
    twin.host.load_state_dict({k: v.cpu() for k, v in student.host.state_dict().items()})
    for name, slot in student.host.slots.items():  # the same stages (and alpha) as the GPU student
        twin.host.slots[name].load_lifecycle_state(slot.lifecycle_state(), twin.host.slots[name].seed)
    twin.host.refresh()
    on_cpu = loss.slot_gaps(twin)
    print(f"\n[distill] slot gaps on {DEVICE}: {gaps}; the CPU twin's: {on_cpu}")
    assert on_cpu == pytest.approx(loss.slot_gaps(student), abs=1e-4)


# ---- d. Tezzeret: torch.compile on the GPU ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["residual_mlp", "conv1d"])
def test_tezzeret_compiles_seeds_on_cuda(name: str) -> None:
    pytest.importorskip("ray")  # actors.tezzeret is a Ray module
    from actors.tezzeret import compile_seed

    spec = STANDARD_BLUEPRINTS[name]
    shape = KIND_SHAPES[spec.kind]
    info = compile_seed(spec, shape, enabled=True, device=DEVICE)
    print(
        f"\n[compile] {name} {shape} on {DEVICE}: mode={info.mode} in {info.seconds:.1f} s, "
        f"{len(info.artifacts)} bytes of cache artifacts, error={info.error!r}"
    )
    # Independently of compile_seed's own check: the compiled seed against eager, forward and backward.
    torch._dynamo.reset()
    seed = build_seed(spec, shape, generator_seed=0).to(DEVICE)
    with torch.no_grad():
        seed.gamma.fill_(1.0)
    h = torch.randn((8, *shape), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    compiled = torch.compile(seed, dynamic=False, fullgraph=True)
    out = compiled(h)
    out.square().mean().backward()
    compiled_grads = [p.grad.clone() for p in seed.parameters()]
    seed.zero_grad(set_to_none=True)
    expected = seed(h)
    expected.square().mean().backward()
    diff = float((out.detach() - expected.detach()).abs().max())
    print(
        f"[compile] {name}: max |compiled - eager| = {diff:.3g} "
        f"(cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
        f"matmul precision={torch.get_float32_matmul_precision()})"
    )
    assert torch.allclose(out.detach(), expected.detach(), rtol=1e-4, atol=1e-5), f"max diff {diff:.3g}"
    for p, g in zip(seed.parameters(), compiled_grads, strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-3, atol=1e-5)
    assert info.mode == "compiled", f"compile_seed fell back to eager on {DEVICE}: {info.error}"
    assert info.seconds > 0


# ---- e. Urabrask on the GPU --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["residual_mlp", "conv1d", "conv2d"])
def test_urabrask_measures_on_cuda(name: str) -> None:
    pytest.importorskip("ray")
    from actors.urabrask import measure

    spec = STANDARD_BLUEPRINTS[name]
    report = measure(spec, KIND_SHAPES[spec.kind], device=DEVICE, iters=20)
    print(
        f"\n[urabrask] {name} on {report.device}: p50 {report.latency_p50_ms:.3f} ms, "
        f"p95 {report.latency_p95_ms:.3f} ms, peak {report.peak_memory_bytes:,} B, risk {report.risk} "
        f"{report.reason!r}"
    )
    assert report.device == str(DEVICE)
    assert 0.0 < report.latency_p50_ms <= report.latency_p95_ms
    assert report.peak_memory_bytes > 0
    assert ("estimated" in report.reason) is not ON_GPU  # measured on a GPU, estimated on a CPU
    assert report.passed and report.risk != "high", report.reason


def test_urabrask_peak_memory_is_the_seeds_not_the_whole_process() -> None:
    """Memory the process holds for other reasons (here 64 MiB of it) is not charged to the seed."""
    pytest.importorskip("ray")
    from actors.urabrask import latency_ms, peak_memory_bytes, probe_seed

    spec = STANDARD_BLUEPRINTS["residual_mlp"]
    decoy = torch.empty(64 * 2**20, dtype=torch.uint8, device=DEVICE)
    seed = probe_seed(spec, (64,), DEVICE)
    h = torch.randn((16, 64), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    latency_ms(seed, h, iters=2)
    peak, measured = peak_memory_bytes(seed, h)
    resident = sum(p.numel() * p.element_size() for p in seed.parameters()) + h.numel() * h.element_size()
    print(f"\n[urabrask] residual_mlp peak {peak:,} B (measured={measured}); params + input {resident:,} B")
    assert measured is ON_GPU
    assert resident <= peak < 16 * 2**20
    del decoy


# ---- f. Ray: the services placed on the GPU ---------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_ray():
    """A local Ray of this module's own that declares one GPU (the lent machine has one).

    Not the shared ``ray_session`` (2 CPUs, 4 logical GPUs): when that, or any other Ray, is
    already up in this process this module cannot start its own, and the test skips.
    """
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process; run tests/test_cuda.py on its own")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False, namespace="esper-ray-cuda")
    yield ray
    ray.shutdown()


def test_tezzeret_and_urabrask_share_the_gpu_and_compile_and_benchmark_on_it(gpu_ray, tmp_path: Path) -> None:
    from actors.launch import start_pipeline, stop_pipeline
    from actors.urza import READY, REJECTED

    ray = gpu_ray
    on_gpu = ActorResources(num_cpus=1, num_gpus=0.5)
    cfg = ActorsConfig(
        namespace=f"cuda-{uuid.uuid4().hex[:8]}",
        storage=str(tmp_path / "urza"),
        compile=True,
        urza=ActorResources(num_cpus=0.5),
        tezzeret=on_gpu,
        urabrask=on_gpu,
    )
    # A whole GPU each does not fit one GPU: refused before anything starts.
    whole = ActorResources(num_cpus=1, num_gpus=1)
    greedy = cfg.model_copy(update={"tezzeret": whole, "urabrask": whole})
    with pytest.raises(EsperError, match=r"ask for 2 GPUs together but only 1 are free"):
        start_pipeline(greedy, with_karn=False, seed_standard=False)
    with pytest.raises(ValueError):
        ray.get_actor("urza", namespace=cfg.namespace)

    pipeline = start_pipeline(cfg, with_karn=False, seed_standard=False)
    try:
        placed = {name: ray.get(h.gpu_ids.remote(), timeout=90) for name, h in pipeline.handles().items()}
        stats = {name: ray.get(h.stats.remote(), timeout=60) for name, h in pipeline.handles().items()}
        print(f"\n[ray] gpu ids {placed}; devices { {n: s.get('device') for n, s in stats.items()} }")
        assert placed["urza"] == []
        assert len(placed["tezzeret"]) == 1 and placed["tezzeret"] == placed["urabrask"]  # the one GPU, shared
        expected = "cuda:0" if ON_GPU else "cpu"
        assert stats["tezzeret"]["device"] == expected and stats["urabrask"]["device"] == expected
        assert stats["tezzeret"]["compile"] is True

        spec = STANDARD_BLUEPRINTS["residual_mlp"]  # test d compiled it: Tezzeret can hit the disk cache
        key = ray.get(pipeline.tezzeret.submit.remote(spec.to_json()), timeout=60)
        assert key == spec.content_hash
        row, started = None, time.monotonic()
        while time.monotonic() - started < 180:
            row = ray.get(pipeline.urza.entry.remote(key), timeout=30)
            if row is not None and row.status in (READY, REJECTED):
                break
            time.sleep(0.25)
        waited = time.monotonic() - started
        print(f"[ray] {spec.name} came back after {waited:.1f} s: {str(row)[:1500]}")
        assert row is not None and row.status == READY, row
        assert row.compile_mode == "compiled", f"Tezzeret fell back to eager: {row.compile_error}"
        report = row.report
        assert report is not None
        assert report.device == expected
        assert 0.0 < report.latency_p50_ms <= report.latency_p95_ms
        assert report.peak_memory_bytes > 0
        assert ("estimated" in report.reason) is not ON_GPU
        assert BlueprintSpec.from_json(row["spec_json"]).content_hash == key
    finally:
        stop_pipeline(pipeline, kill=True)
