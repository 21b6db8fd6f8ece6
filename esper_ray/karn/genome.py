"""A blueprint spec as an editable genome: genes that point at earlier genes by index.

``BlueprintSpec`` names its nodes; editing a DAG by names means renaming and
collision handling at every step. Karn instead edits a list of :class:`Gene` whose
inputs are indices of earlier genes (``INPUT`` for the slot's activation), so
"insert before gene 3" or "splice B's tail onto A's head" is index arithmetic, and
the list order is the topological order by construction. Converting back names the
nodes ``n0, n1, ...`` with every argument explicit: the *canonical form*, so two
structurally equal specs have the same content hash whatever their original names.

This module also infers channel counts per gene for a slot view, mirroring the
builder's rules, so the generator can pick widths and groups that fit before it pays
for a real build.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from esper_ray.blueprints.spec import OP_ARGS, BlueprintSpec, Node

INPUT = -1  # a gene input that reads the slot's activation


@dataclass(frozen=True)
class Gene:
    """One op of a genome; ``inputs`` are indices of earlier genes or ``INPUT``."""

    op: str
    inputs: tuple[int, ...]
    args: tuple[tuple[str, Any], ...] = ()  # every argument of the op, sorted by name

    @classmethod
    def make(cls, op: str, inputs: Iterable[int], **args: Any) -> Gene:
        """A gene with the op's defaults filled in, so equal genes compare equal."""
        full = {**OP_ARGS[op], **args}
        return cls(op, tuple(inputs), tuple(sorted(full.items())))

    def arg(self, name: str) -> Any:
        return dict(self.args)[name]

    def with_args(self, **args: Any) -> Gene:
        return Gene.make(self.op, self.inputs, **{**dict(self.args), **args})

    def with_inputs(self, inputs: Iterable[int]) -> Gene:
        return Gene(self.op, tuple(inputs), self.args)


Genome = list[Gene]


@dataclass(frozen=True)
class View:
    """How a spec of some kind sees one reference slot: channels and spatial rank."""

    channels: int
    spatial_rank: int


def view_of(kind: str, shape: Sequence[int]) -> View:
    """The builder's view of a ``kind`` spec on a slot of ``shape`` (no batch dim)."""
    if kind == "seq" and len(shape) == 1:
        return View(1, 1)  # a seq blueprint sees a vector slot of width D as (1, D)
    return View(shape[0], len(shape) - 1)


# ---- spec <-> genome ------------------------------------------------------------------------


def from_spec(spec: BlueprintSpec) -> Genome:
    """The genome of a (valid) spec; node names are dropped, order is kept."""
    index = {"input": INPUT}
    genes: Genome = []
    for i, node in enumerate(spec.nodes):
        genes.append(Gene.make(node.op, (index[src] for src in node.inputs), **node.args))
        index[node.id] = i
    return genes


def to_nodes(genes: Sequence[Gene]) -> tuple[Node, ...]:
    """Canonical nodes: ids ``n<i>``, all arguments explicit."""
    return tuple(
        Node(
            id=f"n{i}",
            op=g.op,
            inputs=tuple("input" if j == INPUT else f"n{j}" for j in g.inputs),
            args=dict(g.args),
        )
        for i, g in enumerate(genes)
    )


def canonical_key(kind: str, genes: Sequence[Gene]) -> tuple:
    """Identity of a genome up to node names (what the canonical content hash depends on)."""
    return (kind, tuple(genes))


# ---- structural edits -----------------------------------------------------------------------


def consumers(genes: Sequence[Gene], i: int) -> list[int]:
    """Indices of the genes that read gene ``i``."""
    return [j for j, g in enumerate(genes) if i in g.inputs]


def insert_at(genes: Sequence[Gene], pos: int, gene: Gene) -> Genome:
    """Insert ``gene`` at ``pos``; references to genes at or after ``pos`` shift by one.

    ``gene`` itself must only read genes before ``pos`` (or ``INPUT``).
    """
    shifted = [g.with_inputs(j + 1 if j >= pos else j for j in g.inputs) for g in genes[pos:]]
    return [*genes[:pos], gene, *shifted]


def redirect(genes: Sequence[Gene], old: int, new: int, *, after: int) -> Genome:
    """Genes after index ``after`` that read ``old`` read ``new`` instead."""
    return [g.with_inputs(new if (j == old and k > after) else j for j in g.inputs) for k, g in enumerate(genes)]


def remove(genes: Sequence[Gene], i: int, replacement: int) -> Genome:
    """Delete gene ``i``; its readers read ``replacement`` (an earlier gene or ``INPUT``)."""
    out: Genome = []
    for k, g in enumerate(genes):
        if k == i:
            continue
        ins = (replacement if j == i else j for j in g.inputs)
        out.append(g.with_inputs(j - 1 if j > i else j for j in ins))
    return out


def prune(genes: Sequence[Gene], out: int | None = None) -> Genome:
    """Keep only the ancestors of gene ``out`` (default: the last), which becomes the last gene.

    A gene nobody reads would hold parameters that never get a gradient, which the
    contract check rejects; dropping it is the repair.
    """
    if not genes:
        return []
    out = len(genes) - 1 if out is None else out
    keep = {out}
    for k in range(out, -1, -1):
        if k in keep:
            keep.update(j for j in genes[k].inputs if j != INPUT)
    order = sorted(keep)
    new_index = {old: new for new, old in enumerate(order)}
    new_index[INPUT] = INPUT
    return [genes[k].with_inputs(new_index[j] for j in genes[k].inputs) for k in order]


# ---- channel inference ----------------------------------------------------------------------


def channels(genes: Sequence[Gene], view: View) -> list[int] | None:
    """Output channels of every gene in ``view``, or None where the builder would refuse.

    Mirrors ``blueprints.builder._make_op``: widths default to the view's channels,
    group counts must divide, ``add``/``mul`` need equal channels or one side of 1.
    """
    out: list[int] = []

    def of(j: int) -> int:
        return view.channels if j == INPUT else out[j]

    for g in genes:
        c_in = of(g.inputs[0])
        if g.op == "linear":
            out.append(g.arg("width") or view.channels)
        elif g.op == "conv":
            if view.spatial_rank == 0:
                return None
            width = g.arg("width") or view.channels
            groups = g.arg("groups") or c_in
            if c_in % groups or width % groups:
                return None
            out.append(width)
        elif g.op == "norm":
            groups = g.arg("groups")
            if (view.spatial_rank == 0 and groups != 1) or c_in % groups:
                return None
            out.append(c_in)
        elif g.op in ("act", "pool"):
            if g.op == "pool" and view.spatial_rank == 0:
                return None
            out.append(c_in)
        else:  # add / mul
            a, b = of(g.inputs[0]), of(g.inputs[1])
            if a != b and 1 not in (a, b):
                return None
            out.append(max(a, b))
    return out


def fits(genes: Sequence[Gene], views: Sequence[View]) -> bool:
    """Every view accepts the genome and its last gene has the view's channel count."""
    if not genes:
        return False
    for view in views:
        chans = channels(genes, view)
        if chans is None or chans[-1] != view.channels:
            return False
    return True


def width_matching(genes: Sequence[Gene], i: int, views: Sequence[View]) -> int | None | bool:
    """The ``width`` argument that reproduces gene ``i``'s channel count in every view.

    ``None`` (the default width) when gene ``i`` has the view's own channel count
    everywhere, an int when it has that same count everywhere, ``False`` when neither
    (then no single width matches and the caller must try something else).
    """
    per_view = []
    for view in views:
        chans = channels(genes, view)
        if chans is None:
            return False
        c = view.channels if i == INPUT else chans[i]
        per_view.append((c, view.channels))
    if all(c == vc for c, vc in per_view):
        return None
    if len({c for c, _ in per_view}) == 1:
        return per_view[0][0]
    return False
