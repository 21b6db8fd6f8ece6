"""Urza's memory is bounded: at most ``templates_in_memory`` templates in the object store, the rest on disk.

The library's entries stay in memory; the templates (the large part) are put in the object store
only when asked for, the least recently served one making room, and every stored blueprint is still
served, from disk when it is not in memory, digest checked.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from esper_ray.blueprints import BlueprintSpec
from esper_ray.contracts import BenchmarkReport

pytestmark = pytest.mark.ray

K = 3  # templates kept in memory
N = 8  # blueprints stored: more than K


def _spec(width: int) -> BlueprintSpec:
    return BlueprintSpec.model_validate(
        {
            "name": f"mem{width}",
            "kind": "vector",
            "nodes": [
                {"id": "n0", "op": "linear", "args": {"width": width}},
                {"id": "n1", "op": "linear", "inputs": ["n0"], "args": {"width": None}},
            ],
        }
    )


def _report(spec: BlueprintSpec) -> BenchmarkReport:
    return BenchmarkReport(
        blueprint_hash=spec.content_hash,
        device="cpu",
        params=10,
        flops=10,
        latency_p50_ms=0.1,
        latency_p95_ms=0.2,
        peak_memory_bytes=100,
        grad_norm_ratio=1.0,
        nan_under_large_inputs=False,
        low_precision_error=0.0,
        risk="low",
        passed=True,
    )


@pytest.fixture
def urza(ray_session, tmp_path: Path):
    import ray

    from actors.launch import _actor_class
    from actors.urza import Urza

    name = f"urza-mem-{uuid.uuid4().hex[:8]}"
    handle = _actor_class(Urza).options(name=name, num_cpus=0.05).remote(str(tmp_path), False, K)
    yield handle
    ray.kill(handle, no_restart=True)


def test_urza_keeps_at_most_k_templates_in_memory_and_serves_every_blueprint(urza, tmp_path: Path) -> None:
    import ray

    specs = [_spec(w) for w in range(2, 2 + N)]
    # Distinct bytes per blueprint (the content does not matter to Urza; the digest does).
    templates = {
        s.content_hash: hashlib.sha256(s.content_hash.encode()).digest() * (50 + i) for i, s in enumerate(specs)
    }
    try:  # the typed record where the contracts have it, else the plain mapping Urza took before
        from esper_ray.contracts import CompileInfo

        info: object = CompileInfo("eager", 0.0)
    except ImportError:
        info = {"mode": "eager", "seconds": 0.0, "error": ""}
    for s in specs:
        status = ray.get(urza.complete.remote(s.to_json(), templates[s.content_hash], (16,), info, _report(s)))
        assert status == "ready"
        assert ray.get(urza.stats.remote())["templates_in_store"] <= K
    stats = ray.get(urza.stats.remote())
    assert stats["ready"] == N and stats["templates_in_memory_max"] == K
    assert stats["templates_in_store"] == 0  # nothing is put in the store until asked for

    # Every stored blueprint is served (twice: from disk, then again after others evicted it).
    for _ in range(2):
        for s in specs:
            ref = ray.get(urza.template_ref.remote(s.content_hash))
            assert ref is not None and ray.get(ref) == templates[s.content_hash]
            assert ray.get(urza.stats.remote())["templates_in_store"] <= K
    assert ray.get(urza.stats.remote())["templates_in_store"] == K

    # Least recently served out first: serving the oldest of the K keeps it; the next new one evicts another.
    last = [s.content_hash for s in specs[-K:]]
    ray.get(urza.template_ref.remote(last[0]))  # now the most recent
    ray.get(urza.template_ref.remote(specs[0].content_hash))  # read from disk: evicts last[1]
    kept = ray.get(urza.__ray_call__.remote(lambda self: list(self._in_store)))
    assert kept == [last[2], last[0], specs[0].content_hash]

    # A ref a caller holds stays valid after Urza evicts its own (Ray counts the borrower).
    held = ray.get(urza.template_ref.remote(specs[1].content_hash))
    for s in specs[2 : 2 + K]:
        ray.get(urza.template_ref.remote(s.content_hash))
    assert specs[1].content_hash not in ray.get(urza.__ray_call__.remote(lambda self: list(self._in_store)))
    assert ray.get(held) == templates[specs[1].content_hash]

    # A template damaged on disk while out of memory is not served (its digest no longer matches).
    victim = specs[-1].content_hash
    for s in specs[:K]:
        ray.get(urza.template_ref.remote(s.content_hash))  # push the victim out of memory
    (tmp_path / "templates" / f"{victim}.safetensors").write_bytes(b"tampered")
    assert ray.get(urza.template_ref.remote(victim)) is None
    # Unknown keys: nothing.
    assert ray.get(urza.template_ref.remote("0" * 64)) is None
