"""The blueprint genome: declarative specs, the builder, contract checks, catalogues."""

from esper_ray.blueprints.builder import (
    BlueprintShapeError,
    SeedModule,
    TokenShape,
    build_seed,
    count_params,
    flops_per_example,
    slot_channels,
    slot_kind,
)
from esper_ray.blueprints.catalogue import BlueprintCatalogue, CatalogueEntry, LocalCatalogue
from esper_ray.blueprints.contract import ContractResult, check_contract
from esper_ray.blueprints.library import STANDARD_BLUEPRINTS, TRANSFORMER_BLUEPRINTS, named_blueprint
from esper_ray.blueprints.spec import BlueprintSpec, Node

__all__ = [
    "BlueprintCatalogue",
    "BlueprintShapeError",
    "BlueprintSpec",
    "CatalogueEntry",
    "ContractResult",
    "LocalCatalogue",
    "Node",
    "STANDARD_BLUEPRINTS",
    "SeedModule",
    "TRANSFORMER_BLUEPRINTS",
    "TokenShape",
    "build_seed",
    "check_contract",
    "count_params",
    "flops_per_example",
    "named_blueprint",
    "slot_channels",
    "slot_kind",
]
