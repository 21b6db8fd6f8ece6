"""The lineage ledger: a hash-chained, Ed25519-signed record of every architectural change.

Each change to a host (``init``, ``germinate``, every seed stage ``transition``,
``fossilize``, ``cull``, ``rollback``, ``checkpoint`` and ``resume``) becomes one
:class:`~esper_ray.contracts.LineageEvent`. Events are chained: ``event_hash`` is the
SHA-256 of the event's canonical JSON (every field but ``event_hash``), and each
event's ``prev_hash`` is the previous event's ``event_hash`` (:data:`GENESIS` for the
first). The run folder holds

    lineage.parquet    one row per event, one column per field (``metrics`` as JSON text)
    lineage.sig.json   {"count", "head", "public_key", "signature"}: an Ed25519 signature
                       over ``esper-ray-lineage:v1:{run_id}:{count}:{head}``

so editing, deleting, reordering or appending rows breaks the chain or the signature,
and :func:`verify_run` names the first event that no longer holds. It also checks
that the run's final checkpoint is the one the ledger says was saved: same weights
(:func:`weights_digest`) and same architecture (:func:`replay`).

The signing key is a PEM file (default ``~/.config/esper-ray/lineage_ed25519.pem``,
or ``$ESPER_RAY_LINEAGE_KEY``), created on first use with mode 0600.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import stat
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from esper_ray.contracts import EsperError, EventKind, LineageEvent, SeedStage
from esper_ray.util import atomic_write, atomic_write_text, read_parquet

__all__ = [
    "GENESIS",
    "KINDS",
    "Ledger",
    "LineageReport",
    "default_key_path",
    "format_timeline",
    "load_events",
    "load_or_create_key",
    "replay",
    "verify_run",
    "weights_digest",
]

GENESIS = "0" * 64
"""The ``prev_hash`` of the first event of every ledger."""

LEDGER_FILE = "lineage.parquet"
SIGNATURE_FILE = "lineage.sig.json"
UNSIGNED_FILE = "lineage.unsigned.parquet"  # a killed run's rows that were never signed (set aside on resume)
CHECKPOINT_DIR = "checkpoint"
KEY_ENV = "ESPER_RAY_LINEAGE_KEY"
SIGNATURE_DOMAIN = "esper-ray-lineage:v1"

# Kinds that change one slot's seed; they must name the slot.
SEED_KINDS = frozenset({EventKind.GERMINATE, EventKind.TRANSITION, EventKind.FOSSILIZE, EventKind.CULL})
KINDS = frozenset(EventKind)
"""Every event kind :meth:`Ledger.append` accepts."""

# The stage a seed kind implies when the caller leaves ``stage`` empty.
_DEFAULT_STAGE: dict[str, str] = {
    EventKind.GERMINATE: SeedStage.GERMINATED.name,
    EventKind.FOSSILIZE: SeedStage.FOSSILIZED.name,
    EventKind.CULL: SeedStage.CULLED.name,
}
_STAGE_NAMES = frozenset(s.name for s in SeedStage)
# In these stages the slot holds no seed, so the architecture names no blueprint.
_EMPTY_STAGES = frozenset({"CULLED", "EMBARGOED", "DORMANT"})
_DORMANT: dict[str, str] = {"stage": "DORMANT", "blueprint_hash": ""}


# ---- schema ------------------------------------------------------------------------------
# Derived from the dataclass so that a field added to LineageEvent is stored and hashed
# without touching this module.
def _type_name(f: dataclasses.Field[Any]) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _arrow_type(f: dataclasses.Field[Any]) -> pa.DataType:
    name = _type_name(f)
    if name.startswith("dict"):
        return pa.string()  # stored as sorted-key JSON text, so the schema never depends on keys
    types = {"int": pa.int64(), "str": pa.string(), "float": pa.float64(), "bool": pa.bool_()}
    if name not in types:
        raise TypeError(f"LineageEvent.{f.name}: no Parquet type for {name!r}")
    return types[name]


_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LineageEvent))
_HASHED: tuple[str, ...] = tuple(n for n in _FIELDS if n != "event_hash")
_JSON_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(LineageEvent) if _type_name(f).startswith("dict")
)
_SCHEMA = pa.schema(
    [pa.field(f.name, _arrow_type(f), nullable=False) for f in dataclasses.fields(LineageEvent)],
    metadata={"format": "esper-ray-lineage/1"},
)

# One encoder reused for every event: json.dumps builds a new one per call when given
# options. Floats go through float.__repr__ (shortest round-trip form), which is the same
# on every platform, so hashes are reproducible; NaN/inf are kept (a diverging loss is a
# fact worth recording) as the tokens NaN/Infinity.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=True)


def _hash_row(row: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of an event's hashed fields."""
    return hashlib.sha256(_CANONICAL.encode(row).encode()).hexdigest()


def _one_line(text: str, limit: int = 240) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class _Tampered(EsperError):
    """A check failed; ``seq`` is the first event that fails (None: not one event's fault)."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(_one_line(message))
        self.seq = seq


def _label(kind: str, slot: str) -> str:
    return f"{kind} {slot}" if slot else kind


# ---- keys --------------------------------------------------------------------------------
_warned_keys: set[Path] = set()


def default_key_path() -> Path:
    """``$ESPER_RAY_LINEAGE_KEY`` if set, else ``~/.config/esper-ray/lineage_ed25519.pem``."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".config" / "esper-ray" / "lineage_ed25519.pem"


def _read_key_bytes(path: Path) -> tuple[bytes, int]:
    """The key file's bytes and permission bits."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as err:
        raise EsperError(f"cannot read lineage key {path}: {err.strerror or err}") from None
    return data, stat.S_IMODE(mode)


def _warn_if_shared(path: Path, mode: int) -> None:
    """Warn (once per file) that a private key is readable by group or others.

    The key is still used: refusing would stop a training run over a chmod.
    """
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and path not in _warned_keys:
        _warned_keys.add(path)
        warnings.warn(
            f"lineage key {path} is readable by other users (mode {mode:o}); run: chmod 600 {path}",
            stacklevel=3,
        )


def _parse_private_key(data: bytes, path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise EsperError(f"lineage key {path} is not an unencrypted Ed25519 PEM private key")
    return key


def _write_new_key(path: Path, pem: bytes) -> None:
    """Publish ``pem`` at ``path`` only if no key is there; FileExistsError otherwise.

    The key is written to a private temporary file (O_CREAT|O_EXCL, 0600) and then
    hard-linked into place, so a concurrent process never reads a half-written key and
    two processes racing to create one never overwrite each other.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            raise
        except OSError:
            pass  # no hard links on this filesystem: fall back to an exclusive create
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 signing key at ``path``, created (PEM, PKCS8, mode 0600) if absent.

    A key file readable by group or others is still used, with one warning. A file that
    is not an unencrypted Ed25519 PEM private key raises :class:`EsperError`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            _write_new_key(path, pem)
            return key
        except FileExistsError:
            pass  # another process created it first: use theirs, so both sign alike
        except OSError as err:
            raise EsperError(f"cannot create lineage key {path}: {err.strerror or err}") from None
    data, mode = _read_key_bytes(path)
    key = _parse_private_key(data, path)
    _warn_if_shared(path, mode)
    return key


def _load_public_key(path: Path) -> Ed25519PublicKey:
    """The verifying key at ``path``: from a private key file, or a public key PEM."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EsperError(
            f"cannot check the signature: no lineage key at {path} "
            f"(pass the key the run was signed with, or set {KEY_ENV})"
        )
    data, mode = _read_key_bytes(path)
    try:
        private = _parse_private_key(data, path)
    except EsperError:
        pass  # perhaps a public key: a verifier needs no more
    else:
        _warn_if_shared(path, mode)
        return private.public_key()
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        public = None
    if not isinstance(public, Ed25519PublicKey):
        raise EsperError(f"lineage key {path} is not an Ed25519 PEM key")
    return public


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _signed_message(run_id: str, count: int, head: str) -> bytes:
    return f"{SIGNATURE_DOMAIN}:{run_id}:{count}:{head}".encode()


# ---- weights -----------------------------------------------------------------------------
def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 hex of the tensors serialised as safetensors (keys sorted, no metadata).

    The same names, dtypes, shapes and values give the same digest in any process and
    in any insertion order (safetensors lays tensors out in a fixed order and we pass no
    metadata). An empty mapping gives ``sha256(b"")``. To match a checkpoint, digest the
    exact mapping given to ``save_file`` (e.g. ``load_file(model.safetensors)``).
    """
    if not tensors:
        return hashlib.sha256(b"").hexdigest()
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise EsperError(f"weights_digest: {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().contiguous().cpu()
        # safetensors refuses tensors sharing storage (tied weights, slices of one buffer);
        # a private copy serialises to the same bytes.
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()
        storages.add(ptr)
        prepared[name] = t
    return hashlib.sha256(safetensors_save(prepared)).hexdigest()


# ---- reading a ledger --------------------------------------------------------------------
@dataclass
class _Chain:
    """A ledger as read from disk, before any check: hashed fields per row, and hashes."""

    rows: list[dict[str, Any]]
    hashes: list[str]

    def events(self, stop: int | None = None) -> list[LineageEvent]:
        return [LineageEvent(**row, event_hash=h) for row, h in zip(self.rows[:stop], self.hashes[:stop], strict=True)]


def _read_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise _Tampered(f"no lineage ledger at {path}")
    try:
        table = read_parquet(path)
    except Exception as err:  # any parser failure on a damaged file is one answer
        raise _Tampered(f"{path} is unreadable (truncated or corrupt?): {err}") from None
    for name in _FIELDS:
        if name not in table.column_names:
            raise _Tampered(f"{path} has no column {name!r} (not an esper-ray lineage ledger?)")
        want = _SCHEMA.field(name).type
        if table.schema.field(name).type != want:
            raise _Tampered(f"{path}: column {name!r} is {table.schema.field(name).type}, expected {want}")
    return table


def _load_chain(run_dir: Path) -> _Chain:
    table = _read_table(Path(run_dir) / LEDGER_FILE)
    columns = [table.column(name).to_pylist() for name in _HASHED]
    hashes = table.column("event_hash").to_pylist()
    rows: list[dict[str, Any]] = []
    for i, values in enumerate(zip(*columns, strict=True)):
        row = dict(zip(_HASHED, values, strict=True))
        for name in _JSON_FIELDS:
            try:
                value = json.loads(row[name])
            except (TypeError, ValueError):
                value = None
            if not isinstance(value, dict):
                raise _Tampered(
                    f"event {i} ({_label(row['kind'], row['slot'])}): {name} is not a JSON object (row edited?)",
                    i,
                )
            row[name] = value
        rows.append(row)
    return _Chain(rows, hashes)


def _read_signature(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / SIGNATURE_FILE
    if not path.is_file():
        raise _Tampered(f"no signature file at {path} (the ledger was never signed?)")
    try:
        sig = json.loads(path.read_text())
        if not isinstance(sig, dict):
            raise ValueError("not a JSON object")
        parsed = {
            "count": int(sig["count"]),
            "head": str(sig["head"]),
            "public_key": bytes.fromhex(sig["public_key"]),
            "signature": bytes.fromhex(sig["signature"]),
        }
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _Tampered(f"{path} is unreadable or incomplete: {err}") from None
    return parsed


def load_events(run_dir: Path) -> list[LineageEvent]:
    """The events in ``run_dir/lineage.parquet`` as stored, unchecked (see :func:`verify_run`).

    Raises :class:`EsperError` (one line) when the file is missing or unreadable.
    """
    return _load_chain(Path(run_dir)).events()


# ---- checks ------------------------------------------------------------------------------
def _check_chain(chain: _Chain) -> None:
    """Seq contiguous from 0, every hash recomputes, every prev_hash links; else _Tampered."""
    prev = GENESIS
    for i, (row, stored) in enumerate(zip(chain.rows, chain.hashes, strict=True)):
        seq = row["seq"]
        if seq != i:
            raise _Tampered(f"event {i} out of place: row {i} holds event {seq} (rows deleted or reordered?)", i)
        if _hash_row(row) != stored:
            raise _Tampered(f"event {i} ({_label(row['kind'], row['slot'])}): hash mismatch (row edited?)", i)
        if row["prev_hash"] != prev:
            what = "does not start from genesis" if i == 0 else f"does not link to event {i - 1}"
            raise _Tampered(
                f"event {i} ({_label(row['kind'], row['slot'])}): prev_hash {what} (chain rewritten?)",
                i,
            )
        prev = stored


def _check_signature(chain: _Chain, sig: Mapping[str, Any], public: Ed25519PublicKey, key_path: Path) -> None:
    """The signature file is genuine (made with ``public``'s key) and seals these rows."""
    n = len(chain.rows)
    if n == 0:
        raise _Tampered(f"the ledger has no events but the signature covers {sig['count']} (rows deleted?)", 0)
    # The signed statement names the run, so it is checked before count and head: a valid
    # signature makes count and head trustworthy, and a mismatch is then the rows' fault.
    message = _signed_message(chain.rows[0]["run_id"], sig["count"], sig["head"])
    expected = _raw_public(public)
    if sig["public_key"] != expected:
        try:
            Ed25519PublicKey.from_public_bytes(sig["public_key"]).verify(sig["signature"], message)
        except (InvalidSignature, ValueError):
            raise _Tampered(
                f"{SIGNATURE_FILE}: signature invalid, and its public key is not the one at {key_path}"
            ) from None
        raise _Tampered(
            f"{SIGNATURE_FILE}: signed by another key (public key "
            f"{sig['public_key'].hex()[:16]}..., expected {expected.hex()[:16]}... "
            f"from {key_path})"
        )
    try:
        public.verify(sig["signature"], message)
    except InvalidSignature:
        raise _Tampered(f"{SIGNATURE_FILE}: signature does not verify (signature file edited?)") from None
    count, head = sig["count"], sig["head"]
    if n < count:
        raise _Tampered(
            f"event {n} missing: the ledger has {n} events but the signature covers "
            f"{count} (rows deleted from the end?)",
            n,
        )
    if n > count:
        row = chain.rows[count]
        raise _Tampered(
            f"event {count} ({_label(row['kind'], row['slot'])}): not covered by the "
            f"signature, which covers {count} events (appended after signing?)",
            count,
        )
    if chain.hashes[-1] != head:
        row = chain.rows[-1]
        raise _Tampered(
            f"event {n - 1} ({_label(row['kind'], row['slot'])}): not the signed head (ledger rewritten?)",
            n - 1,
        )


def _stage_text(entry: Mapping[str, str]) -> str:
    bp = entry.get("blueprint_hash", "")
    return f"{entry.get('stage', '')} {bp[:12]}" if bp else entry.get("stage", "")


def _check_checkpoint(run_dir: Path, chain: _Chain) -> str:
    """The final checkpoint matches the ledger's last checkpoint event; returns a note."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    last = next(
        (i for i in range(len(chain.rows) - 1, -1, -1) if chain.rows[i]["kind"] == EventKind.CHECKPOINT),
        None,
    )
    if not ckpt.exists():
        if last is None:
            return "no checkpoint to compare"
        raise _Tampered(
            f"event {last} (checkpoint, epoch {chain.rows[last]['epoch']}) records a checkpoint but {ckpt} "
            "is missing (deleted?); to verify the ledger alone use --ledger-only",
            last,
        )
    model, state_path = ckpt / "model.safetensors", ckpt / "state.json"
    for path in (model, state_path):
        if not path.is_file():
            raise _Tampered(f"{path} is missing (checkpoint incomplete or swapped?)")
    if last is None:
        raise _Tampered(f"{ckpt} exists but the ledger records no checkpoint event")
    try:
        digest = weights_digest(load_file(model))
    except Exception as err:  # a damaged file of any kind is one answer
        raise _Tampered(f"{model} is unreadable: {err}") from None
    recorded = chain.rows[last]["weights_digest"]
    if digest != recorded:
        raise _Tampered(
            f"event {last} (checkpoint): weights digest {recorded[:12]} does not "
            f"match {CHECKPOINT_DIR}/model.safetensors ({digest[:12]}) "
            "(checkpoint swapped?)",
            last,
        )
    try:
        slots = json.loads(state_path.read_text())["slots"]
        state_arch = {
            str(name): {
                "stage": SeedStage(s["stage"]).name if isinstance(s["stage"], int) else str(s["stage"]),
                "blueprint_hash": s.get("blueprint_hash") or "",
            }
            for name, s in slots.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise _Tampered(f"{state_path} has no readable 'slots' architecture: {err}") from None
    # Replay up to the checkpoint event: that is the architecture the checkpoint was saved
    # with, even if events were appended after it.
    ledger_arch = replay(chain.events(last + 1))
    # A slot the ledger never named has always been dormant.
    for name in sorted(set(ledger_arch) | set(state_arch)):
        ours = ledger_arch.get(name, _DORMANT)
        theirs = state_arch.get(name, _DORMANT)
        if ours != theirs:
            raise _Tampered(
                f"event {last} (checkpoint): slot {name} is {_stage_text(theirs)} in "
                f"{CHECKPOINT_DIR}/state.json but the ledger replays to "
                f"{_stage_text(ours)} (checkpoint swapped?)",
                last,
            )
    return "checkpoint matches"


@dataclass
class LineageReport:
    """The outcome of :func:`verify_run`."""

    ok: bool
    events: int
    first_bad_seq: int | None  # the first event that fails, or None (file-level problem / ok)
    message: str  # one line, fit to print


def verify_run(run_dir: Path, key_path: Path | None = None, check_checkpoint: bool = True) -> LineageReport:
    """Check a run folder's ledger: files, seq order, hashes, links, signature, checkpoint.

    The signature must verify under the key at ``key_path`` (:func:`default_key_path`
    when None; a private key or a public key PEM). With ``check_checkpoint``, the files in
    ``run_dir/checkpoint`` must match the ledger's last ``checkpoint`` event (weights
    digest and replayed architecture); a run whose ledger records no checkpoint passes with a
    note, one whose recorded checkpoint folder is gone fails. Never raises for a damaged run:
    the report says what is wrong.
    """
    run_dir = Path(run_dir)
    key_path = Path(key_path) if key_path is not None else default_key_path()
    n = 0
    try:
        chain = _load_chain(run_dir)
        n = len(chain.rows)
        sig = _read_signature(run_dir)
        _check_chain(chain)
        _check_signature(chain, sig, _load_public_key(key_path), key_path)
        note = "chain and signature valid"
        if check_checkpoint:
            note += ", " + _check_checkpoint(run_dir, chain)
    except EsperError as err:
        seq = err.seq if isinstance(err, _Tampered) else None  # other errors are not one event's fault
        return LineageReport(False, n, seq, _one_line(str(err)))
    return LineageReport(True, n, None, f"ok: {n} events, {note}")


# ---- the ledger --------------------------------------------------------------------------
class Ledger:
    """Append-only, hash-chained and signed; lives in run_dir/lineage.parquet + lineage.sig.json.

    Opening a folder that already holds a ledger resumes it: the ledger is verified
    (chain and signature under this key; :class:`EsperError` if it fails or belongs to
    another run or host) and new events continue its chain. Nothing reaches disk until
    :meth:`flush`.
    """

    def __init__(self, run_dir: Path, run_id: str, host_id: str, key_path: Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_id = str(run_id)
        self.host_id = str(host_id)
        self.key_path = Path(key_path) if key_path is not None else default_key_path()
        self._key = load_or_create_key(self.key_path)
        self._events: list[LineageEvent] = []
        # The Parquet columns, kept up to date by append so that a flush is one conversion.
        self._columns: dict[str, list[Any]] = {name: [] for name in _FIELDS}
        self._dirty = False
        ledger, sig = self.run_dir / LEDGER_FILE, self.run_dir / SIGNATURE_FILE
        if ledger.exists() or sig.exists():
            for event in self._resume():
                self._push(event)

    def _resume(self) -> list[LineageEvent]:
        try:
            chain = _load_chain(self.run_dir)
            _check_chain(chain)
            chain = self._without_unsigned_tail(chain)
            if not chain.rows and not (self.run_dir / SIGNATURE_FILE).exists():
                return []  # nothing was ever signed: the run starts its ledger again
            signature = _read_signature(self.run_dir)
            _check_signature(chain, signature, self._key.public_key(), self.key_path)
        except EsperError as err:
            raise EsperError(f"cannot resume the lineage ledger in {self.run_dir}: {err}") from None
        first = chain.rows[0]
        if (first["run_id"], first["host_id"]) != (self.run_id, self.host_id):
            raise EsperError(
                f"cannot resume the lineage ledger in {self.run_dir}: it belongs to run "
                f"{first['run_id']!r} host {first['host_id']!r}, not run {self.run_id!r} "
                f"host {self.host_id!r}"
            )
        return chain.events()

    def _without_unsigned_tail(self, chain: _Chain) -> _Chain:
        """The chain without rows written after its last signature: a run killed between writing
        the ledger and signing it (``flush`` writes the rows first). Only a tail that links onto
        the signed rows is set aside, into ``lineage.unsigned.parquet``, never signed: this key
        seals only what it wrote itself. The signed rows are then checked as usual."""
        try:
            count = _read_signature(self.run_dir)["count"] if (self.run_dir / SIGNATURE_FILE).exists() else 0
        except _Tampered:
            return chain  # an unreadable signature is _check_signature's to report
        if len(chain.rows) <= count:
            return chain
        shutil.copyfile(self.run_dir / LEDGER_FILE, self.run_dir / UNSIGNED_FILE)
        warnings.warn(
            f"lineage ledger in {self.run_dir}: events {count}..{len(chain.rows) - 1} were written but never "
            f"signed (the run stopped in between); set aside in {UNSIGNED_FILE}, the ledger resumes at event {count}",
            stacklevel=4,
        )
        self._dirty = count > 0  # the next flush writes the signed rows without them
        return _Chain(chain.rows[:count], chain.hashes[:count])

    @property
    def events(self) -> list[LineageEvent]:
        """All events so far, oldest first (a copy of the list)."""
        return list(self._events)

    @property
    def head(self) -> str:
        """``event_hash`` of the last event (:data:`GENESIS` if none)."""
        return self._events[-1].event_hash if self._events else GENESIS

    def __len__(self) -> int:
        return len(self._events)

    def append(
        self,
        kind: str,
        slot: str = "",
        blueprint_hash: str = "",
        stage: str = "",
        epoch: int = 0,
        step: int = 0,
        weights_digest: str = "",
        metrics: Mapping[str, float] | None = None,
        blueprint_name: str = "",
    ) -> LineageEvent:
        """Chain one event onto the ledger (in memory; :meth:`flush` writes it).

        ``kind`` is one of :data:`KINDS`; seed kinds name a ``slot``; ``stage`` is a
        :class:`SeedStage` name (germinate/fossilize/cull default to theirs). Metric
        values are stored as floats.
        """
        if kind not in KINDS:
            known = ", ".join(sorted(KINDS))
            raise EsperError(f"unknown lineage event kind {kind!r} (one of {known})")
        stage = stage or _DEFAULT_STAGE.get(kind, "")
        if stage and stage not in _STAGE_NAMES:
            raise EsperError(f"lineage event {kind}: unknown stage {stage!r}")
        if kind in SEED_KINDS and not (slot and stage):
            raise EsperError(f"a {kind} lineage event needs a slot and a stage")
        try:
            clean = {str(k): float(v) for k, v in sorted((metrics or {}).items())}
        except (TypeError, ValueError) as err:
            raise EsperError(f"lineage event {kind}: metrics must be numbers ({err})") from None
        # Normalise types first, so the hash computed now is the one recomputed from Parquet.
        row: dict[str, Any] = {
            "seq": len(self._events),
            "run_id": self.run_id,
            "host_id": self.host_id,
            "kind": str(kind),  # a plain string (an EventKind member is one): hashed and stored as text
            "slot": str(slot),
            "blueprint_hash": str(blueprint_hash),
            "stage": stage,
            "epoch": int(epoch),
            "step": int(step),
            "weights_digest": str(weights_digest),
            "metrics": clean,
            "prev_hash": self.head,
            "blueprint_name": str(blueprint_name),
        }
        event = LineageEvent(**row)
        # Hash what the event holds (fields added later with defaults included), exactly as
        # verification will rebuild it from the Parquet columns.
        event.event_hash = _hash_row({name: getattr(event, name) for name in _HASHED})
        self._push(event)
        self._dirty = True
        return event

    def _push(self, event: LineageEvent) -> None:
        self._events.append(event)
        for name, column in self._columns.items():
            value = getattr(event, name)
            column.append(_CANONICAL.encode(value) if name in _JSON_FIELDS else value)

    def _table(self) -> pa.Table:
        return pa.Table.from_pydict(self._columns, schema=_SCHEMA)

    def flush(self) -> None:
        """Write the ledger and its signature (each atomically); a no-op if nothing new.

        The Parquet file is replaced first and the signature second, so a crash between
        the two leaves unsigned rows that the next open refuses rather than accepts.
        """
        if not self._dirty:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        table = self._table()
        atomic_write(self.run_dir / LEDGER_FILE, lambda f: pq.write_table(table, f))
        count, head = len(self._events), self.head
        signature = self._key.sign(_signed_message(self.run_id, count, head))
        sig = {
            "count": count,
            "head": head,
            "public_key": _raw_public(self._key.public_key()).hex(),
            "signature": signature.hex(),
        }
        atomic_write_text(self.run_dir / SIGNATURE_FILE, json.dumps(sig, indent=1, sort_keys=True) + "\n")
        self._dirty = False


# ---- reading a history -------------------------------------------------------------------
def replay(events: Sequence[LineageEvent]) -> dict[str, dict[str, str]]:
    """The architecture the events lead to: ``{slot: {"stage", "blueprint_hash"}}``.

    Every slot any seed event named appears. ``germinate`` sets the blueprint and stage;
    ``transition``/``fossilize``/``cull`` set the stage, and a slot that reaches CULLED,
    EMBARGOED or DORMANT holds no blueprint (""). ``rollback``, ``init`` and
    ``checkpoint`` change nothing; ``resume`` (written when training continues from the
    last checkpoint) returns every slot to its state at the last ``checkpoint`` event,
    discarding the events of the abandoned stretch. Unknown kinds are ignored.
    """
    arch: dict[str, dict[str, str]] = {}
    saved: dict[str, dict[str, str]] = {}
    for ev in events:
        kind = ev.kind
        if kind == EventKind.CHECKPOINT:
            saved = {name: dict(entry) for name, entry in arch.items()}
            continue
        if kind == EventKind.RESUME:
            arch = {name: dict(saved.get(name, _DORMANT)) for name in arch}
            continue
        if kind not in SEED_KINDS or not ev.slot:
            continue
        stage = ev.stage or _DEFAULT_STAGE.get(kind, "")
        if kind == EventKind.GERMINATE:
            arch[ev.slot] = {"stage": stage, "blueprint_hash": ev.blueprint_hash}
            continue
        entry = arch.setdefault(ev.slot, dict(_DORMANT))
        entry["stage"] = stage
        if stage in _EMPTY_STAGES:
            entry["blueprint_hash"] = ""
    return arch


def format_timeline(run_dir: Path) -> str:
    """The host's biography: one line per event, then its final architecture.

    ``epoch  12 step   1200  hidden1  germinate conv1d(ab12cd34)  GERMINATED  val_acc=0.71``.
    Reads the ledger without verifying it (see :func:`verify_run`).
    """
    events = load_events(Path(run_dir))
    if not events:
        return f"{Path(run_dir) / LEDGER_FILE}: no events"
    names = {ev.blueprint_hash: ev.blueprint_name for ev in events if ev.blueprint_name}

    def blueprint(h: str) -> str:
        return f"{names[h]}({h[:8]})" if h in names else h[:8]

    whats = [f"{ev.kind} {blueprint(ev.blueprint_hash)}".rstrip() for ev in events]
    ew = max(3, *(len(str(ev.epoch)) for ev in events))
    sw = max(6, *(len(str(ev.step)) for ev in events))
    slw = max(1, *(len(ev.slot) for ev in events))
    ww = max(len(w) for w in whats)
    stw = max(1, *(len(ev.stage) for ev in events))
    first = events[0]
    lines = [f"run {first.run_id}  host {first.host_id}  {len(events)} events"]
    for ev, what in zip(events, whats, strict=True):
        metrics = "  ".join(f"{k}={v:.4g}" for k, v in sorted(ev.metrics.items()))
        lines.append(
            f"epoch {ev.epoch:>{ew}} step {ev.step:>{sw}}  {ev.slot or '-':<{slw}}  "
            f"{what:<{ww}}  {ev.stage or '-':<{stw}}  {metrics}".rstrip()
        )
    arch = replay(events)
    lines.append("final architecture:" if arch else "final architecture: no seed ever germinated")
    for name in sorted(arch):
        entry = arch[name]
        bp = blueprint(entry["blueprint_hash"]) if entry["blueprint_hash"] else ""
        lines.append(f"  {name:<{slw}}  {entry['stage']:<10}  {bp}".rstrip())
    return "\n".join(lines)
