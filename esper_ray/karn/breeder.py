"""Karn's state and one proposal round, without Ray (the actor in ``actors/karn.py`` wraps it).

A round: take the library's best specs as parents, generate a pool of candidates
(mutations and crossovers of the parents, some random), rank them with the reward
model, and return the few to send to Tezzeret. Between rounds the breeder learns
from field reports: each names a blueprint by content hash, so the breeder keeps a
spec table (hash -> spec) of everything it has sent or seen in the library.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from esper_ray.blueprints.contract import check_contract
from esper_ray.blueprints.library import STANDARD_BLUEPRINTS
from esper_ray.blueprints.spec import BlueprintSpec
from esper_ray.contracts import FieldReport
from esper_ray.karn.generator import DEFAULT_BUDGET, REFERENCE_SHAPES, BlueprintGenerator
from esper_ray.karn.reward import FitSummary, RewardModel

_REPORT_FIELDS = tuple(f.name for f in dataclasses.fields(FieldReport))


def as_field_report(row: FieldReport | Mapping[str, Any]) -> FieldReport:
    """A FieldReport from itself or from a dict of its fields (extra keys are ignored)."""
    if isinstance(row, FieldReport):
        return row
    return FieldReport(**{k: row[k] for k in _REPORT_FIELDS if k in row})


def _report_key(report: FieldReport) -> str:
    # Urza returns its whole report list on every call; this key drops the repeats.
    return json.dumps(dataclasses.asdict(report), sort_keys=True, default=str)


class KarnBreeder:
    """Generator + reward model + spec table + report store: everything a Karn round needs.

    Args:
        seed: seeds both the generator and the model's exploration draws.
        budget: parameter budget of every proposal on its reference shapes.
        pool_factor: candidates generated per spec sent on.
        p_random, p_crossover: shares of random specs and crossovers in a pool.
        model: a reward model to use instead of the default one.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        budget: int = DEFAULT_BUDGET,
        pool_factor: int = 8,
        p_random: float = 0.2,
        p_crossover: float = 0.2,
        model: RewardModel | None = None,
    ):
        gen_rng, model_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
        self.generator = BlueprintGenerator(gen_rng, budget=budget)
        self.model = model or RewardModel(seed=model_rng)
        self.pool_factor = pool_factor
        self.p_random = p_random
        self.p_crossover = p_crossover
        # The standard library is known from the start: reports about it can be learned from.
        self.specs: dict[str, BlueprintSpec] = {s.content_hash: s for s in STANDARD_BLUEPRINTS.values()}
        self.parents: list[BlueprintSpec] = list(STANDARD_BLUEPRINTS.values())
        self.reports: list[FieldReport] = []
        self.sent: set[str] = set()
        self.bad_specs = 0  # library specs that did not parse
        self.bad_reports = 0  # report rows that did not make a FieldReport
        self.contract_failures = 0  # chosen candidates that failed check_contract, not sent
        self._report_keys: set[str] = set()
        self._fitted_usable = -1  # usable reports at the last fit

    # ---- what comes in ------------------------------------------------------------------------

    def add_specs(self, spec_jsons: Iterable[str]) -> list[BlueprintSpec]:
        """Parse library specs into the spec table; unparseable ones are counted and skipped."""
        parsed = []
        for text in spec_jsons:
            try:
                spec = BlueprintSpec.from_json(text)
            except ValueError:  # pydantic's ValidationError is a ValueError
                self.bad_specs += 1
                continue
            self.specs.setdefault(spec.content_hash, spec)
            parsed.append(spec)
        return parsed

    def set_parents(self, specs: Sequence[BlueprintSpec]) -> None:
        """Breed from these from now on (an empty list keeps the previous parents)."""
        if specs:
            self.parents = list(specs)

    def ingest(self, rows: Iterable[FieldReport | Mapping[str, Any]]) -> int:
        """Store new field reports (repeats are dropped); returns how many were new."""
        new = 0
        for row in rows:
            try:
                report = as_field_report(row)
            except TypeError:  # a dict missing required fields
                self.bad_reports += 1
                continue
            key = _report_key(report)
            if key in self._report_keys:
                continue
            self._report_keys.add(key)
            self.reports.append(report)
            new += 1
        return new

    # ---- learning and proposing ---------------------------------------------------------------

    def usable_reports(self) -> int:
        """Reports whose blueprint is in the spec table (the others cannot be featurised yet)."""
        return sum(1 for r in self.reports if r.blueprint_hash in self.specs)

    def retrain_if_needed(self) -> FitSummary | None:
        """Refit when the usable reports changed since the last fit; the summary, or None."""
        usable = self.usable_reports()
        if usable == self._fitted_usable:
            return None
        self._fitted_usable = usable
        return self.model.fit(self.reports, self.specs)

    def round(self, batch: int) -> list[BlueprintSpec]:
        """Generate a pool, choose ``batch`` specs to send on, and remember them as sent.

        The chosen are contract-checked on their reference shapes first (a few ms each),
        so Tezzeret's time goes to specs that will pass; one that fails (e.g. every ReLU
        dead on the probe batch) is replaced by the next in the model's ranking.
        """
        pool = self.generator.propose(
            self.parents,
            self.pool_factor * batch,
            p_random=self.p_random,
            p_crossover=self.p_crossover,
            exclude=self.sent,
        )
        chosen: list[BlueprintSpec] = []
        for spec in self.model.choose([p.spec for p in pool], len(pool)):
            if len(chosen) == batch:
                break
            if not all(check_contract(spec, shape).ok for shape in REFERENCE_SHAPES[spec.kind]):
                self.contract_failures += 1
                continue
            chosen.append(spec)
            self.sent.add(spec.content_hash)
            self.specs[spec.content_hash] = spec
        return chosen
