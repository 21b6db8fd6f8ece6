"""The trainer's side of Urza: a BlueprintCatalogue that never blocks.

``UrzaCatalogue.poll()`` is called at every decision point of a training loop, so it
must return at once whatever the actors are doing. It keeps

- the last catalogue it received (entries already parsed and hash-checked), and
- at most one request in flight (``catalogue_if_newer(version)``),

and on each poll only *looks* at the request with ``ray.wait([ref], timeout=0)``: if
the answer is there it takes it (and sends the next request), otherwise it returns the
cached entries. Urza answers "nothing newer" with a small tuple, so a quiet library
costs one integer round trip per poll.

When Urza dies the in-flight request fails; the client then looks the actor up by name
again (``Peer.refresh``) and carries on with the cached catalogue meanwhile.

The module also holds what every actor module shares (the actors' names and ``Peer``)
and the driver-side metrics: ``record_germination()`` and ``record_accuracy(acc)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray
from pydantic import ValidationError
from ray.exceptions import RayActorError, RayError

from esper_ray.blueprints import BlueprintSpec, CatalogueEntry
from esper_ray.blueprints.catalogue import resolve_in
from esper_ray.contracts import CatalogueRow, EsperError, FieldReport
from esper_ray.util import error_line

log = logging.getLogger("esper_ray.actors.client")

# ---- the actors' names and a handle that finds them again --------------------------------------------
URZA = "urza"
KARN = "karn"
TEZZERET = "tezzeret"
URABRASK = "urabrask"
ACTOR_NAMES = (URZA, KARN, TEZZERET, URABRASK)


class Peer:
    """A handle to a named actor that survives the actor being replaced.

    A restarted actor (``max_restarts``) keeps its handle, but an actor that was killed
    for good and started again by another job is a new actor under the same name: calls
    through the old handle fail with ``RayActorError``. ``refresh()`` looks the name up
    again; callers do that when a call fails and then retry.
    """

    def __init__(self, name: str, namespace: str, handle: Any = None):
        self.name = name
        self.namespace = namespace
        self._handle = handle

    @property
    def handle(self) -> Any:
        """The current handle (looked up by name the first time)."""
        if self._handle is None:
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        return self._handle

    def refresh(self) -> bool:
        """Look the actor up by name again; False when no actor has that name now."""
        try:
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        except ValueError:
            self._handle = None
            return False
        return True

    def call(self, method: str, *args: Any, timeout: float | None = 30.0, **kwargs: Any) -> Any:
        """Call ``method`` and wait for it, looking the actor up again once if it is gone.

        Only for an actor's own background work: never on a trainer's hot path.
        """
        try:
            return ray.get(getattr(self.handle, method).remote(*args, **kwargs), timeout=timeout)
        except RayActorError:
            if not self.refresh():
                raise
            log.warning("%s was replaced; retrying %s on the new actor", self.name, method)
            return ray.get(getattr(self.handle, method).remote(*args, **kwargs), timeout=timeout)

    def __reduce__(self) -> tuple:
        # Travel as (name, namespace, handle): handles pickle across Ray processes.
        return (Peer, (self.name, self.namespace, self._handle))


# How often a client asks Urza for news (one small request in flight at a time), and how
# long it waits before looking Urza up by name again after the actor died.
REFRESH_EVERY_S = 1.0
RECONNECT_EVERY_S = 1.0


def entry_from_row(row: CatalogueRow) -> CatalogueEntry | None:
    """A CatalogueEntry from one of Urza's catalogue rows; None if its hash does not check out."""
    try:
        spec = BlueprintSpec.from_json(row.spec_json)
    except ValidationError:
        return None
    if spec.content_hash != row.content_hash or row.report.blueprint_hash != spec.content_hash:
        return None
    return CatalogueEntry(spec, row.report) if row.report.passed else None


@dataclass
class PollStats:
    """What the client did, for tests and the non-blocking benchmark."""

    polls: int = 0
    answers: int = 0  # answers received from Urza (with or without a new catalogue)
    updates: int = 0  # new catalogues received
    requests: int = 0  # requests sent to Urza
    reconnects: int = 0  # times Urza was found again by name after a failure
    refused: int = 0  # rows dropped because their hash did not match their spec
    errors: list[str] = field(default_factory=list)  # the last few problems, for humans


class UrzaCatalogue:
    """BlueprintCatalogue over the Urza actor; ``poll`` and ``resolve`` never wait on Ray.

    ``refresh_every_s`` bounds how often a request goes out, so that a loop polling in
    a tight cycle costs a clock read per poll, not a round trip.
    """

    def __init__(
        self,
        urza: Any = None,
        *,
        namespace: str = "esper-ray",
        karn: Any = None,
        refresh_every_s: float = REFRESH_EVERY_S,
    ):
        self._urza = Peer(URZA, namespace, urza)
        self._karn = Peer(KARN, namespace, karn) if karn is not None else None
        self.refresh_every_s = refresh_every_s
        self.version: int | None = None
        self.entries: list[CatalogueEntry] = []
        self.waited_s = 0.0  # seconds spent inside poll/resolve, all calls together
        self.stats = PollStats()
        self._claimed: dict[str, str] = {}  # entry name -> the content hash Urza served it under
        self._inflight: ray.ObjectRef | None = None
        self._next_request = 0.0  # monotonic time before which no new request goes out
        self._lost = False  # Urza died under us: look it up by name at the next request
        self._request()

    # ---- the BlueprintCatalogue protocol ----------------------------------------------------------
    def poll(self) -> list[CatalogueEntry]:
        """The ready blueprints as last heard from Urza; never blocks."""
        with self._timed():
            self.stats.polls += 1
            if self._inflight is not None:
                self._take_answer_if_ready()
            if self._inflight is None and time.monotonic() >= self._next_request:
                self._request()
            return list(self.entries)

    def resolve(self, name_or_hash: str) -> CatalogueEntry:
        """The cached ready entry with this name or hash, its content hash verified again."""
        with self._timed():
            entry = resolve_in(self.entries, name_or_hash)
            # Recompute from a fresh parse of the spec and compare with what Urza vouched for.
            recomputed = BlueprintSpec.from_json(entry.spec.to_json()).content_hash
            vouched = entry.report.blueprint_hash if entry.report is not None else None
            if recomputed != self._claimed.get(entry.name) or recomputed != vouched:
                raise EsperError(f"blueprint {name_or_hash!r}: content hash does not match its spec")
            return entry

    # ---- talking to Urza ------------------------------------------------------------------------
    def _request(self) -> None:
        """Send "anything newer than my version?" (the only request in flight)."""
        self._next_request = time.monotonic() + self.refresh_every_s
        if self._lost:
            # A lookup by name is a round trip to the control store: at most once a second.
            self._next_request = time.monotonic() + RECONNECT_EVERY_S
            if not self._urza.refresh():
                return
            self._lost = False
            self.stats.reconnects += 1
        try:
            self._inflight = self._urza.handle.catalogue_if_newer.remote(self.version)
            self.stats.requests += 1
        except (ValueError, RayError) as err:  # no actor by that name right now
            self._inflight, self._lost = None, True
            self._note(f"cannot reach Urza: {err}")

    def _take_answer_if_ready(self) -> None:
        ready, _ = ray.wait([self._inflight], timeout=0)
        if not ready:
            return
        self._inflight = None
        try:
            version, rows = ray.get(ready[0])  # ready: this does not wait
        except RayActorError as err:
            self._note(f"Urza died: {error_line(err)}")
            self._lost = True
            return
        except RayError as err:
            self._note(f"catalogue request failed: {error_line(err)}")
            return
        self.stats.answers += 1
        if rows is not None:
            self._install(version, rows)

    def _install(self, version: int, rows: list[CatalogueRow]) -> None:
        entries, claimed = [], {}
        for row in rows:
            entry = entry_from_row(row)
            if entry is None:
                self.stats.refused += 1
                log.error("refusing catalogue row %s: hash or report does not match", row.content_hash)
            elif entry.name not in claimed:  # names are how controllers pick: first one wins
                entries.append(entry)
                claimed[entry.name] = row.content_hash
        self.version, self.entries, self._claimed = version, entries, claimed
        self.stats.updates += 1

    def _note(self, message: str) -> None:
        log.warning("%s", message)
        self.stats.errors.append(message)
        del self.stats.errors[:-20]

    @contextmanager
    def _timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.waited_s += time.perf_counter() - start

    # ---- outside the hot path ---------------------------------------------------------------------
    def sync(self, timeout: float = 30.0) -> list[CatalogueEntry]:
        """Block until Urza answered a request sent after this call began (startup and tests only).

        The request in flight may predate the caller's question, so this waits for the
        answer to the one sent after it. Its time is not counted in ``waited_s``.
        """
        deadline = time.monotonic() + timeout
        target = self.stats.answers + (2 if self._inflight is not None else 1)
        while self.stats.answers < target:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EsperError(f"Urza did not answer within {timeout:g} s")
            if self._inflight is None:
                if time.monotonic() >= self._next_request or not self._lost:
                    self._request()
                if self._inflight is None:
                    time.sleep(min(0.2, left))
                continue
            ray.wait([self._inflight], timeout=left)
            self._take_answer_if_ready()
        return list(self.entries)

    def send_field_reports(self, reports: Iterable[FieldReport]) -> None:
        """Send field reports to Urza (kept across runs) and to Karn; fire and forget."""
        reports = list(reports)
        if not reports:
            return
        try:
            self._urza.handle.add_field_reports.remote(reports)
        except (ValueError, RayError) as err:
            self._note(f"field reports not delivered to Urza: {err}")
        if self._karn is not None:
            try:
                self._karn.handle.ingest_field_reports.remote(reports)
            except (ValueError, RayError) as err:
                self._note(f"field reports not delivered to Karn: {err}")

    # ---- driver-side metrics --------------------------------------------------------------------
    @staticmethod
    def record_germination() -> None:
        record_germination()

    @staticmethod
    def record_accuracy(accuracy: float) -> None:
        record_accuracy(accuracy)


# ---- driver metrics (created on first use, once per process) ---------------------------------------
_METRICS: dict[str, Any] = {}
DRIVER_COUNTS = {"germinations": 0, "accuracy_updates": 0}


def _metric(name: str) -> Any:
    if name not in _METRICS:
        from ray.util.metrics import Counter, Gauge

        if name == "germinations":
            _METRICS[name] = Counter("esper_germinations", description="seeds germinated in hosts")
        else:
            _METRICS[name] = Gauge("esper_host_accuracy", description="latest host validation accuracy")
    return _METRICS[name]


def record_germination() -> None:
    """Count one germination (no blueprint tag: a metric's tag values must stay few)."""
    DRIVER_COUNTS["germinations"] += 1
    _metric("germinations").inc()


def record_accuracy(accuracy: float) -> None:
    """Set the host accuracy gauge."""
    DRIVER_COUNTS["accuracy_updates"] += 1
    _metric("host_accuracy").set(float(accuracy))
