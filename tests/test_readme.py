"""The README's "## Library API" example runs as written.

The python code block(s) under that heading are extracted and executed in a fresh
subprocess, in a temporary folder (with a copy of ``configs/`` so relative config paths
work), with the lineage key and HOME pointed into that folder so nothing is written to
the user's ~/.config. A missing README or section is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from esper_ray.tasks import cache_dir

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
HEADING = "## Library API"
_FENCE = re.compile(r"^\s*```\s*(\S*)\s*$")


class ReadmeError(AssertionError):
    """The README does not hold a runnable Library API example."""


def library_api_code(text: str, source: str = "README.md") -> str:
    """The python code blocks in the section under ``## Library API``, joined in order."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == HEADING), None)
    if start is None:
        raise ReadmeError(f'{source} has no "{HEADING}" section (a heading line exactly "{HEADING}")')
    blocks: list[list[str]] = []
    block: list[str] = []
    in_block = keep = False
    for line in lines[start + 1 :]:
        fence = _FENCE.match(line)
        if not in_block:
            if re.match(r"^#{1,2} ", line):  # the next section of the same or a higher level
                break
            if fence:
                in_block, keep, block = True, fence.group(1).lower() in ("python", "py", "python3"), []
        elif fence and not fence.group(1):  # the closing fence
            if keep:
                blocks.append(block)
            in_block = False
        else:
            block.append(line)
    if in_block:
        raise ReadmeError(f'{source}: a code block under "{HEADING}" is never closed')
    if not blocks or not any(line.strip() for block in blocks for line in block):
        raise ReadmeError(f'{source}: the "{HEADING}" section has no ```python code block')
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


def test_extractor_finds_only_the_library_api_python_blocks() -> None:
    text = "\n".join(
        [
            "# esper-ray",
            "```python",
            "print('not this one')",
            "```",
            "## Library API",
            "Some prose.",
            "```bash",
            "esper-ray train",
            "```",
            "```python",
            "x = 1",
            "```",
            "### A subsection still belongs to it",
            "```py",
            "print(x + 1)",
            "```",
            "## Next section",
            "```python",
            "print('nor this one')",
            "```",
        ]
    )
    assert library_api_code(text) == "x = 1\n\nprint(x + 1)\n"
    with pytest.raises(ReadmeError, match='no "## Library API" section'):
        library_api_code("# esper-ray\n## Quickstart\n```python\nx=1\n```\n")
    with pytest.raises(ReadmeError, match="no ```python code block"):
        library_api_code("## Library API\n```bash\nls\n```\n## Other\n")
    with pytest.raises(ReadmeError, match="never closed"):
        library_api_code("## Library API\n```python\nx = 1\n")


def test_readme_library_api_example_runs(tmp_path: Path) -> None:
    if not README.is_file():
        pytest.fail(f'{README} is missing: it must have a "{HEADING}" section with a python example')
    try:
        code = library_api_code(README.read_text(), str(README))
    except ReadmeError as err:
        pytest.fail(str(err))
    work = tmp_path / "work"
    work.mkdir()
    if (REPO / "configs").is_dir():
        shutil.copytree(REPO / "configs", work / "configs")
    script = work / "library_api_example.py"
    script.write_text(code)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HOME": str(home),
        "ESPER_RAY_LINEAGE_KEY": str(tmp_path / "key" / "lineage_ed25519.pem"),
        "ESPER_RAY_CACHE": str(cache_dir()),  # reuse generated data despite the new HOME
        "MPLBACKEND": "Agg",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    try:
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f'the "{HEADING}" example in README.md did not finish in 600 s')
    assert proc.returncode == 0, (
        f'the "{HEADING}" example in README.md failed (exit {proc.returncode}).\n'
        f"--- code ---\n{code}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    assert not (home / ".config" / "esper-ray").exists(), "the example wrote a key under ~/.config"
