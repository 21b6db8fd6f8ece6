"""Fetch the wheels that benchmarks/gpu_check.sh installs on the lent GPU machine, into ``.whl/``.

The GPU machine has Python 3.12 with torch (CUDA), numpy, scipy, pyarrow, safetensors, pyyaml,
matplotlib, pytest, hypothesis, rich, tqdm, click, filelock, msgpack, protobuf, requests,
aiosignal, frozenlist, attrs, packaging, pandas and scikit-learn, and no network. Everything
else ``esper_ray``, ``envs`` and ``actors`` import (and what Ray needs at ``ray.init``) travels
as cp312 wheels of the versions installed in this project's venv. The Ray wheel (79 MB) is
repacked without ``ray/jars/`` (Java workers) and the dashboard's JavaScript source maps, so
that ``.whl`` fits the device tool's 64 MiB carry limit; its RECORD loses those entries.

Run from the repository root, with the project's venv (it reads the versions from it)::

    .venv/bin/python tools/gpu_wheels.py      # then: du -sh .whl

Needs PyPI (``python3 -m pip download``). ``.whl/`` is git-ignored (.gitignore), never
committed. Not run by CI.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
import zipfile
from pathlib import Path

# Distributions the GPU machine lacks. Ray core at import/ray.init needs jsonschema (+ its three);
# its runtime-env agent's aiohttp is vendored inside the Ray wheel. pydantic: every config.
# cryptography (+ cffi, pycparser): the lineage ledger. gymnasium (+ cloudpickle,
# farama-notifications): envs/. mnist1d: the MNIST-1D task. typing-extensions: pydantic 2.14
# wants >= 4.16, newer than torch's image may have.
PACKAGES = [
    "ray",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "cryptography",
    "cffi",
    "pycparser",
    "gymnasium",
    "cloudpickle",
    "farama-notifications",
    "mnist1d",
]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# Entries dropped from the Ray wheel: Java support, and the dashboard's source maps.
RAY_DROP_PREFIXES = ("ray/jars/",)
RAY_DROP_SUFFIXES = (".map",)
RAY_DROP_UNDER = "ray/dashboard/client/build/"


def download(names: list[str], dest: Path, python_version: str) -> None:
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    for name in names:
        spec = f"{name}=={md.version(name)}"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        cmd += ["--python-version", python_version, "--implementation", "cp", *plat, "-d", str(dest), spec]
        subprocess.run(cmd, check=True)


def _drop(name: str) -> bool:
    if name.startswith(RAY_DROP_PREFIXES):
        return True
    return name.startswith(RAY_DROP_UNDER) and name.endswith(RAY_DROP_SUFFIXES)


def repack_ray(wheel: Path) -> tuple[int, int]:
    """Rewrite ``wheel`` in place without the dropped entries; returns (bytes before, after)."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        infos = src.infolist()
        if not any(_drop(i.filename) for i in infos):
            tmp.unlink()
            return before, before  # repacked already
        for info in infos:
            if _drop(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if not _drop(ln.split(",", 1)[0])).encode()
            # The same ZipInfo keeps each entry's permission bits (raylet and gcs_server are executables).
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data, compresslevel=9)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=".whl")
    ap.add_argument("--python-version", default="3.12")
    args = ap.parse_args()
    dest = Path(args.dest)
    dest.mkdir(exist_ok=True)
    download(PACKAGES, dest, args.python_version)
    for wheel in dest.glob("ray-*.whl"):
        before, after = repack_ray(wheel)
        print(f"{wheel.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    total = sum(w.stat().st_size for w in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels in {dest}, {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
