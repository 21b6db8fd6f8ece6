"""The static checks CI gates on: ruff (with its private-access and complexity rules) over the whole
repository, and mypy over the library (``esper_ray``, ``envs``, ``actors``; settings in pyproject.toml).

They run the same tools a developer runs (``ruff check .``, ``mypy``) so a failure here reads the same
as it does at the prompt.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    done = _run("ruff", "check", "--output-format", "concise", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_rules_include_private_access_and_complexity():
    """The rules this test gates are the ones the project promises: no module reaches into another's
    underscore names (SLF) and a bound on function complexity (C90)."""
    done = _run("ruff", "check", "--show-settings", "esper_ray/__init__.py")
    assert done.returncode == 0, done.stderr
    settings = done.stdout
    assert "private-member-access (SLF001)" in settings
    assert "complex-structure (C901)" in settings
    assert "linter.mccabe.max_complexity = 12" in settings


@pytest.mark.slow
def test_mypy_finds_no_errors():
    done = _run("mypy")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Success: no issues found" in done.stdout
