"""Tolaria: trains a host epoch by epoch while seeds live through their lifecycles.

One epoch is: train on every batch (seeds in their own Adam param groups), evaluate,
advance the automatic lifecycle steps, and measure telemetry. Between epochs a
controller looks at ``observe()`` and ``apply()``s one action from
``legal_actions()``. The Gymnasium environment (``envs/``) drives these same calls.

Side effects of lifecycle transitions live in one place, ``_on_transition``: a seed
joins the optimizer when it germinates, the host is snapshotted when blending starts,
and a cull removes the seed's param group and, if it had blended, restores the host's
weights and optimizer state to that snapshot.

The trainer holds the loop, evaluation, gradient telemetry and the governor; the rest is
in objects it holds, each in its own module and given its inputs explicitly:
``candidates.CandidateBook`` (the ready blueprints, their costs and the legality of
actions), ``observation.Observer`` (the probe batch, its signals and the ``Observation``),
``seedlog.SeedLog`` (events, birth records, field reports) and ``trials.run_trials``
(what-if runs). ``state_dict`` / ``load_state_dict`` are its whole state for
``tolaria.checkpoint``; ``set_task``, ``set_seed_lr`` and ``absorb_fossilized`` are how
continual learning changes a run from outside.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, cast

import torch
import torch.nn.functional as F

from esper_ray.blueprints import (
    BlueprintCatalogue,
    build_seed,
)
from esper_ray.blueprints.catalogue import CatalogueEntry
from esper_ray.config import RunConfig
from esper_ray.contracts import (
    ActionKind,
    ControllerAction,
    EsperError,
    EventKind,
    FieldReport,
    HostContext,
    Observation,
    SeedEvent,
    SeedStage,
    SlotGapSource,
    TrialResult,
)
from esper_ray.hosts import MorphoHost, build_host
from esper_ray.karn.invented import local_catalogue
from esper_ray.kasmina import SeedSlot, Transition
from esper_ray.tasks import TaskData, load_task
from esper_ray.tolaria import optim
from esper_ray.tolaria.candidates import CandidateBook
from esper_ray.tolaria.governor import Governor
from esper_ray.tolaria.observation import Observer, eval_mode, host_context
from esper_ray.tolaria.seedlog import EventHook, SeedLog
from esper_ray.tolaria.telemetry import grad_norms
from esper_ray.tolaria.trials import run_trials

# A loss function gets (logits, labels, batch indices) and returns a scalar loss. One that also
# has ``slot_gaps(trainer) -> {slot: float}`` (distillation) feeds Observation.distill.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Trainer:
    """One host training run, steppable one epoch at a time."""

    def __init__(
        self,
        cfg: RunConfig,
        data: TaskData | None = None,
        *,
        catalogue: BlueprintCatalogue | None = None,
        run_id: str = "run",
        loss_fn: LossFn | None = None,
    ):
        torch.set_num_threads(cfg.training.threads)
        self.cfg = cfg
        self.run_id = run_id
        self.device = resolve_device(cfg.training.device)
        self.data = on_device(data if data is not None else load_task(cfg.task), self.device)
        torch.manual_seed(cfg.training.seed)
        self.host: MorphoHost = build_host(cfg.host, self.data.input_shape, self.data.num_classes, cfg.lifecycle)
        self.host.to(self.device)
        self.host.add_listener(self._on_transition)
        if cfg.training.host_init == "task":
            self._init_host_from_task()
        # A frozen host keeps requires_grad (gradient telemetry still flows) but never moves.
        host_lr = 0.0 if cfg.training.freeze_host else cfg.training.lr
        self.opt = torch.optim.Adam(
            [{"params": list(self.host.host_parameters()), "lr": host_lr, "name": optim.HOST_GROUP}]
        )
        self.catalogue = catalogue or local_catalogue(cfg.blueprints)
        self.loss_fn = loss_fn
        self.governor = Governor(cfg.governor)
        self.gen = torch.Generator().manual_seed(cfg.training.seed)
        self.epoch = 0
        self.step = 0
        self.best_val = 0.0
        self.plateau = 0
        self.last: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.log = SeedLog(run_id)
        self.book = CandidateBook(self.catalogue, cfg.blueprints, cfg.controller.max_germinations)
        self.observer = Observer(self.data, cfg.training.probe_size, cfg.training.signal_every)
        self._blend_snapshots: dict[str, optim.HostSnapshot] = {}
        self._host_grad: dict[str, float] = {}
        # (host version, slots, seeded slots, parameter groups): _measure_grads
        self._grad_groups: tuple[int, list[SeedSlot], list[SeedSlot], list[list[torch.nn.Parameter]]] = (
            -1,
            [],
            [],
            [],
        )
        self._good = optim.RollbackPoint(self.host, self.opt)
        self.refresh_candidates()
        self.remember_good()

    def _init_host_from_task(self) -> None:
        init = self.data.host_init
        if init is None:
            raise EsperError(f"training.host_init=task: task {self.data.name} provides no host weights")
        try:
            self.host.load_host_state_dict({k: v.to(torch.float32) for k, v in init.items()})
        except (EsperError, RuntimeError) as err:
            raise EsperError(f"task {self.data.name}'s host weights do not fit this host: {err}") from None

    # ---- training --------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(logits, y, idx)
        if logits.dim() > 2:  # a sequence model (transformer host): logits (B, T, classes), labels (B, T)
            return F.cross_entropy(logits.flatten(0, -2), y.flatten())
        return F.cross_entropy(logits, y)

    def train_epoch(self) -> dict[str, float]:
        """Train one epoch, evaluate, and take the automatic lifecycle steps."""
        started = time.perf_counter()
        x, y = self.data.x_train, self.data.y_train
        bs = self.cfg.training.batch_size
        # Drawn on the CPU (one generator, the same order on every device), then moved once, so
        # on a GPU each batch indexes on the device instead of copying its indices there.
        batches = torch.randperm(len(x), generator=self.gen).to(x.device).split(bs)
        self.host.train()
        total, n_seen, rolled_back = 0.0, 0, ""
        last = len(batches) - 1
        # Stages change only between epochs (or at a rollback, which ends the epoch).
        blending = [s for s in self.host.slots.values() if s.stage is SeedStage.BLENDING]
        for b, idx in enumerate(batches):
            loss = self.loss(self.host(x[idx]), y[idx], idx)
            value = loss.item()
            why = self.governor.check(value)
            if why:
                rolled_back = why
                self._governor_rollback(why)
                break
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if b == last:
                self._measure_grads()
            self.opt.step()
            self.step += 1
            for slot in blending:
                slot.on_step()
            n = idx.shape[0]
            total += value * n
            n_seen += n
        with eval_mode(self.host):  # one switch for every evaluation of the epoch
            val_loss, val_acc = self._evaluate(self.data.x_val, self.data.y_val)
            last_epoch = self.epoch + 1 >= self.cfg.training.epochs
            scored = self.cfg.training.eval_test or last_epoch
            test_acc = self._evaluate(self.data.x_test, self.data.y_test)[1] if scored else math.nan
            self._measure_contributions(val_acc)
        train_loss = total / n_seen if n_seen else float("nan")
        seconds = time.perf_counter() - started
        return self.finish_epoch(train_loss, (val_loss, val_acc), test_acc, bool(rolled_back), seconds)

    def finish_epoch(
        self, train_loss: float, val: tuple[float, float], test_acc: float, rolled_back: bool, seconds: float
    ) -> dict[str, float]:
        """An epoch's end once it is trained and evaluated: best and plateau, the epoch counter,
        ``last``, and the automatic lifecycle steps. ``train_epoch`` ends with it, and so does a
        caller that trained the epoch itself (``tolaria.batched``, which gives each run its share of
        the batched epoch's ``seconds``)."""
        val_loss, val_acc = val
        if val_acc > self.best_val + 1e-9:
            self.best_val, self.plateau = val_acc, 0
        else:
            self.plateau += 1
        self.epoch += 1
        self.last = {"train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc, "test_acc": test_acc}
        for slot in self.host.slots.values():
            slot.on_epoch_end()
            slot.advance()
        self.last["rolled_back"] = float(rolled_back)
        self.last["epoch_seconds"] = seconds
        return self.last

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
        """Mean cross-entropy and accuracy of the current model on (x, y)."""
        with eval_mode(self.host):
            return self._evaluate(x, y, chunk)

    @torch.no_grad()
    def _evaluate(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
        """``evaluate`` for a caller that has put the host in eval mode. For a sequence model (logits
        ``(B, T, classes)``, labels ``(B, T)``) both are per position: loss per token, next-token accuracy."""
        loss, correct = 0.0, 0
        for i in range(0, len(x), chunk):
            logits, labels = self.host(x[i : i + chunk]), y[i : i + chunk]
            # Summed cross-entropy as logsumexp - the label's logit: the same number as F.cross_entropy,
            # cheaper on a CPU thread (F.cross_entropy's log_softmax over a few classes is slow there).
            loss += float(torch.logsumexp(logits, -1).sum() - logits.gather(-1, labels[..., None]).sum())
            correct += int((logits.argmax(-1) == labels).sum())
        return loss / y.numel(), correct / y.numel()

    def _measure_grads(self) -> None:
        """Per slot, the gradient norm of the host module reading it and of its seed (last batch)."""
        if self._grad_groups[0] != self.host.version:  # which parameters: kept until a transition
            slots = list(self.host.slots.values())
            seeded = [slot for slot in slots if slot.seed is not None]
            params = [list(self.host.consumer(slot).parameters()) for slot in slots]
            params += [list(seed.parameters()) for slot in seeded if (seed := slot.seed) is not None]
            self._grad_groups = (self.host.version, slots, seeded, params)
        _, slots, seeded, groups = self._grad_groups
        norms = grad_norms(groups)
        for slot, norm in zip(slots, norms[: len(slots)], strict=True):
            self._host_grad[slot.name] = norm
        for slot, norm in zip(seeded, norms[len(slots) :], strict=True):
            slot.seed_grad_norm = norm

    def _measure_contributions(self, val_acc: float) -> None:
        """Counterfactual: validation accuracy with each blended seed ablated (host in eval mode)."""
        for slot in self.host.slots.values():
            if slot.stage in (SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.FOSSILIZED):
                with slot.ablated():
                    _, ablated = self._evaluate(self.data.x_val, self.data.y_val)
                slot.contribution = val_acc - ablated

    # ---- governor --------------------------------------------------------------------------
    def remember_good(self) -> None:
        """Keep the current state as the governor's rollback point (taken at each healthy epoch end;
        call it after changing the host or its weights outside the lifecycle)."""
        self._good.take()

    def _governor_rollback(self, why: str) -> None:
        """Back to the last good state, then cull the seed responsible (if any)."""
        culprit = self._culprit()  # judge before the restore makes every seed's weights finite again
        self._good.restore()
        self.log.rollback(why, epoch=self.epoch, step=self.step, val_acc=self.last.get("val_acc", 0.0))
        if culprit is not None:
            culprit.cull(f"governor: {why}")

    def governor_rollback(self, why: str) -> None:
        """The governor's answer to a bad loss (rollback, then cull the seed responsible), for a
        caller that ran the training step itself (``tolaria.batched``)."""
        self._governor_rollback(why)

    def set_host_grad_norms(self, norms: dict[str, float]) -> None:
        """Per slot, the last batch's gradient norm of the host module reading it, for a caller
        that ran the training step itself (``tolaria.batched``); SlotTelemetry reports them."""
        self._host_grad.update(norms)

    def _culprit(self) -> SeedSlot | None:
        live = [s for s in self.host.slots.values() if s.stage.is_live]
        for slot in live:  # a seed whose weights went bad is guilty for sure
            if slot.seed_diverged:
                return slot
        # Otherwise the youngest live seed: the most recent change is the likeliest cause.
        return max(live, key=lambda s: self.log.born_at_step(s.name), default=None)

    # ---- decisions -------------------------------------------------------------------------
    @property
    def candidates(self) -> list[CatalogueEntry]:
        """The up to K ready blueprints, in the order observations show them (``order_candidates``)."""
        return self.book.entries

    def refresh_candidates(self) -> None:
        """Poll the catalogue (never blocks) and keep up to K ready blueprints."""
        self.book.refresh()

    def order_candidates(self, key: Callable[[CatalogueEntry], Any]) -> None:
        """Show the candidates in the order of ``key`` (stable) from now until the next refresh."""
        self.book.order(key)

    def seed_cost(self, entry: CatalogueEntry, slot: SeedSlot) -> int | None:
        """Parameters of ``entry`` in ``slot``, or None when it does not fit (cached)."""
        return self.book.seed_cost(entry, slot)

    def why_illegal(self, action: ControllerAction) -> str:
        """'' if ``action`` may be applied now, else the reason."""
        return self.book.why_illegal(action, self.host.slots, self.germinations)

    def legal_actions(self) -> list[ControllerAction]:
        """Every action ``apply`` accepts right now; WAIT is always first (``CandidateBook``)."""
        return self.book.legal_actions(self.host.slots, self.germinations)

    def apply(self, action: ControllerAction) -> None:
        """Carry out a controller's decision; EsperError (one line) if it is not legal now."""
        why = self.why_illegal(action)
        if why:
            raise EsperError(f"illegal action {action}: {why}")
        name = cast(str, action.slot)  # legal and not WAIT: it names one of the host's slots
        if action.kind is ActionKind.GERMINATE:
            # The catalogue's own entry: a remote catalogue checks the spec's content hash again here.
            entry = self.book.resolve(action.blueprint)
            slot = self.host.germinate(
                name,
                entry.spec,
                max_params=self.cfg.blueprints.max_seed_params,
                generator_seed=self.cfg.training.seed * 1_000_003 + self.step,
                reason="controller",
            )
            slot.transition(SeedStage.TRAINING, "joined the optimizer")
        elif action.kind is ActionKind.FOSSILIZE:
            self.host.slots[name].fossilize("controller")
        elif action.kind is ActionKind.CULL:
            self.host.slots[name].cull("controller")

    def apply_decision(self, controller) -> ControllerAction:
        """At a decision point, ask ``controller`` for an action and apply it (else wait)."""
        if self.epoch % self.cfg.controller.decide_every:
            return ControllerAction.wait()
        self.refresh_candidates()
        action = controller.act(self.observe(), self.legal_actions())
        self.apply(action)
        return action

    def observe(self) -> Observation:
        """Global and per-slot telemetry at this decision point (``observation.Observer``)."""
        return self.observer.observe(
            self.host,
            epoch=self.epoch,
            max_epochs=self.cfg.training.epochs,
            last=self.last,
            best_val=self.best_val,
            plateau=self.plateau,
            events=len(self.events),
            host_grad=self._host_grad,
            book=self.book,
            distill=self.loss_fn.slot_gaps(self) if isinstance(self.loss_fn, SlotGapSource) else {},
        )

    @property
    def probe_x(self) -> torch.Tensor:
        """The probe batch's inputs (the first ``training.probe_size`` validation examples)."""
        return self.observer.probe_x

    @property
    def probe_y(self) -> torch.Tensor:
        """The probe batch's labels."""
        return self.observer.probe_y

    def graft_fossilized(self, slot_name: str, spec) -> None:
        """Put a seed of ``spec`` in ``slot_name`` as already FOSSILIZED (no lifecycle, no events).

        Only for reference runs such as the "big static" baseline: a host that has the
        grown capacity from the start. Call before training.
        """
        slot = self.host.slot(slot_name)
        seed = build_seed(spec, slot.shape, generator_seed=self.cfg.training.seed * 1_000_003 + self.step)
        seed.to(self.device)
        state = {"stage": "FOSSILIZED", "epochs_in_stage": 0, "blend_steps": 0}
        slot.load_lifecycle_state({**state, "seed_grad_norm": 0.0, "contribution": 0.0}, seed)
        self.host.refresh()
        optim.add_seed_group(self.opt, slot_name, seed, self.cfg.training.seed_lr)
        self.remember_good()

    def absorb_fossilized(self, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> int:
        """Make every fossilized seed part of the host proper and reopen its slot; return how many.

        Each seed (``wrap(seed)`` if given) moves into the host block before its slot
        (``MorphoHost.absorb``); its parameters leave their own param group and join the host's
        (learning rate 0 when the host is frozen), and the slot goes back to DORMANT silently (the
        network computes the same). Only while no seed is live (a live seed's rollback snapshot
        has the old architecture): EsperError otherwise. The governor's rollback point is retaken.
        """
        if live := [s.name for s in self.host.slots.values() if s.stage.is_live]:
            raise EsperError(f"cannot absorb fossilized seeds while slot(s) {live} have a live seed")
        n = 0
        for slot in self.host.slots.values():
            if slot.stage is not SeedStage.FOSSILIZED:
                continue
            optim.remove_seed_group(self.opt, slot.name)
            module = self.host.absorb(slot.name, wrap)
            self.opt.param_groups[0]["params"].extend(module.parameters())
            n += 1
        self.remember_good()
        return n

    def train_only(self, params: list[torch.nn.Parameter]) -> None:
        """From now on train only ``params`` of the host (e.g. its head, or its biases, for a
        parameter-efficient fine-tune): the host's param group holds just them, with fresh Adam
        moments at the same learning rate, and the governor's rollback point follows the new
        optimizer. Before any seed joins: EsperError while a seed has its own param group."""
        seeded = [name for name in optim.group_names(self.opt) if name != optim.HOST_GROUP]
        if seeded:
            raise EsperError(f"train_only: seeds already train ({', '.join(seeded)}); restrict the host first")
        own = {id(p) for p in self.host.host_parameters()}
        if not params or any(id(p) not in own for p in params):
            raise EsperError("train_only: give a non-empty list of this host's own parameters")
        lr = self.opt.param_groups[0]["lr"]
        self.opt = torch.optim.Adam([{"params": list(params), "lr": lr, "name": optim.HOST_GROUP}])
        self._good = optim.RollbackPoint(self.host, self.opt)
        self.remember_good()

    def set_seed_lr(self, slot: str, lr: float) -> None:
        """Set the learning rate of the seed in ``slot`` (its own param group; 0 stops it training
        while it still computes, e.g. a fossilized seed on a frozen host). EsperError if none."""
        name = optim.seed_group_name(slot)
        groups = [g for g in self.opt.param_groups if g.get("name") == name]
        if not groups:
            raise EsperError(f"slot {slot} has no seed in the optimizer")
        for group in groups:
            group["lr"] = lr

    def set_task(self, data: TaskData) -> None:
        """Train on ``data`` from now on (continual learning: a new task of the same input shape and
        classes). The probe batch and task features follow it; the run's best and last metrics and
        its plateau count start again. The host, seeds, optimizer and counters stay."""
        if data.input_shape != self.data.input_shape or data.num_classes != self.data.num_classes:
            raise EsperError(
                f"task {data.name} ({data.input_shape}, {data.num_classes} classes) does not fit this host "
                f"({self.data.input_shape}, {self.data.num_classes} classes)"
            )
        self.data = on_device(data, self.device)
        self.observer.set_task(self.data)
        self.best_val, self.plateau, self.last = 0.0, 0, {}

    def host_context(self) -> HostContext:
        """The run's static context, read from the host that is training (``observation.host_context``)."""
        return host_context(self.host)

    def trial_candidates(
        self, candidates: list[tuple[str, str]], steps: int, seed_lr_scale: float = 1.0
    ) -> TrialResult:
        """What-if runs, without changing the run (``trials.run_trials``): from the host's current
        weights, train ``steps`` batches once with the host alone and once per ``(slot, blueprint)``
        of ``candidates`` with that seed fully in that open slot; report the validation loss each
        reaches. EsperError if one of them is not a germination allowed now."""
        plans = []
        for slot_name, name in candidates:
            target = self.host.slot(slot_name)
            entry = self.book.find(name)
            if not target.is_open or entry is None or self.book.why_unfit(entry, target):
                raise EsperError(f"trial: {name!r} in slot {slot_name} is not a germination allowed now")
            plans.append((target, entry))
        return run_trials(
            self.host,
            self.data,
            self.loss,
            plans,
            steps=steps,
            training=self.cfg.training,
            max_seed_params=self.cfg.blueprints.max_seed_params,
            seed_lr_scale=seed_lr_scale,
            epoch=self.epoch,
            step=self.step,
        )

    # ---- bookkeeping ---------------------------------------------------------------------------
    def end_epoch(self, action: ControllerAction) -> dict[str, Any]:
        """Record the epoch's metrics row (with the action taken) and keep a good state."""
        counts = self.host.param_count()
        row = {
            "epoch": self.epoch,
            "step": self.step,
            **{k: v for k, v in self.last.items()},
            "host_params": counts["host"],
            "seed_params": counts["seeds"],
            "total_params": counts["total"],
            "live_seeds": sum(s.stage.is_live for s in self.host.slots.values()),
            "fossilized": sum(s.stage is SeedStage.FOSSILIZED for s in self.host.slots.values()),
            "action": str(action),
        }
        self.history.append(row)
        self.remember_good()
        return row

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run's own state beyond the model's and optimizer's tensors and the RNGs: counters,
        metrics and event logs, each live seed's birth record, the telemetry the next observation
        reads, the governor's state, and under ``blend_snapshots`` the host snapshot each blending
        seed would restore if culled (``optim.HostSnapshot``; everything else is JSON-able).
        ``load_state_dict`` takes it back; ``tolaria.checkpoint`` writes it to disk."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_val": self.best_val,
            "plateau": self.plateau,
            "last": self.last,
            "history": self.history,
            **self.log.state_dict(),
            "host_grad": self._host_grad,
            **self.observer.state_dict(),
            "governor": self.governor.state_dict(),
            "blend_snapshots": dict(self._blend_snapshots),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to the state of ``state_dict`` (the host's seeds, weights and the optimizer already
        restored), then keep it as the governor's rollback point. The probe fields may be missing
        (older checkpoints): the signals are then measured at the next observation."""
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_val, self.plateau = state["best_val"], state["plateau"]
        self.last = state["last"]
        self.history = state["history"]
        self.log.load_state_dict(state)
        self._host_grad = state["host_grad"]
        self.observer.load_state_dict(state, len(self.events))
        self.governor.load_state_dict(state["governor"])
        self._blend_snapshots = dict(state.get("blend_snapshots", {}))
        self.remember_good()

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.training.epochs

    def _on_transition(self, slot: SeedSlot, t: Transition) -> None:
        """A seed's stage changed: its optimizer group and the host snapshot follow, then the log."""
        name = slot.name
        if t.new is SeedStage.GERMINATED and slot.seed is not None:  # a germinated slot holds its seed
            optim.add_seed_group(self.opt, name, slot.seed, self.cfg.training.seed_lr)
        elif t.new is SeedStage.BLENDING:
            self._blend_snapshots[name] = optim.take_host_snapshot(self.host, self.opt)
        elif t.new is SeedStage.CULLED:
            optim.remove_seed_group(self.opt, name)
            snap = self._blend_snapshots.pop(name, None)
            if snap is not None:  # the host adapted to the blended seed: undo that too
                optim.restore_host_snapshot(self.host, self.opt, snap)
        elif t.new is SeedStage.FOSSILIZED:
            self._blend_snapshots.pop(name, None)
        val_acc = self.last.get("val_acc", 0.0)
        self.log.transition(slot, t, epoch=self.epoch, step=self.step, val_acc=val_acc, task=self.data.name)

    # ---- the seed log (``seedlog.SeedLog``) ------------------------------------------------------
    @property
    def events(self) -> list[SeedEvent]:
        """Every transition and rollback of the run so far, in order."""
        return self.log.events

    @property
    def field_reports(self) -> list[FieldReport]:
        """The reports of the seeds that fossilized or were culled so far."""
        return self.log.field_reports

    @property
    def event_hooks(self) -> list[EventHook]:
        """Called with each event as it is recorded (append to add one)."""
        return self.log.hooks

    @property
    def germinations(self) -> int:
        """Germinations so far in this run (culled ones included)."""
        return self.log.count(EventKind.GERMINATE)

    def summary(self) -> dict[str, Any]:
        counts = self.host.param_count()
        return {
            "epochs": self.epoch,
            "final_val_acc": self.last.get("val_acc", 0.0),
            "final_test_acc": self.last.get("test_acc", 0.0),
            "best_val_acc": self.best_val,
            **{f"{k}_params": v for k, v in counts.items()},
            "germinations": self.germinations,
            "fossilizations": self.log.count(EventKind.FOSSILIZE),
            "culls": self.log.count(EventKind.CULL),
            "rollbacks": self.log.count(EventKind.ROLLBACK),
            "architecture": self.host.architecture(),
            "field_reports": [asdict(r) for r in self.field_reports],
        }


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; EsperError for a device this machine lacks."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EsperError(f"training.device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EsperError(f"training.device={name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:  # "cuda" is the current GPU: name it, so that
        device = torch.device("cuda", torch.cuda.current_device())  # tensor.device == device holds
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise EsperError(f"training.device={name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def on_device(data: TaskData, device: torch.device) -> TaskData:
    """``data`` with its splits on ``device`` (the same object when already there)."""
    if data.x_train.device == device:
        return data
    moved = {f"{p}_{s}": getattr(data, f"{p}_{s}").to(device) for p in ("x", "y") for s in ("train", "val", "test")}
    return dataclasses.replace(data, **moved)
