"""Tezzeret: validates, contract-checks and compiles every submitted spec, on its own queue.

``submit(spec_json)`` answers at once: it parses the text (cheap), records the spec as
``pending`` in Urza (so the queue survives Tezzeret: a restarted Tezzeret asks Urza for
the pending entries and queues them again) and puts it on the queue. A background
thread works the queue, one spec at a time:

1. validate: parse (malformed -> rejected with the pydantic reason), then the blueprint
   contract (``check_contract``) in each reference slot shape of its kind, within the
   parameter budget;
2. build the seed for its first reference shape and keep its weights as a safetensors
   template;
3. compile: ``torch.compile`` of the seed's forward+backward (seconds on a CPU, see
   BENCHMARKS.md), or eager when compile is off or fails, the reason recorded;
4. hand it to Urabrask for benchmarking, and report the result to Urza.

A slow compile stalls nobody: the queue is Tezzeret's own and nothing waits on it.
Everything a submitter controls is untrusted: no spec, however hostile, crashes the
actor; it ends as a rejected entry with a reason. ``validate_spec`` is a plain function
so that it can be tested without Ray.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass, replace
from typing import Any

import ray
import safetensors.torch
import torch
from pydantic import ValidationError
from ray.exceptions import GetTimeoutError, RayActorError

from actors.client import TEZZERET, URABRASK, URZA, Peer
from actors.urabrask import actor_device
from actors.urza import COMPILED, PENDING, raw_key
from esper_ray.blueprints import BlueprintShapeError, BlueprintSpec, build_seed, check_contract, count_params
from esper_ray.config import ActorsConfig, BlueprintsConfig, format_validation_error
from esper_ray.contracts import BlueprintStatus, CompileInfo, CompileMode, RejectionStage
from esper_ray.util import error_line
from esper_ray.util import one_line as _escaped

log = logging.getLogger("esper_ray.actors.tezzeret")

# The slot shapes (without batch) every spec of a kind is checked in. A seq blueprint must
# also fit a vector slot, where it sees the (B, 1, D) view; the first shape is the one the
# weight template is built for and Urabrask benchmarks.
REFERENCE_SLOT_SHAPES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vector": ((64,),),
    "seq": ((16, 32), (40,)),
    "image": ((16, 8, 8),),
}
DEFAULT_MAX_PARAMS = BlueprintsConfig().max_seed_params
MAX_SPEC_CHARS = 64_000  # a real spec is a few KB; longer text is rejected unparsed
MAX_STORED_CHARS = 4_000  # how much of a rejected, unparsed submission Urza keeps
MAX_ATTEMPTS = 3  # infrastructure failures (a peer died) before a spec is given up on
RESYNC_S = 2.0  # idle seconds between asking Urza for pending entries
MAX_REASON_CHARS = 300


# ---- validation (no Ray) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Validation:
    """The verdict on one submitted text."""

    ok: bool
    key: str  # the content hash when the spec parsed (and any stated hash matched), else a raw key
    reason: str = ""
    stage: str = ""  # where it failed: RejectionStage.PARSE | HASH | CONTRACT
    spec: BlueprintSpec | None = None
    shapes: tuple[tuple[int, ...], ...] = ()  # reference shapes it fits (and passes) in
    params: int = 0  # the most parameters it has in any of them


def one_line(reason: str) -> str:
    """A reason safe to log and store: control characters escaped (a submitter chose part of
    the text, e.g. a field name with a newline in it), and at most MAX_REASON_CHARS long."""
    return _escaped(reason, MAX_REASON_CHARS)


def parse_spec(text: Any, expected_hash: str | None = None) -> Validation:
    """Parse submitted text into a spec, checking a stated content hash; never raises."""
    verdict = _parse(text, expected_hash)
    return verdict if verdict.ok else replace(verdict, reason=one_line(verdict.reason))


def _parse(text: Any, expected_hash: str | None) -> Validation:
    if not isinstance(text, str):
        shown = repr(text)[:MAX_STORED_CHARS]
        reason = f"a spec must be JSON text, got {type(text).__name__}"
        return Validation(False, raw_key(shown), reason, RejectionStage.PARSE)
    if len(text) > MAX_SPEC_CHARS:
        reason = f"spec text is {len(text):,} characters, over {MAX_SPEC_CHARS:,}"
        return Validation(False, raw_key(text), reason, RejectionStage.PARSE)
    try:
        spec = BlueprintSpec.from_json(text)
    except ValidationError as err:
        return Validation(False, raw_key(text), format_validation_error(err, "spec"), RejectionStage.PARSE)
    except (ValueError, RecursionError) as err:  # belt and braces: pydantic reports nearly all as above
        return Validation(False, raw_key(text), f"spec: {type(err).__name__}: {err}", RejectionStage.PARSE)
    if expected_hash is not None and expected_hash != spec.content_hash:
        reason = f"stated hash {str(expected_hash)[:12]!r} is not the spec's content hash {spec.short_hash}"
        return Validation(False, raw_key(text), reason, RejectionStage.HASH)
    return Validation(True, spec.content_hash, spec=spec)


def check_spec(spec: BlueprintSpec, max_params: int = DEFAULT_MAX_PARAMS) -> Validation:
    """The contract in every reference slot shape of the spec's kind that it fits; never raises.

    Not fitting a shape is allowed (a trainer only offers it where it fits), but it must
    fit at least one; in every shape it fits it must be within budget and pass the contract.
    """
    fits, params, misfits = [], 0, []
    for shape in REFERENCE_SLOT_SHAPES[spec.kind]:
        try:
            # Counted on the meta device first: an absurd spec never allocates.
            count = count_params(spec, shape)
        except BlueprintShapeError as err:
            misfits.append(f"{shape}: {err}")
            continue
        except Exception as err:  # untrusted input: any failure to build it is the spec's fault
            return _contract_failure(spec, f"build failed in slot {shape}: {_first_line(err)}")
        if count > max_params:
            return _contract_failure(spec, f"{count:,} parameters in slot {shape}, over the budget of {max_params:,}")
        try:
            result = check_contract(spec, shape, max_params=max_params)
        except Exception as err:
            return _contract_failure(spec, f"contract check crashed in slot {shape}: {_first_line(err)}")
        if not result.ok:
            return _contract_failure(spec, f"contract failed in slot {shape}: {result.reason}")
        fits.append(shape)
        params = max(params, result.params)
    if not fits:
        return _contract_failure(spec, "fits none of the reference slots: " + "; ".join(misfits))
    return Validation(True, spec.content_hash, spec=spec, shapes=tuple(fits), params=params)


def validate_spec(text: Any, *, expected_hash: str | None = None, max_params: int = DEFAULT_MAX_PARAMS) -> Validation:
    """Parse, hash-check and contract-check one submitted text; never raises."""
    parsed = parse_spec(text, expected_hash)
    return check_spec(parsed.spec, max_params) if parsed.ok and parsed.spec is not None else parsed


def _contract_failure(spec: BlueprintSpec, reason: str) -> Validation:
    return Validation(False, spec.content_hash, one_line(reason), RejectionStage.CONTRACT, spec=spec)


def _first_line(err: BaseException) -> str:
    return one_line(error_line(err))


# ---- building and compiling (no Ray) ---------------------------------------------------------------
def template_bytes(spec: BlueprintSpec, slot_shape: tuple[int, ...]) -> bytes:
    """The seed's birth weights for ``slot_shape`` (fixed generator seed) as safetensors bytes."""
    seed = build_seed(spec, slot_shape, generator_seed=0)
    return safetensors.torch.save({k: v.contiguous() for k, v in seed.state_dict().items()})


def compile_seed(
    spec: BlueprintSpec, slot_shape: tuple[int, ...], *, enabled: bool, device: torch.device
) -> CompileInfo:
    """``torch.compile`` the seed's forward+backward once and check it matches eager.

    Falls back to eager (recording why) when compilation is off, fails, or disagrees.
    The compiled module is not kept: compiled code does not travel between processes
    (tracing, which dominates, happens in whichever process runs it), so this proves the blueprint
    compiles and what it costs.
    """
    if not enabled:
        return CompileInfo(CompileMode.EAGER, 0.0, "compile disabled by config")
    start = time.perf_counter()
    try:
        torch.compiler.reset()  # otherwise every SeedModule shares one cache and hits its size limit
        seed = build_seed(spec, slot_shape, generator_seed=0).to(device)
        with torch.no_grad():
            seed.gamma.fill_(1.0)  # compile the path a trained seed takes, not the identity
        h = torch.randn((8, *slot_shape), generator=torch.Generator().manual_seed(0)).to(device)
        compiled = torch.compile(seed, dynamic=False, fullgraph=True)
        out = compiled(h)
        out.square().mean().backward()
        with torch.no_grad():
            expected = seed(h)
        if not torch.allclose(out.detach(), expected, rtol=1e-4, atol=1e-5):
            return CompileInfo(CompileMode.EAGER, time.perf_counter() - start, "compiled output differs from eager")
        saved = torch.compiler.save_cache_artifacts()
    except Exception as err:  # inductor, a missing compiler, an op it cannot trace...
        return CompileInfo(CompileMode.EAGER, time.perf_counter() - start, f"compile failed: {_first_line(err)}")
    return CompileInfo(CompileMode.COMPILED, time.perf_counter() - start, artifacts=saved[0] if saved else b"")


# ---- the actor --------------------------------------------------------------------------------------
@ray.remote(max_concurrency=4)  # type: ignore[call-overload]  # Ray's stubs omit actor options
class Tezzeret:
    """The compiler actor, named ``tezzeret``: a queue and one worker thread.

    Threaded (``max_concurrency``) so that ``submit`` and ``stats`` are answered while
    the worker thread compiles.
    """

    def __init__(
        self,
        cfg: ActorsConfig,
        urza: Any = None,
        urabrask: Any = None,
        *,
        max_params: int = DEFAULT_MAX_PARAMS,
        slow_compile_s: float = 0.0,
        threads: int = 1,
    ):
        from ray.util.metrics import Counter, Histogram

        # By name, not an import statement: cloudpickle would then try to ship the (unpicklable)
        # config module object with this method whenever the driver has already imported it.
        inductor_config: Any = importlib.import_module("torch._inductor.config")

        torch.set_num_threads(threads)  # share the machine with the trainer...
        inductor_config.compile_threads = threads  # ...also while inductor builds kernels
        self.max_params = max_params
        self.slow_compile_s = slow_compile_s
        self.compile_enabled = cfg.compile
        self.device = actor_device()
        self._urza = Peer(URZA, cfg.namespace, urza)
        self._urabrask = Peer(URABRASK, cfg.namespace, urabrask)
        self._queue: queue.Queue[tuple[str, str]] = queue.Queue()
        self._queued: set[str] = set()  # content hashes in the queue or being worked on
        self._lock = threading.Lock()
        self._current: str | None = None
        self._attempts: Tally[str] = Tally()
        self._counts: Tally[str] = Tally()
        self._compiles = Counter("esper_compiles", description="blueprints compiled", tag_keys=("mode",))
        self._compile_seconds = Histogram(
            "esper_compile_seconds", description="seconds per compile", boundaries=[0.1, 1, 5, 15, 60]
        )
        self._rejections = Counter("esper_rejections", description="specs Tezzeret rejected", tag_keys=("stage",))
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name=f"{TEZZERET}-worker", daemon=True)
        self._worker.start()

    # ---- the public side -------------------------------------------------------------------------
    def submit(self, spec_json: str, expected_hash: str | None = None) -> str:
        """Queue a spec and return its key at once (the content hash, or a raw key if it never parsed).

        A spec Urza already knows (ready, rejected or queued) is not worked on again.
        """
        self._counts["submitted"] += 1
        parsed = parse_spec(spec_json, expected_hash)
        if not parsed.ok or parsed.spec is None:  # a parsed verdict always carries its spec
            shown = spec_json[:MAX_STORED_CHARS] if isinstance(spec_json, str) else repr(spec_json)[:200]
            self._reject(parsed.key, shown, parsed.reason, parsed.stage)
            return parsed.key
        canonical = parsed.spec.to_json()
        try:
            key, status = self._urza.call("register", canonical)  # persisted before we answer
        except (RayActorError, GetTimeoutError) as err:
            # Urza is away: work on it anyway; the result is recorded when Urza is back.
            log.warning("could not register %s with Urza (%s); queueing it in memory", parsed.key[:12], err)
            key, status = parsed.key, PENDING
        if status in (PENDING, COMPILED):
            self._enqueue(key, canonical)
        return key

    def queue_len(self) -> int:
        """Specs waiting or being worked on."""
        with self._lock:
            return len(self._queued)

    def configure(self, slow_compile_s: float | None = None, compile: bool | None = None) -> None:
        """Test/benchmark knobs: sleep ``slow_compile_s`` per compile; turn torch.compile on/off."""
        if slow_compile_s is not None:
            self.slow_compile_s = float(slow_compile_s)
        if compile is not None:
            self.compile_enabled = bool(compile)

    def stats(self) -> dict[str, Any]:
        return {
            **self._counts,
            "queue_len": self.queue_len(),
            "current": self._current,
            "slow_compile_s": self.slow_compile_s,
            "compile": self.compile_enabled,
            "device": str(self.device),
        }

    def stop(self) -> None:
        """Stop the worker after the spec in hand (the queue stays pending in Urza)."""
        self._stop.set()

    def gpu_ids(self) -> list:
        return ray.get_gpu_ids()

    # ---- the queue -------------------------------------------------------------------------------
    def _enqueue(self, key: str, spec_json: str) -> bool:
        with self._lock:
            if key in self._queued:
                return False
            self._queued.add(key)
        self._queue.put((key, spec_json))
        return True

    def _resync(self) -> None:
        """Queue whatever Urza still holds as pending: the standard library at first start,
        and after a restart the specs this actor had accepted before it died."""
        try:
            pending = self._urza.call("pending")
        except Exception as err:  # Urza restarting: try again at the next idle moment
            log.info("could not fetch pending specs from Urza: %s", err)
            return
        for spec_json in pending:
            parsed = parse_spec(spec_json)
            if parsed.ok:  # Urza only holds parsed specs; a broken one would be its bug, skip it
                self._enqueue(parsed.key, spec_json)

    def _run(self) -> None:
        """The worker thread: never ends on an error, only on ``stop()``."""
        while not self._stop.is_set():
            try:
                self._resync()
                self._drain()
            except Exception:  # a bug here must not silently stop all compilation
                log.exception("Tezzeret's worker loop failed; carrying on")
                self._stop.wait(RESYNC_S)

    def _drain(self) -> None:
        """Work the queue until it has been empty for RESYNC_S seconds (then the caller resyncs)."""
        while not self._stop.is_set():
            try:
                key, spec_json = self._queue.get(timeout=RESYNC_S)
            except queue.Empty:
                return
            self._current = key
            try:
                self._work(key, spec_json)
            finally:
                self._current = None
                with self._lock:
                    self._queued.discard(key)

    def _work(self, key: str, spec_json: str) -> None:
        """Process one spec; a failing peer leaves it pending, a failing spec gets it rejected."""
        try:
            self._process(key, spec_json)
        except (RayActorError, GetTimeoutError) as err:
            self._attempts[key] += 1
            if self._attempts[key] >= MAX_ATTEMPTS:
                self._reject(
                    key,
                    spec_json,
                    f"gave up after {MAX_ATTEMPTS} failed attempts: {_first_line(err)}",
                    RejectionStage.INTERNAL,
                )
            else:  # still pending in Urza: the next resync queues it again
                log.warning("peer failed on %s (%s); will retry", key[:12], _first_line(err))
        except Exception as err:  # a bug this spec triggered: reject it, keep the actor alive
            log.exception("processing %s failed", key[:12])
            self._reject(key, spec_json, f"internal error: {_first_line(err)}", RejectionStage.INTERNAL)

    def _process(self, key: str, spec_json: str) -> None:
        verdict = validate_spec(spec_json, max_params=self.max_params)
        if not verdict.ok or verdict.spec is None:  # a passing verdict always carries its spec
            self._reject(verdict.key, spec_json, verdict.reason, verdict.stage)
            return
        spec, shape = verdict.spec, verdict.shapes[0]
        template = template_bytes(spec, shape)
        info = self._compile_stage(spec, shape)
        self._urza.call("mark_compiled", key, info.without_artifacts())
        report = self._urabrask.call("benchmark", spec.to_json(), shape, timeout=600)
        status = self._urza.call("complete", spec.to_json(), template, shape, info, report)
        self._counts[status] += 1
        if status == BlueprintStatus.REJECTED:  # judged high risk by Urabrask
            self._rejections.inc(1, tags={"stage": RejectionStage.BENCHMARK.value})

    def _compile_stage(self, spec: BlueprintSpec, shape: tuple[int, ...]) -> CompileInfo:
        started = time.perf_counter()
        info = compile_seed(spec, shape, enabled=self.compile_enabled, device=self.device)
        if self.slow_compile_s > 0:
            # The test/benchmark knob: every compile takes this much longer (after the real
            # work, so a benchmark overlaps a training run with the compile's CPU load first).
            self._stop.wait(self.slow_compile_s)
        info = replace(info, seconds=time.perf_counter() - started)
        self._counts[f"mode_{info.mode}"] += 1
        self._compiles.inc(1, tags={"mode": str(info.mode)})
        self._compile_seconds.observe(info.seconds)
        return info

    def _reject(self, key: str, spec_json: str, reason: str, stage: str) -> None:
        self._counts["rejected"] += 1
        self._rejections.inc(1, tags={"stage": str(stage)})  # a plain str for Ray's metrics
        try:
            self._urza.call("reject", key, spec_json, reason, stage)
        except Exception as err:  # the verdict stands even if Urza cannot hear it now
            log.warning("could not record the rejection of %s: %s", key[:12], err)
