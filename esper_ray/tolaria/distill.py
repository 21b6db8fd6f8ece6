"""Knowledge distillation: a fixed teacher, a smaller student with seed slots, and per-slot gaps.

Tolaria trains a teacher (or loads one) once, precomputes its logits on the training set,
and distils it into the student the Trainer trains (``Trainer(..., loss_fn=loss)``)::

    loss = (1 - w) * CE(student, y) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with ``T = DistillConfig.temperature`` and ``w = DistillConfig.weight`` (KL averaged over
the batch). The teacher's logits are indexed by the batch indices the Trainer passes to
``loss_fn(logits, y, idx)``, so the teacher never runs during student training.

The per-slot distillation gap (``DistillationLoss.slot_gaps(trainer)``, which the Trainer
puts into ``Observation.distill`` and Tamiyo sees as ``tanh(gap)``) is, for each student
slot ``s`` at block boundary ``i`` of a student with ``n_s`` blocks:

1. ``A``: the student's activation *leaving* the slot (what the block after it reads, the
   seed's blended output included), flattened, on the first ``gap_probe`` validation
   examples (eval mode, no gradient);
2. ``Z``: the teacher's logits on the same examples (``gap_target: logits``, the default),
   or the teacher's output at the matching depth (``gap_target: features``): the student's
   pipeline has ``n_s + 1`` stages after the input (its blocks and head) and slot ``i``
   feeds stage ``i + 1``; the teacher's stages are its ``n_t`` blocks and its logits (stage
   ``n_t + 1``); the target is teacher stage ``j = round((i + 1) * (n_t + 1) / (n_s + 1))``;
3. a ridge regression ``Z ~ A W + b`` is fit on the first half of the probe examples
   (``lambda = ridge * trace(A'A) / dim(A)``, both sides centred on the fitting half's mean)
   and scored on the second half::

       gap = ||Z2 - (A2 W + b)||^2 / ||Z2 - mean(Z1)||^2

So ``gap`` is the share of the teacher's (centred) logits that no linear read-out of what
the student passes on at that slot can predict: 0 means the student already carries all
of the teacher's decision there, 1 means none of it (slightly above 1 if the read-out
overfits). On MNIST-1D (MLP student, CNN teacher) the gaps fall with training at the hidden
slots, and a conv seed at the input lowers every slot's gap (the readings: BENCHMARKS.md,
"Measurements behind the code"). The input slot's gap is constant until a seed there changes
what leaves it. Cost: one student forward pass on the probe and one small ridge solve per slot.

Sequence models (the transformer host on a text task: logits ``(B, T, classes)``, labels
``(B, T)``) are distilled per position: the KL is averaged over every (example, position), the
teacher's training-set logits are kept in float16 (they are ``n_train x T x classes``), and a slot
gap is fit on rows of (example, position) with the slot's ``D`` channels as features and the
teacher's logits *at the same position* as targets: a read-out across positions would let a later
position (which has seen the next byte) predict an earlier one's logits.

Teachers are cached: in-process (a dict keyed by teacher settings + a content hash of the
task's tensors) and on disk (``<cache_dir>/teachers/<key>/teacher.safetensors`` + ``teacher.json``),
so the Gymnasium env reuses the same teacher on every reset and in every process. A teacher
checkpoint is exactly such a folder (or its ``.safetensors`` file with the ``.json`` beside
it): tensors in safetensors, the teacher's HostConfig in JSON, never pickles.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from esper_ray.config import RunConfig, StrictModel, format_validation_error, validate_model
from esper_ray.contracts import EsperError
from esper_ray.hosts import HostConfig, MorphoHost, build_host
from esper_ray.hosts.transformer import TransformerHost
from esper_ray.tasks import TaskData, cache_dir
from esper_ray.util import error_line

FORMAT = "esper-ray-teacher/1"
_CACHE_VERSION = 1  # bump when a cached teacher's meaning changes (training loop, format)

# How many teachers were trained, loaded from disk or taken from memory in this process
# (tests count these instead of timing).
cache_stats: collections.Counter[str] = collections.Counter()
_MEMORY: dict[str, Teacher] = {}


def _default_teacher() -> HostConfig:
    return HostConfig(kind="cnn1d", hidden=[32, 64], slots=[])


class DistillConfig(StrictModel):
    """The ``distill:`` section: the teacher, the KD loss, and the slot-gap signal."""

    teacher: HostConfig = Field(default_factory=_default_teacher, description="teacher host config")
    teacher_epochs: int = Field(30, ge=1, description="epochs to train the teacher (best val kept)")
    teacher_lr: float = Field(1e-3, gt=0)
    teacher_batch_size: int = Field(100, ge=1)
    teacher_seed: int = Field(0, description="teacher init and data order (independent of the student)")
    teacher_checkpoint: str | None = Field(
        None, description="load this teacher (folder with teacher.safetensors + teacher.json) instead"
    )
    temperature: float = Field(4.0, gt=0, description="T: softens both distributions in the KL term")
    weight: float = Field(0.7, ge=0, le=1, description="w: loss = (1-w) CE + w T^2 KL")
    gap_target: Literal["logits", "features"] = Field(
        "logits", description="slot gap target: the teacher's logits, or its stage at matching depth"
    )
    gap_probe: int = Field(512, ge=16, description="validation examples used for slot gaps")
    ridge: float = Field(1e-2, ge=0, description="ridge strength (relative to the mean eigenvalue)")
    cache: bool = Field(True, description="keep trained teachers on disk and reuse them")
    cache_dir: str | None = Field(None, description="default: <ESPER_RAY_CACHE or ~/.cache/esper-ray>/teachers")


class DistillRunConfig(RunConfig):
    """A distillation config file: a normal RunConfig for the student plus ``distill:``."""

    distill: DistillConfig = Field(default_factory=DistillConfig)

    def split(self) -> tuple[RunConfig, DistillConfig]:
        run = RunConfig(**{k: getattr(self, k) for k in RunConfig.model_fields})
        return run, self.distill


def load_distill_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[RunConfig, DistillConfig]:
    """Read a distillation YAML (student RunConfig + ``distill:``), apply overrides, validate."""
    from esper_ray.config import load_config

    return load_config(path, overrides, model=DistillRunConfig).split()


# ---- the loss -------------------------------------------------------------------------------------
def kd_loss(
    student: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor, temperature: float, weight: float
) -> torch.Tensor:
    """``(1-w) CE(student, y) + w T^2 KL(softmax(teacher/T) || softmax(student/T))`` (batch mean).

    Logits ``(B, T, classes)`` with labels ``(B, T)`` count every position as an example."""
    if student.dim() > 2:
        student, y, teacher = student.flatten(0, -2), y.flatten(), teacher.flatten(0, -2)
    ce = F.cross_entropy(student, y)
    if weight == 0:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher.to(student.dtype) / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - weight) * ce + weight * t * t * kl


@dataclass
class Teacher:
    """A trained teacher and what the student's loss and gaps need from it, for one task."""

    host: MorphoHost
    config: HostConfig
    key: str
    source: str  # "trained", "disk cache", "memory", "checkpoint"
    meta: dict[str, Any]
    train_logits: torch.Tensor  # (n_train, classes), teacher logits on data.x_train
    probe_x: torch.Tensor  # data.x_val[:gap_probe]
    probe_stages: list[torch.Tensor] = field(default_factory=list)  # stage k+1 output, flattened
    path: Path | None = None  # where its safetensors + JSON lie (cache or checkpoint)

    @property
    def test_acc(self) -> float:
        return float(self.meta.get("metrics", {}).get("test_acc", float("nan")))

    @property
    def val_acc(self) -> float:
        return float(self.meta.get("metrics", {}).get("val_acc", float("nan")))

    def save(self, folder: str | Path) -> Path:
        """Write ``teacher.safetensors`` + ``teacher.json`` into ``folder`` (a loadable checkpoint)."""
        return _save_teacher(self.host, self.meta, Path(folder))


class DistillationLoss:
    """``loss_fn(logits, y, idx)`` for the Trainer, plus ``slot_gaps(trainer)`` (module docstring)."""

    def __init__(self, teacher: Teacher, cfg: DistillConfig):
        self.teacher = teacher
        self.cfg = cfg
        self.temperature = cfg.temperature
        self.weight = cfg.weight
        self.gap_seconds = 0.0  # time spent in slot_gaps (last call)
        self._logits = teacher.train_logits  # the teacher's logits, moved once to the student's device

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t = self._logits
        if idx.numel() and int(idx.max()) >= len(t):
            raise EsperError(
                f"distillation: batch index {int(idx.max())} beyond the {len(t)} training examples "
                "the teacher's logits were computed for (was the Trainer given other data?)"
            )
        if t.device != logits.device:
            t = self._logits = t.to(logits.device)
        return kd_loss(logits, y, t[idx.to(t.device)], self.temperature, self.weight)

    @torch.no_grad()
    def slot_gaps(self, trainer) -> dict[str, float]:
        """Per student slot, the teacher's unexplained share at matching depth (see module doc)."""
        started = time.perf_counter()
        host: MorphoHost = trainer.host
        x = self.teacher.probe_x  # on the CPU, like the teacher; the Trainer's data may be on a GPU
        own = trainer.data.x_val[: len(x)]
        if len(own) < len(x) or not torch.equal(own.to(x.device), x):
            raise EsperError("distillation: the Trainer's data is not the data the teacher was set up for")
        outs = slot_outputs(host, own)  # the same examples, already on the student's device
        n_s, n_t = len(host.blocks), len(self.teacher.probe_stages) - 1
        gaps = {}
        for name, slot in host.slots.items():
            if self.cfg.gap_target == "logits":
                j = n_t + 1
            else:
                j = min(max(round((slot.index + 1) * (n_t + 1) / (n_s + 1)), 1), n_t + 1)
            gaps[name] = ridge_gap(outs[name], self.teacher.probe_stages[j - 1], self.cfg.ridge)
        self.gap_seconds = time.perf_counter() - started
        return gaps


def _rows(h: torch.Tensor, per_position: bool) -> torch.Tensor:
    """One row per example, flattened; with ``per_position`` one row per (example, position) of a
    ``(B, T, D)`` sequence (a transformer's stream or logits: the read-out must not look across
    positions)."""
    return h.flatten(0, 1) if per_position else h.flatten(1)


def slot_outputs(host: MorphoHost, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The activation leaving each slot (after its seed, if any), flattened, in eval mode."""
    was_training = host.training
    host.eval()
    try:
        outs: dict[str, torch.Tensor] = {}
        by_index = {s.index: (name, s) for name, s in host.slots.items()}
        h = x
        for i in range(len(host.blocks) + 1):
            if i > 0:
                h = host.blocks[i - 1](h)
            if i in by_index:
                name, slot = by_index[i]
                h = slot(h)  # identity while dormant
                outs[name] = _rows(h, slot.kind == "tokens")
        return outs
    finally:
        host.train(was_training)


def teacher_stages(host: MorphoHost, x: torch.Tensor) -> list[torch.Tensor]:
    """The teacher's block outputs and its logits on ``x``, each flattened (n_t + 1 tensors); rows
    per (example, position) for a transformer."""
    host.eval()
    out, h = [], x
    per_position = isinstance(host, TransformerHost)
    with torch.no_grad():
        for block in host.blocks:
            h = block(h)
            out.append(_rows(h, per_position))
        out.append(_rows(host.head(h), per_position) if per_position else host.head(h))
    return out


def ridge_gap(a: torch.Tensor, z: torch.Tensor, ridge: float) -> float:
    """Held-out relative residual of a ridge read-out ``z ~ a W + b`` (fit: 1st half, score: 2nd).

    Solved on the CPU in float64 (a student on a GPU hands its activations over as they are).
    """
    a, z = a.detach().cpu().double(), z.detach().cpu().double()
    n = len(a) // 2
    a1, a2, z1, z2 = a[:n], a[n:], z[:n], z[n:]
    ma, mz = a1.mean(0), z1.mean(0)
    a1, a2, z1, z2 = a1 - ma, a2 - ma, z1 - mz, z2 - mz
    denom = float(z2.square().sum())
    if denom <= 1e-12:
        return 0.0  # nothing to predict
    d = a1.shape[1]
    lam = ridge * float(a1.square().sum()) / max(d, 1) + 1e-8
    if d <= n:  # primal: (A'A + lam I) W = A'Z
        w = torch.linalg.solve(a1.T @ a1 + lam * torch.eye(d, dtype=a.dtype), a1.T @ z1)
        pred = a2 @ w
    else:  # dual: W = A' (AA' + lam I)^-1 Z, cheaper when the slot is wider than the probe half
        coef = torch.linalg.solve(a1 @ a1.T + lam * torch.eye(n, dtype=a.dtype), z1)
        pred = (a2 @ a1.T) @ coef
    return float((z2 - pred).square().sum()) / denom


# ---- teachers: train, save, load, cache -----------------------------------------------------------
def data_digest(data: TaskData) -> str:
    """A content hash of a task's tensors (what a teacher's logits are a function of)."""
    h = hashlib.sha256()
    h.update(json.dumps([list(data.input_shape), data.num_classes]).encode())
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        t = getattr(data, name).contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def teacher_key(cfg: DistillConfig, data: TaskData) -> str:
    """The cache key of the teacher ``cfg`` trains on ``data``."""
    recipe = {
        "version": _CACHE_VERSION,
        "host": cfg.teacher.model_dump(mode="json"),
        "epochs": cfg.teacher_epochs,
        "lr": cfg.teacher_lr,
        "batch_size": cfg.teacher_batch_size,
        "seed": cfg.teacher_seed,
        "data": data_digest(data),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]


def teacher_cache_dir(cfg: DistillConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_dir() / "teachers"


@torch.no_grad()
def _accuracy(host: MorphoHost, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correct predictions (of every position, for a sequence model)."""
    host.eval()
    correct = sum(int((host(x[i : i + 4096]).argmax(-1) == y[i : i + 4096]).sum()) for i in range(0, len(x), 4096))
    return correct / max(y.numel(), 1)


@torch.no_grad()
def _mean_ce(host: MorphoHost, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy in nats (per position, for a sequence model)."""
    host.eval()
    total = 0.0
    for i in range(0, len(x), 1024):
        logits = host(x[i : i + 1024])
        total += float(F.cross_entropy(logits.flatten(0, -2), y[i : i + 1024].flatten(), reduction="sum"))
    return total / max(y.numel(), 1)


def train_teacher(cfg: DistillConfig, data: TaskData) -> tuple[MorphoHost, dict[str, Any]]:
    """Train the teacher host with cross-entropy; keep the weights of its best validation epoch."""
    cache_stats["trained"] += 1
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.teacher_seed)
        host = build_host(cfg.teacher, data.input_shape, data.num_classes)
    gen = torch.Generator().manual_seed(cfg.teacher_seed)
    opt = torch.optim.Adam(host.parameters(), lr=cfg.teacher_lr)
    x, y, bs = data.x_train, data.y_train, cfg.teacher_batch_size
    best, best_epoch = -math.inf, 0
    best_state = host.host_state_dict()  # replaced by the first epoch (val > -inf)
    sequence = isinstance(host, TransformerHost)
    for epoch in range(cfg.teacher_epochs):
        host.train()
        perm = torch.randperm(len(x), generator=gen)
        for b in range(0, len(x), bs):
            idx = perm[b : b + bs]
            loss = F.cross_entropy(host(x[idx]).flatten(0, -2), y[idx].flatten())  # also (B, T, classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        # A language model is kept at its best validation loss (bits per byte is what it is judged on).
        val = -_mean_ce(host, data.x_val, data.y_val) if sequence else _accuracy(host, data.x_val, data.y_val)
        if val > best:
            best, best_epoch = val, epoch + 1
            best_state = host.host_state_dict()
    host.load_host_state_dict(best_state)
    metrics = {
        "val_acc": _accuracy(host, data.x_val, data.y_val) if sequence else best,
        "test_acc": _accuracy(host, data.x_test, data.y_test),
        "best_epoch": best_epoch,
        "epochs": cfg.teacher_epochs,
        "params": host.param_count()["host"],
        "train_seconds": round(time.perf_counter() - started, 3),
    }
    return host, metrics


def _save_teacher(host: MorphoHost, meta: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in host.host_state_dict().items()}
    save_file(tensors, folder / "teacher.safetensors")
    digest = hashlib.sha256((folder / "teacher.safetensors").read_bytes()).hexdigest()
    (folder / "teacher.json").write_text(json.dumps({**meta, "weights_sha256": digest}, indent=1))
    return folder


def _checkpoint_files(path: Path) -> tuple[Path, Path]:
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / "teacher.safetensors", path / "teacher.json"


def load_teacher(path: str | Path, data: TaskData) -> tuple[MorphoHost, dict[str, Any]]:
    """Load a teacher checkpoint for ``data``; EsperError (one line, naming the path) if unusable."""
    path = Path(path).expanduser()
    weights, meta_path = _checkpoint_files(path)
    where = f"teacher checkpoint {path}"
    for f in (weights, meta_path):
        if not f.is_file():
            raise EsperError(f"{where}: {f.name} not found (expected teacher.safetensors + teacher.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EsperError(f"{where}: {meta_path.name} is not valid JSON: {error_line(err)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EsperError(f"{where}: {meta_path.name} is not an {FORMAT} file")
    try:
        host_cfg = HostConfig.model_validate(meta.get("host"))
    except ValidationError as err:
        raise EsperError(format_validation_error(err, f"{where}: host")) from None
    if list(meta.get("input_shape", [])) != list(data.input_shape) or meta.get("num_classes") != data.num_classes:
        raise EsperError(
            f"{where}: made for inputs {meta.get('input_shape')} with {meta.get('num_classes')} classes, "
            f"but task {data.name} has {list(data.input_shape)} and {data.num_classes}"
        )
    try:
        raw = weights.read_bytes()
        tensors = load(raw)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise EsperError(f"{where}: {weights.name} is not a readable safetensors file: {error_line(err)}") from None
    recorded = meta.get("weights_sha256")
    if recorded is not None and recorded != hashlib.sha256(raw).hexdigest():
        raise EsperError(f"{where}: {weights.name} does not match the sha256 recorded in {meta_path.name}")
    host = build_host(host_cfg, data.input_shape, data.num_classes)
    try:
        host.load_host_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    except (EsperError, RuntimeError) as err:
        raise EsperError(f"{where}: weights do not fit its host config: {error_line(err)}") from None
    host.requires_grad_(False)
    return host, meta


def _finish(host: MorphoHost, cfg: DistillConfig, data: TaskData, key: str, source: str, meta, path) -> Teacher:
    host.eval()
    host.requires_grad_(False)
    with torch.no_grad():
        chunk = 256 if isinstance(host, TransformerHost) else 4096  # a sequence's logits are T x classes each
        logits = torch.cat([host(data.x_train[i : i + chunk]) for i in range(0, len(data.x_train), chunk)])
    if logits.dim() > 2:  # n_train x T x classes: half the memory; the KD loss casts back to float32
        logits = logits.to(torch.float16)
    probe_x = data.x_val[: cfg.gap_probe].clone()
    # Accuracy on this task's splits, measured here (a checkpoint may come from elsewhere).
    meta = {
        **meta,
        "metrics": {
            **meta.get("metrics", {}),
            "val_acc": _accuracy(host, data.x_val, data.y_val),
            "test_acc": _accuracy(host, data.x_test, data.y_test),
            **(
                {
                    "test_loss": _mean_ce(host, data.x_test, data.y_test),
                    "val_loss": _mean_ce(host, data.x_val, data.y_val),
                }
                if isinstance(host, TransformerHost)
                else {}
            ),
        },
    }
    return Teacher(
        host=host,
        config=HostConfig.model_validate(meta["host"]),
        key=key,
        source=source,
        meta=meta,
        train_logits=logits.detach(),
        probe_x=probe_x,
        probe_stages=teacher_stages(host, probe_x),
        path=path,
    )


def get_teacher(cfg: DistillConfig, data: TaskData) -> Teacher:
    """The teacher for ``data``: from memory, the checkpoint, the disk cache, or trained now."""
    if cfg.teacher_checkpoint:
        weights, _ = _checkpoint_files(Path(cfg.teacher_checkpoint).expanduser())
        try:
            file_hash = hashlib.sha256(weights.read_bytes()).hexdigest()
        except OSError:
            file_hash = "missing"  # load_teacher names the problem
        key = hashlib.sha256(f"{cfg.teacher_checkpoint}|{file_hash}|{data_digest(data)}".encode()).hexdigest()[:24]
    else:
        key = teacher_key(cfg, data)
    memo_key = f"{key}|{cfg.gap_probe}"
    if memo_key in _MEMORY:
        cache_stats["memory"] += 1
        return _MEMORY[memo_key]
    if cfg.teacher_checkpoint:
        host, meta = load_teacher(cfg.teacher_checkpoint, data)
        cache_stats["checkpoint"] += 1
        teacher = _finish(host, cfg, data, key, "checkpoint", meta, Path(cfg.teacher_checkpoint))
    else:
        folder = teacher_cache_dir(cfg) / key
        cached: Teacher | None = None
        if cfg.cache and (folder / "teacher.json").is_file():
            try:
                host, meta = load_teacher(folder, data)
                cache_stats["disk"] += 1
                cached = _finish(host, cfg, data, key, "disk cache", meta, folder)
            except EsperError:
                shutil.rmtree(folder, ignore_errors=True)  # a broken cache entry: train again
        if cached is not None:
            teacher = cached
        else:
            host, metrics = train_teacher(cfg, data)
            meta = {
                "format": FORMAT,
                "host": cfg.teacher.model_dump(mode="json"),
                "input_shape": list(data.input_shape),
                "num_classes": data.num_classes,
                "task": data.name,
                "data_sha256": data_digest(data),
                "recipe": {
                    "epochs": cfg.teacher_epochs,
                    "lr": cfg.teacher_lr,
                    "batch_size": cfg.teacher_batch_size,
                    "seed": cfg.teacher_seed,
                },
                "metrics": metrics,
            }
            path = _store(host, meta, folder) if cfg.cache else None
            teacher = _finish(host, cfg, data, key, "trained", meta, path)
    _MEMORY[memo_key] = teacher
    return teacher


def _store(host: MorphoHost, meta: dict[str, Any], folder: Path) -> Path | None:
    """Write the teacher to the cache atomically (a temporary folder renamed into place)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        _save_teacher(host, meta, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process stored it first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return None  # an unwritable cache costs a retrain next time, nothing else


def clear_memory_cache() -> None:
    """Forget in-process teachers (the disk cache stays)."""
    _MEMORY.clear()


def make_distillation(cfg: dict[str, Any] | DistillConfig | None, data: TaskData, run: RunConfig) -> DistillationLoss:
    """Build (train, load or reuse) the teacher for ``data`` and return the student's loss object.

    ``run`` is the student's RunConfig (its thread setting is applied while a teacher trains).
    The same teacher settings on the same task tensors give the same teacher object in this
    process, and the same cached weights across processes.
    """
    if not isinstance(cfg, DistillConfig):
        cfg = validate_model(DistillConfig, dict(cfg or {}), "distill config")
    threads = torch.get_num_threads()
    torch.set_num_threads(run.training.threads)
    try:
        teacher = get_teacher(cfg, data)
    finally:
        torch.set_num_threads(threads)
    return DistillationLoss(teacher, cfg)


# ---- one end-to-end run ---------------------------------------------------------------------------
def run_distillation(
    run: RunConfig,
    cfg: DistillConfig,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    controller=None,
):
    """Teacher (trained or loaded), then the student's run folder via ``run_training``.

    Beside the usual run folder it writes ``teacher/`` (a loadable teacher checkpoint) and
    ``distill.json`` (teacher and student accuracy, the share retained, the settings).
    Returns ``(RunResult, DistillationLoss)``.
    """
    from esper_ray.tasks import load_task
    from esper_ray.tolaria.run import check_run_dir, run_training

    check_run_dir(run, out)  # fail before the teacher trains
    data = load_task(run.task)
    torch.set_num_threads(run.training.threads)
    loss = make_distillation(cfg, data, run)
    teacher = loss.teacher
    if progress:
        print(
            f"[{run.name}] teacher {cfg.teacher.kind} {cfg.teacher.hidden} ({teacher.source}): "
            f"test {teacher.test_acc:.4f}, val {teacher.val_acc:.4f}",
            flush=True,
        )
    result = run_training(run, out=out, data=data, loss_fn=loss, progress=progress, controller=controller)
    teacher.save(result.run_dir / "teacher")
    student = result.summary["final_test_acc"]
    record: dict[str, Any] = {
        "teacher": {
            "host": teacher.meta["host"],
            "source": teacher.source,
            "cache_path": str(teacher.path) if teacher.path else None,
            "test_acc": teacher.test_acc,
            "val_acc": teacher.val_acc,
            "params": teacher.host.param_count()["host"],
        },
        "student": {
            "test_acc": student,
            "host_params": result.summary["host_params"],
            "seeds_params": result.summary["seeds_params"],
        },
        "retained": student / teacher.test_acc if teacher.test_acc > 0 else float("nan"),
        "config": cfg.model_dump(mode="json"),
    }
    if "test_loss" in teacher.meta["metrics"]:  # a text task: bits per byte, the figure that matters
        student_loss = result.trainer.evaluate(data.x_test, data.y_test)[0]
        record["teacher"]["test_bits_per_byte"] = teacher.meta["metrics"]["test_loss"] / math.log(2)
        record["student"]["test_bits_per_byte"] = student_loss / math.log(2)
        if progress:
            print(
                f"[{run.name}] test bits per byte: teacher {record['teacher']['test_bits_per_byte']:.4f}, "
                f"student {record['student']['test_bits_per_byte']:.4f}",
                flush=True,
            )
    (result.run_dir / "distill.json").write_text(json.dumps(record, indent=1))
    return result, loss
