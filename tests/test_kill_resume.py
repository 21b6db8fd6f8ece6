"""A run killed with SIGKILL at a random point continues to the uninterrupted run's metrics.

Each trial starts ``esper-ray train`` in a subprocess with time-based checkpoints (the default
mechanism, ``training.checkpoint_every_s``, here at a short cadence so kills land between, and
during, checkpoints), kills it at a random moment, then either resumes it with ``--resume`` (a
checkpoint was written) or starts it again into the same ``--out`` (killed before the first
checkpoint). The finished folder must hold the same per-epoch metrics as a run never killed, and
its lineage must verify.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

OVERRIDES = ["training.epochs=40", "training.checkpoint_every_s=0.25", "training.eval_test=false"]
# Wall-clock columns differ between any two runs; everything else must match exactly.
TIMING = {"epoch_seconds", "seconds", "wall_s", "time"}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "esper_ray.cli", *args]


def _metrics(run: Path) -> list[dict]:
    """Per-epoch rows without wall-clock columns; NaN (e.g. test_acc with eval_test off) as a string
    so that equal rows compare equal."""
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    return [
        {
            k: "nan" if isinstance(v, float) and math.isnan(v) else v
            for k, v in row.items()
            if k not in TIMING and not k.endswith("_seconds")
        }
        for row in rows
    ]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    env = dict(os.environ, ESPER_RAY_LINEAGE_KEY=str(tmp_path / "key.pem"), RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])

    def run(*args: str) -> None:
        done = subprocess.run(_cmd(*args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    reference = tmp_path / "reference"
    run("train", "--no-progress", "--out", str(reference), *OVERRIDES)
    expected = _metrics(reference)
    assert len(expected) == 40

    rng = random.Random(16)
    outcomes = {"resumed": 0, "restarted": 0, "finished": 0}
    for trial in range(10):
        out = tmp_path / f"trial{trial}"
        proc = subprocess.Popen(
            _cmd("train", "--no-progress", "--out", str(out), *OVERRIDES),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # From the first flushed epoch (the ledger appears), kill after a random part of the run.
        deadline = time.monotonic() + 120
        while not (out / "lineage.parquet").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.returncode == 0:
            outcomes["finished"] += 1
        elif (out / "checkpoint" / "state.json").exists() or (out / "checkpoint.old" / "state.json").exists():
            outcomes["resumed"] += 1
            run("train", "--no-progress", "--resume", str(out))
        else:
            outcomes["restarted"] += 1
            run("train", "--no-progress", "--out", str(out), *OVERRIDES)
        assert _metrics(out) == expected, f"trial {trial}: metrics differ from the uninterrupted run"
        verify = subprocess.run(
            _cmd("lineage", "verify", str(out)), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert verify.returncode == 0, f"trial {trial}: {verify.stdout}{verify.stderr}"
    assert outcomes["resumed"] >= 5, outcomes  # most kills land after a checkpoint and exercise --resume
