"""The lineage ledger: chain, signature, tamper detection, checkpoint match, keys, replay."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file

from esper_ray import lineage
from esper_ray.contracts import EsperError, LineageEvent
from esper_ray.lineage import (
    GENESIS,
    Ledger,
    default_key_path,
    format_timeline,
    load_events,
    load_or_create_key,
    replay,
    verify_run,
    weights_digest,
)

BP_A = "a" * 64
BP_B = "b" * 64
RUN_ID = "run-1234"
HOST_ID = "run-1234/host"
CKPT_SEQ = 11  # the checkpoint event of the scripted run below
N_EVENTS = 12


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"head.weight": torch.randn(3, 4, generator=g), "head.bias": torch.randn(3, generator=g)}


def _write_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], slots: dict) -> None:
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file(weights, ckpt / "model.safetensors")
    # Shaped like the trainer's state.json: extra keys per slot and elsewhere are ignored.
    state = {
        "format": "esper-ray-checkpoint/1",
        "slots": {name: {"stage": s, "blueprint_hash": h, "epochs_in_stage": 2} for name, (s, h) in slots.items()},
    }
    (ckpt / "state.json").write_text(json.dumps(state))


FINAL_SLOTS = {"hidden1": ("FOSSILIZED", BP_A), "hidden2": ("EMBARGOED", ""), "hidden3": ("DORMANT", "")}


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "lineage.pem"


@pytest.fixture
def run(tmp_path: Path, key_path: Path) -> Path:
    """A signed run folder: 12 events ending in a checkpoint that matches them."""
    run_dir = tmp_path / "run"
    ledger = Ledger(run_dir, RUN_ID, HOST_ID, key_path=key_path)
    a = {"slot": "hidden1", "blueprint_hash": BP_A}
    b = {"slot": "hidden2", "blueprint_hash": BP_B}
    ledger.append("init", weights_digest="0" * 64, metrics={"host_params": 1000})
    ledger.append("germinate", **a, epoch=1, step=100, metrics={"val_acc": 0.5}, blueprint_name="conv1d")
    ledger.append("transition", **a, stage="TRAINING", epoch=2, step=200)
    ledger.append("germinate", **b, epoch=2, step=200, blueprint_name="mlp")
    ledger.append("transition", **b, stage="TRAINING", epoch=3, step=300)
    ledger.append("cull", **b, epoch=4, step=400, metrics={"val_acc": 0.55})
    ledger.append("transition", **a, stage="BLENDING", epoch=5, step=500, metrics={"val_acc": 0.6})
    ledger.append("rollback", epoch=5, step=520)
    ledger.append("transition", **a, stage="HOLDING", epoch=6, step=600)
    ledger.flush()  # flushed mid-run, like the trainer at each epoch end
    ledger.append("fossilize", **a, epoch=7, step=700, metrics={"val_acc": 0.71})
    ledger.append("transition", slot="hidden2", stage="EMBARGOED", epoch=7, step=700)
    weights = _weights()
    _write_checkpoint(run_dir, weights, FINAL_SLOTS)
    ledger.append("checkpoint", epoch=7, step=700, weights_digest=weights_digest(weights))
    ledger.flush()
    assert len(ledger) == N_EVENTS
    return run_dir


def _rewrite(run_dir: Path, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    """Tamper with the Parquet file as an editor would: read rows, change them, write back."""
    path = run_dir / "lineage.parquet"
    table = pq.read_table(path)
    rows = edit(table.to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def _check(run_dir: Path, key_path: Path, bad_seq: int | None, *words: str) -> None:
    report = verify_run(run_dir, key_path)
    assert not report.ok
    assert report.first_bad_seq == bad_seq, report.message
    assert "\n" not in report.message
    for word in words:
        assert word in report.message


# ---- a valid ledger -------------------------------------------------------------------------
def test_valid_run_verifies(run: Path, key_path: Path) -> None:
    report = verify_run(run, key_path)
    assert report.ok, report.message
    assert (report.events, report.first_bad_seq) == (N_EVENTS, None)
    assert report.message == f"ok: {N_EVENTS} events, chain and signature valid, checkpoint matches"


def test_chain_links_and_parquet_schema(run: Path) -> None:
    events = load_events(run)
    assert [e.seq for e in events] == list(range(N_EVENTS))
    assert events[0].prev_hash == GENESIS
    assert all(e.prev_hash == p.event_hash for p, e in zip(events, events[1:], strict=False))
    assert events[5].stage == "CULLED" and events[9].stage == "FOSSILIZED"  # defaulted by kind
    assert events[0].metrics == {"host_params": 1000.0}
    schema = pq.read_schema(run / "lineage.parquet")
    assert set(schema.names) == {f for f in LineageEvent.__dataclass_fields__}
    assert schema.field("metrics").type == pa.string()
    sig = json.loads((run / "lineage.sig.json").read_text())
    assert sig["count"] == N_EVENTS and sig["head"] == events[-1].event_hash
    assert len(bytes.fromhex(sig["public_key"])) == 32


def test_deleted_checkpoint_folder_fails_unless_ledger_only(run: Path, key_path: Path) -> None:
    """The ledger records a checkpoint: its folder being gone is a failure, naming the event."""
    shutil.rmtree(run / "checkpoint")
    report = verify_run(run, key_path)
    assert not report.ok
    assert report.first_bad_seq == N_EVENTS - 1
    assert "records a checkpoint" in report.message and "missing" in report.message
    assert "--ledger-only" in report.message
    assert verify_run(run, key_path, check_checkpoint=False).message == (
        f"ok: {N_EVENTS} events, chain and signature valid"
    )


def test_no_checkpoint_recorded_and_none_present_is_ok_with_a_note(tmp_path: Path, key_path: Path) -> None:
    ledger = Ledger(tmp_path, "r", "h", key_path)
    ledger.append("init", metrics={"host_params": 10.0})
    ledger.flush()
    report = verify_run(tmp_path, key_path)
    assert report.ok and "no checkpoint to compare" in report.message


def test_special_metric_values_survive_parquet(tmp_path: Path, key_path: Path) -> None:
    ledger = Ledger(tmp_path, "r", "h", key_path)
    ledger.append(
        "rollback",
        metrics={
            "loss": float("nan"),
            "inf": float("inf"),
            "n": 3,
            "tiny": 1e-300,
            "third": 1 / 3,
            "neg0": -0.0,
        },
    )
    ledger.flush()
    assert verify_run(tmp_path, key_path).ok
    metrics = load_events(tmp_path)[0].metrics
    assert math.isnan(metrics["loss"]) and metrics["third"] == 1 / 3 and metrics["n"] == 3.0


# ---- tampering ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seq", "column", "value"),
    [(6, "metrics", '{"val_acc":0.99}'), (8, "stage", "FOSSILIZED"), (0, "weights_digest", "f" * 64)],
)
def test_edited_row_is_named(run: Path, key_path: Path, seq: int, column: str, value: str) -> None:
    def edit(rows: list[dict]) -> list[dict]:
        rows[seq][column] = value
        return rows

    _rewrite(run, edit)
    kind_slot = {6: "transition hidden1", 8: "transition hidden1", 0: "init"}[seq]
    _check(run, key_path, seq, f"event {seq} ({kind_slot}): hash mismatch")


def test_edited_row_with_recomputed_hash_breaks_the_next_link(run: Path, key_path: Path) -> None:
    from esper_ray.lineage import _hash_row  # the forger knows the hash recipe

    def edit(rows: list[dict]) -> list[dict]:
        rows[4]["stage"] = "BLENDING"
        hashed = {k: v for k, v in rows[4].items() if k != "event_hash"}
        hashed["metrics"] = json.loads(hashed["metrics"])
        rows[4]["event_hash"] = _hash_row(hashed)
        return rows

    _rewrite(run, edit)
    _check(run, key_path, 5, "event 5", "does not link to event 4")


@pytest.mark.parametrize("seq", [3, N_EVENTS - 1])
def test_deleted_row_is_named(run: Path, key_path: Path, seq: int) -> None:
    _rewrite(run, lambda rows: rows[:seq] + rows[seq + 1 :])
    _check(run, key_path, seq, f"event {seq}")


def test_all_rows_deleted(run: Path, key_path: Path) -> None:
    _rewrite(run, lambda rows: [])
    _check(run, key_path, 0, "no events")


def test_reordered_rows_are_named(run: Path, key_path: Path) -> None:
    _rewrite(run, lambda rows: rows[:3] + [rows[4], rows[3]] + rows[5:])
    _check(run, key_path, 3, "event 3 out of place", "reordered")


def test_unsigned_appended_rows_are_named(run: Path, key_path: Path) -> None:
    signed = (run / "lineage.sig.json").read_bytes()
    ledger = Ledger(run, RUN_ID, HOST_ID, key_path)
    ledger.append("rollback", epoch=8, step=800)
    ledger.flush()
    (run / "lineage.sig.json").write_bytes(signed)  # the forger has no key: old signature back
    _check(run, key_path, N_EVENTS, f"event {N_EVENTS} (rollback): not covered by the signature")


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_parquet_is_reported_not_raised(run: Path, key_path: Path, keep: float) -> None:
    path = run / "lineage.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    _check(run, key_path, None, "lineage.parquet is unreadable")


def test_missing_or_garbage_files(run: Path, key_path: Path) -> None:
    sig = run / "lineage.sig.json"
    sig.write_text("{not json")
    _check(run, key_path, None, "lineage.sig.json is unreadable")
    sig.unlink()
    _check(run, key_path, None, "no signature file")
    (run / "lineage.parquet").write_bytes(b"PAR1 definitely not parquet PAR1")
    _check(run, key_path, None, "unreadable")
    (run / "lineage.parquet").unlink()
    _check(run, key_path, None, "no lineage ledger")


def test_edited_signature_count(run: Path, key_path: Path) -> None:
    path = run / "lineage.sig.json"
    sig = json.loads(path.read_text())
    sig["count"] -= 1
    path.write_text(json.dumps(sig))
    _check(run, key_path, None, "signature does not verify")


# ---- the checkpoint ------------------------------------------------------------------------
def test_swapped_checkpoint_weights(run: Path, key_path: Path) -> None:
    save_file(_weights(seed=1), run / "checkpoint" / "model.safetensors")
    _check(run, key_path, CKPT_SEQ, f"event {CKPT_SEQ} (checkpoint): weights digest")


@pytest.mark.parametrize(
    ("slot", "entry"),
    [("hidden1", ("HOLDING", BP_A)), ("hidden1", ("FOSSILIZED", BP_B)), ("hidden3", ("TRAINING", BP_B))],
)
def test_swapped_checkpoint_architecture(run: Path, key_path: Path, slot: str, entry: tuple[str, str]) -> None:
    _write_checkpoint(run, _weights(), {**FINAL_SLOTS, slot: entry})
    _check(run, key_path, CKPT_SEQ, f"slot {slot}", "state.json")


def test_checkpoint_without_a_checkpoint_event(tmp_path: Path, key_path: Path) -> None:
    ledger = Ledger(tmp_path, "r", "h", key_path)
    ledger.append("init")
    ledger.flush()
    _write_checkpoint(tmp_path, _weights(), {})
    _check(tmp_path, key_path, None, "no checkpoint event")
    (tmp_path / "checkpoint" / "model.safetensors").unlink()
    _check(tmp_path, key_path, None, "model.safetensors is missing")


# ---- keys and signatures ------------------------------------------------------------------
def test_signature_made_with_another_key(run: Path, key_path: Path, tmp_path: Path) -> None:
    path = run / "lineage.sig.json"
    sig = json.loads(path.read_text())
    other = Ed25519PrivateKey.generate()
    sig["signature"] = other.sign(f"esper-ray-lineage:v1:{RUN_ID}:{sig['count']}:{sig['head']}".encode()).hex()
    sig["public_key"] = (
        other.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    )
    path.write_text(json.dumps(sig))
    _check(run, key_path, None, "signed by another key")
    # The same forgery claiming our public key fails plainly.
    ours = load_or_create_key(key_path).public_key()
    sig["public_key"] = ours.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    path.write_text(json.dumps(sig))
    _check(run, key_path, None, "signature does not verify")


def test_verifying_with_the_wrong_or_no_key(run: Path, tmp_path: Path, key_path: Path) -> None:
    other = tmp_path / "other.pem"
    load_or_create_key(other)
    _check(run, other, None, "signed by another key")
    _check(run, tmp_path / "absent.pem", None, "no lineage key")
    assert not (tmp_path / "absent.pem").exists()  # verifying never creates a key
    public = tmp_path / "public.pem"  # a verifier may hold only the public half
    public.write_bytes(
        load_or_create_key(key_path)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert verify_run(run, public).ok


def test_key_file_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "key.pem"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = load_or_create_key(path)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert key.public_key().public_bytes(*raw) == again.public_key().public_bytes(*raw)
    assert [p.name for p in path.parent.iterdir()] == ["key.pem"]  # no temporary left behind


def test_loose_key_permissions_warn_once(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    load_or_create_key(path)
    os.chmod(path, 0o644)
    with pytest.warns(UserWarning, match="readable by other users"):
        load_or_create_key(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_or_create_key(path)  # second load: no second warning


def test_malformed_key_is_one_line_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    os.chmod(path, 0o600)
    with pytest.raises(EsperError, match=str(path)) as err:
        load_or_create_key(path)
    assert "\n" not in str(err.value)
    with pytest.raises(EsperError):
        Ledger(tmp_path / "run", "r", "h", key_path=path)


def test_default_key_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ESPER_RAY_LINEAGE_KEY", str(tmp_path / "k.pem"))
    assert default_key_path() == tmp_path / "k.pem"
    monkeypatch.delenv("ESPER_RAY_LINEAGE_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_key_path() == tmp_path / ".config" / "esper-ray" / "lineage_ed25519.pem"


def test_ledger_uses_env_key_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ESPER_RAY_LINEAGE_KEY", str(tmp_path / "env.pem"))
    ledger = Ledger(tmp_path / "run", "r", "h")
    ledger.append("init")
    ledger.flush()
    assert (tmp_path / "env.pem").exists()
    assert verify_run(tmp_path / "run").ok


# ---- resuming ------------------------------------------------------------------------------
def test_resume_continues_the_chain(run: Path, key_path: Path) -> None:
    old_head = load_events(run)[-1].event_hash
    ledger = Ledger(run, RUN_ID, HOST_ID, key_path)
    assert (len(ledger), ledger.head) == (N_EVENTS, old_head)
    event = ledger.append("resume", epoch=7, step=700)
    assert (event.seq, event.prev_hash) == (N_EVENTS, old_head)
    ledger.append("transition", slot="hidden2", stage="DORMANT", epoch=8, step=800)
    ledger.flush()
    report = verify_run(run, key_path)  # the checkpoint still matches its own event
    assert report.ok and report.events == N_EVENTS + 2, report.message
    assert Ledger(run, RUN_ID, HOST_ID, key_path).head == ledger.head


def test_flush_rewrites_only_after_append(run: Path, key_path: Path) -> None:
    files = [run / "lineage.parquet", run / "lineage.sig.json"]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
    ledger = Ledger(run, RUN_ID, HOST_ID, key_path)
    ledger.flush()
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files] == before
    ledger.append("rollback")
    ledger.flush()
    assert [p.stat().st_ino for p in files] != [ino for ino, _ in before]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "lineage.parquet", "lineage.sig.json"]


def test_resume_refuses_a_bad_ledger(run: Path, key_path: Path, tmp_path: Path) -> None:
    with pytest.raises(EsperError, match="belongs to run"):
        Ledger(run, "another-run", HOST_ID, key_path)
    with pytest.raises(EsperError, match="signed by another key"):
        Ledger(run, RUN_ID, HOST_ID, tmp_path / "other.pem")
    _rewrite(run, lambda rows: rows[:2] + rows[3:])
    with pytest.raises(EsperError, match="cannot resume.*event 2"):
        Ledger(run, RUN_ID, HOST_ID, key_path)


def _kill_before_signing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next flush writes the rows, then dies before the signature (as a SIGKILL between the two)."""

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed before signing")

    monkeypatch.setattr(lineage, "atomic_write_text", killed)


def test_resume_sets_aside_rows_written_but_never_signed(
    run: Path, key_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed_head = load_events(run)[-1].event_hash
    ledger = Ledger(run, RUN_ID, HOST_ID, key_path)
    ledger.append("resume", epoch=7, step=700)
    ledger.append("rollback", epoch=8, step=800)
    with monkeypatch.context() as m:
        _kill_before_signing(m)
        with pytest.raises(KeyboardInterrupt):
            ledger.flush()
    assert len(load_events(run)) == N_EVENTS + 2  # on disk, but not covered by the signature
    assert not verify_run(run, key_path).ok
    with pytest.warns(UserWarning, match=f"events {N_EVENTS}..{N_EVENTS + 1} were written but never signed"):
        resumed = Ledger(run, RUN_ID, HOST_ID, key_path)
    assert (len(resumed), resumed.head) == (N_EVENTS, signed_head)
    kept = pq.read_table(run / "lineage.unsigned.parquet").to_pylist()  # nothing written is lost
    assert [r["kind"] for r in kept[N_EVENTS:]] == ["resume", "rollback"]
    resumed.append("resume", epoch=7, step=700)
    resumed.flush()
    report = verify_run(run, key_path)
    assert report.ok and report.events == N_EVENTS + 1, report.message


def test_unsigned_rows_are_set_aside_only_when_they_follow_the_signed_ones(
    run: Path, key_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A forged tail (signature kept, rows appended by someone without the key) is set aside, never signed.
    signed = (run / "lineage.sig.json").read_bytes()
    forger = Ledger(run, RUN_ID, HOST_ID, key_path)
    forger.append("rollback", epoch=8, step=800)
    forger.flush()
    (run / "lineage.sig.json").write_bytes(signed)
    with pytest.warns(UserWarning, match="never signed"):
        assert len(Ledger(run, RUN_ID, HOST_ID, key_path)) == N_EVENTS
    # A signature whose count was lowered to hide rows does not verify: refused, not trimmed.
    sig = json.loads(signed)
    (run / "lineage.sig.json").write_text(json.dumps({**sig, "count": sig["count"] - 2}))
    with pytest.warns(UserWarning), pytest.raises(EsperError, match="cannot resume.*signature"):
        Ledger(run, RUN_ID, HOST_ID, key_path)
    # Rows deleted from the signed part are still refused (on disk: the signed rows + the forged one).
    (run / "lineage.sig.json").write_bytes(signed)
    _rewrite(run, lambda rows: rows[: N_EVENTS - 1])
    with pytest.raises(EsperError, match="cannot resume.*missing"):
        Ledger(run, RUN_ID, HOST_ID, key_path)
    # A ledger whose first flush never got its signature starts again (its rows set aside).
    fresh = tmp_path / "fresh"
    first = Ledger(fresh, RUN_ID, HOST_ID, key_path)
    first.append("init")
    with monkeypatch.context() as m:
        _kill_before_signing(m)
        with pytest.raises(KeyboardInterrupt):
            first.flush()
    with pytest.warns(UserWarning, match="events 0..0"):
        again = Ledger(fresh, RUN_ID, HOST_ID, key_path)
    assert len(again) == 0 and (fresh / "lineage.unsigned.parquet").is_file()
    again.append("init")
    again.flush()
    assert verify_run(fresh, key_path, check_checkpoint=False).ok


def test_append_rejects_bad_events(tmp_path: Path, key_path: Path) -> None:
    ledger = Ledger(tmp_path, "r", "h", key_path)
    for kwargs in (
        {"kind": "explode"},
        {"kind": "transition", "slot": "s", "stage": "RIPE"},
        {"kind": "germinate"},
        {"kind": "transition", "slot": "s"},
        {"kind": "rollback", "metrics": {"x": "high"}},
    ):
        with pytest.raises(EsperError):
            ledger.append(**kwargs)
    assert len(ledger) == 0 and ledger.head == GENESIS
    ledger.flush()
    assert not (tmp_path / "lineage.parquet").exists()  # nothing appended, nothing written


# ---- weights digest ------------------------------------------------------------------------
def test_weights_digest() -> None:
    w = _weights()
    reordered = dict(reversed(list(w.items())))
    assert list(reordered) != list(w)
    assert weights_digest(w) == weights_digest(reordered)
    changed = {k: v.clone() for k, v in w.items()}
    changed["head.bias"][1] += 1e-6
    assert weights_digest(changed) != weights_digest(w)
    assert weights_digest({k: v.double() for k, v in w.items()}) != weights_digest(w)
    assert weights_digest({}) == hashlib.sha256(b"").hexdigest()
    # Fixed bytes -> fixed digest, in every process (safetensors layout, no metadata).
    golden = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": torch.tensor([1, 2, 3], dtype=torch.int64),
    }
    assert weights_digest(golden) == ("1d0986257e4c70a710f07bc87725442d7bf81f9bc642c8bf4d5473516724b049")


def test_weights_digest_handles_views_and_grads() -> None:
    base = torch.randn(4, 4, requires_grad=True)
    tied = {"x": base, "y": base[:2], "t": base.t()}  # shared storage, non-contiguous
    copies = {k: v.detach().clone().contiguous() for k, v in tied.items()}
    assert weights_digest(tied) == weights_digest(copies)


# ---- replay and timeline ---------------------------------------------------------------------
def _ev(seq: int, kind: str, slot: str = "", stage: str = "", bp: str = "") -> LineageEvent:
    return LineageEvent(seq, "r", "h", kind, slot, bp, stage, 0, 0, "", {}, "")


def test_replay_scripted_lifecycle() -> None:
    script = [
        ("init", "", "", ""),
        ("germinate", "s1", "GERMINATED", BP_A),
        ("transition", "s1", "TRAINING", BP_A),
        ("germinate", "s2", "GERMINATED", BP_B),
        ("cull", "s1", "CULLED", BP_A),
        ("rollback", "", "", ""),
        ("transition", "s1", "EMBARGOED", ""),
        ("transition", "s1", "DORMANT", ""),
        ("germinate", "s1", "GERMINATED", BP_B),
        ("transition", "s1", "TRAINING", BP_B),
        ("transition", "s1", "BLENDING", BP_B),
        ("transition", "s1", "HOLDING", BP_B),
        ("fossilize", "s1", "FOSSILIZED", BP_B),
        ("transition", "s2", "TRAINING", BP_B),
        ("germinate", "s3", "GERMINATED", BP_A),
        ("cull", "s3", "CULLED", BP_A),
        ("transition", "s3", "EMBARGOED", ""),
        ("germinate", "s4", "GERMINATED", BP_A),
        ("cull", "s4", "", BP_A),  # stage left empty: implied by the kind
        ("transition", "s4", "EMBARGOED", ""),
        ("transition", "s4", "DORMANT", ""),
        ("checkpoint", "", "", ""),
    ]
    events = [_ev(i, *row) for i, row in enumerate(script)]
    assert replay(events) == {
        "s1": {"stage": "FOSSILIZED", "blueprint_hash": BP_B},
        "s2": {"stage": "TRAINING", "blueprint_hash": BP_B},
        "s3": {"stage": "EMBARGOED", "blueprint_hash": ""},
        "s4": {"stage": "DORMANT", "blueprint_hash": ""},
    }
    assert replay(events[:5])["s1"] == {"stage": "CULLED", "blueprint_hash": ""}
    assert replay([]) == {}


def test_replay_resume_discards_the_abandoned_stretch() -> None:
    events = [
        _ev(0, "germinate", "s1", "GERMINATED", BP_A),
        _ev(1, "checkpoint"),
        _ev(2, "transition", "s1", "TRAINING", BP_A),  # trained on, then the process died
        _ev(3, "germinate", "s2", "GERMINATED", BP_B),
        _ev(4, "resume"),  # continued from the checkpoint at event 1
        _ev(5, "transition", "s1", "CULLED", BP_A),
    ]
    assert replay(events) == {
        "s1": {"stage": "CULLED", "blueprint_hash": ""},
        "s2": {"stage": "DORMANT", "blueprint_hash": ""},
    }


def test_format_timeline(run: Path) -> None:
    text = format_timeline(run)
    lines = text.splitlines()
    assert lines[0] == f"run {RUN_ID}  host {HOST_ID}  {N_EVENTS} events"
    germ = lines[2]
    assert germ.startswith("epoch   1 step    100  hidden1  germinate conv1d(aaaaaaaa)")
    assert "GERMINATED" in germ and germ.endswith("val_acc=0.5")
    assert "final architecture:" in lines
    assert lines[-2].split() == ["hidden1", "FOSSILIZED", "conv1d(aaaaaaaa)"]
    assert lines[-1].split() == ["hidden2", "EMBARGOED"]
    with pytest.raises(EsperError, match="no lineage ledger"):
        format_timeline(run / "nowhere")
