"""The one small interface through which a trainer gets blueprints.

A catalogue lists the blueprints that are ready to deploy right now. The trainer
polls it at decision points and never waits: ``poll`` must return at once. The
in-process ``LocalCatalogue`` serves the hand-written library; the Urza actor's
client (``actors/``) serves what came through Karn, Tezzeret and Urabrask.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from esper_ray.blueprints.library import STANDARD_BLUEPRINTS, named_blueprint
from esper_ray.blueprints.spec import BlueprintSpec
from esper_ray.contracts import BenchmarkReport, EsperError


@dataclass(frozen=True)
class CatalogueEntry:
    """A deployable blueprint with what is known about it."""

    spec: BlueprintSpec
    report: BenchmarkReport | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def content_hash(self) -> str:
        return self.spec.content_hash


@runtime_checkable
class BlueprintCatalogue(Protocol):
    """What a trainer needs from a blueprint library."""

    def poll(self) -> list[CatalogueEntry]:
        """The blueprints ready now, without blocking."""
        ...

    def resolve(self, name_or_hash: str) -> CatalogueEntry:
        """The ready entry with this name or content hash; EsperError if there is none."""
        ...


def resolve_in(entries: Iterable[CatalogueEntry], name_or_hash: str) -> CatalogueEntry:
    """Find an entry by name or (full or 12-char) content hash."""
    entries = list(entries)
    for entry in entries:
        h = entry.content_hash
        if name_or_hash in (entry.name, h) or (len(name_or_hash) >= 12 and h.startswith(name_or_hash)):
            return entry
    known = ", ".join(sorted(e.name for e in entries)) or "none"
    raise EsperError(f"unknown blueprint {name_or_hash!r} (ready: {known})")


class LocalCatalogue:
    """An in-process catalogue over a fixed set of specs (the standard library by default)."""

    def __init__(self, specs: Iterable[BlueprintSpec] | None = None):
        specs = list(STANDARD_BLUEPRINTS.values() if specs is None else specs)
        self._entries = [CatalogueEntry(spec) for spec in specs]

    @classmethod
    def from_names(cls, names: Iterable[str]) -> LocalCatalogue:
        """The standard (or transformer) blueprints with these names; EsperError naming an unknown one."""
        return cls([named_blueprint(name) for name in names])

    def poll(self) -> list[CatalogueEntry]:
        return list(self._entries)

    def resolve(self, name_or_hash: str) -> CatalogueEntry:
        return resolve_in(self._entries, name_or_hash)
