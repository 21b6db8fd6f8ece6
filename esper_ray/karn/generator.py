"""Karn's generator: new blueprint specs by mutation, crossover and random construction.

Everything here is a pure function of a seeded ``numpy.random.Generator``: the same
seed and the same parents give the same proposals, so a run can be replayed.

Every proposal is checked before it leaves: it must parse as a ``BlueprintSpec``,
build on every reference slot shape of its kind (``REFERENCE_SHAPES``), and stay
within the parameter budget there. Attempts that fail are retried (up to
``max_tries``) and counted in :class:`GeneratorStats`, so the share of wasted work is
visible. Proposals are in canonical form (nodes ``n0, n1, ...``, every argument
explicit; see :mod:`esper_ray.karn.genome`), named ``karn-<kind>-<short hash>``, with
``origin="karn"`` and the parents' content hashes.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from pydantic import ValidationError

from esper_ray.blueprints.builder import count_params
from esper_ray.blueprints.spec import ACTIVATIONS, BlueprintSpec
from esper_ray.contracts import EsperError
from esper_ray.karn.genome import (
    INPUT,
    Gene,
    Genome,
    View,
    canonical_key,
    channels,
    fits,
    from_spec,
    insert_at,
    prune,
    redirect,
    remove,
    to_nodes,
    view_of,
    width_matching,
)

KINDS: tuple[str, ...] = ("vector", "seq", "image")

# Slot shapes (no batch dim) every proposal of a kind must build on. A seq blueprint
# is grafted on 1-D CNN slots (C, L) and on vector slots (it then sees (1, D)), so it
# must fit both; the first shape of each kind is the one its features are measured on.
REFERENCE_SHAPES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vector": ((64,),),
    "seq": ((16, 32), (40,)),
    "image": ((16, 8, 8),),
}
DEFAULT_BUDGET = 20_000  # parameters; the default per-seed budget of BlueprintsConfig
T = TypeVar("T")

WIDTHS: tuple[int | None, ...] = (None, 4, 8, 16, 24, 32, 48, 64, 96, 128)
KERNELS = (1, 3, 5, 7)
CONV_GROUPS: tuple[int | None, ...] = (1, 1, None, 2, 4)  # None = depthwise; plain convs most often
_GROUP_CHOICES: tuple[int | None, ...] = (1, None, 2, 4)  # a tuple, not a set: order must not vary
NORM_GROUPS = (1, 2, 4, 8)
MAX_GENES = 16  # far below the spec's limit: a seed is meant to be small


@dataclass
class GeneratorStats:
    """What the generator did: attempts, valid proposals, and why the rest were dropped."""

    attempts: int = 0  # candidate genomes that reached validation
    valid: int = 0
    invalid: int = 0  # failed validation (reasons below), retried
    duplicates: int = 0  # no change from the parent, or already proposed
    not_applicable: int = 0  # the operator had nothing to act on (e.g. delete a 1-node spec)
    dropped: int = 0  # operator calls that gave up after max_tries
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def valid_share(self) -> float:
        """Valid proposals among the candidates that reached validation."""
        return self.valid / self.attempts if self.attempts else 1.0

    def as_dict(self) -> dict[str, object]:
        return {
            "attempts": self.attempts,
            "valid": self.valid,
            "invalid": self.invalid,
            "duplicates": self.duplicates,
            "not_applicable": self.not_applicable,
            "dropped": self.dropped,
            "valid_share": self.valid_share,
            "reasons": dict(self.reasons),
        }


@dataclass(frozen=True)
class Proposal:
    """A checked new spec and how it was made."""

    spec: BlueprintSpec
    operator: str  # "mutate:<op>", "crossover" or "random"
    params: int  # parameters at the kind's first reference shape


class _NotApplicable(Exception):
    """The operator cannot act on this genome (not an invalid result: nothing was made)."""


class BlueprintGenerator:
    """Proposes valid, budgeted BlueprintSpecs from parents or from scratch.

    Args:
        seed: an int or a ``numpy.random.Generator`` (shared, so a caller may interleave).
        budget: maximum parameters on every reference shape.
        reference_shapes: slot shapes per kind that every proposal must build on.
        max_tries: attempts per requested proposal before it is dropped.
        max_genes: maximum nodes of a proposal.
    """

    def __init__(
        self,
        seed: int | np.random.Generator = 0,
        *,
        budget: int = DEFAULT_BUDGET,
        reference_shapes: dict[str, tuple[tuple[int, ...], ...]] | None = None,
        max_tries: int = 8,
        max_genes: int = MAX_GENES,
    ):
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.budget = budget
        self.reference_shapes = dict(reference_shapes or REFERENCE_SHAPES)
        self.views = {
            kind: tuple(view_of(kind, shape) for shape in shapes) for kind, shapes in self.reference_shapes.items()
        }
        self.max_tries = max_tries
        self.max_genes = max_genes
        self.stats = GeneratorStats()
        self._mutations: dict[str, Callable[[Genome, str], Genome]] = {
            "tweak": self._tweak,
            "insert": self._insert,
            "delete": self._delete,
            "residual": self._residual,
            "gate": self._gate,
            "swap": self._swap,
        }
        self._mutation_p = np.array([0.3, 0.25, 0.15, 0.1, 0.1, 0.1])

    # ---- public operators ---------------------------------------------------------------------

    def mutate(self, parent: BlueprintSpec) -> Proposal | None:
        """One structural or argument change of ``parent``; None if every try failed."""
        base = from_spec(parent)
        parent_key = canonical_key(parent.kind, base)
        for _ in range(self.max_tries):
            name = str(self.rng.choice(list(self._mutations), p=self._mutation_p))
            try:
                genes = self._mutations[name](list(base), parent.kind)
            except _NotApplicable:
                self.stats.not_applicable += 1
                continue
            genes = self._repair_tail(genes, parent.kind)
            if canonical_key(parent.kind, genes) == parent_key:
                self.stats.duplicates += 1
                continue
            proposal = self._finish(genes, parent.kind, f"mutate:{name}", (parent.content_hash,))
            if proposal is not None:
                return proposal
        self.stats.dropped += 1
        return None

    def crossover(self, a: BlueprintSpec, b: BlueprintSpec) -> Proposal | None:
        """The head of ``a`` (its first nodes) feeding the tail of ``b``; same kind only.

        References of ``b``'s tail to nodes before the cut are rewired to the last node
        of ``a``'s head; references to the slot input stay (they are skip connections).
        """
        if a.kind != b.kind:
            raise EsperError(f"crossover needs two parents of one kind, got {a.kind} and {b.kind}")
        ga, gb = from_spec(a), from_spec(b)
        keys = {canonical_key(a.kind, ga), canonical_key(b.kind, gb)}
        for _ in range(self.max_tries):
            i = int(self.rng.integers(1, len(ga) + 1))  # head = ga[:i], junction gene i - 1
            j = int(self.rng.integers(0, len(gb)))  # tail = gb[j:]
            tail = [
                g.with_inputs(INPUT if k == INPUT else (i - 1 if k < j else k - j + i) for k in g.inputs)
                for g in gb[j:]
            ]
            genes = self._repair_tail(prune([*ga[:i], *tail]), a.kind)
            if canonical_key(a.kind, genes) in keys:
                self.stats.duplicates += 1
                continue
            proposal = self._finish(genes, a.kind, "crossover", (a.content_hash, b.content_hash))
            if proposal is not None:
                return proposal
        self.stats.dropped += 1
        return None

    def random_spec(self, kind: str) -> Proposal | None:
        """A fresh spec of ``kind``: a few mixing blocks, then maybe a residual or a gate."""
        for _ in range(self.max_tries):
            genes = self._random_genes(kind)
            proposal = self._finish(genes, kind, "random", ())
            if proposal is not None:
                return proposal
        self.stats.dropped += 1
        return None

    def propose(
        self,
        parents: Sequence[BlueprintSpec],
        n: int,
        *,
        p_random: float = 0.2,
        p_crossover: float = 0.2,
        kinds: Sequence[str] = KINDS,
        exclude: set[str] | None = None,
    ) -> list[Proposal]:
        """Up to ``n`` distinct proposals: mutations and crossovers of ``parents``, some random.

        With no parents every proposal is random. ``exclude`` holds content hashes that
        must not be proposed again (the parents are always excluded).
        """
        seen = set(exclude or ()) | {p.content_hash for p in parents}
        by_kind: dict[str, list[BlueprintSpec]] = {}
        for p in parents:
            by_kind.setdefault(p.kind, []).append(p)
        out: list[Proposal] = []
        for _ in range(4 * n):  # bounded: duplicates and drops must not loop forever
            if len(out) >= n:
                break
            r = self.rng.random()
            if not parents or r < p_random:
                proposal = self.random_spec(str(self.rng.choice(list(kinds))))
            else:
                a = parents[int(self.rng.integers(len(parents)))]
                mates = [p for p in by_kind[a.kind] if p.content_hash != a.content_hash]
                if r < p_random + p_crossover and mates:
                    proposal = self.crossover(a, mates[int(self.rng.integers(len(mates)))])
                else:
                    proposal = self.mutate(a)
            if proposal is None:
                continue
            if proposal.spec.content_hash in seen:
                self.stats.duplicates += 1
                continue
            seen.add(proposal.spec.content_hash)
            out.append(proposal)
        return out

    def check(self, spec: BlueprintSpec) -> str:
        """Why ``spec`` would be refused as a proposal ("" if it would not): shape, budget, size."""
        try:
            genes = from_spec(spec)
        except KeyError:
            return "schema"
        return self._reason(genes, spec.kind)[1]

    # ---- validation ---------------------------------------------------------------------------

    def _reason(self, genes: Genome, kind: str) -> tuple[int, str]:
        """(params at the first reference shape, refusal reason or "")."""
        if not genes:
            return 0, "empty"
        if len(genes) > self.max_genes:
            return 0, "too_many_nodes"
        if not fits(genes, self.views[kind]):
            return 0, "shape"
        try:
            spec = BlueprintSpec(name="candidate", kind=kind, nodes=to_nodes(genes))
        except ValidationError:
            return 0, "schema"
        counts = []
        for shape in self.reference_shapes[kind]:
            try:
                counts.append(count_params(spec, shape))
            except (EsperError, RuntimeError, ValueError):  # the builder disagrees with our inference
                return 0, "build"
        if max(counts) > self.budget:
            return counts[0], "over_budget"
        return counts[0], ""

    def _finish(self, genes: Genome, kind: str, operator: str, parents: tuple[str, ...]) -> Proposal | None:
        """Validate a candidate genome; a Proposal, or None (counted) when it is refused."""
        self.stats.attempts += 1
        params, reason = self._reason(genes, kind)
        if reason:
            self.stats.invalid += 1
            self.stats.reasons[reason] += 1
            return None
        self.stats.valid += 1
        nodes = to_nodes(genes)
        short = BlueprintSpec(name="candidate", kind=kind, nodes=nodes).short_hash
        spec = BlueprintSpec(name=f"karn-{kind}-{short}", kind=kind, nodes=nodes, origin="karn", parents=parents)
        return Proposal(spec, operator, params)

    def _repair_tail(self, genes: Genome, kind: str) -> Genome:
        """Append a width-null linear when the body would end with the wrong channel count."""
        views = self.views[kind]
        if not genes or fits(genes, views):
            return genes
        if all(channels(genes, v) is not None for v in views):
            return [*genes, Gene.make("linear", (len(genes) - 1,), width=None)]
        return genes  # an inner mismatch no tail fixes; validation will refuse it

    # ---- random choices -----------------------------------------------------------------------

    def _pick(self, options: Sequence[T]) -> T:
        return options[int(self.rng.integers(len(options)))]

    def _width(self) -> int | None:
        return self._pick(WIDTHS)

    def _fn(self, avoid: str | None = None) -> str:
        return str(self._pick([f for f in ACTIVATIONS if f != avoid]))

    def _norm_groups(self, genes: Genome, src: int, kind: str) -> int:
        """A group count dividing the channels at ``src`` in every view (1 for vectors)."""
        if kind == "vector":
            return 1
        views = self.views[kind]
        options = [g for g in NORM_GROUPS if all(self._chans(genes, src, v) % g == 0 for v in views)]
        return int(self._pick(options))

    @staticmethod
    def _chans(genes: Genome, src: int, view: View) -> int:
        if src == INPUT:
            return view.channels
        chans = channels(genes[: src + 1], view)
        return chans[-1] if chans else 0  # 0 divides nothing: only groups that always fit apply

    def _new_gene(self, op: str, src: int, genes: Genome, kind: str) -> Gene:
        """A gene of ``op`` reading ``src``, with random arguments that suit its input."""
        if op == "linear":
            return Gene.make("linear", (src,), width=self._width())
        if op == "conv":
            return Gene.make(
                "conv",
                (src,),
                width=self._width(),
                kernel=int(self._pick(KERNELS[1:])),
                groups=self._pick(CONV_GROUPS),
            )
        if op == "act":
            return Gene.make("act", (src,), fn=self._fn())
        if op == "norm":
            return Gene.make("norm", (src,), groups=self._norm_groups(genes, src, kind))
        return Gene.make(op, (src,))

    def _unary_ops(self, kind: str) -> list[str]:
        return ["linear", "act", "norm"] if kind == "vector" else ["linear", "conv", "act", "norm", "pool"]

    # ---- mutation operators (each returns a new genome or raises _NotApplicable) -------------

    def _tweak(self, genes: Genome, kind: str) -> Genome:
        """Change one argument: a width, a kernel, a group count or an activation."""
        tunable = [i for i, g in enumerate(genes) if g.op in ("linear", "conv", "act")]
        if kind != "vector":
            tunable += [i for i, g in enumerate(genes) if g.op == "norm"]
        if not tunable:
            raise _NotApplicable
        i = int(self._pick(tunable))
        g = genes[i]
        if g.op == "act":
            genes[i] = g.with_args(fn=self._fn(avoid=g.arg("fn")))
        elif g.op == "norm":
            genes[i] = g.with_args(groups=self._norm_groups(genes, g.inputs[0], kind))
        elif g.op == "linear" or self.rng.random() < 0.4:
            genes[i] = g.with_args(width=self._pick([w for w in WIDTHS if w != g.arg("width")]))
        elif self.rng.random() < 0.6:
            genes[i] = g.with_args(kernel=int(self._pick([k for k in KERNELS if k != g.arg("kernel")])))
        else:
            genes[i] = g.with_args(groups=self._pick([c for c in _GROUP_CHOICES if c != g.arg("groups")]))
        return genes

    def _insert(self, genes: Genome, kind: str) -> Genome:
        """Put a new unary op on one edge of the DAG (or after the output)."""
        edges = [(k, p) for k, g in enumerate(genes) for p in range(len(g.inputs))] + [(len(genes), 0)]
        k, p = edges[int(self.rng.integers(len(edges)))]
        src = len(genes) - 1 if k == len(genes) else genes[k].inputs[p]
        new = self._new_gene(str(self._pick(self._unary_ops(kind))), src, genes, kind)
        if k == len(genes):
            return [*genes, new]
        out = insert_at(genes, k, new)
        reader = out[k + 1]
        ins = list(reader.inputs)
        ins[p] = k
        out[k + 1] = reader.with_inputs(ins)
        return out

    def _delete(self, genes: Genome, kind: str) -> Genome:
        """Remove one node; its readers read one of its inputs instead; dead nodes go too."""
        if len(genes) < 2:
            raise _NotApplicable
        i = int(self.rng.integers(len(genes)))
        options = [j for j in genes[i].inputs if not (i == len(genes) - 1 and j == INPUT)]
        if not options:
            raise _NotApplicable  # deleting the output would leave an empty body
        replacement = int(self._pick(options))
        out = remove(genes, i, replacement)
        return prune(out, replacement if i == len(genes) - 1 else None)

    def _residual(self, genes: Genome, kind: str) -> Genome:
        """``add`` a node's output to an earlier tensor of matching channels (a skip)."""
        j = int(self.rng.integers(len(genes)))
        sources = [s for s in [INPUT, *range(j)] if self._compatible(genes, j, s, kind)]
        if not sources:
            raise _NotApplicable
        s = int(self._pick(sources))
        out = insert_at(genes, j + 1, Gene.make("add", (j, s)))
        return redirect(out, j, j + 1, after=j + 1)

    def _compatible(self, genes: Genome, a: int, b: int, kind: str) -> bool:
        for view in self.views[kind]:
            ca, cb = self._chans(genes, a, view), self._chans(genes, b, view)
            if ca != cb and 1 not in (ca, cb):
                return False
        return True

    def _gate(self, genes: Genome, kind: str) -> Genome:
        """Multiply a node by a learned sigmoid gate of itself (squeeze-excitation when pooled)."""
        j = int(self.rng.integers(len(genes)))
        width = width_matching(genes, j, self.views[kind])
        if width is False:
            width = 1  # a single gate channel broadcasts over any channel count
        pos, src = j + 1, j
        out = list(genes)
        if kind != "vector" and self.rng.random() < 0.5:
            out = insert_at(out, pos, Gene.make("pool", (src,)))
            pos, src = pos + 1, pos
        out = insert_at(out, pos, Gene.make("linear", (src,), width=width))
        out = insert_at(out, pos + 1, Gene.make("act", (pos,), fn="sigmoid"))
        out = insert_at(out, pos + 2, Gene.make("mul", (j, pos + 1)))
        return redirect(out, j, pos + 2, after=pos + 2)

    def _swap(self, genes: Genome, kind: str) -> Genome:
        """Replace one op by a related one: act<->norm, linear<->conv, pool->act, add<->mul."""
        i = int(self.rng.integers(len(genes)))
        g = genes[i]
        src = g.inputs[0]
        if g.op == "act":
            new = self._new_gene("norm", src, genes, kind)
        elif g.op in ("norm", "pool"):
            new = self._new_gene("act", src, genes, kind)
        elif g.op == "linear" and kind != "vector":
            kernel = int(self._pick(KERNELS[1:]))
            new = Gene.make("conv", (src,), width=g.arg("width"), kernel=kernel, groups=1)
        elif g.op == "conv":
            new = Gene.make("linear", (src,), width=g.arg("width"))
        elif g.op in ("add", "mul"):
            new = Gene.make("mul" if g.op == "add" else "add", g.inputs)
        else:
            raise _NotApplicable
        genes[i] = new
        return genes

    # ---- random construction ------------------------------------------------------------------

    def _random_genes(self, kind: str) -> Genome:
        if self.rng.random() < 0.1:
            # Parameter-free or nearly so: normalisation / activation only. Often useless,
            # which is exactly what the reward model must learn to tell.
            genes: Genome = [self._new_gene(str(self._pick(["norm", "act"])), INPUT, [], kind)]
            if self.rng.random() < 0.5:
                genes.append(self._new_gene(str(self._pick(["norm", "act"])), 0, genes, kind))
            return genes
        genes = []
        for _ in range(int(self.rng.integers(1, 4))):
            src = len(genes) - 1
            op = "conv" if kind != "vector" and self.rng.random() < 0.6 else "linear"
            genes.append(self._new_gene(op, src, genes, kind))
            if self.rng.random() < 0.25:
                genes.append(self._new_gene("norm", len(genes) - 1, genes, kind))
            if self.rng.random() < 0.8:
                genes.append(self._new_gene("act", len(genes) - 1, genes, kind))
        genes.append(Gene.make("linear", (len(genes) - 1,), width=None))
        for _ in range(int(self.rng.integers(0, 3))):
            grow = self._residual if self.rng.random() < 0.6 else self._gate
            with contextlib.suppress(_NotApplicable):
                genes = grow(genes, kind)
        return self._repair_tail(genes, kind)
