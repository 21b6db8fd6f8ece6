"""Knowledge distillation (esper_ray.tolaria.distill): the KD loss, the teacher cache, slot gaps,
the ``esper-ray distill`` command, the env in distillation mode, and bad teacher checkpoints.

Teachers here are tiny (cnn1d [8, 16], a few epochs on a few hundred MNIST-1D examples) and
cached under ``tmp_path``, so the whole file runs in well under a minute on one core.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from esper_ray import lineage
from esper_ray.cli import main
from esper_ray.config import RunConfig
from esper_ray.contracts import EsperError
from esper_ray.tamiyo.controllers import StaticController
from esper_ray.tasks import TaskConfig, load_task
from esper_ray.tolaria import distill
from esper_ray.tolaria.distill import DistillConfig, kd_loss, load_distill_config, make_distillation
from esper_ray.tolaria.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TASK = {"family": "mnist1d", "seed": 0, "n_train": 800}
TEACHER = {"kind": "cnn1d", "hidden": [8, 16], "slots": []}


@pytest.fixture(scope="module")
def data():
    return load_task(TaskConfig(**TASK))


@pytest.fixture
def dcfg(tmp_path: Path) -> DistillConfig:
    distill.clear_memory_cache()
    return DistillConfig(teacher=TEACHER, teacher_epochs=6, cache_dir=str(tmp_path / "teachers"), gap_probe=256)


def _run(epochs: int = 3, seed: int = 0) -> RunConfig:
    return RunConfig(
        task=TASK,
        training={"epochs": epochs, "seed": seed, "probe_size": 256},
        lineage={"enabled": False},
    )


# ---- the loss --------------------------------------------------------------------------------------
def test_kd_loss_equals_hand_computation() -> None:
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    T, w = 2.0, 0.3

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    ce = kl = 0.0
    for s, t, label in zip(student.tolist(), teacher.tolist(), y.tolist(), strict=True):
        ce += -math.log(softmax(s)[label])
        p_t, p_s = softmax([v / T for v in t]), softmax([v / T for v in s])
        kl += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    ce, kl = ce / 2, kl / 2
    expected = (1 - w) * ce + w * T * T * kl
    assert float(kd_loss(student, y, teacher, T, w)) == pytest.approx(expected, rel=1e-6)
    assert float(kd_loss(student, y, teacher, T, 0.0)) == pytest.approx(ce, rel=1e-6)
    assert float(kd_loss(student, y, teacher, T, 1.0)) == pytest.approx(T * T * kl, rel=1e-6)
    assert float(kd_loss(teacher, y, teacher, T, 1.0)) == pytest.approx(0.0, abs=1e-7)


def test_loss_object_indexes_precomputed_teacher_logits(data, dcfg) -> None:
    loss = make_distillation(dcfg, data, _run())
    idx = torch.tensor([5, 0, 17, 799])
    logits = torch.randn(4, data.num_classes)
    expected = kd_loss(logits, data.y_train[idx], loss.teacher.train_logits[idx], dcfg.temperature, dcfg.weight)
    assert torch.equal(loss(logits, data.y_train[idx], idx), expected)
    with torch.no_grad():
        assert torch.allclose(loss.teacher.host(data.x_train[idx]), loss.teacher.train_logits[idx], atol=1e-5)
    with pytest.raises(EsperError, match="beyond the 800 training examples"):
        loss(logits[:1], data.y_train[:1], torch.tensor([800]))


# ---- the teacher cache --------------------------------------------------------------------------------
def test_teacher_is_trained_once_then_reused(data, dcfg, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = distill.train_teacher
    monkeypatch.setattr(distill, "train_teacher", lambda *a: calls.append(1) or real(*a))
    first = make_distillation(dcfg, data, _run())
    assert len(calls) == 1 and first.teacher.source == "trained"
    assert (Path(dcfg.cache_dir) / first.teacher.key / "teacher.safetensors").is_file()

    second = make_distillation(dcfg.model_dump(), data, _run(seed=3))  # a dict works too
    assert len(calls) == 1 and second.teacher is first.teacher  # in-process cache

    distill.clear_memory_cache()  # a new process: the disk cache
    third = make_distillation(dcfg, data, _run())
    assert len(calls) == 1 and third.teacher.source == "disk cache"
    assert torch.allclose(third.teacher.train_logits, first.teacher.train_logits)

    make_distillation(dcfg.model_copy(update={"teacher_seed": 1}), data, _run())  # another teacher
    assert len(calls) == 2


# ---- slot gaps -----------------------------------------------------------------------------------------
def test_slot_gaps_are_finite_per_slot_and_shrink_as_the_student_learns(data, dcfg) -> None:
    loss = make_distillation(dcfg.model_copy(update={"teacher_epochs": 10}), data, _run())
    trainer = Trainer(_run(epochs=15), data, loss_fn=loss)
    before = loss.slot_gaps(trainer)
    assert set(before) == set(trainer.host.slots) == {"input", "hidden0", "hidden1"}
    assert all(math.isfinite(v) and v >= 0 for v in before.values())
    static = StaticController()
    while not trainer.done:
        trainer.train_epoch()
        trainer.end_epoch(trainer.apply_decision(static))
    obs = trainer.observe()
    after = obs.distill
    assert set(after) == set(before)
    assert after["input"] == pytest.approx(before["input"])  # nothing changed what leaves the input slot
    assert after["hidden1"] < before["hidden1"] - 0.05, (before, after)
    assert after["hidden0"] < before["hidden0"], (before, after)
    # The feature-matching variant is defined for every slot too.
    feats = distill.DistillationLoss(loss.teacher, dcfg.model_copy(update={"gap_target": "features"}))
    assert all(math.isfinite(v) for v in feats.slot_gaps(trainer).values())


def test_slot_gaps_refuse_other_data(data, dcfg) -> None:
    loss = make_distillation(dcfg, data, _run())
    other = load_task(TaskConfig(family="mnist1d", seed=1, n_train=800))
    trainer = Trainer(_run(), other, loss_fn=loss)
    with pytest.raises(EsperError, match="not the data the teacher"):
        trainer.observe()


# ---- the command ---------------------------------------------------------------------------------------
def _cli_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--config",
        str(REPO / "configs" / "distill.yaml"),
        "--out",
        str(out),
        "--no-progress",
        "training.epochs=3",
        "training.probe_size=128",
        "task.n_train=400",
        "distill.teacher_epochs=2",
        "distill.teacher.hidden=[8,16]",
        "distill.gap_probe=128",
        f"distill.cache_dir={tmp_path / 'teachers'}",
        *extra,
    ]


def test_cli_distill_writes_a_verified_run_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ESPER_RAY_LINEAGE_KEY", str(tmp_path / "key" / "lineage_ed25519.pem"))
    distill.clear_memory_cache()
    out = tmp_path / "run"
    assert main(_cli_args(tmp_path, out)) == 0
    assert "student final test accuracy" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.parquet", "lineage.parquet", "report.png", "summary.json", "distill.json"):
        assert (out / name).is_file(), name
    report = lineage.verify_run(out)
    assert report.ok, report.message
    record = json.loads((out / "distill.json").read_text())
    assert record["teacher"]["source"] == "trained" and record["retained"] > 0
    # The run folder's teacher/ is a reusable checkpoint.
    distill.clear_memory_cache()
    again = tmp_path / "run2"
    assert main(_cli_args(tmp_path, again, f"distill.teacher_checkpoint={out / 'teacher'}")) == 0
    assert json.loads((again / "distill.json").read_text())["teacher"]["source"] == "checkpoint"


@pytest.mark.parametrize("damage", ["weights", "json", "tampered", "missing"])
def test_corrupt_teacher_checkpoint_is_one_line_naming_the_path(data, dcfg, tmp_path: Path, damage) -> None:
    good = make_distillation(dcfg, data, _run()).teacher
    ckpt = good.save(tmp_path / "ckpt")
    if damage == "weights":
        (ckpt / "teacher.safetensors").write_bytes(b"\x00garbage, not safetensors")
    elif damage == "json":
        (ckpt / "teacher.json").write_text("{not json")
    elif damage == "tampered":  # still valid safetensors, but not the weights teacher.json recorded
        from safetensors.torch import load_file, save_file

        tensors = load_file(ckpt / "teacher.safetensors")
        first = sorted(tensors)[0]
        tensors[first] = tensors[first] + 1.0
        save_file(tensors, ckpt / "teacher.safetensors")
    else:
        (ckpt / "teacher.safetensors").unlink()
    distill.clear_memory_cache()
    bad = dcfg.model_copy(update={"teacher_checkpoint": str(ckpt)})
    with pytest.raises(EsperError) as err:
        make_distillation(bad, data, _run())
    message = str(err.value)
    assert str(ckpt) in message and "\n" not in message, message


def test_cli_corrupt_checkpoint_exits_2_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ESPER_RAY_LINEAGE_KEY", str(tmp_path / "key.pem"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "teacher.safetensors").write_bytes(b"junk")
    (ckpt / "teacher.json").write_text("[]")
    rc = main(_cli_args(tmp_path, tmp_path / "run", f"distill.teacher_checkpoint={ckpt}"))
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("esper-ray: error:") and str(ckpt) in err[0]
    assert not (tmp_path / "run").exists()


def test_config_errors_name_the_distill_key(tmp_path: Path) -> None:
    with pytest.raises(EsperError, match=r"distill\.temperature"):
        load_distill_config(REPO / "configs" / "distill.yaml", ["distill.temperature=0"])
    run, cfg = load_distill_config(REPO / "configs" / "distill.yaml", ["distill.weight=0.5"])
    assert isinstance(run, RunConfig) and cfg.weight == 0.5 and run.host.hidden == [64, 64]


# ---- the environment -----------------------------------------------------------------------------------
def test_env_in_distill_mode_passes_check_env_and_reuses_the_teacher(tmp_path: Path, monkeypatch) -> None:
    from gymnasium.utils.env_checker import check_env

    import envs

    distill.clear_memory_cache()
    calls = []
    real = distill.train_teacher
    monkeypatch.setattr(distill, "train_teacher", lambda *a: calls.append(1) or real(*a))
    env = envs.MorphogenesisEnv(
        {
            "distill": {"teacher": TEACHER, "teacher_epochs": 2, "cache_dir": str(tmp_path), "gap_probe": 128},
            "train_tasks": [{"family": "mnist1d", "seed": 0, "n_train": 300}],
            "run": {
                "name": "episode",
                "training": {"epochs": 3, "probe_size": 128},
                "lifecycle": {"min_training_epochs": 1, "min_holding_epochs": 1, "alpha": {"steps": 6}},
                "lineage": {"enabled": False},
            },
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gymnasium's advice about infinite Box bounds
        check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=7)
    gaps = env.trainer.observe().distill
    assert set(gaps) == {"input", "hidden0", "hidden1"} and all(math.isfinite(v) for v in gaps.values())
    done = False
    while not done:
        _, reward, done, _, info = env.step(0)
        assert math.isfinite(reward)
    env.reset(seed=8)
    assert len(calls) == 1, "the teacher was trained again on a reset"
