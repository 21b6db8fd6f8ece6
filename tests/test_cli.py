"""Tests of the ``esper-ray`` command: bad input is one stderr line and exit 2; train and lineage.

Most calls run ``esper_ray.cli.main([...])`` in-process; a few run the real command in a
subprocess to check exit codes and that stderr holds exactly one line (no warnings, no
traceback). Every test works in a temporary folder with a temporary lineage key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from esper_ray import lineage
from esper_ray.cli import main

REPO = Path(__file__).resolve().parents[1]
PREFIX = "esper-ray: error:"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary working folder (no configs/quickstart.yaml there) and lineage key."""
    key = tmp_path / "key" / "lineage_ed25519.pem"
    monkeypatch.setenv("ESPER_RAY_LINEAGE_KEY", str(key))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return key


def _one_error_line(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, f"exit status {rc}, stderr: {err!r}"
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith(PREFIX), lines[0]
    assert "Traceback" not in err
    return lines[0]


def _tree(folder: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        pytest.param(["training.epochs=-1"], ["training.epochs", "greater than or equal to 1"], id="epochs"),
        pytest.param(["training.lr=fast"], ["training.lr"], id="lr-not-a-number"),
        pytest.param(["training.epoch=3"], ["training.epoch", "not permitted"], id="unknown-key"),
        pytest.param(["nosuch.thing=1"], ["nosuch"], id="unknown-section"),
        pytest.param(["training.epochs"], ["'training.epochs'", "KEY=VALUE"], id="no-equals"),
        pytest.param(["=3"], ["'=3'", "KEY=VALUE"], id="no-key"),
        pytest.param(["training.epochs=3", "host.slots=[hidden9]"], ["hidden9", "unknown slot"], id="slot"),
        pytest.param(["training.epochs=3", "blueprints.names=[nope]"], ["'nope'", "blueprint"], id="blueprint"),
        pytest.param(
            ["training.epochs=3", "task.family=cifar10", "task.root=/nonexistent"],
            ["/nonexistent", "CIFAR-10"],
            id="cifar-folder",
        ),
        pytest.param(["host.kind=transformer9"], ["host.kind"], id="host-kind"),
    ],
)
def test_bad_override_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], says: list[str]
) -> None:
    rc = main(["train", "--out", str(tmp_path / "run"), "--no-progress", *overrides])
    line = _one_error_line(capsys, rc)
    for word in says:
        assert word in line, line


def test_config_file_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yaml"
    line = _one_error_line(capsys, main(["train", "--config", str(missing), "--out", str(tmp_path / "r")]))
    assert "not found" in line and str(missing) in line

    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: [1, 2\n")
    line = _one_error_line(capsys, main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]))
    assert "not valid YAML" in line and str(bad) in line

    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    line = _one_error_line(capsys, main(["train", "--config", str(listy), "--out", str(tmp_path / "r")]))
    assert "mapping" in line and str(listy) in line

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("training:\n  epochs: 0\n")
    line = _one_error_line(capsys, main(["train", "--config", str(wrong), "--out", str(tmp_path / "r")]))
    assert "training.epochs" in line and str(wrong) in line
    assert not (tmp_path / "r").exists()  # config errors come before any folder is made


def test_resume_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text("name: x\n")
    before = _tree(empty)
    line = _one_error_line(capsys, main(["train", "--resume", str(empty), "--no-progress"]))
    assert "no checkpoint" in line and str(empty) in line
    assert _tree(empty) == before

    line = _one_error_line(capsys, main(["train", "--resume", str(tmp_path / "nowhere")]))
    assert "no checkpoint" in line and "nowhere" in line

    line = _one_error_line(capsys, main(["train", "--resume", str(empty), "training.epochs=3"]))
    assert "--resume" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line_fresh_or_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fresh"
    line = _one_error_line(capsys, main(["train", "--out", str(out), "--device", "cuda", "training.epochs=2"]))
    assert "training.device=cuda" in line and "CUDA is not available" in line
    assert not out.exists()

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", "training.epochs=2"]) == 0
    capsys.readouterr()
    before = _tree(run)
    line = _one_error_line(capsys, main(["train", "--resume", str(run), "--device", "cuda", "--no-progress"]))
    assert "CUDA is not available" in line
    assert _tree(run) == before


def test_train_into_a_non_empty_out_is_refused_and_keeps_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken"
    (out / "checkpoint").mkdir(parents=True)
    (out / "metrics.parquet").write_bytes(b"precious")
    (out / "checkpoint" / "state.json").write_text('{"keep": true}')
    before = _tree(out)
    line = _one_error_line(capsys, main(["train", "--out", str(out), "--no-progress", "training.epochs=2"]))
    assert str(out) in line and "not empty" in line
    assert _tree(out) == before
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoint", "metrics.parquet", "state.json"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("host.slots=[hidden9]", id="slot"),
        pytest.param("task.family=cifar10 task.root=/nonexistent", id="cifar"),
    ],
)
def test_failed_start_leaves_out_free_for_a_retry(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    out = tmp_path / "run"
    _one_error_line(capsys, main(["train", "--out", str(out), "--no-progress", *bad.split()]))
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def _subprocess(args: list[str], cwd: Path, key: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ESPER_RAY_LINEAGE_KEY": str(key), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "esper_ray.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("override", "says"),
    [("training.epochs=-1", "training.epochs"), ("host.slots=[hidden9]", "hidden9")],
)
def test_real_command_bad_input(tmp_path: Path, _isolated: Path, override: str, says: str) -> None:
    proc = _subprocess(["train", "--out", str(tmp_path / "run"), "--no-progress", override], tmp_path, _isolated)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"stderr should be exactly one line: {proc.stderr!r}"
    assert lines[0].startswith(PREFIX) and says in lines[0]


# ---- train, then lineage ----------------------------------------------------------------------------
def test_train_then_lineage_verify_tamper_and_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], _isolated: Path
) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), "--no-progress", "training.epochs=3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"run folder: {out}" in captured.out
    assert "final test accuracy" in captured.out
    assert (out / "checkpoint" / "state.json").is_file()
    assert pq.read_table(out / "metrics.parquet").num_rows == 3

    assert main(["lineage", "verify", str(out)]) == 0
    verified = capsys.readouterr().out
    assert verified.startswith("ok:") and "checkpoint matches" in verified
    assert main(["lineage", "verify", str(out), "--key", str(_isolated)]) == 0
    capsys.readouterr()

    other = tmp_path / "other.pem"
    lineage.load_or_create_key(other)
    assert main(["lineage", "verify", str(out), "--key", str(other)]) == 1
    assert "TAMPERED" in capsys.readouterr().out

    assert main(["lineage", "show", str(out)]) == 0
    timeline = capsys.readouterr().out
    assert "init" in timeline and "checkpoint" in timeline and "final architecture" in timeline
    assert "init" in timeline.splitlines()[1].split()  # the first event

    # Edit one row of the ledger: verify names that event and exits 1.
    path = out / "lineage.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    assert len(rows) >= 2 and rows[0]["kind"] == "init"
    rows[1]["epoch"] += 1
    pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    assert main(["lineage", "verify", str(out)]) == 1
    tampered = capsys.readouterr().out.strip().splitlines()
    assert len(tampered) == 1
    assert tampered[0].startswith("TAMPERED:") and "event 1" in tampered[0] and rows[1]["kind"] in tampered[0]

    line = _one_error_line(capsys, main(["lineage", "verify", str(tmp_path / "nowhere")]))
    assert "nowhere" in line


def test_the_shipped_policy_on_a_host_beyond_its_maxima_is_one_line(tmp_path: Path, capsys) -> None:
    """A host with more slots than the shipped Tamiyo handles fails in one line, and the failed start
    leaves no run folder behind (a retry into the same --out works)."""
    from esper_ray.cli import main

    out = tmp_path / "run"
    args = ["train", "--controller", "tamiyo", "--out", str(out), "--no-progress"]
    tiny = ["blueprints.source=local", "training.epochs=2", "lineage.enabled=false"]
    line = _one_error_line(capsys, main([*args, *tiny, "host.hidden=[8,8,8,8,8,8,8]"]))
    assert "8 slots" in line and "max_slots=6" in line, line
    assert not out.exists()
    assert main([*args, *tiny, "host.hidden=[8,8]"]) == 0
    assert (out / "summary.json").exists()
