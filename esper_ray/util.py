"""Small helpers every part of esper-ray shares: atomic file writes, consistent Parquet reads and
one-line error text.

Atomic writes: a reader (another process, a resumed run, Urza after a crash) sees the old file
or the new one, never half of one. The data goes to a temporary file in the same folder, is
flushed and fsynced, and is then renamed over the target (``os.replace``, atomic on POSIX and
Windows within one filesystem). A failed write removes its temporary file and leaves the old
file as it was. Temporary names start with ``.`` and end with ``.tmp``: a run folder holding only
such leftovers is recognised as a start that was cut short (``esper_ray.tolaria.run``).

The other half of that promise is the reader's: ``read_parquet`` reads a Parquet file through one
open file, so a file replaced while it is read gives the old table or the new one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "error_line",
    "one_line",
    "read_parquet",
]


def _temp_path(path: Path) -> Path:
    # Unique per process, thread and call: two writers of one file never share a temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` atomically with ``write(file)`` (a binary file open for writing); returns ``path``.

    For writers that stream (``pyarrow.parquet.write_table``, ``numpy.savez``); the folder must exist.
    """
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename); returns ``path``."""

    def write(fh: IO[bytes]) -> None:
        fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """Write ``json.dumps(obj, **dumps)`` to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(obj, **dumps))


def read_parquet(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The Parquet table at ``path`` (only ``columns``, when given), from one version of the file.

    ``pyarrow.parquet.read_table(path)`` opens the file more than once (its footer, then its
    pages): when a writer renames a new version over it in between, as every atomic write here
    does, it reads the footer of one version and the pages of the other and fails (a reader of
    Urza's catalogue or of a live run's ledger, say). The bytes are read through one open file, so
    a reader sees the old file or the new one. Errors are pyarrow's and ``OSError``, as before.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(path, "rb") as fh:
        data = fh.read()
    return pq.read_table(pa.BufferReader(data), columns=list(columns) if columns is not None else None)


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` safe for a log line or a stored reason: control characters (a newline a submitter
    put in a field name, say) escaped, and cut to ``limit`` characters (with ``...``) when given."""
    escaped = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)
    if limit is None or len(escaped) <= limit:
        return escaped
    return escaped[: max(limit - 3, 0)] + "..."


def error_line(err: BaseException | str) -> str:
    """The first non-empty line of an error's message (its type name when the message is empty):
    what a one-line ``EsperError`` quotes of the exception that caused it."""
    text = str(err).strip()
    if text:
        return text.splitlines()[0].strip()
    return type(err).__name__ if isinstance(err, BaseException) else ""
