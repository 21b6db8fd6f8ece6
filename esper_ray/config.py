"""Run configuration: one validated pydantic model per part, loaded from YAML.

``load_config(path, overrides)`` is the only way a run gets its settings; any
invalid value fails here with one line naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from esper_ray.contracts import EsperError
from esper_ray.hosts import HostConfig
from esper_ray.kasmina import LifecycleConfig
from esper_ray.tasks import TaskConfig


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainingConfig(StrictModel):
    """Tolaria's loop."""

    epochs: int = Field(60, ge=1, description="host epochs in the run")
    batch_size: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the host")
    seed_lr: float = Field(1e-3, gt=0, description="Adam learning rate of each seed's param group")
    seed: int = Field(0, description="seed of weights, data order and controllers")
    threads: int = Field(1, ge=1, description="torch intra-op threads")
    probe_size: int = Field(512, ge=8, description="validation examples used for slot telemetry")
    signal_every: int = Field(
        1,
        ge=1,
        description="probe telemetry (activation statistics, gradient signals: ~5 ms for 3 slots) is measured "
        "every N epochs, and at once whenever a seed changed stage or the governor rolled back since; reused "
        "in between; 1: fresh at every decision point",
    )
    eval_test: bool = Field(
        True, description="evaluate the test split every epoch (metrics, report); false: only in the run's last epoch"
    )
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N epochs (0: only at the end)")
    device: str = Field("cpu", description='"cpu", "cuda", "cuda:N", or "auto" (cuda when available)')
    host_init: Literal["random", "task"] = Field(
        "random", description="task: start the host from the weights the task provides (TaskData.host_init)"
    )
    freeze_host: bool = Field(False, description="host weights stay fixed (its param group has lr 0); only seeds learn")


class GovernorConfig(StrictModel):
    """Detects NaN/inf or an exploding loss, rolls back, and culls the seed responsible."""

    enabled: bool = True
    explosion_factor: float = Field(20.0, gt=1, description="loss > factor * running mean is an explosion")
    warmup_steps: int = Field(50, ge=0, description="steps before explosions are judged")


class ControllerConfig(StrictModel):
    """Which Tamiyo decides germinations."""

    kind: Literal["static", "random", "heuristic", "policy"] = "heuristic"
    path: str | None = Field(None, description="policy: an exported Tamiyo policy folder")
    decide_every: int = Field(1, ge=1, description="epochs between decision points")
    plateau_patience: int = Field(3, ge=1, description="heuristic: epochs without improvement")
    cull_below: float = Field(0.0, description="heuristic: cull a holding seed whose contribution is <= this")
    p_act: float = Field(0.2, ge=0, le=1, description="random: chance of a non-wait action")
    max_germinations: int | None = Field(
        None, ge=0, description="germinations allowed per run, whoever decides (None: no limit; a cull does not refund)"
    )


class BlueprintsConfig(StrictModel):
    """Where blueprints come from and what a seed may cost."""

    source: Literal["local", "urza"] = "local"
    names: list[str] | None = Field(None, description="local: standard blueprint names (None: all)")
    max_seed_params: int = Field(20_000, ge=1, description="budget per seed")
    max_candidates: int = Field(8, ge=1, description="K: candidates shown to Tamiyo")
    startup_ready: int = Field(
        0, ge=0, description="urza: before training starts, wait until this many blueprints are ready"
    )
    startup_timeout_s: float = Field(300.0, gt=0, description="urza: how long that startup wait may take")


class ActorResources(StrictModel):
    """Ray resources of one actor; fractional CPUs let everything fit on 2 cores."""

    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class ActorsConfig(StrictModel):
    """The blueprint pipeline on Ray (used when ``blueprints.source`` is ``urza``)."""

    namespace: str = Field("esper-ray", description="Ray namespace where the named actors live")
    storage: str = Field("~/.cache/esper-ray/urza", description="where Urza persists its library")
    urza: ActorResources = ActorResources()
    karn: ActorResources = ActorResources()
    tezzeret: ActorResources = ActorResources()
    urabrask: ActorResources = ActorResources()
    karn_interval_s: float = Field(2.0, gt=0, description="seconds between Karn's proposal rounds")
    karn_batch: int = Field(4, ge=1, description="specs Karn sends on per round")
    compile: bool = Field(True, description="Tezzeret tries torch.compile (eager fallback recorded)")
    max_restarts: int = Field(3, ge=0)


class LineageConfig(StrictModel):
    enabled: bool = True
    key_path: str | None = Field(None, description="Ed25519 key (default ~/.config/esper-ray/...)")


class RunConfig(StrictModel):
    """Everything one `esper-ray train` run needs."""

    name: str = "run"
    task: TaskConfig = TaskConfig()
    host: HostConfig = HostConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    training: TrainingConfig = TrainingConfig()
    governor: GovernorConfig = GovernorConfig()
    controller: ControllerConfig = ControllerConfig()
    blueprints: BlueprintsConfig = BlueprintsConfig()
    lineage: LineageConfig = LineageConfig()
    actors: ActorsConfig = ActorsConfig()
    out_dir: str = "runs"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise EsperError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["training.epochs=5", "host.hidden=[32,32]"]`` -> a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise EsperError(f"override {item!r} is not KEY=VALUE (e.g. training.epochs=5)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """The first problem of a pydantic error as one line: ``source: key.path: message``."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {first['msg']}{extra}"


def validate_model(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """``model.model_validate(data)`` with a one-line EsperError on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise EsperError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; EsperError naming the file when it cannot be had."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise EsperError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise EsperError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise EsperError(f"{path}: expected a mapping at the top level")
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    model: type[BaseModel] = RunConfig,
) -> Any:
    """Read YAML (or defaults), apply ``KEY=VALUE`` overrides, and validate."""
    raw = read_yaml(path) if path is not None else {}
    raw = _merge(raw, parse_overrides(overrides or []))
    return validate_model(model, raw, str(path) if path else "config")


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what the run folder keeps)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
