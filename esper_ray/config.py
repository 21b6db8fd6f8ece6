"""Run configuration: one validated pydantic model per part, loaded from YAML.

``load_config(path, overrides)`` is the only way a run gets its settings; any
invalid value fails here with one line naming the key.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from esper_ray.contracts import EsperError
from esper_ray.hosts import HostConfig
from esper_ray.kasmina import LifecycleConfig
from esper_ray.tasks import TaskConfig
from esper_ray.util import error_line

# A run's name becomes a folder name: no separators, no "..", nothing a shell or a filesystem reads.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainingConfig(StrictModel):
    """Tolaria's loop."""

    epochs: int = Field(60, ge=1, description="host epochs in the run")
    batch_size: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the host")
    seed_lr: float = Field(1e-3, gt=0, description="Adam learning rate of each seed's param group")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of weights, data order and controllers")
    threads: int = Field(1, ge=1, description="torch intra-op threads")
    probe_size: int = Field(512, ge=8, description="validation examples used for slot telemetry")
    signal_every: int = Field(
        1,
        ge=1,
        description="probe telemetry (activation statistics, gradient signals; its cost: BENCHMARKS.md) is measured "
        "every N epochs, and at once whenever a seed changed stage or the governor rolled back since; reused "
        "in between; 1: fresh at every decision point",
    )
    eval_test: bool = Field(
        True, description="evaluate the test split every epoch (metrics, report); false: only in the run's last epoch"
    )
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N epochs (0: by time only)")
    checkpoint_every_s: float = Field(
        60.0,
        ge=0,
        description="also checkpoint when this many seconds passed since the last one, so a killed run "
        "loses at most about this much work (--resume continues it); 0: by epochs only",
    )
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


class ScheduledAction(StrictModel):
    """One step of an open-loop schedule (``fixed`` and ``replay`` controllers): at decision
    ``decision`` (0 = the run's first decision point) or as soon after as it is legal."""

    decision: int = Field(0, ge=0, description="decision index (0: the first decision point)")
    slot: str | int = Field(description='a slot name ("hidden0") or its position from the input (0: input)')
    blueprint: str | None = Field(None, description="germinate: the blueprint's name")
    action: Literal["germinate", "fossilize", "cull"] = "germinate"

    def model_post_init(self, context: Any) -> None:
        if self.action == "germinate" and not (self.blueprint or "").strip():
            raise ValueError("a germinate step needs a blueprint")
        if isinstance(self.slot, int) and self.slot < 0:
            raise ValueError(f"slot position must be >= 0 (0 is the input slot), got {self.slot}")


class BestFixedConfig(StrictModel):
    """``best-fixed``: the grid of open-loop schedules searched on the training tasks."""

    decisions: list[int] = Field(
        default_factory=lambda: [0, 5], description="first-decision indices a germination is tried at"
    )
    slots: list[int] | None = Field(None, description="slot positions tried (0: input; None: every slot)")
    blueprints: list[str] | None = Field(None, description="blueprints tried (None: every candidate)")
    pair_top: int = Field(3, ge=0, description="pairs of germinations among the best N single schedules (0: none)")
    seeds: int = Field(1, ge=1, description="training seeds per training task in the search")
    max_tasks: int | None = Field(None, ge=1, description="training tasks searched per context (None: all)")
    table: str | None = Field(None, description="train: a best_fixed.json table written by esper-ray evaluate")


class TrialConfig(StrictModel):
    """``trial``: the heuristic that picks growth by short what-if trials (see TrialHeuristic)."""

    steps: int = Field(200, ge=1, description="training batches of a confirming trial")
    screen_steps: int = Field(30, ge=1, description="training batches of a screening trial (every candidate)")
    keep: int = Field(2, ge=1, description="candidates per slot confirmed after the screen")
    lr_scale: float = Field(10.0, gt=0, description="the seed's learning rate in a trial, times the run's seed_lr")
    every: int = Field(4, ge=1, description="decisions between trial rounds while a slot is open and none is live")
    min_gain: float = Field(0.05, description="germinate when a seed removes more than this share of the val loss")
    cull_below: float = Field(
        -0.01,
        description="cull a holding seed whose ablation contribution is below this; a seed chosen by trial is kept "
        "unless it clearly hurts (one that has barely started to matter at the end of blending often pays off later)",
    )
    min_epochs_left: int = Field(5, ge=0, description="no new germination with fewer epochs than this left")
    max_rounds: int = Field(3, ge=1, description="trial rounds per run at most")
    top_slots: int | None = Field(None, ge=1, description="trial only the N open slots the signals rank highest")
    max_candidates: int | None = Field(None, ge=1, description="trial at most N candidates per slot (None: all)")


class ControllerConfig(StrictModel):
    """Which Tamiyo decides germinations."""

    kind: Literal["static", "random", "heuristic", "trial", "fixed", "best-fixed", "replay", "policy"] = "heuristic"
    path: str | None = Field(None, description="policy: an exported Tamiyo policy folder (None: the shipped Tamiyo)")
    sample: bool = Field(
        True, description="policy: draw actions from the policy's distribution (as trained); false: the likeliest"
    )
    decide_every: int = Field(1, ge=1, description="epochs between decision points")
    plateau_patience: int = Field(3, ge=1, description="heuristic: epochs without improvement")
    cull_below: float = Field(0.0, description="heuristic: cull a holding seed whose contribution is <= this")
    p_act: float = Field(0.2, ge=0, le=1, description="random: chance of a non-wait action")
    max_germinations: int | None = Field(
        None, ge=0, description="germinations allowed per run, whoever decides (None: no limit; a cull does not refund)"
    )
    schedule: list[ScheduledAction] = Field(
        default_factory=list, description="fixed / replay: the open-loop schedule (slots by name or position)"
    )
    best_fixed: BestFixedConfig = BestFixedConfig()
    trial: TrialConfig = TrialConfig()


class BlueprintsConfig(StrictModel):
    """Where blueprints come from and what a seed may cost."""

    source: Literal["local", "urza"] = "local"
    names: list[str] | None = Field(None, description="local: standard blueprint names (None: all)")
    max_seed_params: int = Field(20_000, ge=1, description="budget per seed")
    max_candidates: int = Field(8, ge=1, description="K: candidates shown to Tamiyo")
    karn_invented: int = Field(
        0, ge=0, le=64, description="local: also serve this many blueprints Karn's generator invents from them"
    )
    karn_seed: int = Field(0, ge=0, le=2**32 - 1, description="local: seed of those inventions")
    shuffle_seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="local: list the catalogue in a random order drawn with this seed"
    )
    reverse: bool = Field(False, description="local: list the catalogue in reverse (after any shuffle)")
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
    idle_after_s: float = Field(
        300.0,
        ge=0,
        description="Karn stops proposing (and the pipeline idles) when no trainer has asked Urza for "
        "blueprints for this long; the next request wakes it (0: never idles)",
    )
    urza_templates_in_memory: int = Field(
        32,
        ge=1,
        description="ready blueprints whose weight template (and compile artifacts) Urza keeps in the object "
        "store at once, least recently served out first; the others are read from disk when asked for",
    )
    compile: bool = Field(True, description="Tezzeret tries torch.compile (eager fallback recorded)")
    max_restarts: int = Field(3, ge=0)


class LineageConfig(StrictModel):
    enabled: bool = True
    key_path: str | None = Field(None, description="Ed25519 key (default ~/.config/esper-ray/...)")


class RunConfig(StrictModel):
    """Everything one `esper-ray train` run needs."""

    name: str = Field("run", description="names the run folder <out_dir>/<name>-<time>: a plain file name")
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

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _PLAIN_NAME.fullmatch(name) or name.endswith("."):
            raise ValueError(f"{name!r} is not a plain file name (letters, digits and ._+- only, no / or ..)")
        return name


# Seeds feed torch.Generator.manual_seed, numpy's legacy seeding (which takes 32 bits) and
# products such as ``seed * 1_000_003 + step``: a 32-bit range keeps every one of them valid.
SEED_RANGE = (0, 2**32 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def check_plain_name(name: str, where: str) -> str:
    """``name`` if it is a plain file name (letters, digits, ``._+-``, no separators, not ``..``)."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or name.endswith("."):
        raise EsperError(
            f"{where}: {name!r} is not a plain file name (letters, digits and ._+- only, no / or ..; it names a folder)"
        )
    return name


def check_numbers(data: Any, source: str, path: str = "") -> None:
    """Refuse what no setting means: non-finite floats, integers outside 64 bits, and seeds (any
    key named ``seed``) outside ``SEED_RANGE``; EsperError naming the key."""
    if isinstance(data, dict):
        for key, value in data.items():
            check_numbers(value, source, f"{path}.{key}" if path else str(key))
        return
    if isinstance(data, list | tuple):
        for i, value in enumerate(data):
            check_numbers(value, source, f"{path}.{i}")
        return
    where = f"{source}: {path or '(top level)'}"
    if isinstance(data, float) and not math.isfinite(data):
        raise EsperError(f"{where}: {data} is not a finite number")
    if isinstance(data, int) and not isinstance(data, bool):
        lo, hi = SEED_RANGE if path.rsplit(".", 1)[-1] == "seed" else _INT64
        if not lo <= data <= hi:
            what = "a seed" if (lo, hi) == SEED_RANGE else "an integer"
            raise EsperError(f"{where}: {data} is out of range for {what} ({lo}..{hi})")


def _parse_value(item: str, key: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        marked = err.problem if isinstance(err, yaml.MarkedYAMLError) else None
        problem = marked or error_line(err)
        raise EsperError(f"override {item!r}: {key} is not a valid YAML value ({problem})") from None


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """``["training.epochs=5", "host.hidden=[32,32]"]`` -> ``[(["training", "epochs"], 5), ...]``
    (values parsed as YAML); EsperError for an item that is not ``KEY=VALUE`` or whose value is
    not YAML."""
    parsed: list[tuple[list[str], Any]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise EsperError(f"override {item!r} is not KEY=VALUE (e.g. training.epochs=5)")
        keys = key.split(".")
        if not all(keys):
            raise EsperError(f"override {item!r}: {key!r} has an empty part")
        parsed.append((keys, _parse_value(item, key, raw)))
    return parsed


def apply_overrides(raw: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``raw`` (not modified) with each ``KEY=VALUE`` applied in order.

    The dotted path walks into sections; the value then *replaces* what the key held: a list or
    a mapping given on the command line is the whole new value, not merged into the file's.
    """
    out = copy.deepcopy(raw)
    for keys, value in parse_overrides(items):
        node = out
        for i, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise EsperError(f"override {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a section")
        node[keys[-1]] = value
    return out


ModelT = TypeVar("ModelT", bound=BaseModel)


def format_validation_error(err: ValidationError, source: str) -> str:
    """The first problem of a pydantic error as one line: ``source: key.path: message``."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {first['msg']}{extra}"


def validate_model(model: type[ModelT], data: dict[str, Any], source: str) -> ModelT:
    """``model.model_validate(data)`` with a one-line EsperError on failure (``check_numbers``
    first: non-finite numbers, integers past 64 bits and seeds past 32 bits are refused)."""
    if not isinstance(data, dict):
        raise EsperError(f"{source}: expected a mapping, got {type(data).__name__}")
    check_numbers(data, source)
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        raise EsperError(format_validation_error(err, source)) from None
    # Again on the validated values: pydantic reads the strings "inf" and "nan" as floats.
    check_numbers(cfg.model_dump(), source)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; EsperError naming the file when it cannot be had."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EsperError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise EsperError(f"{path} is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise EsperError(f"{path}: not a text file (not UTF-8); a config is YAML text") from None
    except OSError as err:
        raise EsperError(f"{path}: cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise EsperError(f"{path}: not valid YAML: {error_line(err)}") from None
    if raw is None:  # an empty file (or only comments): every setting at its default
        raw = {}
    if not isinstance(raw, dict):
        # 0, false, '' or [] too: only an empty file means "all defaults"
        raise EsperError(f"{path}: expected a mapping at the top level, got {type(raw).__name__} {raw!r:.40}")
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    model: type[BaseModel] = RunConfig,
) -> Any:
    """Read YAML (or defaults), apply ``KEY=VALUE`` overrides (``apply_overrides``), and validate.

    A config whose model has a ``name`` (it names the run's folder) must give a plain file name.
    """
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    source = str(path) if path else "config"
    cfg = validate_model(model, raw, source)
    # RunConfig, SimicConfig, SweepConfig ... name a folder; a model without the field has no name.
    name = cfg.model_dump(include={"name"}).get("name") if "name" in type(cfg).model_fields else None
    if isinstance(name, str):
        check_plain_name(name, f"{source}: name")
    return cfg


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what the run folder keeps)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
