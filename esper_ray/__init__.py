"""esper-ray: morphogenetic training on Ray.

While a host network trains, a controller (Tamiyo) grafts small seeds, built from
blueprints, into the host's slots. The library API, for use without Ray::

    import torch
    import esper_ray as er

    host = er.build_host(er.HostConfig(kind="mlp", hidden=[64, 64]), input_shape=(40,), num_classes=10)
    slot = host.germinate("input", "conv1d")         # DORMANT -> GERMINATED
    slot.transition(er.SeedStage.TRAINING)            # isolated: host outputs unchanged
    slot.transition(er.SeedStage.BLENDING)            # alpha ramps up with slot.on_step()
    ...
    host.slot("input").cull()                         # or .fossilize() from HOLDING
"""

from esper_ray.blueprints import (
    STANDARD_BLUEPRINTS,
    BlueprintSpec,
    LocalCatalogue,
    Node,
    SeedModule,
    build_seed,
    check_contract,
)
from esper_ray.config import RunConfig, load_config
from esper_ray.contracts import (
    ActionKind,
    ControllerAction,
    EsperError,
    IllegalTransition,
    Observation,
    SeedStage,
)
from esper_ray.hosts import HostConfig, MorphoHost, build_host
from esper_ray.kasmina import AlphaSchedule, GateClosed, LifecycleConfig, SeedSlot
from esper_ray.tamiyo.controllers import (
    Controller,
    HeuristicController,
    RandomController,
    StaticController,
)

__version__ = "0.1.0"

__all__ = [
    "STANDARD_BLUEPRINTS",
    "ActionKind",
    "AlphaSchedule",
    "BlueprintSpec",
    "Controller",
    "ControllerAction",
    "EsperError",
    "GateClosed",
    "HeuristicController",
    "HostConfig",
    "IllegalTransition",
    "LifecycleConfig",
    "LocalCatalogue",
    "MorphoHost",
    "Node",
    "Observation",
    "RandomController",
    "RunConfig",
    "SeedModule",
    "SeedSlot",
    "SeedStage",
    "StaticController",
    "build_host",
    "build_seed",
    "check_contract",
    "load_config",
]
