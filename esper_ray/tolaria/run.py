"""One whole run: a run folder, the loop with a controller, lineage, and the outputs.

The folder a run leaves::

    config.yaml           the resolved config
    metrics.parquet       one row per epoch
    seed_events.parquet   every lifecycle transition, rollback and governor trip
    field_reports.parquet one row per seed that ended (fossilized or culled)
    lineage.parquet       the hash-chained ledger (+ lineage.sig.json, its signature)
    checkpoint/           exact-resume checkpoint (safetensors + JSON)
    report.png            accuracy with germinations marked, and parameters over time
    summary.json          final numbers
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper_ray.blueprints import BlueprintCatalogue
from esper_ray.config import RunConfig, dump_config
from esper_ray.contracts import AccuracySink, EsperError, EventKind, FieldReportSink, GerminationSink, SeedEvent
from esper_ray.lineage import LEDGER_FILE, SIGNATURE_FILE, Ledger, weights_digest
from esper_ray.reports import plot_report, write_table
from esper_ray.tamiyo.controllers import Controller, make_controller
from esper_ray.tasks import TaskData
from esper_ray.tolaria.checkpoint import load_checkpoint, save_checkpoint
from esper_ray.tolaria.trainer import LossFn, Trainer

EVENT_COLUMNS = [
    "epoch",
    "step",
    "val_acc",
    "kind",
    "slot",
    "old",
    "new",
    "blueprint",
    "blueprint_hash",
    "reason",
]


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    trainer: Trainer


# What a start writes before its first checkpoint. A folder holding only these (no checkpoint) is a
# start that failed or was killed: a retry into it replaces them instead of being refused.
_START_FILES = frozenset({"config.yaml", LEDGER_FILE, SIGNATURE_FILE})
_START_DIRS = frozenset({"checkpoint.tmp"})


def _is_abandoned_start(run_dir: Path) -> bool:
    for entry in run_dir.iterdir():
        name = entry.name
        if name in _START_FILES and entry.is_file():
            continue
        if name in _START_DIRS and entry.is_dir():
            continue
        if name.startswith(".") and name.endswith(".tmp") and entry.is_file():  # a write cut short
            continue
        return False
    return True


def _clear_start(run_dir: Path) -> None:
    """Remove what an unfinished start wrote (only the names ``_is_abandoned_start`` accepts)."""
    for entry in list(run_dir.iterdir()):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_run_dir(cfg: RunConfig, out: str | Path | None) -> Path:
    """``out`` if given, else ``<out_dir>/<name>-<time>``; EsperError if it is a file or already holds
    a run. A folder left by a start that never reached its first checkpoint is accepted (its files
    are replaced); one with a checkpoint is resumed with ``--resume``."""
    run_dir = Path(out) if out else Path(cfg.out_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and not run_dir.is_dir():
        raise EsperError(f"run folder {run_dir} is a file, not a folder; choose another --out")
    for parent in run_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise EsperError(f"run folder {run_dir}: {parent} is a file, not a folder; choose another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not _is_abandoned_start(run_dir):
        has_checkpoint = (run_dir / "checkpoint" / "state.json").exists() or (
            run_dir / "checkpoint.old" / "state.json"
        ).exists()
        hint = f"continue it with --resume {run_dir}" if has_checkpoint else "choose another --out"
        raise EsperError(f"run folder {run_dir} is not empty; {hint}")
    return run_dir


def new_run_dir(cfg: RunConfig, out: str | Path | None) -> Path:
    """Create the (empty or new) run folder ``check_run_dir`` names; an abandoned start's files
    in it are removed first."""
    run_dir = check_run_dir(cfg, out)
    if run_dir.is_dir():
        _clear_start(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EsperError(f"cannot create run folder {run_dir}: {err.strerror or err}") from None
    return run_dir


def _attach_ledger(trainer: Trainer, run_dir: Path, key_path: str | None) -> Ledger:
    ledger = Ledger(
        run_dir,
        trainer.run_id,
        host_id=f"{trainer.run_id}/host",
        key_path=Path(key_path) if key_path else None,
    )

    def on_event(row: SeedEvent) -> None:
        slot = trainer.host.slots[row["slot"]] if row["slot"] else None
        # The weights this change affected: the seed's, or the host's after a rollback or cull.
        affected = (
            slot.seed.state_dict() if slot is not None and slot.seed is not None else trainer.host.host_state_dict()
        )
        ledger.append(
            kind=row["kind"],
            slot=row["slot"],
            blueprint_hash=row.get("blueprint_hash", ""),
            blueprint_name=row.get("blueprint", ""),
            stage=row.get("new", ""),
            epoch=row["epoch"],
            step=row["step"],
            weights_digest=weights_digest(affected),
            metrics={"val_acc": float(row["val_acc"])},
        )

    trainer.event_hooks.append(on_event)
    return ledger


class _Progress:
    """A tqdm bar on a terminal; plain lines (no carriage returns) in logs such as `ray job logs`."""

    def __init__(self, total: int, initial: int, enabled: bool, label: str):
        self.tty = enabled and sys.stderr.isatty()
        self.enabled, self.total, self.label = enabled, total, label
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, unit="epoch", leave=True)

    def update(self, row: dict[str, Any]) -> None:
        text = f"val {row['val_acc']:.3f} params {row['total_params']:,} {row['action']}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.enabled and (row["epoch"] % 5 == 0 or row["epoch"] == self.total or row["action"] != "wait"):
            print(f"[{self.label}] epoch {row['epoch']}/{self.total} {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_training(
    cfg: RunConfig,
    *,
    out: str | Path | None = None,
    controller: Controller | None = None,
    catalogue: BlueprintCatalogue | None = None,
    data: TaskData | None = None,
    loss_fn: LossFn | None = None,
    resume: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> RunResult:
    """Train to ``cfg.training.epochs`` (or ``stop_after`` epochs, for tests), writing the run folder.

    ``resume`` is a run folder whose ``checkpoint/`` continues exactly where it stopped (on
    ``device`` instead of the run's own ``training.device`` when given).
    """
    if resume is not None:
        run_dir = Path(resume)
        trainer, controller_state = load_checkpoint(
            run_dir / "checkpoint", data, device=device, catalogue=catalogue, loss_fn=loss_fn
        )
        cfg = trainer.cfg
    else:
        check_run_dir(cfg, out)
        # Build everything that can fail on bad input before the run folder is touched.
        trainer = Trainer(cfg, data, catalogue=catalogue, run_id=f"{cfg.name}-{uuid.uuid4().hex[:8]}", loss_fn=loss_fn)
        run_dir = new_run_dir(cfg, out)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        controller_state = {}
    try:
        return _run(
            cfg, trainer, run_dir, controller_state, controller, catalogue, resume is not None, progress, stop_after
        )
    except BaseException:
        # A start that fails (or is interrupted) before its first checkpoint leaves no folder
        # behind, so the same --out works on the next try.
        if resume is None and run_dir.is_dir() and _is_abandoned_start(run_dir):
            _clear_start(run_dir)
            run_dir.rmdir()
        raise


def _run(
    cfg: RunConfig,
    trainer: Trainer,
    run_dir: Path,
    controller_state: dict,
    controller: Controller | None,
    catalogue: BlueprintCatalogue | None,
    resumed: bool,
    progress: bool,
    stop_after: int | None,
) -> RunResult:
    controller = controller or make_controller(cfg.controller, seed=cfg.training.seed, run=trainer)
    if controller_state:
        controller.load_state_dict(controller_state)
    ledger = _attach_ledger(trainer, run_dir, cfg.lineage.key_path) if cfg.lineage.enabled else None
    if ledger is not None and resumed:
        digest = weights_digest(trainer.host.state_dict())
        last = next((e for e in reversed(ledger.events) if e.kind == EventKind.CHECKPOINT), None)
        if last is None or (last.epoch, last.step, last.weights_digest) != (trainer.epoch, trainer.step, digest):
            # The run was killed after its checkpoint was written but before the ledger recorded
            # it: record it now (marked recovered), so that replay restarts from this checkpoint.
            ledger.append(
                kind="checkpoint",
                epoch=trainer.epoch,
                step=trainer.step,
                weights_digest=digest,
                metrics={"val_acc": float(trainer.last.get("val_acc", 0.0)), "recovered": 1.0},
            )
        # Events logged after the checkpoint we resume from are void: replay restarts here.
        ledger.append(kind="resume", epoch=trainer.epoch, step=trainer.step)
    elif ledger is not None:
        ledger.append(
            kind="init",
            weights_digest=weights_digest(trainer.host.state_dict()),
            metrics={"host_params": float(trainer.host.param_count()["host"])},
        )

    # A pipeline client (actors.client.UrzaCatalogue) also takes metrics and field reports.
    accuracy_sink = catalogue if isinstance(catalogue, AccuracySink) else None
    if isinstance(catalogue, GerminationSink):
        germinations: GerminationSink = catalogue
        trainer.event_hooks.append(
            lambda row: germinations.record_germination() if row["kind"] == EventKind.GERMINATE else None
        )
    bar = _Progress(cfg.training.epochs, trainer.epoch, progress, cfg.name)
    stop = cfg.training.epochs if stop_after is None else min(cfg.training.epochs, trainer.epoch + stop_after)
    every, every_s = cfg.training.checkpoint_every, cfg.training.checkpoint_every_s
    last_saved = time.monotonic()
    try:
        while trainer.epoch < stop:
            trainer.train_epoch()
            action = trainer.apply_decision(controller)
            row = trainer.end_epoch(action)
            bar.update(row)
            if accuracy_sink is not None:
                accuracy_sink.record_accuracy(row["val_acc"])
            if ledger is not None:
                ledger.flush()
            due = (every and trainer.epoch % every == 0) or (every_s and time.monotonic() - last_saved >= every_s)
            if due and trainer.epoch < stop:
                _checkpoint(trainer, controller, run_dir, ledger)
                last_saved = time.monotonic()
    finally:
        bar.close()
    _checkpoint(trainer, controller, run_dir, ledger)
    summary = _write_outputs(trainer, run_dir)
    if isinstance(catalogue, FieldReportSink) and trainer.field_reports:
        catalogue.send_field_reports(trainer.field_reports)  # fire-and-forget: they accumulate in Urza for Karn
    return RunResult(run_dir, summary, trainer)


def _checkpoint(trainer: Trainer, controller: Controller, run_dir: Path, ledger: Ledger | None) -> None:
    save_checkpoint(trainer, run_dir / "checkpoint", controller.state_dict())
    if ledger is not None:
        ledger.append(
            kind="checkpoint",
            epoch=trainer.epoch,
            step=trainer.step,
            weights_digest=weights_digest(trainer.host.state_dict()),
            metrics={"val_acc": float(trainer.last.get("val_acc", 0.0))},
        )
        ledger.flush()


def _write_outputs(trainer: Trainer, run_dir: Path) -> dict[str, Any]:
    write_table(trainer.history, run_dir / "metrics.parquet")
    write_table(trainer.events, run_dir / "seed_events.parquet", EVENT_COLUMNS)
    write_table(trainer.field_reports, run_dir / "field_reports.parquet", ["run_id", "blueprint_hash", "outcome"])
    plot_report(
        trainer.history,
        trainer.events,
        run_dir / "report.png",
        title=f"{trainer.cfg.name}: {trainer.data.name}, {trainer.cfg.host.kind} host",
    )
    summary = trainer.summary()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary
