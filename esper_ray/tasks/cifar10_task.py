"""CIFAR-10 from a local copy of the official python batches; esper-ray never downloads it."""

from __future__ import annotations

import functools
import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esper_ray.contracts import EsperError
from esper_ray.tasks.base import TaskConfig, TaskData, finish, split_pool, task_name

BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
_PIXELS = 3 * 32 * 32

# The only globals an official batch (or a numpy re-pickle of one) refers to. Anything else,
# e.g. os.system, is refused: no code runs from files on disk.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
    }
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return getattr(importlib.import_module(module), name)


def resolve_batch_dir(root: str | None) -> Path:
    """The folder holding the batches: ``root/cifar-10-batches-py`` or ``root`` itself.

    Raises EsperError (one line, naming the folder) if neither holds all six batch files.
    """
    if root is None:
        raise EsperError(
            "CIFAR-10 needs TaskConfig.root: the folder holding cifar-10-batches-py/ "
            "(download it yourself; esper-ray never downloads)"
        )
    base = Path(root).expanduser()
    nested = base / BATCH_DIR
    for candidate in (nested, base):
        if all((candidate / f).is_file() for f in (*TRAIN_FILES, TEST_FILE)):
            return candidate
    look_in = nested if nested.is_dir() or not base.is_dir() else base
    missing = [f for f in (*TRAIN_FILES, TEST_FILE) if not (look_in / f).is_file()]
    raise EsperError(
        f"CIFAR-10 not found at {str(base)!r}: expected data_batch_1..5 and test_batch in "
        f"{str(nested)!r} or {str(base)!r} (missing in {str(look_in)!r}: {', '.join(missing)}; "
        "download it yourself; esper-ray never downloads)"
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, 3072), labels int64 (N,)) of one batch, checked against the format."""
    try:
        with path.open("rb") as f:
            batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        detail = " ".join(str(exc).split())  # keep the message on one line
        raise EsperError(f"CIFAR-10 batch {str(path)!r} is unreadable: {detail}") from exc
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _PIXELS
        or labels.shape != (data.shape[0],)
        or (labels.size and (labels.min() < 0 or labels.max() > 9))
    ):
        raise EsperError(
            f"CIFAR-10 batch {str(path)!r} is not in the official format: expected uint8 data "
            f"(N, {_PIXELS}) and N labels in 0..9, got data {data.dtype} {data.shape} and "
            f"labels {labels.shape}"
        )
    return data, labels


@functools.lru_cache(maxsize=1)
def _raw(batch_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train = [_read_batch(Path(batch_dir) / f) for f in TRAIN_FILES]
    x, y = np.concatenate([d for d, _ in train]), np.concatenate([lab for _, lab in train])
    x_test, y_test = _read_batch(Path(batch_dir) / TEST_FILE)
    arrays = (x, y, x_test, y_test)
    for a in arrays:
        a.setflags(write=False)  # shared by every caller in the process
    return arrays


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and std of uint8 images (N, 3, 1024) in [0, 1] units.

    Counted from a 256-bin histogram per channel, so no float copy of 50 000 images is made.
    """
    mean, std = np.empty(3), np.empty(3)
    values = np.arange(256, dtype=np.float64) / 255.0
    for c in range(3):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        n = counts.sum()
        mean[c] = (counts * values).sum() / n
        std[c] = np.sqrt(max((counts * (values - mean[c]) ** 2).sum() / n, 1e-12))
    return mean, std


def _tensor(a: np.ndarray) -> torch.Tensor:
    # The cached arrays are read-only; torch must not wrap them, so copy those (and only those).
    return torch.from_numpy(np.ascontiguousarray(a) if a.flags.writeable else a.copy())


def load_cifar10(cfg: TaskConfig) -> TaskData:
    """CIFAR-10 as (3, 32, 32) float32 images, standardised per channel with train-pool stats.

    Val is carved from the 50 000 training images; the 10 000 test images keep file order.
    """
    batch_dir = resolve_batch_dir(cfg.root)
    x, y, x_test, y_test = _raw(str(batch_dir.resolve()))

    gen = torch.Generator().manual_seed(cfg.seed)
    train_idx, val_idx = split_pool(x.shape[0], cfg, gen)
    pool = np.ones(x.shape[0], dtype=bool)
    pool[val_idx.numpy()] = False
    mean, std = _channel_stats(x[pool].reshape(-1, 3, 32 * 32))
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def images(raw: np.ndarray) -> torch.Tensor:
        # Select uint8 rows first, then convert: only the split itself is ever held as float.
        t = _tensor(raw).view(-1, 3, 32, 32).float()
        return finish(t.div_(255.0).sub_(mean_t).div_(std_t), torch.float32)

    def labels(raw: np.ndarray) -> torch.Tensor:
        return finish(_tensor(raw), torch.int64)

    tr, va = train_idx.numpy(), val_idx.numpy()
    return TaskData(
        name=task_name(cfg, "cifar10"),
        x_train=images(x[tr]),
        y_train=labels(y[tr]),
        x_val=images(x[va]),
        y_val=labels(y[va]),
        x_test=images(x_test),
        y_test=labels(y_test),
        input_shape=(3, 32, 32),
        num_classes=10,
        meta={
            "family": "cifar10",
            "seed": cfg.seed,
            "root": str(batch_dir),
            "n_train": int(tr.size),
            "n_val": int(va.size),
            "n_test": int(y_test.size),
            "channel_mean": [float(m) for m in mean],
            "channel_std": [float(s) for s in std],
        },
    )
