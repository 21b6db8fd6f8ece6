"""Byte-level text: next-byte prediction on English prose or Python source, offline and pinned.

The corpora ship with the package, compressed, in ``esper_ray/tasks/data/`` (nothing is
downloaded, and the bytes are the same on every machine and Python version):

* ``docs``: the English text of CPython 3.11.7's ``pydoc_data/topics.py`` (the language
  reference topics ``help()`` shows): its 79 topics in sorted key order joined by blank lines,
  UTF-8, 466,273 bytes;
* ``code``: the source of CPython 3.11.7's ``Lib/argparse.py``, 99,661 bytes (a shifted domain
  for adaptation: Python code instead of prose).

Both are Copyright (c) 2001-2023 Python Software Foundation, distributed under the PSF License
Agreement (``esper_ray/tasks/data/PSF_LICENSE.txt``); the stdlib ships them, and a verbatim copy is
kept here because ``pydoc_data/topics.py`` changes from one Python release to the next. Each
corpus is pinned by the SHA-256 of its bytes (``CORPORA``): a shipped file that does not match
is an error, and the decompressed corpus cached under ``<cache_dir>/text/`` is checked against the
same digest on every load and rebuilt from the shipped file when it does not match (a corrupt
cache is never trusted).

The task (``family: text``): the corpus is cut by position into train, validation and test
regions (the last ``TEST_FRACTION`` is test, the ``val_fraction`` before it validation), so no
window of one split overlaps another's; each region is cut into windows of ``context + 1`` bytes
at stride ``context`` (the start offset drawn from ``seed``), ``x`` = the window's first
``context`` bytes as float32 byte values, ``y`` = the ``context`` bytes after each position
(int64, ``(N, context)``). ``num_classes`` is 256. A host's loss is the mean cross-entropy per
byte; the trainer's accuracy is next-byte accuracy, and bits per byte = loss / ln 2.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from esper_ray.contracts import EsperError
from esper_ray.tasks.base import TEST_FRACTION, TaskConfig, TaskData, cache_dir, finish, task_name
from esper_ray.tasks.params import TextParams
from esper_ray.util import atomic_write_bytes

VOCAB = 256
"""Byte values: the number of classes of every text task."""


@dataclass(frozen=True)
class Corpus:
    """One shipped corpus: its compressed file in ``esper_ray/tasks/data`` and the digest of its bytes."""

    file: str
    sha256: str
    size: int
    source: str


CORPORA: dict[str, Corpus] = {
    "docs": Corpus(
        "pydoc_topics.txt.xz",
        "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee",
        466_273,
        "CPython 3.11.7 Lib/pydoc_data/topics.py (topics in sorted key order, blank-line separated); PSF License",
    ),
    "code": Corpus(
        "argparse_py.txt.xz",
        "dc1eba8adfdf615986421f981337458ba1072d3e718a0f76e3224940fd74118b",
        99_661,
        "CPython 3.11.7 Lib/argparse.py; PSF License",
    ),
}


def _shipped(corpus: Corpus) -> bytes:
    """The corpus decompressed from the package's data file, checked against its digest."""
    try:
        blob = resources.files("esper_ray.tasks").joinpath("data", corpus.file).read_bytes()
        data = lzma.decompress(blob)
    except (OSError, lzma.LZMAError) as err:
        raise EsperError(f"text corpus {corpus.file}: cannot read the shipped file: {err}") from None
    if hashlib.sha256(data).hexdigest() != corpus.sha256:
        raise EsperError(f"text corpus {corpus.file}: its bytes do not match the pinned sha256 (damaged install?)")
    return data


def corpus_path(domain: str) -> Path:
    """Where the decompressed corpus of ``domain`` is cached."""
    corpus = CORPORA[domain]
    return cache_dir() / "text" / f"{domain}-{corpus.sha256[:16]}.bin"


@functools.lru_cache(maxsize=4)
def corpus_bytes(domain: str) -> bytes:
    """The bytes of corpus ``domain``: from the cache when its digest matches, else rebuilt from the
    shipped file (and the cache rewritten atomically; an unwritable cache is only a missed saving)."""
    corpus = CORPORA[domain]
    path = corpus_path(domain)
    try:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == corpus.sha256:
            return data
    except OSError:
        pass
    data = _shipped(corpus)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError:
        pass  # a cache we cannot write: the shipped corpus is read again next time
    return data


def _windows(region: torch.Tensor, context: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``context + 1`` bytes at stride ``context``: inputs and next bytes."""
    region = region[offset:]
    n = (len(region) - 1) // context
    if n < 1:
        return torch.empty(0, context), torch.empty(0, context, dtype=torch.int64)
    starts = torch.arange(n) * context
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    w = region[idx]
    return w[:, :-1], w[:, 1:]


def load_text(cfg: TaskConfig) -> TaskData:
    """The text task ``cfg`` describes (module docstring); EsperError for an unusable setting."""
    params = TextParams.model_validate(cfg.params)
    corpus = CORPORA[params.domain]
    data = torch.frombuffer(bytearray(corpus_bytes(params.domain)), dtype=torch.uint8).to(torch.int64)
    n = len(data)
    n_test = round(TEST_FRACTION * n)
    n_val = max(1, round(cfg.val_fraction * (n - n_test)))
    n_train_bytes = n - n_test - n_val
    regions = {"train": data[:n_train_bytes], "val": data[n_train_bytes : n - n_test], "test": data[n - n_test :]}
    gen = torch.Generator().manual_seed(cfg.seed)
    offset = int(torch.randint(params.context, (1,), generator=gen))
    splits = {name: _windows(region, params.context, offset) for name, region in regions.items()}
    if min(len(x) for x, _ in splits.values()) < 2:
        raise EsperError(
            f"text task: context {params.context} leaves fewer than 2 windows in a split of the "
            f"{params.domain} corpus ({n:,} bytes)"
        )
    x_train, y_train = splits["train"]
    order = torch.randperm(len(x_train), generator=gen)
    if cfg.n_train is not None:
        if cfg.n_train > len(x_train):
            raise EsperError(f"n_train={cfg.n_train} is more than the {len(x_train)} training windows of this task")
        order = order[: cfg.n_train]
    x_train, y_train = x_train[order], y_train[order]
    x_val, y_val = splits["val"]
    x_test, y_test = splits["test"]
    return TaskData(
        name=task_name(cfg, f"text-{params.domain}-c{params.context}"),
        x_train=finish(x_train, torch.float32),
        y_train=finish(y_train, torch.int64),
        x_val=finish(x_val, torch.float32),
        y_val=finish(y_val, torch.int64),
        x_test=finish(x_test, torch.float32),
        y_test=finish(y_test, torch.int64),
        input_shape=(params.context,),
        num_classes=VOCAB,
        meta={
            "family": "text",
            "seed": cfg.seed,
            "domain": params.domain,
            "context": params.context,
            "tokenizer": params.tokenizer,
            "corpus_sha256": corpus.sha256,
            "source": corpus.source,
            "n_train": int(len(x_train)),
            "n_val": int(len(x_val)),
            "n_test": int(len(x_test)),
            "offset": offset,
        },
    )
