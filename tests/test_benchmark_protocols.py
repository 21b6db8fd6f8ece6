"""The protocols of benchmarks/stability.py (sample, replay, gates, routing, figures) and
benchmarks/param_efficiency.py (counting).

The benchmarks are scripts, not package modules: they are imported from benchmarks/ here. The
fast tests run a tiny host for a few epochs; the ``slow`` one runs param_efficiency.py --quick.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import param_efficiency as pe  # noqa: E402
import stability as st  # noqa: E402
from common import read_result  # noqa: E402
from page import Page, efficiency  # noqa: E402

from esper_ray.blueprints.builder import build_seed  # noqa: E402
from esper_ray.blueprints.library import STANDARD_BLUEPRINTS  # noqa: E402
from esper_ray.contracts import ControllerAction  # noqa: E402
from esper_ray.tasks import TaskConfig, TaskData, load_task  # noqa: E402
from esper_ray.tolaria.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def original() -> TaskData:
    return load_task(TaskConfig(family="mnist1d", seed=0))


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


# ---- stability.py: the original-task sample and replay ----------------------------------------------
def test_original_sample_is_fixed_by_the_seed_and_of_the_stated_size(original: TaskData) -> None:
    sample = st.original_sample(original, seed=0)
    again = st.original_sample(original, seed=0)
    assert len(sample) == st.SAMPLE_SIZE == 160 == round(0.05 * len(original.x_train))
    assert torch.equal(sample.x, again.x) and torch.equal(sample.y, again.y)
    assert not torch.equal(sample.x, st.original_sample(original, seed=1).x)
    # Drawn from the training split only, without repeats, labels kept with their inputs.
    train = {row.numpy().tobytes(): int(label) for row, label in zip(original.x_train, original.y_train, strict=True)}
    assert len(_rows(sample.x)) == len(sample)
    assert all(train.get(row.numpy().tobytes()) == int(label) for row, label in zip(sample.x, sample.y, strict=True))
    assert not _rows(sample.x) & (_rows(original.x_test) | _rows(original.x_val))


@pytest.mark.parametrize("gated", [False, True])
def test_replay_training_sees_the_sample_and_never_the_original_test_split(original: TaskData, gated: bool) -> None:
    """Every input the network is trained on (train-mode forwards) comes from the new task or the
    sample; the gated arm's gate objective reads the same two and nothing else."""
    sample = st.original_sample(original, seed=0)
    trainer = Trainer(st.run_config(0, True, 32), original, run_id="test-replay", catalogue=st.catalogue(gated))
    if gated:
        trainer.loss_fn = st.GateRehearsal(trainer, sample, batch=st.REPLAY_BATCH, replay=True, seed=0)
    else:
        trainer.loss_fn = st.Rehearsal(trainer.host, sample, batch=st.REPLAY_BATCH, seed=0)
    new = st.shifted_task(load_task(TaskConfig(family="mnist1d", seed=101)), 0, 1, permuted=10)
    st.use_task(trainer, new)
    seen: list[torch.Tensor] = []
    trainer.host.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()) if m.training else None)
    v0 = trainer.evaluate(original.x_val, original.y_val)[1]
    guard = None if gated else (original, v0)
    st.adapt(trainer, 3, True, guard, blueprints=st.GATED_FOR if gated else None, train_fossils=gated)
    assert trainer.summary()["germinations"] == 3  # seeds did train on it
    assert {r.blueprint_name for r in trainer.field_reports} <= set(
        (st.GATED_FOR if gated else st.BLUEPRINT_FOR).values()
    )
    trained_on = _rows(torch.cat(seen))
    assert not trained_on & _rows(original.x_test)
    assert not trained_on & _rows(original.x_val)  # the guard only evaluates on it
    assert trained_on <= _rows(new.x_train) | _rows(sample.x)
    assert _rows(sample.x) & trained_on  # the sample was replayed
    # Each step: one new-task batch and one replay batch of REPLAY_BATCH examples.
    replay_forwards = [x for x in seen if _rows(x) <= _rows(sample.x)]
    assert replay_forwards and all(len(x) == st.REPLAY_BATCH for x in replay_forwards)


def test_summarise_reports_the_matrix_figures_and_the_gated_targets() -> None:
    def run(arm: str, seed: int, degradation: float, gain: float, germ: int, culls: int) -> dict:
        return {
            "arm": arm,
            "seed": seed,
            "a0": 0.5,
            "a_end": 0.5 * (1 - degradation),
            "degradation": degradation,
            "average_accuracy": 0.4,
            "bwt_original": -0.5 * degradation,
            "bwt_new": float("nan") if seed else -0.01,
            "new_before": 0.3,
            "new_after": 0.3 + gain,
            "new_gain": gain,
            "tasks": 8,
            "germinations": germ,
            "fossilizations": germ - culls,
            "culls": culls,
            "rollbacks": 0,
            "added_params": 10,
            "seconds": 1.0,
            "replay_examples": 160 if arm == "gated" else 0,
        }

    runs = [run("gated", s, 0.04, 0.08, 26, 6) for s in range(2)] + [
        run("finetune", s, 0.3, 0.15, 0, 0) for s in range(2)
    ]
    table = st.summarise(runs)
    g = table["gated"]
    assert g["degradation"] == pytest.approx(0.04) and g["degradation_ci95"] == pytest.approx(0.0, abs=1e-12)
    assert g["bwt_new"] == pytest.approx(-0.01)  # NaN (no earlier new task) is left out of the mean
    assert g["cull_share"] == pytest.approx(12 / 52) and g["gain_vs_full"] == pytest.approx(0.08 / 0.15)
    assert g["met"] and g["met_gated"]
    too_many_culls = st.summarise([run("gated", 0, 0.04, 0.08, 30, 10), run("finetune", 0, 0.3, 0.15, 0, 0)])
    assert too_many_culls["gated"]["met"] and not too_many_culls["gated"]["met_gated"]  # 10/30 > 1/4 culled
    too_little_gain = st.summarise([run("gated", 0, 0.04, 0.07, 26, 6), run("finetune", 0, 0.3, 0.15, 0, 0)])
    assert not too_little_gain["gated"]["met_gated"]


# ---- stability.py: routing ------------------------------------------------------------------------------
def test_a_routed_seed_is_the_identity_off_its_task() -> None:
    seed = build_seed(STANDARD_BLUEPRINTS["residual_mlp"], (64,), generator_seed=0)
    with torch.no_grad():
        seed.gamma.fill_(1.0)  # a seed that changes its input
    router = st.TaskRouter()
    routed = st.Routed(seed, task=2, router=router)
    h = torch.randn(5, 64)
    assert not torch.equal(seed(h), h)
    for active in (0, 1, 3):
        router.active = active
        assert torch.equal(routed(h), h)
    router.active = 2
    assert torch.equal(routed(h), seed(h))


# ---- param_efficiency.py: counting ---------------------------------------------------------------------
SMALL = [8, 8]  # host 40-8-8-10: 40*8+8 + 8*8+8 + 8*10+10 = 490 weights


@pytest.mark.parametrize(
    ("arm", "expected"),
    [
        (pe.Arm("full", "all"), 490),
        (pe.Arm("head", "head"), 8 * 10 + 10),
        (pe.Arm("bias", "bias"), 8 + 8 + 10),
        # lowrank r at width w: w*r + r (down), r*w + w (up), w (gamma)
        (pe.Arm("lr2@input", "seeds", (("input", pe.lowrank(2)),)), 40 * 2 + 2 + 2 * 40 + 40 + 40),
        (
            pe.Arm("lr2@input+lr1@hidden0", "seeds", (("input", pe.lowrank(2)), ("hidden0", pe.lowrank(1)))),
            242 + (8 * 1 + 1 + 1 * 8 + 8 + 8),
        ),
    ],
    ids=lambda a: a.name if isinstance(a, pe.Arm) else str(a),
)
def test_trainable_counts_exactly_the_weights_that_move(original: TaskData, arm: pe.Arm, expected: int) -> None:
    weights = Trainer(pe.config(0, 1, 1e-3, freeze=False, hidden=SMALL), original).host.host_state_dict()
    trainer = pe.prepare(arm, pe.config(0, 1, 1e-2, freeze=arm.trains == "seeds", hidden=SMALL), original, weights)
    assert pe.trainable(trainer.opt) == expected
    before = {n: p.detach().clone() for n, p in trainer.host.named_parameters()}
    trainer.train_epoch()
    trainer.end_epoch(ControllerAction.wait())
    moved = sum(p.numel() for n, p in trainer.host.named_parameters() if not torch.equal(p, before[n]))
    assert moved == expected


def test_summarise_matches_the_smallest_seed_configuration_with_enough_val_gain() -> None:
    arms = [
        pe.Arm("full", "all"),
        pe.Arm("small", "seeds", (("input", pe.lowrank(2)),)),
        pe.Arm("mid", "seeds", (("input", pe.lowrank(8)),)),
        pe.Arm("big", "seeds", (("input", pe.lowrank(16)),)),
    ]
    trainable = {"full": 1000, "small": 10, "mid": 50, "big": 100}
    # (test gains, val gains) per seed: the match is decided on val, the test gains are reported.
    gains = {
        "full": ([0.10, 0.12], [0.10, 0.12]),
        "small": ([0.11, 0.11], [0.05, 0.06]),  # good on test, not on val: not chosen
        "mid": ([0.08, 0.09], [0.10, 0.105]),  # 0.1025 >= 0.9 * 0.11 on val
        "big": ([0.12, 0.13], [0.12, 0.13]),
    }
    runs = [
        {
            "arm": a,
            "seed": s,
            "before": 0.3,
            "after": 0.3 + test[s],
            "gain": test[s],
            "val_gain": val[s],
            "trainable": trainable[a],
            "kept": 1,
            "lr": 1e-3,
        }
        for a, (test, val) in gains.items()
        for s in (0, 1)
    ]
    out = pe.summarise(runs, arms)
    m = out["matched"]
    assert m["arm"] == "mid" and m["param_ratio"] == pytest.approx(20.0)
    assert m["gain"] == pytest.approx(0.085) and m["full_gain"] == pytest.approx(0.11)
    assert m["gain_vs_full"] == pytest.approx((0.08 / 0.10 + 0.09 / 0.12) / 2)
    assert out["matched_100"]["arm"] == "big"
    assert "20.0x fewer" in pe.verdict(out) and pe.verdict(out).endswith(": met")


@pytest.mark.slow
def test_param_efficiency_quick_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "pe.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "param_efficiency.py"), "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_result(out)
    assert result.script == "benchmarks/param_efficiency.py" and result.command.endswith("param_efficiency.py --quick")
    assert result.machine["cores"] >= 1 and result.seconds is not None and result.seconds > 0
    fig = result.figures
    arms = fig["scenarios"]["shift"]["arms"]
    assert arms["full"]["trainable"] == 144_650  # 40*256+256 + 2*(256*256+256) + 256*10+10
    assert arms["head"]["trainable"] == 2_570 and arms["bias"]["trainable"] == 778
    assert arms["seeds: lowrank2 @input"]["trainable"] == 242
    assert all(-1 <= a["gain"] <= 1 for a in arms.values())
    assert "SUMMARY shift:" in proc.stdout
    # The page's section 3 takes its primary figure from this result file.
    page = Page({"param_efficiency": result}, commands={}, quick=True)
    section = efficiency(page)["param_efficiency"]
    assert "| shift | seeds: lowrank8 @input | 728 | 198.7x |" in section
    (row,) = [r for r in page.summary if r[0] == "3. parameter efficiency"]
    assert row[1].startswith("shift: ") and "x fewer" in row[1]
