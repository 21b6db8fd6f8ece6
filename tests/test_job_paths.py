"""Runs submitted with ``ray job submit`` write outside the job's temporary working directory.

Ray marks a job's entrypoint with ``RAY_JOB_CONFIG_JSON_ENV_VAR``; then relative output paths
resolve under ``$ESPER_RAY_HOME`` and the command prints the absolute run folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from esper_ray.cli import main
from esper_ray.cluster import persistent_path


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake job environment: a throwaway working folder and a persistent home."""
    monkeypatch.setenv("ESPER_RAY_LINEAGE_KEY", str(tmp_path / "key.pem"))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("ESPER_RAY_HOME", str(tmp_path / "home"))
    work = tmp_path / "job_working_dir"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def test_persistent_path_in_and_out_of_a_job(job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert persistent_path("runs/x") == job / "home" / "runs" / "x"
    assert persistent_path("/abs/x") == Path("/abs/x")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert persistent_path("runs/x") == job / "job_working_dir" / "runs" / "x"


def test_train_as_a_job_writes_under_the_home_and_prints_the_absolute_path(
    job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--no-progress", "training.epochs=1", "name=jobrun"]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed.startswith("run folder: /")
    run = Path(printed.removeprefix("run folder: "))
    assert run.parent == job / "home" / "runs" and run.name.startswith("jobrun-")
    assert (run / "summary.json").exists()
    assert not any((job / "job_working_dir").iterdir())  # nothing left in the temporary copy
    # --resume of a relative run folder finds the one an earlier job wrote under the home.
    rel = run.relative_to(job / "home")
    assert main(["train", "--no-progress", "--resume", str(rel)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"run folder: {run}"
