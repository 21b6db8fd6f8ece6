"""Tests of the transformer host, its blueprints and the byte-level text task: causality, dormant =
plain bit for bit, seeds function-preserving at birth in every slot, isolation and blending on the
residual stream, checkpoint / exact resume, the corpus digest and its cache, and bad input."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from esper_ray.blueprints import TRANSFORMER_BLUEPRINTS, TokenShape, check_contract, count_params
from esper_ray.config import RunConfig
from esper_ray.contracts import ControllerAction, EsperError, Observation, SeedStage
from esper_ray.hosts import HostConfig, MorphoHost, build_host
from esper_ray.hosts.transformer import PlainTransformer, bits_per_byte
from esper_ray.kasmina import AlphaSchedule, LifecycleConfig
from esper_ray.tasks import TaskConfig, load_task, text_task
from esper_ray.tolaria.run import run_training
from esper_ray.tolaria.trainer import Trainer

pytestmark = pytest.mark.usefixtures("torch_seed")

S = SeedStage
T = 16  # context of the small test host
CFG = HostConfig(kind="transformer", hidden=[32, 32], heads=4, context=T)
SLOTS = ["hidden0", "hidden1", "hidden2"]
BLUEPRINTS = list(TRANSFORMER_BLUEPRINTS) + ["lowrank", "residual_mlp", "norm"]  # standard vector ones fit too


def make_host(lifecycle: LifecycleConfig | None = None, slots="all") -> MorphoHost:
    return build_host(CFG.model_copy(update={"slots": slots}), (T,), 256, lifecycle=lifecycle)


def tokens(n: int = 5, gen_seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(gen_seed)
    return torch.randint(0, 256, (n, T), generator=gen).float(), torch.randint(0, 256, (n, T), generator=gen)


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def out_and_grads(model: torch.nn.Module, params, x, y) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss_of(out, y).backward()
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads)
    return out.detach(), [g.clone() for g in grads]


def perturb_seed(seed: torch.nn.Module, gen_seed: int) -> None:
    """Move a seed away from identity: gamma around 1, every weight randomised."""
    gen = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        for name, p in seed.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.5 * noise) if name == "gamma" else p.add_(0.3 * noise)


def plain_twin(host: MorphoHost) -> PlainTransformer:
    plain = PlainTransformer(CFG, (T,), 256)
    plain.load_state_dict(host.host_state_dict(), strict=True)
    return plain


# ---- the host ------------------------------------------------------------------------------------
def test_slots_are_token_shapes_on_the_residual_stream():
    host = make_host()
    assert list(host.slots) == SLOTS  # no slot on the token ids
    for slot in host.iter_slots():
        assert isinstance(slot.shape, TokenShape) and slot.shape == (T, 32) and slot.kind == "tokens"
    x, _ = tokens()
    assert host(x).shape == (5, T, 256)
    assert host(x[:, :7]).shape == (5, 7, 256)  # shorter sequences use the first positions
    # embedding + 2 blocks (ln 2*64, attn 4*32*32 + 4*32, mlp 2*32*128 + 128 + 32) + head (ln 64, 32*256 + 256)
    block = 2 * 64 + 4 * 32 * 32 + 4 * 32 + 2 * 32 * 128 + 128 + 32
    assert host.param_count()["host"] == 256 * 32 + T * 32 + 2 * block + 64 + 32 * 256 + 256


def test_dormant_host_equals_plain_transformer_bit_for_bit():
    host = make_host()
    plain = plain_twin(host)
    x, y = tokens()
    out_h, grads_h = out_and_grads(host, list(host.host_parameters()), x, y)
    out_p, grads_p = out_and_grads(plain, list(plain.parameters()), x, y)
    assert torch.equal(out_h, out_p)
    assert len(grads_h) == len(grads_p)
    for gh, gp in zip(grads_h, grads_p, strict=True):
        assert torch.equal(gh, gp)


@pytest.mark.parametrize("grown", [False, True], ids=["dormant", "grown"])
def test_causal_a_future_token_does_not_change_an_earlier_output(grown):
    host = make_host(LifecycleConfig(alpha=AlphaSchedule(kind="linear", steps=2)))
    if grown:  # a blended seed in every slot, attention included
        for name, bp in zip(SLOTS, ["attn_head", "mlp_expand", "adapter8"], strict=True):
            slot = host.germinate(name, bp, generator_seed=1)
            perturb_seed(slot.seed, 2)
            for stage in (S.TRAINING, S.BLENDING):
                slot.transition(stage)
            slot.on_step()
    host.eval()
    x, _ = tokens()
    with torch.no_grad():
        base = host(x)
        for t in (0, 5, T - 2):
            changed = x.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 17) % 256
            out = host(changed)
            assert torch.equal(out[:, : t + 1], base[:, : t + 1])
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])  # later positions do see it


@pytest.mark.parametrize("slot_name", SLOTS)
@pytest.mark.parametrize("bp", BLUEPRINTS)
def test_seed_is_function_preserving_at_birth_in_every_slot(slot_name, bp):
    host = make_host()
    x, _ = tokens()
    with torch.no_grad():
        before = host(x)
    slot = host.germinate(slot_name, bp, generator_seed=3)
    for stage in (S.TRAINING, S.BLENDING):
        slot.transition(stage)
    for _ in range(5):
        slot.on_step()
    assert 0 < slot.alpha < 1
    with torch.no_grad():
        assert torch.equal(host(x), before)  # gamma is zero at birth: seed(h) == h exactly
    assert check_contract(slot.seed.spec, slot.shape).ok


@pytest.mark.parametrize("bp", ["conv1d", "se1d", "conv2d"])
def test_blueprints_that_see_later_positions_do_not_fit(bp):
    host = make_host()
    with pytest.raises(EsperError, match="causal token slot|does not fit a tokens slot"):
        host.germinate("hidden1", bp)
    assert host.slot("hidden1").is_open


def test_attention_seed_needs_a_token_slot():
    mlp = build_host(HostConfig(kind="cnn1d"), (40,), 10)
    with pytest.raises(EsperError, match="needs a token slot"):
        mlp.germinate("hidden0", TRANSFORMER_BLUEPRINTS["attn_head"])
    # adapter and MLP expansion are vector blueprints: they fit the other hosts as well
    assert count_params(TRANSFORMER_BLUEPRINTS["adapter8"], (64,)) == 64 * 8 + 8 + 8 * 64 + 64 + 64


@pytest.mark.parametrize("slot_name", SLOTS)
@pytest.mark.parametrize("bp", ["adapter8", "attn_head"])
def test_isolated_training_leaves_host_exactly_unchanged(slot_name, bp):
    host = make_host()
    plain = plain_twin(host)
    slot = host.germinate(slot_name, bp, generator_seed=5)
    slot.transition(S.TRAINING)
    perturb_seed(slot.seed, 6)
    x, y = tokens()
    out_h, grads_h = out_and_grads(host, list(host.host_parameters()), x, y)
    out_p, grads_p = out_and_grads(plain, list(plain.parameters()), x, y)
    assert torch.equal(out_h, out_p)
    for gh, gp in zip(grads_h, grads_p, strict=True):
        assert torch.equal(gh, gp)
    for p in slot.seed.parameters():  # the seed still learns from the loss
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("slot_name", SLOTS)
def test_upstream_gets_only_scaled_host_gradient_while_blending(slot_name):
    steps = 4
    host = make_host(LifecycleConfig(alpha=AlphaSchedule(kind="linear", steps=steps)))
    slot = host.slot(slot_name)
    host.germinate(slot_name, "mlp_expand", generator_seed=7)
    slot.transition(S.TRAINING)
    slot.transition(S.BLENDING)
    x, _ = tokens()
    g = torch.randn((x.shape[0], *slot.shape))

    def upstream(through_slot: bool) -> list[torch.Tensor]:
        host.zero_grad(set_to_none=True)
        h = x
        for block in host.blocks[: slot.index]:
            h = block(h)
        (slot(h) if through_slot else h).backward(g)
        return [p.grad.clone() for block in host.blocks[: slot.index] for p in block.parameters()]

    reference = upstream(False)
    for t in range(steps + 1):
        alpha = slot.alpha
        assert alpha == t / steps
        perturb_seed(slot.seed, 100 + t)
        first = upstream(True)
        perturb_seed(slot.seed, 200 + t)
        second = upstream(True)
        for a, b, r in zip(first, second, reference, strict=True):
            assert torch.equal(a, b)  # the seed's weights do not reach upstream
            assert torch.allclose(a, (1 - alpha) * r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))
        slot.on_step()


def test_blend_output_formula_on_the_stream():
    host = make_host(LifecycleConfig(alpha=AlphaSchedule(kind="sigmoid", steps=10)))
    slot = host.germinate("hidden1", "attn_head", generator_seed=2)
    slot.transition(S.TRAINING)
    slot.transition(S.BLENDING)
    perturb_seed(slot.seed, 3)
    h = torch.randn((3, *slot.shape))
    with torch.no_grad():
        s = slot.seed(h)
        for _ in range(12):
            alpha = slot.alpha
            atol = 1e-6 * max(1.0, float(s.abs().max()), float(h.abs().max()))
            assert torch.allclose(slot(h), alpha * s + (1 - alpha) * h, rtol=0, atol=atol)
            with slot.ablated():
                assert torch.equal(slot(h), h)
            slot.on_step()


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_host_input_is_one_line():
    with pytest.raises(EsperError, match="more than the transformer's context of 16"):
        build_host(CFG, (32,), 256)
    with pytest.raises(EsperError, match="input is token ids and has no slot"):
        build_host(CFG.model_copy(update={"slots": ["input", "hidden0"]}), (T,), 256)
    with pytest.raises(EsperError, match="takes token sequences"):
        build_host(CFG, (1, 8, 8), 10)
    host = make_host()
    with pytest.raises(EsperError, match="a sequence of 20 tokens is longer than the transformer's context of 16"):
        host(torch.zeros(2, 20))
    with pytest.raises(ValueError, match="heads=3 must divide d_model=32"):
        HostConfig(kind="transformer", hidden=[32], heads=3)
    with pytest.raises(ValueError, match="equal widths"):
        HostConfig(kind="transformer", hidden=[32, 64])


def test_bad_text_settings_are_one_line(tmp_path: Path):
    with pytest.raises(ValueError, match="tokenizer"):
        TaskConfig(family="text", params={"tokenizer": "bpe"})
    with pytest.raises(ValueError, match="unknown setting"):
        TaskConfig(family="text", params={"vocab": 300})
    with pytest.raises(EsperError, match="more than the transformer's context"):
        Trainer(RunConfig(task={"family": "text", "params": {"context": 32}, "n_train": 8}, host=CFG.model_dump()))


def test_cli_bad_context_and_tokenizer_exit_2(tmp_path: Path, capsys):
    from esper_ray.cli import main

    for override, says in (("task.params.context=64", "context of 16"), ("task.params.tokenizer=bpe", "tokenizer")):
        args = ["train", "--out", str(tmp_path / "run"), "--no-progress", "task.family=text", "host.kind=transformer"]
        args += ["host.hidden=[32]", "host.heads=4", "host.context=16", "blueprints.source=local", override]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("esper-ray: error:") and "\n" not in err and says in err, err
        assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ---- the text task -------------------------------------------------------------------------------
def test_corpus_digest_is_pinned_and_the_task_is_reproducible(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("ESPER_RAY_CACHE", str(tmp_path))
    text_task.corpus_bytes.cache_clear()
    for domain, corpus in text_task.CORPORA.items():
        data = text_task.corpus_bytes(domain)
        assert len(data) == corpus.size and hashlib.sha256(data).hexdigest() == corpus.sha256
    a = load_task({"family": "text", "seed": 3, "params": {"context": 32}})
    b = load_task({"family": "text", "seed": 3, "params": {"context": 32}})
    for split in ("x_train", "y_train", "x_val", "y_test"):
        assert torch.equal(getattr(a, split), getattr(b, split))
    assert a.input_shape == (32,) and a.num_classes == 256 and a.y_train.shape == a.x_train.shape
    # y is x shifted by one byte
    assert torch.equal(a.x_train[:, 1:].long(), a.y_train[:, :-1])
    assert a.meta["corpus_sha256"] == text_task.CORPORA["docs"].sha256
    docs = text_task.corpus_bytes("docs")
    assert docs.startswith(b"Assert statements") or docs[:200].isascii()
    # disjoint regions: the last byte of train comes before the first of val
    n = len(docs)
    assert a.meta["n_val"] < a.meta["n_train"] and a.meta["n_test"] >= round(0.2 * n) // 32 - 1
    c = load_task({"family": "text", "seed": 4, "params": {"context": 32}})
    assert not torch.equal(a.x_val, c.x_val)  # another seed cuts the windows elsewhere


def test_corrupt_corpus_cache_is_rebuilt_not_trusted(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("ESPER_RAY_CACHE", str(tmp_path))
    text_task.corpus_bytes.cache_clear()
    good = text_task.corpus_bytes("code")
    path = text_task.corpus_path("code")
    assert path.read_bytes() == good
    path.write_bytes(good[:-10] + b"corrupted!")
    text_task.corpus_bytes.cache_clear()
    assert text_task.corpus_bytes("code") == good
    assert path.read_bytes() == good  # rewritten
    path.write_bytes(b"")
    text_task.corpus_bytes.cache_clear()
    assert text_task.corpus_bytes("code") == good


def test_damaged_shipped_corpus_fails_clearly(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("ESPER_RAY_CACHE", str(tmp_path))
    text_task.corpus_bytes.cache_clear()
    fake = text_task.Corpus("argparse_py.txt.xz", "0" * 64, 1, "test")
    monkeypatch.setitem(text_task.CORPORA, "code", fake)
    with pytest.raises(EsperError, match="do not match the pinned sha256"):
        text_task.corpus_bytes("code")
    text_task.corpus_bytes.cache_clear()


# ---- training, telemetry, checkpoints ------------------------------------------------------------
def small_cfg(**training: Any) -> RunConfig:
    return RunConfig(
        task={"family": "text", "n_train": 48, "params": {"context": T, "domain": "code"}},
        host=CFG.model_dump(),
        training={"epochs": 6, "batch_size": 16, "lr": 3e-3, "seed_lr": 3e-3, "probe_size": 32, **training},
        lifecycle={"min_training_epochs": 1, "alpha": {"kind": "linear", "steps": 6}, "min_improvement": -1.0},
        blueprints={"names": ["adapter8", "mlp_expand", "attn_head", "tok_norm"]},
        controller={"kind": "heuristic"},
    )


def test_trainer_reports_per_byte_loss_and_accuracy_and_sees_token_slots():
    trainer = Trainer(small_cfg())
    m = trainer.train_epoch()
    assert math.log(256) * 0.5 < m["val_loss"] < math.log(256) * 1.2  # nats per byte, near uniform early on
    assert 0.0 <= m["val_acc"] <= 1.0
    loss, acc = trainer.evaluate(trainer.data.x_val, trainer.data.y_val)
    with torch.no_grad():
        logits = trainer.host.eval()(trainer.data.x_val)
    trainer.host.train()
    expected = loss_of(logits, trainer.data.y_val)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert acc == int((logits.argmax(-1) == trainer.data.y_val).sum()) / trainer.data.y_val.numel()
    assert bits_per_byte(loss) == pytest.approx(loss / math.log(2))
    obs = trainer.observe()
    assert [s.kind for s in obs.slots] == ["tokens"] * 3 and [s.width for s in obs.slots] == [32] * 3
    assert all(math.isfinite(s.grad_predictability) for s in obs.slots)
    legal = trainer.legal_actions()
    assert ControllerAction.germinate("hidden1", "attn_head") in legal


class Scripted:
    """Plays ``plan[epoch]`` (an action or a function of the legal actions); checkpointed."""

    name = "scripted"

    def __init__(self, plan: dict[int, Any]):
        self.plan, self.calls = plan, 0

    def act(self, obs: Observation, legal: list[ControllerAction]) -> ControllerAction:
        self.calls += 1
        step = self.plan.get(obs.global_.epoch, ControllerAction.wait())
        return step(legal) if callable(step) else step

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]


def _fossilize_or_cull(legal: list[ControllerAction]) -> ControllerAction:
    fossilize = ControllerAction.fossilize("hidden0")
    return fossilize if fossilize in legal else ControllerAction.cull("hidden0")


PLAN = {
    1: ControllerAction.germinate("hidden0", "attn_head"),
    2: ControllerAction.germinate("hidden2", "adapter8"),
    4: _fossilize_or_cull,
}


@pytest.mark.slow
def test_checkpoint_resume_is_exact(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("ESPER_RAY_LINEAGE_KEY", str(tmp_path / "key.pem"))
    cfg = small_cfg()
    a = run_training(cfg, out=tmp_path / "a", controller=Scripted(PLAN), progress=False)
    assert a.summary["germinations"] == 2
    run_training(cfg, out=tmp_path / "b", controller=Scripted(PLAN), progress=False, stop_after=3)
    b = run_training(cfg, resume=tmp_path / "b", controller=Scripted(PLAN), progress=False)
    drop = {"epoch_seconds", "wall_time", "seconds"}
    rows = [
        [{k: v for k, v in r.items() if k not in drop} for r in pq.read_table(d / "metrics.parquet").to_pylist()]
        for d in (tmp_path / "a", tmp_path / "b")
    ]
    assert len(rows[0]) == 6 and rows[0] == rows[1]
    sa, sb = a.trainer.host.state_dict(), b.trainer.host.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.trainer.host.architecture() == b.trainer.host.architecture()
    assert any(s["stage"] != "DORMANT" for s in a.trainer.host.architecture().values())
