"""Tests of esper_ray.tolaria.continual (the bounded sample, rehearsal, the gate objective, EWC,
absorbing seeds, the accuracy matrix) and of gated seeds inside a Trainer: the lifecycle, cull
rollback, checkpoints (safetensors) and lineage hold for them as for lerp seeds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from esper_ray.blueprints import STANDARD_BLUEPRINTS, LocalCatalogue
from esper_ray.config import RunConfig
from esper_ray.contracts import ControllerAction, EsperError, SeedStage
from esper_ray.kasmina import gate_logits, gated_blueprint, is_gated
from esper_ray.tasks import TaskData
from esper_ray.tolaria.checkpoint import load_checkpoint, save_checkpoint
from esper_ray.tolaria.continual import (
    MAX_SAMPLE,
    AccuracyMatrix,
    BoundedSample,
    FisherPenalty,
    GateRehearsal,
    Rehearsal,
    absorb_fossilized,
)
from esper_ray.tolaria.trainer import Trainer

pytestmark = pytest.mark.usefixtures("torch_seed")


def toy_task(seed: int, n: int = 240, d: int = 8, name: str = "toy", shift: float = 0.0) -> TaskData:
    """A linearly separable 3-class task (optionally shifted in input space); disjoint splits."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, 3, generator=gen)
    x = torch.randn(n, d, generator=gen) + shift
    y = (x @ w).argmax(1)
    a, b = n // 2, 3 * n // 4
    return TaskData(name, x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], (d,), 3)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


# ---- the bounded sample -----------------------------------------------------------------------------
def test_bounded_sample_is_from_the_training_split_only_and_fixed_by_its_seed() -> None:
    data = toy_task(0)
    sample = BoundedSample.from_task(data, 20, seed=3)
    assert len(sample) == 20 == len(set(sample.index.tolist()))
    assert torch.equal(sample.x, data.x_train[sample.index]) and torch.equal(sample.y, data.y_train[sample.index])
    assert not _rows(sample.x) & (_rows(data.x_test) | _rows(data.x_val))
    again = BoundedSample.from_task(data, 20, seed=3)
    assert torch.equal(again.index, sample.index)
    assert not torch.equal(BoundedSample.from_task(data, 20, seed=4).index, sample.index)


def test_bounded_sample_never_grows_past_its_bound_and_stays_uniform() -> None:
    data = toy_task(1, n=400)
    sample = BoundedSample(10, seed=0)
    sizes = []
    for _ in range(5):  # the same run offering its training data again and again
        sample.offer(data.x_train, data.y_train)
        sizes.append(len(sample))
    assert sizes == [10] * 5 and sample.seen == 5 * len(data.x_train)
    assert _rows(sample.x) <= _rows(data.x_train)
    # Reservoir sampling: over many draws, every training row is about as likely to be kept.
    counts = torch.zeros(len(data.x_train))
    for s in range(300):
        kept = BoundedSample.from_task(data, 10, seed=s)
        counts[kept.index] += 1
    expected = 300 * 10 / len(data.x_train)
    assert abs(float(counts.mean()) - expected) < 1e-6
    assert float(counts.max()) < 6 * expected  # no row is kept far more often than its share


@pytest.mark.parametrize("size", [0, -1, MAX_SAMPLE + 1, 2.5, True])
def test_sample_size_out_of_range_is_one_line(size) -> None:
    with pytest.raises(EsperError, match="out of range") as err:
        BoundedSample(size)
    assert "\n" not in str(err.value)


def test_sample_larger_than_the_training_split_is_refused() -> None:
    data = toy_task(0)
    with pytest.raises(EsperError, match="out of range: task toy has 120 training examples"):
        BoundedSample.from_task(data, 121)


def test_stability_script_rejects_a_sample_size_out_of_range_in_one_line() -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "benchmarks/stability.py", "--sample", "0"], capture_output=True, text=True, cwd=repo
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"stability.py: error: sample size 0 out of range [1, {MAX_SAMPLE}]"]


# ---- losses ---------------------------------------------------------------------------------------
def test_rehearsal_is_the_cross_entropy_of_the_concatenated_batch() -> None:
    data = toy_task(0)
    sample = BoundedSample.from_task(data, 30, seed=0)
    host = torch.nn.Linear(8, 3)
    loss = Rehearsal(host, sample, batch=7, seed=3)
    x, y = data.x_train[:5], data.y_train[:5]
    j = torch.randint(30, (7,), generator=torch.Generator().manual_seed(3))  # what Rehearsal draws first
    expected = F.cross_entropy(host(torch.cat([x, sample.x[j]])), torch.cat([y, sample.y[j]]))
    assert torch.allclose(loss(host(x), y, torch.arange(5)), expected)


def test_fisher_penalty_is_zero_at_the_anchor_and_matches_its_formula() -> None:
    data = toy_task(0)
    model = torch.nn.Linear(8, 3)
    params = list(model.parameters())
    ewc = FisherPenalty(model, params, data.x_train[:50], data.y_train[:50], lam=10.0)
    # The empirical Fisher: mean over examples of the squared per-example gradient.
    fisher = [torch.zeros_like(p) for p in params]
    for i in range(50):
        grads = torch.autograd.grad(F.cross_entropy(model(data.x_train[i : i + 1]), data.y_train[i : i + 1]), params)
        for f, g in zip(fisher, grads, strict=True):
            f += g.square() / 50
    for f, e in zip(ewc.fisher, fisher, strict=True):
        assert torch.allclose(f, e, rtol=1e-5, atol=1e-9)
    assert float(ewc.penalty().detach()) == 0.0
    with torch.no_grad():
        model.weight.add_(0.1)
    expected = 5.0 * float((fisher[0] * 0.01).sum())
    assert float(ewc.penalty().detach()) == pytest.approx(expected, rel=1e-4)
    x, y = data.x_train[:4], data.y_train[:4]
    assert float(ewc(model(x), y, torch.arange(4)).detach()) == pytest.approx(
        float(F.cross_entropy(model(x), y)) + expected, rel=1e-5
    )
    with pytest.raises(EsperError, match="lambda"):
        FisherPenalty(model, params, data.x_train[:5], data.y_train[:5], lam=-1.0)


# ---- the accuracy matrix ----------------------------------------------------------------------------
def test_accuracy_matrix_of_a_two_task_toy_run_equals_its_definition() -> None:
    """Pretrain on task 0, adapt to task 1 then task 2 (a two-task sequence after the original):
    every entry is the accuracy measured at that moment, every figure its formula."""
    tasks = [toy_task(10, name="t0"), toy_task(11, name="t1", shift=1.0), toy_task(12, name="t2", shift=-1.0)]
    model = torch.nn.Linear(8, 3)

    def acc(t: TaskData) -> float:
        with torch.no_grad():
            return float((model(t.x_test).argmax(1) == t.y_test).float().mean())

    def train(t: TaskData, steps: int = 60) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(t.x_train), t.y_train).backward()
            opt.step()

    train(tasks[0])
    m = AccuracyMatrix()
    r00 = acc(tasks[0])
    m.start(r00)
    b1 = acc(tasks[1])
    train(tasks[1])
    r10, r11 = acc(tasks[0]), acc(tasks[1])
    m.adapt(b1, [acc(t) for t in tasks[:2]])
    b2 = acc(tasks[2])
    train(tasks[2])
    r20, r21, r22 = (acc(t) for t in tasks)
    m.adapt(b2, [acc(t) for t in tasks])
    assert m.rows == [[r00], [r10, r11], [r20, r21, r22]] and m.before == [b1, b2] and m.tasks == 2
    assert len({r00, r20, r11, r21}) > 1  # the run did move (a matrix of equal numbers would prove little)
    assert m.backward_transfer() == [r20 - r00, r21 - r11]
    assert m.gains() == [r11 - b1, r22 - b2]
    got = m.metrics()
    assert got["average_accuracy"] == pytest.approx((r20 + r21 + r22) / 3)
    assert got["bwt_original"] == pytest.approx(r20 - r00)
    assert got["degradation"] == pytest.approx((r00 - r20) / r00)
    assert got["bwt_new"] == pytest.approx(r21 - r11)
    assert got["new_gain"] == pytest.approx(((r11 - b1) + (r22 - b2)) / 2)
    assert got["new_before"] == pytest.approx((b1 + b2) / 2) and got["new_after"] == pytest.approx((r11 + r22) / 2)


def test_accuracy_matrix_rejects_a_row_of_the_wrong_length() -> None:
    m = AccuracyMatrix()
    with pytest.raises(EsperError):
        m.adapt(0.1, [0.5])  # not started
    m.start(0.5)
    with pytest.raises(EsperError, match="row 1 needs 2 accuracies"):
        m.adapt(0.1, [0.5])
    m.adapt(0.1, [0.5, 0.6])
    assert math.isnan(m.metrics()["bwt_new"])  # no earlier new task yet


# ---- gated seeds in a trainer -------------------------------------------------------------------------
def _cfg(**training) -> RunConfig:
    return RunConfig(
        name="gated",
        host={"kind": "mlp", "hidden": [16, 16], "slots": "all"},
        training={"epochs": 50, "seed": 0, "threads": 1, "batch_size": 40, **training},
        lifecycle={"min_training_epochs": 1, "min_holding_epochs": 1, "min_improvement": -1.0, "alpha": {"steps": 3}},
        blueprints={"names": ["residual_mlp"]},
        controller={"kind": "static"},
        lineage={"enabled": False},
    )


GATED = gated_blueprint(STANDARD_BLUEPRINTS["residual_mlp"])


def _trainer(data: TaskData, **training) -> Trainer:
    catalogue = LocalCatalogue([STANDARD_BLUEPRINTS["residual_mlp"], GATED])
    return Trainer(_cfg(**training), data, catalogue=catalogue, run_id="gated-test")


def _run(trainer: Trainer, epochs: int) -> None:
    for _ in range(epochs):
        trainer.train_epoch()
        trainer.end_epoch(ControllerAction.wait())


def test_a_gated_seed_lives_through_the_lifecycle_and_its_lineage_names_it() -> None:
    trainer = _trainer(toy_task(0))
    trainer.apply(ControllerAction.germinate("hidden0", GATED.name))
    slot = trainer.host.slots["hidden0"]
    assert is_gated(slot.seed) and slot.blueprint_hash == GATED.content_hash
    gate_params = {id(p) for p in slot.seed.parameters()}
    group = next(g for g in trainer.opt.param_groups if g["name"] == "seed:hidden0")
    assert gate_params == {id(p) for p in group["params"]}  # the gate trains with its seed
    stages = []
    for _ in range(4):
        _run(trainer, 1)
        stages.append(slot.stage)
    assert stages[:3] == [SeedStage.BLENDING, SeedStage.BLENDING, SeedStage.HOLDING] or SeedStage.HOLDING in stages
    trainer.apply(ControllerAction.fossilize("hidden0"))
    report = trainer.field_reports[-1]
    assert report.outcome == "fossilized" and report.blueprint_hash == GATED.content_hash
    assert report.blueprint_name == GATED.name
    assert trainer.events[0]["blueprint_hash"] == GATED.content_hash


def test_culling_a_blended_gated_seed_restores_the_host() -> None:
    data = toy_task(0)
    trainer = _trainer(data)
    before = trainer.host.host_state_dict()
    out_before = trainer.host(data.x_val).detach()
    trainer.apply(ControllerAction.germinate("hidden1", GATED.name))
    _run(trainer, 3)  # into BLENDING: the host moves and was snapshotted
    assert trainer.host.slots["hidden1"].stage in (SeedStage.BLENDING, SeedStage.HOLDING)
    moved = trainer.host.host_state_dict()
    assert any(not torch.equal(moved[k], before[k]) for k in before)
    snapshot = trainer.state_dict()["blend_snapshots"]["hidden1"].weights
    trainer.apply(ControllerAction.cull("hidden1"))
    after = trainer.host.host_state_dict()
    assert all(torch.equal(after[k], snapshot[k]) for k in snapshot)
    assert not torch.equal(trainer.host(data.x_val).detach(), out_before)  # trained before blending: fine
    assert trainer.host.slots["hidden1"].seed is None


def test_a_checkpoint_with_a_gated_seed_resumes_exactly(tmp_path: Path) -> None:
    data = toy_task(0)
    a = _trainer(data)
    a.apply(ControllerAction.germinate("input", GATED.name))
    a.apply(ControllerAction.germinate("hidden0", "residual_mlp"))
    _run(a, 3)
    save_checkpoint(a, tmp_path / "ck")
    b, _ = load_checkpoint(
        tmp_path / "ck", data, catalogue=LocalCatalogue([STANDARD_BLUEPRINTS["residual_mlp"], GATED])
    )
    assert is_gated(b.host.slots["input"].seed) and not is_gated(b.host.slots["hidden0"].seed)
    sa, sb = a.host.state_dict(), b.host.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any("gate_logit" in k for k in sa)  # the gate's weights travel in model.safetensors
    _run(a, 2)
    _run(b, 2)
    sa, sb = a.host.state_dict(), b.host.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_gated_blend_on_a_slot_the_gate_cannot_read_is_one_line() -> None:
    from esper_ray.tasks import TaskConfig, load_task

    data = load_task(TaskConfig(family="mnist1d", seed=0))
    cfg = RunConfig(
        name="gated-cnn",
        host={"kind": "cnn1d", "slots": "all"},
        training={"epochs": 1, "seed": 0, "threads": 1},
        blueprints={"names": ["residual_mlp"]},
        controller={"kind": "static"},
        lineage={"enabled": False},
    )
    trainer = Trainer(cfg, data, catalogue=LocalCatalogue([GATED]))
    assert trainer.host.slots["hidden0"].kind == "seq"
    assert ControllerAction.germinate("hidden0", GATED.name) not in trainer.legal_actions()
    with pytest.raises(EsperError, match="a gated blend reads one vector per example") as err:
        trainer.apply(ControllerAction.germinate("hidden0", GATED.name))
    assert "\n" not in str(err.value) and trainer.host.slots["hidden0"].is_open
    trainer.apply(ControllerAction.germinate("input", GATED.name))  # the vector slot of the same host is fine
    assert is_gated(trainer.host.slots["input"].seed)


# ---- the gate objective ------------------------------------------------------------------------------
def test_gate_rehearsal_opens_the_gate_on_the_new_task_and_closes_it_on_the_original() -> None:
    original, new = toy_task(0, n=400), toy_task(1, n=400, shift=2.0)
    trainer = _trainer(new, freeze_host=True, seed_lr=0.01)
    sample = BoundedSample.from_task(original, 40, seed=0)
    trainer.loss_fn = GateRehearsal(trainer, sample, batch=40, gate_weight=1.0, replay=True, seed=0)
    trainer.apply(ControllerAction.germinate("input", GATED.name))
    seed = trainer.host.slots["input"].seed
    with torch.no_grad():
        g0_new = torch.sigmoid(gate_logits(seed, new.x_test)).mean()
        g0_orig = torch.sigmoid(gate_logits(seed, original.x_test)).mean()
    _run(trainer, 8)
    with torch.no_grad():
        g_new = torch.sigmoid(gate_logits(seed, new.x_test)).mean()
        g_orig = torch.sigmoid(gate_logits(seed, original.x_test)).mean()
    # Measured on the *test* splits, never trained on: the gate generalises from the 40 examples.
    assert abs(float(g0_new - g0_orig)) < 0.2
    assert g_new > 0.8 and g_orig < 0.2


def test_gate_rehearsal_loss_is_its_formula() -> None:
    original, new = toy_task(0), toy_task(1, shift=2.0)
    trainer = _trainer(new)
    sample = BoundedSample.from_task(original, 30, seed=0)
    loss_fn = GateRehearsal(trainer, sample, batch=6, gate_weight=0.5, replay=False, seed=9)
    trainer.apply(ControllerAction.germinate("hidden0", GATED.name))
    trainer.apply(ControllerAction.germinate("input", "residual_mlp"))  # not gated: no gate term
    idx = torch.arange(4)
    logits = trainer.host(new.x_train[idx])
    got = loss_fn(logits, new.y_train[idx], idx)
    j = torch.randint(30, (6,), generator=torch.Generator().manual_seed(9))
    _, acts = trainer.host.forward_with_activations(torch.cat([new.x_train[idx], sample.x[j]]))
    z = gate_logits(trainer.host.slots["hidden0"].seed, acts["hidden0"])
    target = torch.tensor([1.0] * 4 + [0.0] * 6)
    expected = F.cross_entropy(logits, new.y_train[idx]) + 0.5 * F.binary_cross_entropy_with_logits(z, target)
    assert torch.allclose(got, expected)


# ---- absorbing seeds ------------------------------------------------------------------------------
def test_absorbing_fossilized_seeds_keeps_the_function_and_reopens_the_slot() -> None:
    data = toy_task(0)
    trainer = _trainer(data, freeze_host=True)
    trainer.apply(ControllerAction.germinate("hidden0", GATED.name))
    _run(trainer, 4)
    slot = trainer.host.slots["hidden0"]
    assert slot.stage is SeedStage.HOLDING
    trainer.apply(ControllerAction.fossilize("hidden0"))
    trainer.apply(ControllerAction.germinate("input", "residual_mlp"))
    with pytest.raises(EsperError, match="live seed"):
        absorb_fossilized(trainer)
    trainer.apply(ControllerAction.cull("input"))
    seed_params = {id(p) for p in slot.seed.parameters()}
    with torch.no_grad():
        out = trainer.host(data.x_test)
    assert absorb_fossilized(trainer) == 1
    with torch.no_grad():
        assert torch.equal(trainer.host(data.x_test), out)
    assert slot.stage is SeedStage.DORMANT and slot.seed is None
    assert seed_params <= {id(p) for p in trainer.opt.param_groups[0]["params"]}
    assert "seed:hidden0" not in [g["name"] for g in trainer.opt.param_groups]
    assert trainer.opt.param_groups[0]["lr"] == 0.0  # frozen host: the absorbed seed is frozen with it
