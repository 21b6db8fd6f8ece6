"""Train the epochs of many MLP host runs at once: host weights stacked along a leading axis.

``HostStack`` holds N rows. Each row belongs to one ``Trainer`` (one episode); that trainer's
host parameters become views of its row (``p.data = W[i]``) and its Adam state for them
(``exp_avg``, ``exp_avg_sq``, ``step``) views of the stacked moments. Everything else the
trainer has (its slots and seeds, lifecycle, governor, rollback point, probe, candidate table)
stays per run and keeps working unchanged, because it reads and writes the same memory:
a rollback or a cull's snapshot restore copies into the views, and a restore that replaces the
optimizer's state tensors is noticed (by identity) and copied back into the row before the next
epoch (``HostStack.sync``).

``HostStack.train_epochs(trainers)`` is ``Trainer.train_epoch`` for several trainers at once:
per batch one batched forward (``torch.baddbmm`` per layer over the rows, with gradients
computed in ``F.linear``'s order), one backward, one Adam step over the stacked weights, with the
same arithmetic per row as ``torch.optim.Adam``'s single-tensor path: on the CPU each row's numbers
are bit for bit those of its trainer training alone. Seeds are grouped by blueprint and stage
across rows at each slot; on a GPU a group of blending, holding or fossilized seeds runs as one
``torch.func.vmap`` over their stacked weights (on the CPU, where each row must be bit for bit
its run alone, every seed runs its slot's own forward, as do a lone seed and seeds in isolated
TRAINING, whose custom autograd keeps a seed's NaN off the host), and their Adam step is one
fused ``torch._foreach`` update over every seed tensor of every row. Per row: its own batch order
(its trainer's generator), governor (a bad loss rolls back and culls in that row only, which
then sits out the rest of the epoch, exactly as ``train_epoch`` breaks), alpha ramp, gradient
norms, validation, counterfactual contributions and lifecycle steps. A batch where no slot
computes anything (no seed in use) skips autograd for the host layers: their backward is written
out with the kernels autograd would run. ``HostStack.probe`` is ``Observer.probe`` (activations
and loss gradients at every slot on the probe batch) for several runs at once.

The rows of one stack share a skeleton (``skeleton``: input shape and every host parameter's
shape). ``HostStacks`` holds runs of mixed skeletons, one stack per skeleton, each growing as
runs of its skeleton arrive. Only the MLP host batches (``batchable``); other hosts, and runs
with a custom loss (distillation), run ``Trainer.train_epoch`` one after the other.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esper_ray.contracts import EsperError, SeedStage
from esper_ray.kasmina import SeedSlot
from esper_ray.tolaria.telemetry import grad_norms
from esper_ray.tolaria.trainer import Trainer

# How a slot transforms its activation, by stage (kasmina.slot's forward modes).
_IDENTITY, _ISOLATED, _BLEND, _FOSSIL = range(4)
_MODE = {
    SeedStage.TRAINING: _ISOLATED,
    SeedStage.BLENDING: _BLEND,
    SeedStage.HOLDING: _BLEND,
    SeedStage.FOSSILIZED: _FOSSIL,
}
_ABLATABLE = (SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.FOSSILIZED)


class _BatchedLinear(torch.autograd.Function):
    """``F.linear`` for each row of a stack: ``x[i] @ W[i].T + b[i]``, with the gradients computed
    as ``F.linear``'s backward computes them (the weight's as ``g.T @ x``, which autograd's own
    ``baddbmm`` backward computes as ``(x.T @ g).T``: the same numbers summed in another order), so
    that on the CPU a row's forward and gradients are bit for bit those of the single host."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class _Blend(torch.autograd.Function):
    """``torch.lerp(h, s, alpha)`` with one alpha per row, differentiated as the slot's own lerp with a
    Python-float alpha is: the gradient to ``h`` scaled by ``1 - alpha`` computed in double, then
    rounded (``rest``), not by ``1 - alpha`` in float32, which can differ in the last bit."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(alpha, rest)
        return torch.lerp(h, s, alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        alpha, rest = ctx.saved_tensors
        return grad * rest, grad * alpha, None, None


class _Grad:
    """A gradient tensor in the shape ``telemetry.grad_norms`` reads (``.grad``)."""

    __slots__ = ("grad",)

    def __init__(self, grad: torch.Tensor | None):
        self.grad = grad


def mlp_layers(trainer: Trainer) -> list[nn.Linear] | None:
    """The Linear layers of an MLP host (blocks then head), or None when the host is not a plain
    MLP of ``Linear + ReLU`` blocks that ``HostStack`` can batch."""
    host = trainer.host
    layers: list[nn.Linear] = []
    for i, block in enumerate(host.blocks):
        mods = list(block) if type(block) is nn.Sequential else [block]
        if i == 0 and mods and type(mods[0]) is nn.Flatten:
            mods = mods[1:]
        if len(mods) != 2 or type(mods[0]) is not nn.Linear or type(mods[1]) is not nn.ReLU:
            return None
        layers.append(mods[0])
    if type(host.head) is not nn.Linear:
        return None
    layers.append(host.head)
    return layers


def batchable(trainer: Trainer) -> str:
    """'' when ``HostStack`` can train this run, else why it cannot."""
    if trainer.cfg.host.kind != "mlp" or mlp_layers(trainer) is None:
        return f"host kind {trainer.cfg.host.kind} is not batched (only the MLP host is)"
    if trainer.loss_fn is not None:
        return "a custom loss (distillation) is not batched"
    for group in trainer.opt.param_groups:
        if group.get("weight_decay", 0) or group.get("amsgrad") or group.get("maximize"):
            return "Adam with weight decay, amsgrad or maximize is not batched"
    return ""


def skeleton(trainer: Trainer) -> tuple:
    """What rows of one stack must share: the host's parameter shapes and its input shape."""
    return (tuple(trainer.data.input_shape), tuple(tuple(p.shape) for p in trainer.host.host_parameters()))


class HostStack:
    """N MLP host runs of one skeleton whose weights live stacked; see the module docstring.

    ``n`` is the stack's capacity (rows); a row holds one run from ``attach`` to ``release``.
    ``resize`` changes the capacity, moving every attached run's weights and Adam state along."""

    def __init__(self, n: int):
        if n < 1:
            raise EsperError(f"a host stack needs at least 1 row, got {n}")
        self.n = n
        self.trainers: list[Trainer | None] = [None] * n
        # Every host parameter of every row in one flat buffer, layer by layer (each layer's (n, *shape)
        # block contiguous, as a fast batched matmul wants), and Adam's moments likewise; ``split``
        # gives the per-layer views. ``weights`` are those views of ``flat`` as autograd leaves: each
        # layer's gradient is its own tensor (a leaf that is a slice of one flat leaf would get a
        # full-size zero-filled gradient per layer and batch).
        self.flat = torch.zeros(0)
        self.weights: list[torch.Tensor] = []
        self.exp_avg = torch.zeros(0)
        self.exp_avg_sq = torch.zeros(0)
        self._layout: list[tuple[int, int, tuple[int, ...]]] = []  # per parameter: start, end, shape
        self.steps = torch.zeros(0)  # (n,) Adam step counts, float32 like torch's
        self.shape: tuple | None = None
        self.first_task = ""
        self._views: list[list[torch.Tensor]] = [[] for _ in range(n)]  # per row: param, m, v views
        self._plans: dict[tuple, list] = {}  # see _plan
        self.grouped_calls = 0  # seed groups run as one vmapped call (for tests and benchmarks)

    # ---- rows ----------------------------------------------------------------------------------
    def attach(self, row: int, trainer: Trainer) -> None:
        """Make ``row`` belong to ``trainer`` (a fresh run): its host weights and Adam state move
        into the row and become views of it. EsperError when its host has another skeleton."""
        shape = skeleton(trainer)
        if self.shape is None:
            self.shape, self.first_task = shape, trainer.data.name
            self._allocate(trainer)
        elif shape != self.shape:
            raise EsperError(
                f"host stack: task {trainer.data.name} gives a host of another skeleton than task "
                f"{self.first_task} (input {shape[0]} vs {self.shape[0]}, parameter shapes {list(shape[1])} vs "
                f"{list(self.shape[1])})"
            )
        if self.trainers[row] is not None:
            self.release(row)
        self._place(row, trainer)

    def release(self, row: int) -> None:
        """Give the run in ``row`` its own memory again (weights, Adam state) and free the row."""
        trainer = self.trainers[row]
        if trainer is None:
            return
        with torch.no_grad():
            for p in trainer.opt.param_groups[0]["params"]:
                p.data = p.data.clone()
                state = trainer.opt.state.get(p)
                if state:
                    trainer.opt.state[p] = {k: v.clone() for k, v in state.items()}
        self.trainers[row] = None
        self._views[row] = []

    def free_row(self) -> int | None:
        """A row no run holds, or None when every row is taken."""
        return next((row for row, t in enumerate(self.trainers) if t is None), None)

    @property
    def attached(self) -> int:
        """How many rows hold a run."""
        return sum(t is not None for t in self.trainers)

    def resize(self, n: int) -> None:
        """Change the capacity to ``n`` rows (at least the highest row held + 1), keeping every run's
        weights and Adam state bit for bit in its row."""
        placed = [(row, t) for row, t in enumerate(self.trainers) if t is not None]
        if placed and placed[-1][0] >= n:
            raise EsperError(f"host stack: cannot shrink to {n} rows while row {placed[-1][0]} is held")
        self.n = n
        self.trainers = [None] * n
        self._views = [[] for _ in range(n)]
        if not placed:
            self.shape = None
            return
        self._allocate(placed[0][1])
        for row, trainer in placed:
            self._place(row, trainer)  # copies from the old buffers, which the run's tensors still view

    def _allocate(self, template: Trainer) -> None:
        """Fresh buffers of ``n`` rows for hosts shaped like ``template``'s."""
        self._layout, start = [], 0
        for p in template.host.host_parameters():
            self._layout.append((start, start + self.n * p.numel(), tuple(p.shape)))
            start += self.n * p.numel()
        self.flat = torch.zeros(start, device=template.device)
        self.weights = [w.requires_grad_() for w in self.split(self.flat)]
        self.exp_avg = torch.zeros(start, device=template.device)
        self.exp_avg_sq = torch.zeros(start, device=template.device)
        self.steps = torch.zeros(self.n)

    def _place(self, row: int, trainer: Trainer) -> None:
        """Copy the run's weights and Adam state (zero when it has none yet) into ``row`` and make
        them views of it."""
        self.trainers[row] = trainer
        rows = self.split(self.flat)
        with torch.no_grad():
            for k, p in enumerate(trainer.host.host_parameters()):
                rows[k][row].copy_(p)
                p.data = rows[k][row]
        self._link_state(row, trainer)

    def _link_state(self, row: int, trainer: Trainer) -> None:
        """Point the trainer's Adam state of its host parameters at the row, copying in any state it
        holds first (e.g. one a rollback or a cull's snapshot restore just loaded; zero if none)."""
        views = []
        state = trainer.opt.state
        params = trainer.opt.param_groups[0]["params"]
        step_view = self.steps[row]
        ms, vs = self.split(self.exp_avg), self.split(self.exp_avg_sq)
        with torch.no_grad():
            for k, p in enumerate(params):
                m, v = ms[k][row], vs[k][row]
                old = state.get(p)
                if old:
                    m.copy_(old["exp_avg"])
                    v.copy_(old["exp_avg_sq"])
                    step_view.fill_(float(old["step"]))
                else:
                    m.zero_()
                    v.zero_()
                    step_view.fill_(0.0)
                state[p] = {"step": step_view, "exp_avg": m, "exp_avg_sq": v}
                views += [p, m, v]
        self._views[row] = views

    def trainer(self, row: int) -> Trainer:
        """The run in ``row``; EsperError when the row is free."""
        trainer = self.trainers[row]
        if trainer is None:
            raise EsperError(f"host stack: row {row} holds no run")
        return trainer

    def sync(self, row: int) -> None:
        """Re-link a row whose trainer's Adam state tensors were replaced (rollback, cull)."""
        trainer = self.trainer(row)
        state = trainer.opt.state
        views = self._views[row]
        params = trainer.opt.param_groups[0]["params"]
        for k, p in enumerate(params):
            st = state.get(p)
            if st is None or st.get("exp_avg") is not views[3 * k + 1] or st.get("exp_avg_sq") is not views[3 * k + 2]:
                self._link_state(row, trainer)
                return
            if p.data_ptr() != self.weights[k][row].data_ptr():
                raise EsperError(f"row {row}: host parameter {k} no longer shares the stack's memory")

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per host parameter, its (n, *shape) view of a flat tensor laid out like ``flat``."""
        return [flat[a:b].view(self.n, *shape) for a, b, shape in self._layout]

    def _select(self, stack_rows: list[int], device: torch.device) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The index of ``stack_rows`` (None when they are every row, in order) and their weights."""
        if stack_rows == list(range(self.n)):
            return None, self.weights
        index = torch.tensor(stack_rows, device=device)
        return index, [w.index_select(0, index) for w in self.weights]

    # ---- one epoch -----------------------------------------------------------------------------
    def train_epochs(self, rows: Sequence[int]) -> None:
        """``Trainer.train_epoch`` for the trainers of ``rows`` at once (their ``last`` is set)."""
        rows = list(rows)
        if not rows:
            return
        started = time.perf_counter()
        self._plans.clear()
        for r in rows:
            self.sync(r)
        ep = _Epoch.start(rows, [self.trainer(r) for r in rows])
        bs = ep.trainers[0].cfg.training.batch_size
        stacked = ep.stacked
        for b in range(max(ep.n_batches)):
            live = [j for j in range(len(rows)) if b < ep.n_batches[j] and not ep.tripped[j]]
            if not live:
                break
            by_size: dict[int, list[int]] = defaultdict(list)
            for j in live:
                by_size[min(bs, ep.sizes[j] - b * bs)].append(j)
            for size, members in by_size.items():
                lo, hi = b * bs, b * bs + size
                if stacked is not None and len(members) == len(rows):
                    xb, yb = stacked[0][:, lo:hi], stacked[1][:, lo:hi]
                else:
                    xb = torch.stack([ep.orders[j][0][lo:hi] for j in members])
                    yb = torch.stack([ep.orders[j][1][lo:hi] for j in members])
                self._train_batch(ep, members, xb, yb, b)
        self._finish(ep, started)

    def _train_batch(self, ep: _Epoch, members: list[int], xb: torch.Tensor, yb: torch.Tensor, b: int) -> None:
        """One training step of the rows at positions ``members`` of the epoch on their batches ``xb, yb``."""
        stack_rows = [ep.rows[j] for j in members]
        index, weights = self._select(stack_rows, xb.device)
        trainers = [ep.trainers[j] for j in members]
        if any(self._plan(trainers, {}, len(weights) // 2, xb.device)):  # a slot computes: autograd through it
            losses, values = self._losses(self.forward(weights, trainers, xb), yb)
            keep = self._governor(ep, members, values)
            self._backward(ep, members, losses, keep)
            with torch.no_grad():
                grads = self._host_grads(ep, members, keep, index)
        else:  # the host's layers alone (no seed in use): their backward by hand, the same kernels
            grads, keep, values = self._plain_step(ep, members, weights, xb, yb)
        with torch.no_grad():
            last = [pos for pos in keep if b == ep.n_batches[members[pos]] - 1]
            if last:
                self._measure_grads([trainers[pos] for pos in last], [[g[pos] for g in grads] for pos in last])
            whole = index is None and len(keep) == len(members)
            self._adam_host([stack_rows[pos] for pos in keep], keep, grads, whole)
            self._adam_seeds([trainers[pos] for pos in keep])
        ep.account(members, keep, values, xb.shape[1])

    def _governor(self, ep: _Epoch, members: list[int], values: list[float]) -> list[int]:
        """The positions of the members whose loss the governor accepts (the others are marked tripped)."""
        keep = []
        for pos, j in enumerate(members):
            why = ep.trainers[j].governor.check(values[pos])
            if why:
                ep.tripped[j] = why
            else:
                keep.append(pos)
        return keep

    def _losses(self, logits: torch.Tensor, yb: torch.Tensor, values: bool = True) -> tuple[torch.Tensor, list[float]]:
        """Each row's mean cross-entropy on its batch: as a tensor (rows,) to differentiate, and as
        the numbers ``F.cross_entropy`` gives that row alone (the governor and the epoch's mean read them)."""
        m, size = yb.shape[0], yb.shape[1]
        # F.cross_entropy is log_softmax then nll_loss: taken apart so that the log-softmax (a fifth of
        # a batch's time at N = 32) serves both the gradient and the loss values.
        lsm = F.log_softmax(logits, 2)
        losses = F.nll_loss(lsm.reshape(m * size, -1), yb.reshape(-1), reduction="none").view(m, size).mean(1)
        if not values:
            return losses, []
        if logits.device.type == "cpu":
            with torch.no_grad():  # each row's loss as F.cross_entropy's mean reduction sums it (its own order)
                return losses, [float(F.nll_loss(lsm[pos], yb[pos])) for pos in range(m)]
        return losses, losses.tolist()  # one read back per batch, not one per row (not bit for bit there anyway)

    def _plain_step(
        self, ep: _Epoch, members: list[int], weights: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[int], list[float]]:
        """Per host layer the members' gradients, the kept positions and the loss values, for rows
        where no slot computes anything. Autograd runs only from the loss to the logits; the layers'
        backward is written out with the kernels autograd runs for them (``_BatchedLinear.backward``,
        ReLU's ``threshold_backward``), so the numbers are the same, without the autograd graph."""
        with torch.no_grad():
            h = xb.flatten(2) if xb.dim() > 3 else xb
            inputs = []  # each layer's input (after the ReLU, for the layers past the first)
            for i in range(len(weights) // 2):
                if i > 0:
                    h = torch.relu(h)
                inputs.append(h)
                h = torch.baddbmm(weights[2 * i + 1].unsqueeze(1), h, weights[2 * i].transpose(1, 2))
        logits = h.requires_grad_()
        losses, values = self._losses(logits, yb)
        keep = self._governor(ep, members, values)
        for j in members:
            for p in ep.seed_params[j]:
                p.grad = None
        if keep:
            kept = losses if len(keep) == len(members) else losses[torch.tensor(keep, device=losses.device)]
            (g,) = torch.autograd.grad(kept.sum(), logits)
        else:
            g = torch.zeros_like(logits)
        with torch.no_grad():
            grads: list[torch.Tensor] = [g] * len(weights)
            for i in reversed(range(len(inputs))):
                grads[2 * i] = torch.bmm(g.transpose(1, 2), inputs[i])
                grads[2 * i + 1] = g.sum(1)
                if i > 0:
                    g = torch.ops.aten.threshold_backward(torch.bmm(g, weights[2 * i]), inputs[i], 0)
            if len(keep) < len(members):  # rows that tripped: nothing of theirs moves (their gradient may be NaN)
                drop = torch.tensor([pos for pos in range(len(members)) if pos not in keep], device=g.device)
                for grad in grads:
                    grad.index_fill_(0, drop, 0.0)
        return grads, keep, values

    def _backward(self, ep: _Epoch, members: list[int], losses: torch.Tensor, keep: list[int]) -> None:
        """Fresh gradients of the kept rows' losses (host layers and the members' seeds)."""
        for w in self.weights:
            w.grad = None
        for j in members:
            for p in ep.seed_params[j]:
                p.grad = None
        if keep:
            loss = losses.sum() if len(keep) == len(members) else losses[torch.tensor(keep, device=losses.device)].sum()
            loss.backward()

    def _host_grads(
        self, ep: _Epoch, members: list[int], keep: list[int], index: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """Per host layer, the members' gradients (rows in member order), those of rows that tripped
        the governor zeroed (their gradient may be NaN: nothing of theirs moves, seeds included)."""
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in self.weights]
        if index is not None:
            grads = [g.index_select(0, index) for g in grads]
        if len(keep) < len(members):
            dropped = [pos for pos in range(len(members)) if pos not in keep]
            drop = torch.tensor(dropped, device=grads[0].device)
            for g in grads:
                g.index_fill_(0, drop, 0.0)
            for pos in dropped:
                for p in ep.seed_params[members[pos]]:
                    p.grad = None
        return grads

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        weights: list[torch.Tensor],
        trainers: list[Trainer],
        x: torch.Tensor,
        ablated: dict[int, str] | None = None,
        taps: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (rows, batch, classes) of the hosts of ``trainers`` (rows of ``weights``) with
        their slots, on ``x`` (rows, batch, *input); ``ablated``: row position -> a slot that
        outputs its input whatever its seed (``SeedSlot.ablated``); ``taps``: gets the activation
        entering each boundary's slot, boundary by boundary (``MorphoHost.forward_with_activations``)."""
        h = x.flatten(2) if x.dim() > 3 else x
        n_layers = len(weights) // 2
        plan = self._plan(trainers, ablated or {}, n_layers, x.device)
        for i in range(n_layers):
            if i > 0:
                h = torch.relu(h)
            if taps is not None:
                taps.append(h)
            if plan[i]:
                h = self._slots(plan[i], h)
            h = _BatchedLinear.apply(h, weights[2 * i], weights[2 * i + 1])
        return h

    def _plan(self, trainers: list[Trainer], ablated: dict[int, str], n_layers: int, device) -> list:
        """Per boundary, the groups of rows whose slot there computes something: (mode, row
        positions, slots, positions as a tensor), grouped by blueprint and mode. Stages change only
        between epochs (a rollback mid-epoch takes its row out of the rest of the epoch), so a plan
        is kept for the epoch (``_plans``, emptied by ``train_epochs``)."""
        key = (tuple(map(id, trainers)), tuple(sorted(ablated.items())))
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        plan = []
        for index in range(n_layers):
            groups: dict[tuple, list[tuple[int, object]]] = defaultdict(list)
            for pos, t in enumerate(trainers):
                for slot in t.host.slots.values():
                    if slot.index != index or slot.seed is None or ablated.get(pos) == slot.name:
                        continue
                    mode = _MODE.get(slot.stage, _IDENTITY)
                    if mode != _IDENTITY:
                        groups[(slot.seed.blueprint_hash, mode)].append((pos, slot))
            plan.append(
                [(mode, [p for p, _ in members], [s for _, s in members]) for (_, mode), members in groups.items()]
            )
            if groups:
                positions = [p for _, idx, _ in plan[-1] for p in idx]
                plan[-1] = (plan[-1], torch.tensor(positions, device=device))
        self._plans[key] = plan
        return plan

    def _slots(self, step: tuple, h: torch.Tensor) -> torch.Tensor:
        """The slots at one boundary of every row, group by group (see the module docstring)."""
        groups, index_t = step
        outs = []
        for mode, idx, slots in groups:
            if len(idx) == 1 or mode == _ISOLATED or h.device.type == "cpu":
                # The slot's own forward: isolation's custom autograd (value h, gradient to the
                # seed) stays kasmina's alone. On the CPU always: a vmapped group of some seed kinds
                # (conv1d, se1d, norm) sums their gradients in another order than each seed alone,
                # and the CPU promises each episode's numbers bit for bit.
                outs.append(torch.stack([slot(h[i]) for i, slot in zip(idx, slots, strict=True)]))
            else:
                outs.append(self._group_forward(mode, slots, h[idx]))
        return h.index_copy(0, index_t, torch.cat(outs) if len(outs) > 1 else outs[0])

    def _group_forward(self, mode: int, slots: list, h: torch.Tensor) -> torch.Tensor:
        """``SeedSlot.forward`` for several slots with seeds of one blueprint, in one mode (fossilized:
        ``seed(h)``; blending or holding: ``lerp(h, seed(h.detach()), alpha)``), the seeds as one
        vmapped call over their stacked weights."""
        template = slots[0].seed
        self.grouped_calls += 1
        names = [name for name, _ in template.named_parameters()]
        stacked = {name: torch.stack([dict(s.seed.named_parameters())[name] for s in slots]) for name in names}

        def call(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(template, params, (x,))

        s = torch.func.vmap(call)(stacked, h if mode == _FOSSIL else h.detach())
        if mode == _FOSSIL:
            return s
        shape = (-1, *([1] * (h.dim() - 1)))
        alpha = torch.tensor([slot.alpha for slot in slots], dtype=h.dtype, device=h.device).view(shape)
        rest = torch.tensor([1.0 - slot.alpha for slot in slots], dtype=h.dtype, device=h.device).view(shape)
        return _Blend.apply(h, s, alpha, rest)

    # ---- probe -------------------------------------------------------------------------------
    def probe(
        self, rows: Sequence[int], xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]
    ) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """``Observer.probe`` for the runs of ``rows`` at once, each on its probe batch ``(x, y)``:
        per row, each slot's input activation and the gradient of the row's mean cross-entropy
        there, with the hosts in eval mode (the same numbers as the run's own probe on the CPU)."""
        rows = list(rows)
        out: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = [({}, {})] * len(rows)
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for j in range(len(rows)):
            by_shape[(tuple(xs[j].shape), tuple(ys[j].shape))].append(j)
        self._plans.clear()  # stages changed since the last epoch (the decision's action)
        for members in by_shape.values():
            trainers = [self.trainer(rows[j]) for j in members]
            _, weights = self._select([rows[j] for j in members], xs[0].device)
            x = torch.stack([xs[j] for j in members]).requires_grad_(True)
            y = torch.stack([ys[j] for j in members])
            taps: list[torch.Tensor] = []
            for t in trainers:
                t.host.eval()
            try:
                losses, _ = self._losses(self.forward(weights, trainers, x, taps=taps), y, values=False)
                grads = torch.autograd.grad(losses.sum(), taps, allow_unused=True)
            finally:
                for t in trainers:
                    t.host.train()
            for pos, (j, t) in enumerate(zip(members, trainers, strict=True)):
                acts = {name: taps[slot.index][pos].detach() for name, slot in t.host.slots.items()}
                out[j] = (
                    acts,
                    {name: _grad_at(grads[slot.index], taps[slot.index], pos) for name, slot in t.host.slots.items()},
                )
        self._plans.clear()
        return out

    # ---- optimizer -----------------------------------------------------------------------------
    @torch.no_grad()
    def _adam_host(self, stack_rows: list[int], keep: list[int], grads: list[torch.Tensor], whole: bool) -> None:
        """``torch.optim.Adam``'s single-tensor step for the host rows in ``stack_rows`` (``keep``:
        their positions in each of ``grads``, the per-layer gradients), with the same arithmetic per
        row: rows that share a step count and a learning rate step together (scalar coefficients),
        as one fused update of the whole tensors when they are every row."""
        if not stack_rows:
            return
        trainers = [self.trainer(r) for r in stack_rows]
        rows_cpu = torch.tensor(stack_rows)
        self.steps[rows_cpu] += 1.0
        steps = self.steps[rows_cpu].tolist()
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, t in enumerate(trainers):
            g = t.opt.param_groups[0]
            groups[(steps[i], g["lr"], g["betas"], g["eps"])].append(i)
        for (step, lr, (beta1, beta2), eps), members in groups.items():
            bc1 = 1 - beta1**step
            step_size = lr / bc1
            bc2_sqrt = (1 - beta2**step) ** 0.5
            if whole and len(members) == len(stack_rows):
                params, ms, vs = self.split(self.flat), self.split(self.exp_avg), self.split(self.exp_avg_sq)
                _adam_update(params, ms, vs, grads, beta1, beta2, eps, step_size, bc2_sqrt)
                continue
            rows_t = torch.tensor([stack_rows[i] for i in members], device=self.flat.device)
            pos_t = torch.tensor([keep[i] for i in members], device=self.flat.device)
            layers = zip(
                self.split(self.flat), self.split(self.exp_avg), self.split(self.exp_avg_sq), grads, strict=True
            )
            for p_all, m_all, v_all, g_all in layers:
                param, m, v = (
                    p_all.index_select(0, rows_t),
                    m_all.index_select(0, rows_t),
                    v_all.index_select(0, rows_t),
                )
                _adam_update([param], [m], [v], [g_all.index_select(0, pos_t)], beta1, beta2, eps, step_size, bc2_sqrt)
                p_all.index_copy_(0, rows_t, param)
                m_all.index_copy_(0, rows_t, m)
                v_all.index_copy_(0, rows_t, v)

    @torch.no_grad()
    def _adam_seeds(self, trainers: list[Trainer]) -> None:
        """Adam's single-tensor step for every seed parameter of these runs, fused with
        ``torch._foreach`` ops (each tensor keeps its own step count and learning rate)."""
        params, grads, ms, vs, steps, lrs, betas = [], [], [], [], [], [], []
        for t in trainers:
            for group in t.opt.param_groups[1:]:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = t.opt.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    params.append(p)
                    grads.append(p.grad)
                    ms.append(state["exp_avg"])
                    vs.append(state["exp_avg_sq"])
                    steps.append(state["step"])
                    lrs.append(group["lr"])
                    betas.append((group["betas"], group["eps"]))
        if not params:
            return
        torch._foreach_add_(steps, 1.0)
        counts = torch.stack(steps).tolist()
        if len(set(betas)) != 1:
            raise EsperError("batched Adam: seed param groups with different betas or eps")
        (beta1, beta2), eps = betas[0]
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(vs)  # noqa: SLF001 (no public foreach sqrt; torch.optim.Adam uses it)
        torch._foreach_div_(denom, [(1 - beta2**s) ** 0.5 for s in counts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, ms, denom, [-lr / (1 - beta1**s) for lr, s in zip(lrs, counts, strict=True)])

    # ---- telemetry and the epoch's end --------------------------------------------------------
    def _measure_grads(self, trainers: list[Trainer], row_grads: list[list[torch.Tensor]]) -> None:
        """Per slot, the last batch's gradient norm of the host layer reading it, and of its seed
        (what ``Trainer`` measures), with one fused norm for all these rows."""
        groups: list[list[Any]] = []  # what grad_norms reads: objects with a ``.grad``
        layout = []
        for t, grads in zip(trainers, row_grads, strict=True):
            slots = list(t.host.slots.values())
            n_layers = len(grads) // 2
            for slot in slots:
                k = min(slot.index, n_layers - 1)
                groups.append([_Grad(grads[2 * k]), _Grad(grads[2 * k + 1])])
            seeds = [(s, s.seed) for s in slots if s.seed is not None]
            groups += [list(seed.parameters()) for _, seed in seeds]
            layout.append((t, slots, [s for s, _ in seeds]))
        norms = grad_norms(groups)
        at = 0
        for t, slots, seeded in layout:
            t.set_host_grad_norms({s.name: norms[at + i] for i, s in enumerate(slots)})
            at += len(slots)
            for s in seeded:
                s.seed_grad_norm = norms[at]
                at += 1

    @torch.no_grad()
    def _evaluate(
        self, rows: list[int], x: list[torch.Tensor], y: list[torch.Tensor], ablated: str = ""
    ) -> list[tuple[float, float]]:
        """Mean cross-entropy and accuracy of each row's current model on its (x, y) (with the
        slot ``ablated`` of each row ablated)."""
        out: list[tuple[float, float]] = [(0.0, 0.0)] * len(rows)
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for j in range(len(rows)):
            by_shape[tuple(x[j].shape)].append(j)
        for members in by_shape.values():
            stack_rows = [rows[j] for j in members]
            _, weights = self._select(stack_rows, x[0].device)
            xs = torch.stack([x[j] for j in members])
            ys = torch.stack([y[j] for j in members])
            skip = dict.fromkeys(range(len(members)), ablated) if ablated else None
            logits = self.forward(weights, [self.trainer(r) for r in stack_rows], xs, skip)
            loss = torch.logsumexp(logits, 2).sum(1) - logits.gather(2, ys[..., None]).sum((1, 2))
            correct = (logits.argmax(2) == ys).sum(1)
            n = xs.shape[1]
            for pos, (lo, c) in enumerate(zip(loss.tolist(), correct.tolist(), strict=True)):
                out[members[pos]] = (lo / n, c / n)
        return out

    def _finish(self, ep: _Epoch, started: float) -> None:
        """Validation, test at the last epoch, contributions and lifecycle steps, per row."""
        self._plans.clear()  # rollbacks changed stages
        rows, trainers = ep.rows, ep.trainers
        for t in trainers:
            t.host.eval()
        try:
            val = self._evaluate(rows, [t.data.x_val for t in trainers], [t.data.y_val for t in trainers])
            scored = [
                j for j, t in enumerate(trainers) if t.cfg.training.eval_test or t.epoch + 1 >= t.cfg.training.epochs
            ]
            test = {}
            if scored:
                res = self._evaluate(
                    [rows[j] for j in scored],
                    [trainers[j].data.x_test for j in scored],
                    [trainers[j].data.y_test for j in scored],
                )
                test = {j: acc for j, (_, acc) in zip(scored, res, strict=True)}
            self._contributions(rows, trainers, val)
        finally:
            for t in trainers:
                t.host.train()
        self._plans.clear()  # the lifecycle steps below change stages
        seconds = time.perf_counter() - started
        for j in range(len(trainers)):
            ep.close(j, val[j], test.get(j, math.nan), seconds / len(trainers))  # the batched epoch's share

    def _contributions(self, rows: list[int], trainers: list[Trainer], val: list[tuple[float, float]]) -> None:
        """Validation accuracy with each blended seed ablated, batched per slot name."""
        names = sorted({name for t in trainers for name, s in t.host.slots.items() if s.stage in _ABLATABLE})
        for name in names:
            members = [
                j for j, t in enumerate(trainers) if name in t.host.slots and t.host.slots[name].stage in _ABLATABLE
            ]
            slots = [trainers[j].host.slots[name] for j in members]
            res = self._evaluate(
                [rows[j] for j in members],
                [trainers[j].data.x_val for j in members],
                [trainers[j].data.y_val for j in members],
                ablated=name,
            )
            for j, s, (_, ablated) in zip(members, slots, res, strict=True):
                s.contribution = val[j][1] - ablated


@dataclass
class _Epoch:
    """What one batched epoch keeps per row (by position in ``rows``) while it runs."""

    rows: list[int]  # stack rows
    trainers: list[Trainer]
    orders: list[tuple[torch.Tensor, torch.Tensor]]  # the epoch's shuffled (x, y)
    stacked: tuple[torch.Tensor, torch.Tensor] | None  # the same, stacked, when every row's data has one shape
    sizes: list[int]  # training examples
    n_batches: list[int]
    blending: list[list[SeedSlot]]  # slots whose alpha ramps per step
    seed_params: list[list[torch.Tensor]]  # seeds change only between epochs (a rollback ends the row's epoch)
    total: list[float]  # summed loss
    seen: list[int]  # examples trained on
    tripped: list[str]  # why the governor stopped the row ('' while it trains)

    @classmethod
    def start(cls, rows: list[int], trainers: list[Trainer]) -> _Epoch:
        """Each run's batch order for the epoch (from its own generator), in train mode."""
        perms = [torch.randperm(len(t.data.x_train), generator=t.gen).to(t.data.x_train.device) for t in trainers]
        stacked = None
        if len({(t.data.x_train.shape, t.data.y_train.shape) for t in trainers}) == 1:
            # One gather per row straight into one stacked tensor: every full batch is then a view.
            x0, y0 = trainers[0].data.x_train, trainers[0].data.y_train
            stacked = (x0.new_empty((len(rows), *x0.shape)), y0.new_empty((len(rows), *y0.shape)))
            for j, (t, perm) in enumerate(zip(trainers, perms, strict=True)):
                torch.index_select(t.data.x_train, 0, perm, out=stacked[0][j])
                torch.index_select(t.data.y_train, 0, perm, out=stacked[1][j])
            orders = [(stacked[0][j], stacked[1][j]) for j in range(len(rows))]
        else:
            orders = [(t.data.x_train[p], t.data.y_train[p]) for t, p in zip(trainers, perms, strict=True)]
        for t in trainers:
            t.host.train()
        bs = trainers[0].cfg.training.batch_size
        slots = [list(t.host.slots.values()) for t in trainers]
        sizes = [len(t.data.x_train) for t in trainers]
        return cls(
            rows=rows,
            trainers=trainers,
            orders=orders,
            stacked=stacked,
            sizes=sizes,
            n_batches=[math.ceil(n / bs) for n in sizes],
            blending=[[s for s in row if s.stage is SeedStage.BLENDING] for row in slots],
            seed_params=[[p for s in row if s.seed is not None for p in s.seed.parameters()] for row in slots],
            total=[0.0] * len(rows),
            seen=[0] * len(rows),
            tripped=[""] * len(rows),
        )

    def account(self, members: list[int], keep: list[int], values: list[float], size: int) -> None:
        """After a step: the kept rows count it (step, alpha ramp, loss); rows that tripped roll back."""
        for pos, j in enumerate(members):
            if pos in keep:
                t = self.trainers[j]
                t.step += 1
                for slot in self.blending[j]:
                    slot.on_step()
                self.total[j] += values[pos] * size
                self.seen[j] += size
            elif self.tripped[j]:
                self.trainers[j].governor_rollback(self.tripped[j])

    def close(self, j: int, val: tuple[float, float], test_acc: float, seconds: float) -> None:
        """``Trainer.train_epoch``'s end for row ``j`` (``Trainer.finish_epoch``)."""
        train_loss = self.total[j] / self.seen[j] if self.seen[j] else float("nan")
        self.trainers[j].finish_epoch(train_loss, val, test_acc, bool(self.tripped[j]), seconds)


class HostStacks:
    """The host stacks of N episodes of mixed skeletons: one ``HostStack`` per skeleton (input
    shape and layer widths), each episode's run in a row of its skeleton's stack. A stack grows
    (doubling, at most N rows) when a run of its skeleton arrives and no row is free, and goes
    when its last run leaves; a batched epoch trains each stack's rows together."""

    def __init__(self, n: int):
        if n < 1:
            raise EsperError(f"host stacks: need at least 1 episode, got {n}")
        self.n = n
        self.stacks: dict[tuple, HostStack] = {}
        self.where: list[tuple[tuple, int] | None] = [None] * n  # per episode: (skeleton, stack row)
        self.grouped_calls = 0  # seed groups run as one vmapped call, over every stack
        self.probed = 0  # probes computed here (``probe``), for tests and benchmarks

    def attach(self, episode: int, trainer: Trainer) -> None:
        """Put episode ``episode``'s new run in its skeleton's stack (leaving any stack it was in)."""
        self.detach(episode)
        key = skeleton(trainer)
        stack = self.stacks.get(key)
        if stack is None:
            stack = self.stacks[key] = HostStack(1)
        row = stack.free_row()
        if row is None:
            row = stack.n
            stack.resize(min(2 * stack.n, self.n))
        stack.attach(row, trainer)
        self.where[episode] = (key, row)

    def detach(self, episode: int) -> None:
        """Take episode ``episode``'s run out of its stack (its tensors keep their values)."""
        place = self.where[episode]
        if place is None:
            return
        key, row = place
        stack = self.stacks[key]
        stack.release(row)
        self.where[episode] = None
        if not stack.attached:
            self.grouped_calls += stack.grouped_calls
            del self.stacks[key]

    def train_epochs(self, episodes: Sequence[int]) -> None:
        """One epoch of each of these episodes' runs, each stack's rows as one batch."""
        rows: dict[tuple, list[int]] = defaultdict(list)
        for episode in episodes:
            place = self.where[episode]
            if place is None:
                raise EsperError(f"host stacks: episode {episode} has no run in a stack")
            rows[place[0]].append(place[1])
        for key, stack_rows in rows.items():
            stack = self.stacks[key]
            before = stack.grouped_calls
            stack.train_epochs(sorted(stack_rows))
            self.grouped_calls += stack.grouped_calls - before

    def probe(
        self, episodes: Sequence[int], xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]
    ) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """``HostStack.probe`` for these episodes' runs (each on its probe batch), stack by stack."""
        self.probed += len(episodes)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for pos, episode in enumerate(episodes):
            place = self.where[episode]
            if place is None:
                raise EsperError(f"host stacks: episode {episode} has no run in a stack")
            groups[place[0]].append(pos)
        out: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = [({}, {})] * len(episodes)
        for key, positions in groups.items():
            rows = [self._row(episodes[pos]) for pos in positions]
            res = self.stacks[key].probe(rows, [xs[pos] for pos in positions], [ys[pos] for pos in positions])
            for pos, r in zip(positions, res, strict=True):
                out[pos] = r
        return out

    def _row(self, episode: int) -> int:
        place = self.where[episode]
        if place is None:
            raise EsperError(f"host stacks: episode {episode} has no run in a stack")
        return place[1]


def _adam_update(params, ms, vs, grads, beta1: float, beta2: float, eps: float, step_size: float, bc2_sqrt: float):
    """The arithmetic of ``torch.optim.Adam``'s single-tensor step (no weight decay, no amsgrad) on
    lists of tensors, each op fused over the list."""
    torch._foreach_lerp_(ms, grads, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(vs)  # noqa: SLF001 (no public foreach sqrt; torch.optim.Adam uses it)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, ms, denom, value=-step_size)


def _grad_at(grad: torch.Tensor | None, act: torch.Tensor, pos: int) -> torch.Tensor:
    """Row ``pos`` of a probe gradient (zeros where the loss did not depend on the activation)."""
    return torch.zeros_like(act[pos]) if grad is None else grad[pos]
