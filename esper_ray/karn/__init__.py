"""Karn: the blueprint generator and its learned reward model (plain library code, no Ray).

- :mod:`~esper_ray.karn.genome`: a spec as an editable list of genes, channel inference.
- :mod:`~esper_ray.karn.generator`: mutation, crossover and random specs, each checked
  to build within the parameter budget on reference slot shapes.
- :mod:`~esper_ray.karn.features` and :mod:`~esper_ray.karn.reward`: features of a spec
  in a slot and a Bayesian ridge model of improvement per parameter learned from
  field reports, which picks the candidates worth compiling.
- :mod:`~esper_ray.karn.breeder`: the state and one round of the Karn actor.
"""

from esper_ray.karn.breeder import KarnBreeder, as_field_report
from esper_ray.karn.features import (
    CONTEXT_FEATURES,
    DEFAULT_CONTEXTS,
    SPEC_FEATURES,
    SlotContext,
    fits_slot,
    spec_features,
)
from esper_ray.karn.generator import (
    DEFAULT_BUDGET,
    KINDS,
    REFERENCE_SHAPES,
    BlueprintGenerator,
    GeneratorStats,
    Proposal,
)
from esper_ray.karn.reward import FitSummary, RewardModel, reward_target

__all__ = [
    "BlueprintGenerator",
    "CONTEXT_FEATURES",
    "DEFAULT_BUDGET",
    "DEFAULT_CONTEXTS",
    "FitSummary",
    "GeneratorStats",
    "KINDS",
    "KarnBreeder",
    "Proposal",
    "REFERENCE_SHAPES",
    "RewardModel",
    "SPEC_FEATURES",
    "SlotContext",
    "as_field_report",
    "fits_slot",
    "reward_target",
    "spec_features",
]
