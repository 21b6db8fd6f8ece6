"""Continual adaptation: one host adapting to a sequence of tasks after its original one.

What a run needs to adapt without forgetting, and to measure whether it did:

- ``BoundedSample``: a small sample of the original task kept by the run, drawn from its
  *training* split only (never validation or test), never larger than its bound
  (``MIN_SAMPLE``..``MAX_SAMPLE`` examples; a reservoir, so offering more data keeps it at the
  bound). It lives in memory on the trainer's device, inside the loss function that uses it.
- ``Rehearsal``: the Trainer's ``loss_fn`` that adds a batch of that sample to every step
  (experience replay).
- ``GateRehearsal``: rehearsal plus the gate objective of gated seeds (``kasmina.gate``): each
  gated seed's gate learns to open (``g -> 1``) on the data its seed is grown for and to close
  (``g -> 0``) on the original sample, from the slot's input only; no task identity at test time.
- ``FisherPenalty``: elastic weight consolidation, the classic regularisation baseline: a
  quadratic pull of the host's weights towards the original task's optimum, weighted by the
  diagonal (empirical) Fisher information measured on the original task's training split.
- ``absorb_fossilized``: fossilized seeds become part of the host proper (their slots reopen),
  so a slot can grow a seed again on the next task.
- ``AccuracyMatrix``: accuracy on every task seen after every adaptation, and what the field
  reports from it (average accuracy, backward transfer, new-task gain).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esper_ray.contracts import EsperError, SeedStage
from esper_ray.kasmina.gate import gate_logits, is_gated
from esper_ray.tasks import TaskData

MIN_SAMPLE = 1
MAX_SAMPLE = 10_000


# ---- the bounded sample -----------------------------------------------------------------------------
class BoundedSample:
    """At most ``bound`` examples of a task's *training* split, kept by reservoir sampling.

    ``offer`` streams examples in: the first ``bound`` are kept, after that each newcomer replaces
    a kept one with probability ``bound / seen`` (Algorithm R), so the sample is uniform over what
    was offered and never grows past ``bound``. ``index`` holds each kept example's row in the
    training split it came from.
    """

    def __init__(self, bound: int, seed: int = 0):
        if isinstance(bound, bool) or not isinstance(bound, int) or not MIN_SAMPLE <= bound <= MAX_SAMPLE:
            raise EsperError(f"sample size {bound!r} out of range [{MIN_SAMPLE}, {MAX_SAMPLE}]")
        self.bound = bound
        self.seen = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.index = torch.empty(0, dtype=torch.long)

    @classmethod
    def from_task(cls, data: TaskData, size: int, seed: int = 0) -> BoundedSample:
        """``size`` examples of ``data``'s training split (only that split is offered)."""
        sample = cls(size, seed)
        if size > len(data.x_train):
            raise EsperError(
                f"sample size {size} out of range: task {data.name} has {len(data.x_train)} training examples"
            )
        sample.offer(data.x_train, data.y_train)
        return sample

    def __len__(self) -> int:
        return len(self.index)

    def offer(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Stream training examples ``(x, y)`` (rows seen so far + i is each one's index)."""
        n = len(x)
        if n != len(y):
            raise EsperError(f"offer: {n} inputs but {len(y)} labels")
        if self.x is None or self.y is None:
            self.x, self.y = x.new_empty((0, *x.shape[1:])), y.new_empty((0,))
        kept_x, kept_y, kept_i = list(self.x), list(self.y), self.index.tolist()
        draws = torch.rand(n, generator=self.gen, dtype=torch.float64)
        for i in range(n):
            self.seen += 1
            if len(kept_i) < self.bound:
                kept_x.append(x[i])
                kept_y.append(y[i])
                kept_i.append(self.seen - 1)
                continue
            j = int(draws[i] * self.seen)  # uniform in [0, seen)
            if j < self.bound:
                kept_x[j], kept_y[j], kept_i[j] = x[i], y[i], self.seen - 1
        if kept_x:
            self.x, self.y = torch.stack(kept_x), torch.stack(kept_y)
        self.index = torch.tensor(kept_i, dtype=torch.long)

    def to(self, device: torch.device | str) -> BoundedSample:
        if self.x is not None and self.y is not None:
            self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples drawn with replacement (indices from ``gen``, on the CPU)."""
        if self.x is None or self.y is None or not len(self):
            raise EsperError("the sample is empty: offer it some training examples first")
        j = torch.randint(len(self), (n,), generator=gen).to(self.x.device)
        return self.x[j], self.y[j]


# ---- losses ---------------------------------------------------------------------------------------
class Rehearsal:
    """The Trainer's ``loss_fn`` for experience replay: cross-entropy over the new task's batch
    concatenated with ``batch`` examples of the sample (drawn with replacement from a generator
    of its own, so the new task's data order is the same as without replay).

    The sample batch goes through the same host in the same train step, so live seeds (and a
    trainable host) get the gradient of both. (A host without batch statistics, as the MLP,
    computes the same in one forward of the concatenation as in these two forwards.)
    """

    def __init__(self, host: nn.Module, sample: BoundedSample, batch: int = 100, seed: int = 0):
        if batch < 1:
            raise EsperError(f"rehearsal batch must be >= 1, got {batch}")
        self.host, self.sample, self.batch = host, sample, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        xs, ys = self.sample.draw(self.batch, self.gen)
        return F.cross_entropy(torch.cat([logits, self.host(xs)]), torch.cat([y, ys]))


class GateRehearsal:
    """Rehearsal (optional) plus the gate objective of gated seeds.

    Loss = cross-entropy (over the new batch, and the sample batch when ``replay``) +
    ``gate_weight`` x the mean over gated seeds (live or fossilized, still in their slots) of
    ``BCE(g(h_new), 1) + BCE(g(h_orig), 0)``, where ``h`` is the slot's input for the new batch
    and for a batch of the original sample (read with no gradient: the gate never moves the host).
    The gate thus learns where its seed belongs from the data the seed is grown for and the
    bounded original sample; at test time it sees nothing but the activation.
    """

    def __init__(
        self,
        trainer: Any,
        sample: BoundedSample,
        *,
        batch: int = 100,
        gate_weight: float = 1.0,
        replay: bool = True,
        seed: int = 0,
    ):
        if batch < 1:
            raise EsperError(f"rehearsal batch must be >= 1, got {batch}")
        if not (gate_weight >= 0 and math.isfinite(gate_weight)):
            raise EsperError(f"gate_weight must be finite and >= 0, got {gate_weight}")
        self.trainer, self.sample, self.batch = trainer, sample, batch
        self.gate_weight, self.replay = gate_weight, replay
        self.gen = torch.Generator().manual_seed(seed)

    def gated_slots(self) -> list:
        """The slots whose seed is gated and still trains with the run (not culled)."""
        return [
            s
            for s in self.trainer.host.slots.values()
            if is_gated(s.seed) and (s.stage.is_live or s.stage is SeedStage.FOSSILIZED)
        ]

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        host = self.trainer.host
        xs, ys = self.sample.draw(self.batch, self.gen)
        if self.replay:
            loss = F.cross_entropy(torch.cat([logits, host(xs)]), torch.cat([y, ys]))
        else:
            loss = F.cross_entropy(logits, y)
        slots = self.gated_slots()
        if not slots or self.gate_weight == 0:
            return loss
        x_new = self.trainer.data.x_train[idx]
        with torch.no_grad():
            _, acts = host.forward_with_activations(torch.cat([x_new, xs]))
        target = torch.cat([torch.ones(len(x_new)), torch.zeros(len(xs))]).to(logits.device)
        gate = sum(F.binary_cross_entropy_with_logits(gate_logits(s.seed, acts[s.name]), target) for s in slots)
        return loss + self.gate_weight * gate / len(slots)


class FisherPenalty:
    """Elastic weight consolidation (Kirkpatrick et al., 2017) as the Trainer's ``loss_fn``:
    ``CE + lam / 2 * sum_i F_i (theta_i - theta*_i)^2`` over ``params``, with ``theta*`` the weights
    when it was made and ``F`` the diagonal empirical Fisher: the mean squared per-example gradient
    of the log-likelihood over ``(x, y)`` (the original task's training split, seen at the time;
    only ``F`` and ``theta*`` are kept, no examples)."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], x: torch.Tensor, y: torch.Tensor, lam: float):
        if not (lam >= 0 and math.isfinite(lam)):
            raise EsperError(f"EWC lambda must be finite and >= 0, got {lam}")
        if not len(x):
            raise EsperError("EWC needs at least one example to measure the Fisher information")
        self.params, self.lam = list(params), lam
        self.anchor = [p.detach().clone() for p in self.params]
        self.fisher = [torch.zeros_like(p) for p in self.params]
        was_training = model.training
        model.eval()
        for i in range(len(x)):  # per-example gradients: the empirical Fisher's definition
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for f, g in zip(self.fisher, grads, strict=True):
                if g is not None:
                    f += g.detach().square()
        for f in self.fisher:
            f /= len(x)
        model.train(was_training)

    def penalty(self) -> torch.Tensor:
        terms = ((f * (p - a).square()).sum() for p, a, f in zip(self.params, self.anchor, self.fisher, strict=True))
        total = sum(terms, torch.zeros(()))  # a 0-dim start joins any device; 0 + x is x exactly
        return 0.5 * self.lam * total

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y) + self.penalty()


# ---- absorbing seeds ---------------------------------------------------------------------------------
def absorb_fossilized(trainer: Any, wrap: Callable[[nn.Module], nn.Module] | None = None) -> int:
    """Make every fossilized seed part of the host proper and reopen its slot; return how many
    (``Trainer.absorb_fossilized``: the seed moves into the host block before its slot, its
    parameters join the host's param group, the slot goes back to DORMANT silently)."""
    n: int = trainer.absorb_fossilized(wrap)
    return n


# ---- the accuracy matrix --------------------------------------------------------------------------
@dataclasses.dataclass
class AccuracyMatrix:
    """``rows[i][j]``: test accuracy on task ``j`` after adapting to task ``i`` (``j <= i``; task 0
    is the original one, row 0 is before any adaptation); ``before[t - 1]``: accuracy on new task
    ``t`` just before adapting to it.

    From it (Lopez-Paz & Ranzato, 2017; Chaudhry et al., 2018), with ``T`` the last task:
    average accuracy ``mean_j rows[T][j]`` over every task seen (the original included);
    backward transfer on task ``j`` ``rows[T][j] - rows[j][j]`` (negative = forgetting; for the
    original task that is ``A_end - A0``, and the design's degradation is ``(A0 - A_end) / A0``);
    new-task gain ``mean_t rows[t][t] - before[t - 1]``.
    """

    rows: list[list[float]] = dataclasses.field(default_factory=list)
    before: list[float] = dataclasses.field(default_factory=list)

    def start(self, original: float) -> None:
        """Row 0: the original task's accuracy before any adaptation."""
        if self.rows:
            raise EsperError("the accuracy matrix has started already")
        self.rows.append([float(original)])

    def adapt(self, before: float, after: Iterable[float]) -> None:
        """One more task: its accuracy before adapting, then every task's accuracy after."""
        after = [float(a) for a in after]
        if len(after) != len(self.rows) + 1 or not self.rows:
            raise EsperError(f"row {len(self.rows)} needs {len(self.rows) + 1} accuracies, got {len(after)}")
        self.before.append(float(before))
        self.rows.append(after)

    @property
    def tasks(self) -> int:
        """New tasks adapted to so far."""
        return len(self.before)

    def backward_transfer(self) -> list[float]:
        """``rows[T][j] - rows[j][j]`` for every task ``j < T`` (index 0: the original task)."""
        last = self.rows[-1]
        return [last[j] - self.rows[j][j] for j in range(len(last) - 1)]

    def gains(self) -> list[float]:
        """``rows[t][t] - before[t - 1]`` for every new task ``t``."""
        return [self.rows[t][t] - self.before[t - 1] for t in range(1, len(self.rows))]

    def metrics(self) -> dict[str, float]:
        """Average accuracy, backward transfer (original, mean over earlier new tasks), degradation,
        new-task gain and the mean new-task accuracy before and after; NaN where undefined."""
        bwt, gains = self.backward_transfer(), self.gains()
        a0, a_end = self.rows[0][0], self.rows[-1][0]
        new_bwt = bwt[1:]
        return {
            "average_accuracy": sum(self.rows[-1]) / len(self.rows[-1]),
            "bwt_original": a_end - a0 if len(self.rows) > 1 else math.nan,
            "degradation": (a0 - a_end) / a0 if a0 else math.nan,
            "bwt_new": sum(new_bwt) / len(new_bwt) if new_bwt else math.nan,
            "new_gain": sum(gains) / len(gains) if gains else math.nan,
            "new_before": sum(self.before) / len(self.before) if self.before else math.nan,
            "new_after": sum(self.rows[t][t] for t in range(1, len(self.rows))) / self.tasks
            if self.tasks
            else math.nan,
        }

    def to_json(self) -> dict[str, list]:
        return {"rows": self.rows, "before": self.before}
