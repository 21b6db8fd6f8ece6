#!/usr/bin/env bash
# The GPU check: run on a lent GPU machine (one H100 or H200), from the repository root.
#
# What it checks: tests/test_cuda.py, the project's CUDA path on a real GPU (training with
# training.device=cuda and a germinated seed: everything on the GPU, the seed isolated bit for
# bit, CPU and GPU runs agreeing; probe telemetry on cuda equal to the CPU computation; exact
# checkpoint resume on cuda and across devices; Tezzeret's torch.compile on cuda against eager;
# Urabrask's CUDA latency and measured peak memory; Tezzeret and Urabrask placed by Ray on
# half a GPU each, compiling and benchmarking a blueprint on it). Then a short timing of
# Trainer.train_epoch on cuda against the CPU (1 thread), MNIST-1D, MLP and 1-D CNN hosts; and the
# batched env's rows of benchmarks/env_throughput.py (N episodes' host epochs as one batch on the GPU
# against one single env on one CPU thread); and the transformer distillation benchmark on the GPU.
#
# How it is run: with the workplace's device tool, `run` with carry [".whl"] and the command
#     bash benchmarks/gpu_check.sh
# The machine has Python 3.12 with torch (CUDA) but no network and neither Ray, pydantic,
# cryptography, gymnasium, mnist1d nor jsonschema: they travel as cp312 wheels in .whl/
# (made here by `.venv/bin/python tools/gpu_wheels.py`; git-ignored, never committed) and
# are installed under /tmp/site. The repository is not pip-installed there: PYTHONPATH makes
# esper_ray, envs and actors importable (nothing reads esper-ray's package metadata).
# Logs go to $OUT (cuda_tests.log, timing.log, batched.log, distill_transformer.log) when $OUT is set.
# About 10-15 minutes.
#
# CI never runs this (no GPU there; tests/test_cuda.py skips itself without CUDA).
#
# On a machine without a GPU it runs too, as a dry run: the CUDA tests skip and the timing is
# CPU only. There it takes .venv/bin/python and leaves wheels for another Python uninstalled.
# PYTHON, WHEELS and SITE override the interpreter, .whl and /tmp/site;
# ESPER_RAY_TEST_DEVICE=cpu runs the checks of tests/test_cuda.py on the CPU instead of skipping.
set -o pipefail
cd "$(dirname "$0")/.." || exit 2

# python3 on the GPU machine (no .venv travels there); the project's venv where there is one.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
LOGDIR=${OUT:-}

section() { printf '\n==== %s ====\n' "$*"; }

section "machine"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
"$PY" - <<'EOF'
import sys

import torch

print(f"python {sys.version.split()[0]} at {sys.executable}")
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
EOF

section "wheels"
TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if compgen -G "$WHEELS/*-cp3*-cp3*.whl" >/dev/null && ! compgen -G "$WHEELS/*-$TAG-$TAG-*.whl" >/dev/null; then
    export PYTHONPATH="$PWD"
    echo "the wheels in $WHEELS are not for $TAG: not installed, using $PY's own packages (a dry run)"
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        || { echo "installing the wheels from $WHEELS failed"; exit 2; }
    export PYTHONPATH="$SITE:$PWD"
    echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
else
    export PYTHONPATH="$PWD"
    echo "no wheels in $WHEELS: using $PY's own packages"
fi
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1

section "imports"
# Every module of esper_ray, envs and actors, each on its own: a failure is reported, not fatal
# (the tests then say what it breaks).
"$PY" - <<'EOF'
import importlib
import importlib.metadata
import pkgutil
import traceback

for name in ("ray", "pydantic", "cryptography", "gymnasium", "mnist1d", "jsonschema"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {importlib.metadata.version(name)} from {mod.__file__}")
    except Exception as err:
        print(f"{name}: cannot import: {type(err).__name__}: {err}")
failed, seen = [], 0
for top in ("esper_ray", "envs", "actors"):
    try:
        path = importlib.import_module(top).__path__
        names = [top] + [m.name for m in pkgutil.walk_packages(path, top + ".")]
    except Exception:
        names = [top]
    for name in names:
        seen += 1
        try:
            importlib.import_module(name)
        except Exception as err:
            failed.append(name)
            print(f"{name}: cannot import: {traceback.format_exception_only(err)[-1].strip()}")
print(f"imported {seen - len(failed)} of {seen} modules of esper_ray, envs and actors" + (f"; failed: {failed}" if failed else ""))
EOF

section "tests/test_cuda.py"
# No -x: this runs once on a lent machine, so every failure is worth seeing, not only the first.
# -s shows what the tests print (compile modes and times, latencies, peak memory, placements).
if [ -n "$LOGDIR" ]; then TEST_LOG="$LOGDIR/cuda_tests.log"; else TEST_LOG=/dev/null; fi
timeout -k 10 "${TEST_TIMEOUT:-360}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs -s 2>&1 | tee "$TEST_LOG"
status=$?
echo "pytest exit status: $status"

section "timing: Trainer.train_epoch, cuda against cpu"
if [ -n "$LOGDIR" ]; then TIME_LOG="$LOGDIR/timing.log"; else TIME_LOG=/dev/null; fi
timeout -k 10 "${TIMING_TIMEOUT:-120}" "$PY" - <<'EOF' 2>&1 | tee "$TIME_LOG"
import time

import torch

from esper_ray.config import load_config
from esper_ray.tasks import load_task
from esper_ray.tolaria.trainer import Trainer

# The default run (MNIST-1D, batch 100, 32 steps an epoch, validation and test scored each
# epoch); epochs=1000 so that no timed epoch is the run's last.
data = load_task(load_config(None, []).task)
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def seconds_per_epoch(device: str, kind: str, budget_s: float = 3.0) -> tuple[float, int]:
    tr = Trainer(load_config(None, [f"training.device={device}", f"host.kind={kind}", "training.epochs=1000"]), data)
    tr.train_epoch()  # warm-up: CUDA context, cuBLAS/cuDNN handles, allocator
    n, start = 0, time.perf_counter()
    while n < 3 or (time.perf_counter() - start < budget_s and n < 100):
        tr.train_epoch()
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n, n


for kind in ("mlp", "cnn1d"):
    got = {d: seconds_per_epoch(d, kind) for d in devices}
    text = ", ".join(f"{d} {s * 1e3:.1f} ms/epoch ({n} epochs)" for d, (s, n) in got.items())
    ratio = f"; cpu/cuda = {got['cpu'][0] / got['cuda'][0]:.2f}x" if "cuda" in got else ""
    print(f"{kind}: {text}{ratio}  (cpu: 1 thread, training.threads)")
EOF
echo "timing exit status: $?"

section "timing: batched env (envs.batched), env steps/s against one single env on one CPU thread"
# The batched rows of env_throughput.py with the batched env on the GPU (target: >= 100x one single env
# on one CPU core at the best N); a dry run without CUDA times small N on the CPU.
if [ -n "$LOGDIR" ]; then BATCHED_LOG="$LOGDIR/batched.log"; else BATCHED_LOG=/dev/null; fi
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    BATCHED_ARGS=(--device cuda --batched-n "${BATCHED_N:-1,32,128,512,1024}" --batched-steps 10 --batched-seeded-n 1,32,128)
else
    BATCHED_ARGS=(--device cpu --batched-n 1,8 --batched-steps 5 --batched-seeded-n 8 --batched-seeded-steps 3)
fi
timeout -k 10 "${BATCHED_TIMEOUT:-300}" "$PY" benchmarks/env_throughput.py --batched-only "${BATCHED_ARGS[@]}" 2>&1 \
    | tee "$BATCHED_LOG"
echo "batched timing exit status: $?"

section "transformer distillation on the device (benchmarks/distill_transformer.py)"
# The transformer distillation benchmark with every model on the GPU (training.device=cuda; the
# full benchmark there, its --quick form in a dry run), bits per byte as on the CPU.
if [ -n "$LOGDIR" ]; then DISTILL_LOG="$LOGDIR/distill_transformer.log"; else DISTILL_LOG=/dev/null; fi
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    DISTILL_ARGS=(--out /tmp/distill-transformer-gpu training.device=cuda)
else
    DISTILL_ARGS=(--quick --out /tmp/distill-transformer-dry)
fi
timeout -k 10 "${DISTILL_TIMEOUT:-600}" "$PY" benchmarks/distill_transformer.py "${DISTILL_ARGS[@]}" 2>&1 \
    | tee "$DISTILL_LOG"
echo "distillation exit status: $?"
exit "$status"
