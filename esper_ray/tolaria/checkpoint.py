"""Checkpoint and exact resume, with no pickles: tensors in safetensors, the rest in JSON.

A checkpoint folder holds:

- ``model.safetensors``: the whole model (host and seeds);
- ``optimizer.safetensors``: Adam's per-parameter state;
- ``trainer.safetensors``: RNG states and the hosts snapshots kept for rollback;
- ``state.json``: config, counters, metrics so far, each slot's lifecycle and the
  spec of its seed (so seeds are rebuilt from declarative specs), param group order.

Resuming rebuilds the host from the config, regrows the seeds from their specs,
loads every tensor back and continues with the same data order and the same
optimizer state, so the resumed run's metrics equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from esper_ray.blueprints import BlueprintSpec, build_seed
from esper_ray.config import RunConfig, validate_model
from esper_ray.contracts import EsperError
from esper_ray.tasks import TaskData
from esper_ray.tolaria import optim
from esper_ray.tolaria.trainer import Trainer
from esper_ray.util import error_line

FORMAT = "esper-ray-checkpoint/1"
_REQUIRED = (
    "run_id",
    "config",
    "epoch",
    "step",
    "best_val",
    "plateau",
    "last",
    "history",
    "events",
    "field_reports",
    "births",
    "host_grad",
    "governor",
    "param_groups",
    "blend_slots",
    "slots",
    "controller",
)


# The JSON type each state.json field must have: a checkpoint edited by hand (or cut short)
# fails here in one line instead of deep inside the trainer.
_TYPES: dict[str, type | tuple[type, ...]] = {
    "run_id": str,
    "config": dict,
    "epoch": int,
    "step": int,
    "best_val": (int, float),
    "plateau": int,
    "last": dict,
    "history": list,
    "events": list,
    "field_reports": list,
    "births": dict,
    "host_grad": dict,
    "governor": dict,
    "param_groups": list,
    "blend_slots": list,
    "slots": dict,
    "controller": dict,
    "probe_signals": dict,
    "probe_epoch": int,
    "probe_events": int,
}
_ROWS = ("history", "events", "field_reports", "param_groups")  # lists of JSON objects


def _has_type(value: Any, want: type | tuple[type, ...]) -> bool:
    """Whether a JSON value is of ``want`` (a bool is no number here, though Python says so)."""
    return not isinstance(value, bool) and isinstance(value, want)


def _check_types(state: dict[str, Any], path: Path) -> None:
    for key, want in _TYPES.items():
        if key not in state:
            continue
        value = state[key]
        if not _has_type(value, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise EsperError(
                f"checkpoint at {path} is damaged: state.json {key} is {type(value).__name__}, expected {names}"
            )
        if key in ("epoch", "step") and value < 0:
            raise EsperError(f"checkpoint at {path} is damaged: state.json {key} is negative ({value})")
        if key in _ROWS and not all(isinstance(row, dict) for row in value):
            raise EsperError(f"checkpoint at {path} is damaged: state.json {key} holds a non-object row")
        if key == "slots" and not all(isinstance(s, dict) for s in value.values()):
            raise EsperError(f"checkpoint at {path} is damaged: state.json slots holds a non-object slot")


def _tensors(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in d.items()}


def save_checkpoint(trainer: Trainer, path: str | Path, controller_state: dict | None = None) -> Path:
    """Write ``trainer``'s full state to the folder ``path`` atomically (replacing it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    save_file(_tensors(trainer.host.state_dict()), tmp / "model.safetensors")
    opt_sd = trainer.opt.state_dict()
    save_file(
        _tensors({f"{i}.{k}": v for i, s in opt_sd["state"].items() for k, v in s.items()}),
        tmp / "optimizer.safetensors",
    )
    own = trainer.state_dict()
    blend: dict[str, optim.HostSnapshot] = own.pop("blend_snapshots")
    extra = {"rng.data": trainer.gen.get_state(), "rng.torch": torch.get_rng_state()}
    for slot, snap in blend.items():
        extra.update({f"blend.{slot}.w.{k}": v for k, v in snap.weights.items()})
        for i, st in enumerate(snap.opt_state):
            extra.update({f"blend.{slot}.o.{i}.{k}": v for k, v in st.items()})
    save_file(_tensors(extra), tmp / "trainer.safetensors")

    state = {
        "format": FORMAT,
        "run_id": trainer.run_id,
        "config": trainer.cfg.model_dump(mode="json"),
        **own,
        "param_groups": opt_sd["param_groups"],
        "blend_slots": sorted(blend),
        "slots": {name: s.lifecycle_state() for name, s in trainer.host.slots.items()},
        "controller": controller_state or {},
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))

    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _read(
    path: Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    old = path.with_name(path.name + ".old")
    if not (path / "state.json").exists() and (old / "state.json").exists():
        # Killed while save_checkpoint swapped folders: the previous checkpoint is whole in ``.old``.
        path = old
    if not (path / "state.json").is_file():
        raise EsperError(f"no checkpoint at {path} (state.json missing)")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        model = load_file(path / "model.safetensors")
        opt = load_file(path / "optimizer.safetensors")
        extra = load_file(path / "trainer.safetensors")
    except (OSError, ValueError, SafetensorError) as err:
        raise EsperError(f"checkpoint at {path} is unreadable: {error_line(err)}") from None
    if not isinstance(state, dict):
        raise EsperError(
            f"checkpoint at {path} is unreadable: state.json holds a {type(state).__name__}, not an object"
        )
    if state.get("format") != FORMAT:
        raise EsperError(f"checkpoint at {path} has format {state.get('format')!r}, expected {FORMAT!r}")
    return state, model, opt, extra


def read_config(path: str | Path) -> RunConfig:
    """The RunConfig a checkpoint was made with (EsperError if there is no valid checkpoint)."""
    state, *_ = _read(Path(path))
    return validate_model(RunConfig, state.get("config", {}), f"{path}/state.json config")


def load_checkpoint(
    path: str | Path, data: TaskData | None = None, *, device: str | None = None, **trainer_kwargs: Any
) -> tuple[Trainer, dict]:
    """Rebuild a Trainer exactly as it was saved; returns it with the controller's state.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) resumes on another device than the run's
    ``training.device``, e.g. a GPU run on a machine without one: the same state, continued up to
    float rounding (bit-exact only on the device it was saved on).
    """
    path = Path(path)
    state, model, opt_tensors, extra = _read(path)
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise EsperError(f"checkpoint at {path} is incomplete: state.json lacks {', '.join(missing)}")
    _check_types(state, path)
    cfg = validate_model(RunConfig, state["config"], f"{path}/state.json config")
    if device is not None:
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"device": device})})
    trainer = Trainer(cfg, data, run_id=state["run_id"], **trainer_kwargs)
    try:
        _restore(trainer, state, model, opt_tensors, extra)
    except (EsperError, KeyError, RuntimeError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise EsperError(f"checkpoint at {path} does not match its config: {error_line(err)}") from None
    return trainer, state["controller"]


def _restore(trainer: Trainer, state: dict, model: dict, opt_tensors: dict, extra: dict) -> None:
    host = trainer.host
    seeds = {}
    for name, slot_state in state["slots"].items():
        slot = host.slot(name)
        seed = None
        if slot_state["spec"] is not None:
            seed = build_seed(BlueprintSpec.from_json(slot_state["spec"]), slot.shape).to(trainer.device)
            seeds[name] = seed
        slot.load_lifecycle_state(slot_state, seed)
    host.refresh()
    for group in state["param_groups"][1:]:  # seed groups, in their original order
        slot_name = group["name"].removeprefix("seed:")
        optim.add_seed_group(trainer.opt, slot_name, seeds[slot_name], group["lr"])
    host.load_state_dict(model, strict=True)

    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in opt_tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    trainer.opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})

    trainer.gen.set_state(extra["rng.data"])
    torch.set_rng_state(extra["rng.torch"])
    blend: dict[str, optim.HostSnapshot] = {}
    for slot in state["blend_slots"]:
        # On the trainer's device, as take_host_snapshot keeps them (safetensors loads to the CPU);
        # Adam's scalar ``step`` stays on the CPU, as Adam keeps it.
        device = trainer.device
        weights = {k.split(".", 3)[3]: v.to(device) for k, v in extra.items() if k.startswith(f"blend.{slot}.w.")}
        n_host = len(trainer.opt.param_groups[0]["params"])
        opt_st: list[dict[str, torch.Tensor]] = [{} for _ in range(n_host)]
        for k, v in extra.items():
            if k.startswith(f"blend.{slot}.o."):
                _, _, _, i, name = k.split(".", 4)
                opt_st[int(i)][name] = v.to(device) if v.dim() > 0 else v
        blend[slot] = optim.HostSnapshot(weights, opt_st)
    trainer.load_state_dict({**state, "blend_snapshots": blend})
