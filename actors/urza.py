"""Urza: the blueprint library, persisted on disk and served from the object store.

Urza keeps one entry per blueprint: its spec (JSON), its status
(``pending`` -> ``compiled`` -> ``ready`` | ``rejected``), why, how it compiled, the
weight template Tezzeret built (safetensors bytes) and Urabrask's BenchmarkReport. It
publishes a *versioned catalogue* of the ready entries: ``version()`` changes whenever
the ready set changes, so a client asks "anything newer than v?" and usually gets
"no" for the price of an integer.

Storage (``ActorsConfig.storage``), every file written atomically (temp file + rename)::

    catalogue.parquet        one row per entry, plain columns (report flattened as report_*)
    field_reports.parquet    every FieldReport ever received, across runs
    templates/<hash>.safetensors   weight templates, named by the spec's content hash
    meta.json                the catalogue version

Nothing is ever unpickled from disk: specs are JSON parsed by the pydantic model (a
closed op vocabulary), tensors are safetensors, tables are Parquet. The content hash is
recomputed from the spec whenever an entry is added, loaded or served, and an entry
whose hash does not match its spec is refused.

The storage logic is the plain class ``UrzaLibrary`` (testable without Ray); the actor
``Urza`` wraps it with a lock, puts the templates into the object store itself (objects
die with their owner, so the owner must be the long-lived library) and exports metrics.

Memory: the library's entries (specs, statuses, reports) and the field reports stay in
memory; they are small. Templates and compile artifacts, the large part, live on disk: the
actor keeps only the ``templates_in_memory`` most recently served ones in the object store
(``actors.urza_templates_in_memory``) and reads any other from disk, digest checked, when
it is asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import ValidationError

from esper_ray.blueprints import STANDARD_BLUEPRINTS, BlueprintSpec
from esper_ray.contracts import (
    BenchmarkReport,
    BlueprintStatus,
    CatalogueRow,
    CompileInfo,
    EsperError,
    FieldReport,
    RejectionStage,
)
from esper_ray.util import atomic_write_bytes, read_parquet

log = logging.getLogger("esper_ray.actors.urza")

PENDING, COMPILED, READY, REJECTED = (
    BlueprintStatus.PENDING,
    BlueprintStatus.COMPILED,
    BlueprintStatus.READY,
    BlueprintStatus.REJECTED,
)
STATUSES = (PENDING, COMPILED, READY, REJECTED)
RAW_PREFIX = "raw:"  # key of a submission that never parsed: hash of its text, not of a spec

CATALOGUE_FILE = "catalogue.parquet"
FIELD_REPORTS_FILE = "field_reports.parquet"
TEMPLATES_DIR = "templates"
META_FILE = "meta.json"
# Submissions that never parsed are kept (with their reason) for inspection, but only the
# latest ones: a flood of garbage must not grow the library without bound.
MAX_RAW_REJECTIONS = 1000
# Ready blueprints whose template (and compile artifacts) the actor keeps in the object store at once.
DEFAULT_TEMPLATES_IN_MEMORY = 32


# ---- entries and their table form --------------------------------------------------------------
@dataclass
class Entry:
    """Everything Urza knows about one blueprint (or one rejected submission)."""

    key: str  # the spec's content hash, or RAW_PREFIX + sha256(text) if the text never parsed
    spec_json: str
    status: str = PENDING
    name: str = ""
    kind: str = ""
    origin: str = ""
    reason: str = ""
    stage: str = ""  # where a rejection happened: parse / contract / compile / benchmark
    submitted_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    compile_mode: str = ""  # "compiled" | "eager"
    compile_seconds: float = 0.0
    compile_error: str = ""
    slot_shape: str = ""  # JSON list: the reference slot shape of the template and the benchmark
    template_sha256: str = ""
    compiled_sha256: str = ""  # of the torch.compile cache artifacts, "" when it ran eagerly
    report: BenchmarkReport | None = None

    @property
    def content_hash(self) -> str:
        return "" if self.key.startswith(RAW_PREFIX) else self.key

    def copy(self) -> Entry:
        """A copy to hand out (across Ray, or to a caller that must not change the library's)."""
        return replace(self)


_ENTRY_COLUMNS = [f for f in fields(Entry) if f.name != "report"]
_REPORT_FIELDS = list(fields(BenchmarkReport))
_ARROW_TYPES = {"str": pa.string(), "float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}


def _arrow_type(f: Any) -> pa.DataType:
    # Annotations are strings here (``from __future__ import annotations``).
    return _ARROW_TYPES[f.type if isinstance(f.type, str) else f.type.__name__]


CATALOGUE_SCHEMA = pa.schema(
    [pa.field(f.name, _arrow_type(f), nullable=False) for f in _ENTRY_COLUMNS]
    + [pa.field("report_" + f.name, _arrow_type(f), nullable=True) for f in _REPORT_FIELDS]
)

_FIELD_REPORT_COLUMNS = [f for f in fields(FieldReport) if f.name != "extra"]
FIELD_REPORT_SCHEMA = pa.schema(
    [pa.field(f.name, _arrow_type(f), nullable=False) for f in _FIELD_REPORT_COLUMNS]
    + [pa.field("extra_json", pa.string(), nullable=False)]
)


def entry_to_row(entry: Entry) -> dict[str, Any]:
    row = {f.name: getattr(entry, f.name) for f in _ENTRY_COLUMNS}
    for f in _REPORT_FIELDS:
        row["report_" + f.name] = getattr(entry.report, f.name) if entry.report is not None else None
    return row


def row_to_entry(row: dict[str, Any]) -> Entry:
    report = None
    if row.get("report_blueprint_hash") is not None:
        report = BenchmarkReport(**{f.name: row["report_" + f.name] for f in _REPORT_FIELDS})
    # Columns added later (compiled_sha256) take their default in older catalogues.
    return Entry(**{f.name: row.get(f.name, f.default) for f in _ENTRY_COLUMNS}, report=report)


def field_report_to_row(report: FieldReport) -> dict[str, Any]:
    row = {f.name: getattr(report, f.name) for f in _FIELD_REPORT_COLUMNS}
    row["extra_json"] = json.dumps(report.extra, sort_keys=True, default=str)
    return row


def row_to_field_report(row: dict[str, Any]) -> FieldReport:
    extra = json.loads(row["extra_json"])
    return FieldReport(**{f.name: row[f.name] for f in _FIELD_REPORT_COLUMNS}, extra=extra)


# ---- small helpers -------------------------------------------------------------------------------
def raw_key(text: str) -> str:
    """The key of a submission judged by its text alone (it never became a trusted spec)."""
    return RAW_PREFIX + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


def parse(spec_json: str) -> BlueprintSpec:
    """The spec (pydantic over JSON, never pickle); EsperError if the text is not a valid spec."""
    try:
        return BlueprintSpec.from_json(spec_json)
    except ValidationError as err:
        raise EsperError(f"not a valid blueprint spec: {err.errors()[0]['msg']}") from None


def verified_hash(spec_json: str) -> str:
    """The content hash recomputed from the spec; EsperError if the text is not a valid spec."""
    return parse(spec_json).content_hash


atomic_write = atomic_write_bytes  # readers see the old file or the new one, never half


def _parquet_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return read_parquet(path).to_pylist() if path.exists() else []


# ---- the library (no Ray) ------------------------------------------------------------------------
class UrzaLibrary:
    """The blueprint library on disk: entries, templates, field reports, the catalogue version.

    Not thread-safe on its own; the Urza actor serialises calls with a lock.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        (self.root / TEMPLATES_DIR).mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, Entry] = {}
        self.reports: list[FieldReport] = []
        self.version = 0
        self.refused: list[str] = []  # why entries were refused on load (hash or template mismatch)
        self._load()

    # ---- loading ---------------------------------------------------------------------------------
    def _load(self) -> None:
        for row in _read_rows(self.root / CATALOGUE_FILE):
            entry = row_to_entry(row)
            self.entries[entry.key] = entry
            self._recheck_loaded(entry)
        self.reports = [row_to_field_report(r) for r in _read_rows(self.root / FIELD_REPORTS_FILE)]
        meta = self.root / META_FILE
        stored = json.loads(meta.read_text()).get("version", 0) if meta.exists() else 0
        # A reload is a new generation of the catalogue: clients compare versions with !=.
        self._set_version(int(stored) + 1)

    def _recheck_loaded(self, entry: Entry) -> None:
        """Refuse a loaded entry whose spec does not hash to its key or whose template changed."""
        if entry.status == REJECTED or entry.key.startswith(RAW_PREFIX):
            return
        problem = ""
        try:
            if verified_hash(entry.spec_json) != entry.key:
                problem = "content hash does not match the stored spec"
        except EsperError as err:
            problem = str(err)
        if not problem and entry.status == READY:
            try:
                data = self.template_bytes(entry.key)
            except (OSError, EsperError) as err:
                problem = f"template unreadable: {err}"
            else:
                if hashlib.sha256(data).hexdigest() != entry.template_sha256:
                    problem = "template file does not match its recorded digest"
        if problem:
            self.refused.append(f"{entry.key[:12]}: {problem}")
            log.warning("refusing stored entry %s: %s", entry.key[:12], problem)
            entry.status, entry.reason, entry.stage = REJECTED, f"refused on load: {problem}", RejectionStage.STORAGE
        elif entry.status == COMPILED:
            # Compiled but never benchmarked: the work was lost with the process, do it again.
            entry.status = PENDING

    # ---- writing ---------------------------------------------------------------------------------
    def _save_catalogue(self) -> None:
        rows = [entry_to_row(e) for e in self.entries.values()]
        atomic_write(self.root / CATALOGUE_FILE, _parquet_bytes(rows, CATALOGUE_SCHEMA))

    def _set_version(self, version: int) -> None:
        self.version = version
        atomic_write(self.root / META_FILE, json.dumps({"version": version}).encode())

    def _compiled_path(self, key: str) -> Path:
        return self._template_path(key).with_suffix(".compiled")

    def compiled_bytes(self, key: str) -> bytes:
        """The stored torch.compile cache artifacts of ``key`` (b"" when it ran eagerly)."""
        entry = self.entries.get(key)
        if entry is None or not entry.compiled_sha256:
            return b""
        data = self._compiled_path(key).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.compiled_sha256:
            raise EsperError(f"compiled artifacts of {key[:12]} do not match their recorded digest")
        return data

    def _template_path(self, key: str) -> Path:
        if not all(c in "0123456789abcdef" for c in key) or len(key) != 64:
            raise EsperError(f"not a content hash: {key[:80]!r}")
        return self.root / TEMPLATES_DIR / f"{key}.safetensors"

    # ---- entries ---------------------------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        return not self.entries

    def register(self, spec_json: str) -> tuple[str, str]:
        """Record a spec as pending unless known; return (content hash, its status now)."""
        spec = parse(spec_json)
        key = spec.content_hash
        if key in self.entries:
            return key, self.entries[key].status
        self.entries[key] = Entry(key, spec.to_json(), PENDING, spec.name, spec.kind, spec.origin)
        self._save_catalogue()
        return key, PENDING

    def reject(self, key: str, spec_json: str, reason: str, stage: str) -> Entry:
        """Record a rejection. A content-hash key must match the spec (raw keys are text hashes)."""
        if not key.startswith(RAW_PREFIX) and verified_hash(spec_json) != key:
            raise EsperError(f"refused: key {key[:12]} is not the content hash of the spec")
        was_ready = key in self.entries and self.entries[key].status == READY
        entry = self.entries.get(key) or Entry(key, spec_json)
        if not key.startswith(RAW_PREFIX) and not entry.name:
            spec = parse(spec_json)
            entry.name, entry.kind, entry.origin = spec.name, spec.kind, spec.origin
        entry.status, entry.reason, entry.stage, entry.updated_at = REJECTED, reason, stage, time.time()
        if not key.startswith(RAW_PREFIX):
            self._discard_files(entry)
        self.entries[key] = entry
        self._forget_old_raw_rejections()
        self._save_catalogue()
        if was_ready:
            self._set_version(self.version + 1)
        return entry

    def _discard_files(self, entry: Entry) -> None:
        """Remove a no-longer-ready entry's template and compiled artifacts: nothing serves them."""
        for path in (self._template_path(entry.key), self._compiled_path(entry.key)):
            path.unlink(missing_ok=True)
        entry.template_sha256 = entry.compiled_sha256 = ""

    def _forget_old_raw_rejections(self) -> None:
        raw = [k for k in self.entries if k.startswith(RAW_PREFIX)]  # dicts keep insertion order
        for key in raw[: max(0, len(raw) - MAX_RAW_REJECTIONS)]:
            del self.entries[key]

    def mark_compiled(self, key: str, compile_info: CompileInfo) -> None:
        """Note that ``key`` compiled (still waiting for its benchmark)."""
        entry = self.entries[key]
        entry.status, entry.updated_at = COMPILED, time.time()
        self._apply_compile_info(entry, compile_info)
        self._save_catalogue()

    @staticmethod
    def _apply_compile_info(entry: Entry, info: CompileInfo) -> None:
        # The storage edge: the record becomes plain columns of the catalogue table.
        entry.compile_mode = str(info.mode)
        entry.compile_seconds = float(info.seconds)
        entry.compile_error = str(info.error)

    def complete(
        self,
        spec_json: str,
        *,
        template: bytes,
        slot_shape: tuple[int, ...],
        compile_info: CompileInfo,
        report: BenchmarkReport,
    ) -> Entry:
        """Record a benchmarked blueprint: ready if Urabrask passed it, else rejected."""
        spec = parse(spec_json)
        key = spec.content_hash
        if report.blueprint_hash != key:
            raise EsperError(f"refused: report is for {report.blueprint_hash[:12]}, spec is {key[:12]}")
        entry = self.entries.get(key) or Entry(key, spec.to_json(), PENDING, spec.name, spec.kind, spec.origin)
        self._apply_compile_info(entry, compile_info)
        entry.slot_shape = json.dumps(list(slot_shape))
        entry.report, entry.updated_at = report, time.time()
        was_ready = entry.status == READY
        if report.passed:
            atomic_write(self._template_path(key), template)
            entry.template_sha256 = hashlib.sha256(template).hexdigest()
            artifacts = compile_info.artifacts
            if artifacts:
                atomic_write(self._compiled_path(key), artifacts)
                entry.compiled_sha256 = hashlib.sha256(artifacts).hexdigest()
            entry.status, entry.reason, entry.stage = READY, "", ""
        else:
            entry.status, entry.reason, entry.stage = REJECTED, report.reason, RejectionStage.BENCHMARK
            self._discard_files(entry)
        self.entries[key] = entry
        self._save_catalogue()
        if was_ready != (entry.status == READY):
            self._set_version(self.version + 1)
        return entry

    def pending_specs(self) -> list[str]:
        """Spec JSONs still waiting for Tezzeret (pending or compiled), oldest first."""
        waiting = [e for e in self.entries.values() if e.status in (PENDING, COMPILED)]
        return [e.spec_json for e in sorted(waiting, key=lambda e: e.submitted_at)]

    def ready(self) -> list[Entry]:
        """Ready entries whose spec still hashes to their key, oldest first (catalogue order)."""
        out = []
        for entry in sorted(self.entries.values(), key=lambda e: e.submitted_at):
            if entry.status != READY:
                continue
            try:
                ok = verified_hash(entry.spec_json) == entry.key
            except EsperError:
                ok = False
            if ok:
                out.append(entry)
            else:
                log.error("not serving %s: its spec does not hash to its key", entry.key[:12])
        return out

    def catalogue(self) -> list[CatalogueRow]:
        """The ready entries as served to clients: spec, content hash, report and compile info."""
        return [
            CatalogueRow(e.spec_json, e.key, e.report, e.compile_mode, e.compile_seconds)
            for e in self.ready()
            if e.report is not None  # a ready entry always has one: Urabrask passed it
        ]

    def template_bytes(self, key: str) -> bytes:
        return self._template_path(key).read_bytes()

    # ---- field reports ---------------------------------------------------------------------------
    def add_field_reports(self, reports: list[FieldReport]) -> int:
        """Append reports (kept across runs); returns how many are stored in all."""
        self.reports.extend(reports)
        rows = [field_report_to_row(r) for r in self.reports]
        atomic_write(self.root / FIELD_REPORTS_FILE, _parquet_bytes(rows, FIELD_REPORT_SCHEMA))
        return len(self.reports)

    def top_specs(self, k: int) -> list[str]:
        """The best ``k`` ready specs: mean accuracy gain per parameter in the field, then fewest params.

        A blueprint never tried in the field scores 0: below any that helped, above any that hurt.
        """
        gains: dict[str, list[float]] = defaultdict(list)
        for r in self.reports:
            gains[r.blueprint_hash].append(r.accuracy_delta / max(r.seed_params, 1))

        def rank(e: Entry) -> tuple[float, int]:
            g = gains.get(e.key)
            return (-(sum(g) / len(g)) if g else 0.0, e.report.params if e.report else 0)

        return [e.spec_json for e in sorted(self.ready(), key=rank)[:k]]

    def stats(self) -> dict[str, Any]:
        counts: dict[str, int] = {str(s): 0 for s in STATUSES}  # plain keys: this dict is logged
        for entry in self.entries.values():
            counts[entry.status] += 1
        return {
            "version": self.version,
            "entries": len(self.entries),
            **counts,
            "field_reports": len(self.reports),
            "refused_on_load": list(self.refused),
        }


# ---- the actor -------------------------------------------------------------------------------------
@ray.remote(max_concurrency=8)  # type: ignore[call-overload]  # Ray's stubs omit actor options
class Urza:
    """The library actor: named ``urza``, detached, found again by every job.

    Threaded (``max_concurrency``) so that a client's catalogue call is answered while
    Tezzeret records a result; one lock serialises every change to the library.
    """

    def __init__(
        self, storage: str, seed_standard: bool = True, templates_in_memory: int = DEFAULT_TEMPLATES_IN_MEMORY
    ):
        """``templates_in_memory``: how many ready blueprints' templates (and compile artifacts) stay
        in the object store at once, least recently served first out; the rest are read from disk
        when asked for. The library itself (specs, reports, statuses) is small and stays in memory."""
        from ray.util.metrics import Gauge

        if templates_in_memory < 1:
            raise EsperError(f"templates_in_memory={templates_in_memory}: must be at least 1")
        self._lock = threading.RLock()
        self._lib = UrzaLibrary(storage)
        # key -> (template ref, compile-artifacts ref or None), least recently used first.
        self._in_store: OrderedDict[str, tuple[ray.ObjectRef, ray.ObjectRef | None]] = OrderedDict()
        self._max_in_store = templates_in_memory
        self._counts = {"registered": 0, "completed": 0, "rejected": 0, "served": 0, "refused": 0}
        # When a client last asked for the catalogue (start counts as one): Karn idles without demand.
        self._last_demand = time.monotonic()
        # Rejections are counted where they are decided (Tezzeret's esper_rejections).
        self._catalogue_size = Gauge("esper_catalogue_size", description="ready blueprints in Urza")
        # Nothing is put in the object store at start: templates are read from disk when first asked for.
        if seed_standard and self._lib.is_empty:
            # First start on an empty library: the hand-written blueprints also go through
            # Tezzeret and Urabrask. Recorded as pending, Tezzeret picks them up from here.
            for spec in STANDARD_BLUEPRINTS.values():
                self._lib.register(spec.to_json())
        self._catalogue_size.set(len(self._lib.ready()))
        log.info("Urza up at %s: %s", self._lib.root, self._lib.stats())

    def _refs(self, key: str) -> tuple[ray.ObjectRef, ray.ObjectRef | None] | None:
        """The object-store refs of a ready blueprint, read from disk (digests checked) on a miss."""
        with self._lock:
            refs = self._in_store.get(key)
            if refs is not None:
                self._in_store.move_to_end(key)
                return refs
            entry = self._lib.entries.get(key)
            if entry is None or entry.status != READY:
                return None
            try:
                template = self._lib.template_bytes(key)
                if hashlib.sha256(template).hexdigest() != entry.template_sha256:
                    raise EsperError(f"template of {key[:12]} does not match its recorded digest")
                compiled = self._lib.compiled_bytes(key)
            except (OSError, EsperError) as err:  # damaged or deleted on disk since it was stored
                log.error("not serving %s: %s", key[:12], err)
                return None
            # Urza owns these objects, so they outlive the caller; a caller holding a ref keeps its
            # object alive after Urza lets go of it (Ray counts borrowers), so evicting is safe.
            refs = (ray.put(template), ray.put(compiled) if compiled else None)
            self._in_store[key] = refs
            while len(self._in_store) > self._max_in_store:
                self._in_store.popitem(last=False)
            return refs

    def _forget_refs(self, key: str) -> None:
        with self._lock:
            self._in_store.pop(key, None)

    # ---- Tezzeret's side -------------------------------------------------------------------------
    def register(self, spec_json: str) -> tuple[str, str]:
        """Record a submitted spec as pending (persisted); returns (content hash, status).

        EsperError if the text is not a valid spec (Tezzeret parses before registering).
        """
        with self._lock:
            key, status = self._lib.register(spec_json)
            self._counts["registered"] += status == PENDING
            return key, status

    def pending(self) -> list[str]:
        """Specs Tezzeret still has to finish (what a restarted Tezzeret re-queues)."""
        with self._lock:
            return self._lib.pending_specs()

    def mark_compiled(self, key: str, compile_info: CompileInfo) -> None:
        with self._lock:
            if key in self._lib.entries:
                self._lib.mark_compiled(key, compile_info)

    def reject(self, key: str, spec_json: str, reason: str, stage: str) -> bool:
        """Record a rejection; False (and nothing stored) if the key does not match the spec."""
        with self._lock:
            try:
                self._lib.reject(key, spec_json, reason, stage)
            except EsperError as err:
                self._counts["refused"] += 1
                log.warning("%s", err)
                return False
            self._forget_refs(key)
            self._counts["rejected"] += 1
            self._catalogue_size.set(len(self._lib.ready()))
            return True

    def complete(
        self,
        spec_json: str,
        template: bytes,
        slot_shape: tuple[int, ...],
        compile_info: CompileInfo,
        report: BenchmarkReport,
    ) -> str:
        """Record a benchmarked blueprint; returns its status ("refused" if the hash check failed)."""
        with self._lock:
            try:
                entry = self._lib.complete(
                    spec_json,
                    template=template,
                    slot_shape=slot_shape,
                    compile_info=compile_info,
                    report=report,
                )
            except EsperError as err:
                self._counts["refused"] += 1
                log.warning("%s", err)
                return "refused"
            self._forget_refs(entry.key)  # a re-benchmarked blueprint: the stored files may be new
            if entry.status == READY:
                self._counts["completed"] += 1
            else:
                self._counts["rejected"] += 1
            self._catalogue_size.set(len(self._lib.ready()))
            return str(entry.status)  # plain text: callers count and log it

    # ---- serving ---------------------------------------------------------------------------------
    def version(self) -> int:
        """Changes whenever the set of ready blueprints changes (and on every reload)."""
        return self._lib.version

    def catalogue(self) -> tuple[int, list[CatalogueRow]]:
        """(version, ready entries): spec_json, content_hash, report, compile info."""
        with self._lock:
            self._last_demand = time.monotonic()
            self._counts["served"] += 1
            return self._lib.version, self._lib.catalogue()

    def catalogue_if_newer(self, known_version: int) -> tuple[int, list[CatalogueRow] | None]:
        """Like ``catalogue`` but None instead of the entries when ``known_version`` is current."""
        with self._lock:
            self._last_demand = time.monotonic()
            if known_version == self._lib.version:
                return self._lib.version, None
            self._counts["served"] += 1
            return self._lib.version, self._lib.catalogue()

    def demand_age_s(self) -> float:
        """Seconds since a client last asked for the catalogue (or since Urza started)."""
        return time.monotonic() - self._last_demand

    def compiled_ref(self, key: str) -> ray.ObjectRef | None:
        """The ObjectRef of a ready blueprint's torch.compile cache artifacts, or None if eager."""
        refs = self._refs(key)
        return refs[1] if refs is not None else None

    def template_ref(self, key: str) -> ray.ObjectRef | None:
        """The ObjectRef of a ready blueprint's weight template (safetensors bytes), or None.

        Served from the object store when recently asked for, else read from disk (and kept, the
        least recently served one making room): see ``templates_in_memory``.
        """
        refs = self._refs(key)
        return refs[0] if refs is not None else None

    def entry(self, key: str) -> Entry | None:
        """One entry (status, reason, compile info, report), or None."""
        with self._lock:
            entry = self._lib.entries.get(key)
            return entry.copy() if entry is not None else None

    def entries(self, status: str | None = None) -> list[Entry]:
        """Every entry (or those with ``status``)."""
        with self._lock:
            return [e.copy() for e in self._lib.entries.values() if status in (None, e.status)]

    def top_specs(self, k: int) -> list[str]:
        """Spec JSONs of the best ``k`` ready blueprints by field results (Karn breeds from these)."""
        with self._lock:
            return self._lib.top_specs(k)

    # ---- field reports ---------------------------------------------------------------------------
    def add_field_reports(self, reports: list[FieldReport]) -> int:
        with self._lock:
            return self._lib.add_field_reports(list(reports))

    def field_reports(self) -> list[FieldReport]:
        with self._lock:
            return list(self._lib.reports)

    # ---- introspection ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self._lib.stats(),
                **self._counts,
                "templates_in_store": len(self._in_store),
                "templates_in_memory_max": self._max_in_store,
                "demand_age_s": time.monotonic() - self._last_demand,
            }

    def storage(self) -> str:
        return str(self._lib.root)

    def gpu_ids(self) -> list:
        return ray.get_gpu_ids()
