"""Run as users do: a Ray head on loopback, `ray job submit` of a short train, the named actors,
the custom metrics on the metrics export port; and the one-line errors of a bad address or an
oversubscribed config.

The head is started by this test with `ray start --head --block` in its own process group and
stopped by signalling that group, so only the cluster this test started is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper_ray.cli import main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",  # a throwaway local test cluster; README documents token mode
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # job entrypoints find `esper-ray`
    )
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[dict[str, object]]:
    ports = {name: _free_port() for name in ("gcs", "dashboard", "agent", "agent_grpc", "metrics", "client")}
    tmp = Path("/tmp") / f"esper-ray-ci-{os.getpid()}"  # short: Ray's socket paths have a length limit
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={ports['gcs']}",
            "--num-cpus=2",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports['dashboard']}",
            f"--dashboard-agent-listen-port={ports['agent']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--metrics-export-port={ports['metrics']}",
            f"--ray-client-server-port={ports['client']}",
            f"--temp-dir={tmp}",
        ],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopping it stops only this cluster
    )
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        _wait_for_jobs_api(address, proc)
        yield {"address": address, "ports": ports, "tmp": tmp_path_factory.mktemp("cluster")}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def _wait_for_jobs_api(address: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{address}/api/jobs/", timeout=2) as r:
                if r.status == 200:
                    time.sleep(3)  # the job agent comes up a moment after the head's API
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("the test head's job API did not come up")


def _ray(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.mark.slow
def test_job_submit_runs_train_and_the_actors_and_metrics_show(head) -> None:
    out, storage, key = head["tmp"] / "run", head["tmp"] / "urza", head["tmp"] / "key.pem"
    runtime_env = json.dumps({"excludes": [".venv", "runs", ".git", "*.parquet", "*.png"]})
    for attempt in range(3):  # the dashboard's job agent may need a moment more on a busy machine
        submitted = _ray(
            "job",
            "submit",
            "--address",
            head["address"],
            "--working-dir",
            ".",
            "--runtime-env-json",
            runtime_env,
            "--",
            "esper-ray",
            "train",
            "--out",
            str(out),
            "--no-progress",
            "training.epochs=4",
            "blueprints.source=urza",
            "blueprints.startup_ready=2",
            f"actors.storage={storage}",
            f"lineage.key_path={key}",
            "actors.karn_interval_s=5",
        )
        if "No available agent" not in submitted.stderr + submitted.stdout:
            break
        time.sleep(5 * (attempt + 1))
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, logs[-3000:]
    assert "succeeded" in logs and "run folder:" in logs
    assert "\r" not in submitted.stdout  # progress reads well in job logs: no carriage-return spam
    assert (out / "metrics.parquet").exists() and (out / "lineage.parquet").exists()

    listed = _ray("list", "actors", "--address", head["address"], "--format", "json", "--limit", "100")
    assert listed.returncode == 0, listed.stderr[-2000:]
    alive = {a["name"] for a in json.loads(listed.stdout) if a["state"] == "ALIVE"}
    assert {"urza", "karn", "tezzeret", "urabrask"} <= alive  # detached: they outlive the job

    # Each actor's metrics reach the export port on its own reporting cycle: wait for all of them.
    wanted = ("ray_esper_catalogue_size", "ray_esper_benchmarks", "ray_esper_compiles")
    text = ""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not all(m in text for m in wanted):
        with urllib.request.urlopen(f"http://127.0.0.1:{head['ports']['metrics']}/metrics", timeout=5) as r:
            text = r.read().decode()
        time.sleep(2)
    for metric in wanted:
        assert metric in text, metric


def test_an_address_where_no_cluster_answers_is_one_line_within_seconds(tmp_path) -> None:
    # A fresh process, as a user runs it (this test process may already hold a Ray session).
    port = _free_port()  # nothing listens there
    env = {**_env(), "ESPER_RAY_LINEAGE_KEY": str(tmp_path / "key.pem")}
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "esper_ray.cli",
            "train",
            "--out",
            str(tmp_path / "r"),
            "--address",
            f"127.0.0.1:{port}",
            "blueprints.source=urza",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr[-2000:]
    assert err[0].startswith("esper-ray: error: no Ray cluster answers at")
    assert time.monotonic() - started < 60  # seconds, not a silent hang (includes the imports)
    assert not (tmp_path / "r").exists()


@pytest.mark.ray
def test_a_config_asking_for_more_gpus_than_the_cluster_has_is_one_line(ray_session, tmp_path, capsys) -> None:
    code = main(
        [
            "train",
            "--out",
            str(tmp_path / "r"),
            "blueprints.source=urza",
            "actors.namespace=esper-gpu-overask",
            f"actors.storage={tmp_path / 'urza'}",
            "actors.tezzeret.num_gpus=8",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "actors.tezzeret.num_gpus=8" in err[0] and "GPUs in all" in err[0]
