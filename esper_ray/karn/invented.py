"""A local catalogue with blueprints Karn invented: what a controller meets after training.

``local_catalogue(cfg)`` serves the standard blueprints ``cfg.names`` (all when None; a name
``<blueprint>.gated`` is that blueprint with a gated blend, see ``esper_ray.kasmina.gate``) plus
``cfg.karn_invented`` specs that Karn's generator derives from them (mutations, crossovers,
random constructions; reproducible from ``cfg.karn_seed``), optionally in a shuffled order
(``cfg.shuffle_seed``) and then reversed (``cfg.reverse``). Evaluation uses it to show a
learned policy blueprints it never saw, in an order it never saw.
"""

from __future__ import annotations

import numpy as np

from esper_ray.blueprints import LocalCatalogue, named_blueprint
from esper_ray.blueprints.library import STANDARD_BLUEPRINTS
from esper_ray.blueprints.spec import BlueprintSpec
from esper_ray.contracts import EsperError
from esper_ray.karn.generator import BlueprintGenerator
from esper_ray.kasmina.gate import gated_blueprint


def invented_specs(parents: list[BlueprintSpec], n: int, seed: int) -> list[BlueprintSpec]:
    """``n`` distinct specs Karn's generator proposes from ``parents`` (EsperError if it cannot)."""
    if n == 0:
        return []
    proposals = BlueprintGenerator(seed).propose(parents, n)
    if len(proposals) < n:
        raise EsperError(f"Karn's generator made only {len(proposals)} of {n} new blueprints (karn_seed={seed})")
    return [p.spec for p in proposals]


def _named(name: str) -> BlueprintSpec:
    """A library blueprint by name; ``<name>.gated`` is its gated variant (``kasmina.gate``)."""
    if name.endswith(".gated"):
        return gated_blueprint(named_blueprint(name.removesuffix(".gated")))
    return named_blueprint(name)


def local_catalogue(cfg) -> LocalCatalogue:
    """The in-process catalogue a ``BlueprintsConfig`` describes (see the module docstring)."""
    names = cfg.names or list(STANDARD_BLUEPRINTS)
    specs = [_named(name) for name in names]
    specs += invented_specs(specs, cfg.karn_invented, cfg.karn_seed)
    if cfg.shuffle_seed is not None:
        order = np.random.default_rng(cfg.shuffle_seed).permutation(len(specs))
        specs = [specs[i] for i in order]
    return LocalCatalogue(specs[::-1] if cfg.reverse else specs)
