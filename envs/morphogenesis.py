"""``esper/Morphogenesis-v0``: one host training run as a Gymnasium environment.

Each episode trains a fresh host on a task drawn from a task distribution (the
training tasks, or the held-out ones). Each step is a decision point: the agent
(Tamiyo) picks one germination decision, then the host trains ``decide_every``
epochs until the next decision point.

Observation: a Dict with exactly two keys, as RLlib's action-masking modules expect:

- ``observations``: float32 vector (``esper_ray.tamiyo.encoding``): sets padded to
  ``max_slots`` slots and K candidates: global telemetry (progress, accuracy, losses,
  plateau, seed share, generic task statistics; nothing that names the task or its
  family), one row per slot (stage, alpha, epochs in stage, relative depth, activation
  statistics, gradient norms and signals, ablation contribution, seed size), one row per
  candidate blueprint (its features, so the policy can judge blueprints it never saw),
  and the cost of each candidate in each slot;
- ``action_mask``: float32 0/1 over the actions, 1 where legal now.

Each task may bring its own host (``TaskConfig.host``; else ``run.host``), so one env
serves hosts of different depths and kinds; a host with more than ``max_slots`` slots is
refused with one line.

The per-slot probe signals (activation statistics, gradient RMS, ``grad_predictability``,
``grad_deficit``) are measured after every lifecycle transition and otherwise every
``run.training.signal_every`` epochs (default ``SIGNAL_EVERY``), and reused in between;
everything else is fresh at every step. The test split
is scored once, when the episode ends (``info["test_acc"]`` is None before that).

Action: Discrete(1 + S*K + 2*S) with S = ``max_slots``: wait, germinate(slot s,
candidate k), fossilize(s), cull(s) (``esper_ray.tamiyo.encoding.ActionSpace``; slot s is
the host's s-th slot from the input). An action outside the mask
raises ``EsperError``; nothing is silently ignored.

Reward per step::

    r = (val_acc_after - val_acc_before)
        - param_cost  * (seed_params_after - seed_params_before) / host_params
        - action_cost * [action is not wait]

so an episode's return is the validation accuracy gained over the run minus the
relative size of what was grown (times ``param_cost``) and the actions' costs. In
distillation mode the accuracy is the student's.
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium as gym
import numpy as np
from pydantic import Field, model_validator

from esper_ray.config import RunConfig, StrictModel, validate_model
from esper_ray.contracts import ControllerAction, EnvInfo, EsperError, EventKind, Observation
from esper_ray.tamiyo.encoding import ActionSpace, ObsEncoder, SetLayout
from esper_ray.tasks import TaskConfig, TaskDistribution, load_task, sample_tasks
from esper_ray.tolaria.trainer import Trainer

_WAIT = ControllerAction.wait()

SIGNAL_EVERY = 8
"""The env's default ``training.signal_every``. The probe telemetry (the kernel gradient signals
and activation statistics, a sizeable share of a small host's epoch; cheaper on a frozen host,
whose fits are kept) is refreshed at once after every lifecycle transition or rollback, and
otherwise every 8 epochs. What that buys in env throughput (``benchmarks/env_throughput.py``), and
why policies trained at another interval play the same at 8, is in BENCHMARKS.md ("Other
measurements" and "Measurements behind the code")."""


class MaskedDiscrete(gym.spaces.Discrete):
    """Discrete whose ``sample()`` draws only actions legal now (the env keeps ``mask`` current).

    Random exploration and ``gymnasium.utils.env_checker`` sample from the action space;
    with this they never hit the env's error for an action outside the mask.
    """

    mask: np.ndarray | None = None

    def sample(self, mask: np.ndarray | None = None, probability: np.ndarray | None = None) -> np.int64:
        if mask is None and probability is None and self.mask is not None:
            mask = self.mask.astype(np.int8)
        return super().sample(mask=mask, probability=probability)


class RewardConfig(StrictModel):
    """The reward's costs (see the module docstring)."""

    param_cost: float = Field(0.02, ge=0, description="per host-sized amount of seed parameters")
    action_cost: float = Field(
        0.01,
        ge=0,
        description="per non-wait action (at 0.001 PPO on MNIST-1D kept germinating seeds only to cull them the next "
        "epoch: 9 germinations an episode; at 0.01, 3 and no culls, and higher accuracy)",
    )


def _default_train_tasks() -> list[TaskConfig]:
    return [TaskConfig(family="mnist1d", seed=s) for s in range(4)] + [
        TaskConfig(family="bottleneck", seed=s, bottleneck_slot=k, input_dim=40) for s in range(4) for k in range(3)
    ]


def _default_heldout_tasks() -> list[TaskConfig]:
    return [TaskConfig(family="mnist1d", seed=100 + s) for s in range(3)] + [
        TaskConfig(family="bottleneck", seed=100 + s, bottleneck_slot=k, input_dim=40)
        for s in range(2)
        for k in range(3)
    ]


def _default_run() -> RunConfig:
    return RunConfig(
        name="episode",
        training={"epochs": 30, "signal_every": SIGNAL_EVERY},
        lifecycle={"min_training_epochs": 2, "min_holding_epochs": 1, "alpha": {"steps": 96}},
        lineage={"enabled": False},
    )


class EnvConfig(StrictModel):
    """What an episode trains, on which tasks, and what it rewards."""

    run: RunConfig = Field(default_factory=_default_run)
    train_tasks: list[TaskConfig] = Field(default_factory=_default_train_tasks)
    heldout_tasks: list[TaskConfig] = Field(default_factory=_default_heldout_tasks)
    split: Literal["train", "heldout"] = "train"
    warmup_epochs: int = Field(1, ge=1, description="epochs trained before the first decision")
    reward: RewardConfig = RewardConfig()
    distill: dict[str, Any] | None = Field(None, description="distillation mode settings (tolaria.distill)")
    shuffle_candidates: bool = Field(
        False,
        description="train split: show the K candidates in a random order, fixed per episode, so a policy "
        "learns to judge blueprints by their features rather than by their place in the catalogue",
    )
    task_hosts: bool = Field(True, description="tasks that ship a pre-trained host (bottleneck) start from it, frozen")
    train_distribution: TaskDistribution | None = Field(
        None, description="draw the training tasks from these families (replaces train_tasks)"
    )
    heldout_distribution: TaskDistribution | None = Field(
        None, description="draw the held-out tasks from these families (replaces heldout_tasks)"
    )
    max_slots: int = Field(
        6, ge=1, description="slot positions in the observation and action space (the policy's maximum)"
    )

    @model_validator(mode="after")
    def _draw_tasks(self) -> EnvConfig:
        # sample_tasks is a pure function of the distribution: every env runner draws the same tasks.
        if self.train_distribution is not None:
            self.train_tasks = sample_tasks(self.train_distribution)
        if self.heldout_distribution is not None:
            self.heldout_tasks = sample_tasks(self.heldout_distribution)
        return self

    @property
    def tasks(self) -> list[TaskConfig]:
        return self.train_tasks if self.split == "train" else self.heldout_tasks


class MorphogenesisEnv(gym.Env):
    """One host training run; actions are germination decisions. See the module docstring."""

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | dict[str, Any] | None = None, **fields: Any):
        # gym.make (and so RLlib) passes the env config as keyword arguments.
        if not isinstance(config, EnvConfig):
            config = validate_model(EnvConfig, {**dict(config or {}), **fields}, "env config")
        if not config.tasks:
            raise EsperError(f"env config: no {config.split} tasks")
        self.config = config
        self.layout = SetLayout(config.max_slots, config.run.blueprints.max_candidates)
        self.encoder = ObsEncoder(self.layout)
        self.space = ActionSpace((), self.layout.k, self.layout.max_slots)  # the host's slots at reset
        self._actions = MaskedDiscrete(self.layout.n_actions)  # typed: _observe keeps its mask current
        self.action_space = self._actions
        self.observation_space = gym.spaces.Dict(
            {
                "observations": gym.spaces.Box(-np.inf, np.inf, (self.encoder.size,), np.float32),
                "action_mask": gym.spaces.Box(0.0, 1.0, (self.space.n,), np.float32),
            }
        )
        self.trainer: Trainer | None = None
        self.task: TaskConfig | None = None
        self._mask = np.zeros(self.space.n, np.float32)

    # ---- gym API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        tasks = self.config.tasks
        index = options.get("task_index", int(self.np_random.integers(len(tasks))))
        train_seed = options.get("train_seed", int(self.np_random.integers(2**31)))
        self.trainer = self.make_trainer(index, train_seed)
        slots = tuple(self.trainer.host.slots)
        family = tasks[index].family  # the task make_trainer just chose
        self.layout.check_fits(len(slots), 0, f"the env (task {family}, max_slots)")
        self.space = ActionSpace(slots, self.layout.k, self.layout.max_slots)
        self._order: dict[str, float] = {}  # content hash -> sort key (shuffle_candidates)
        for _ in range(self.config.warmup_epochs):
            self.trainer.train_epoch()
            self.trainer.end_epoch(_WAIT)
        self.start_acc = self.trainer.last["val_acc"]
        self.actions_taken = 0
        return self._observe(), self._info()

    def step(self, action: int):
        trainer = self.trainer
        if trainer is None:
            raise EsperError("step() before reset()")
        a = int(action)
        if not 0 <= a < self.space.n or self._mask[a] == 0:
            legal = np.flatnonzero(self._mask).tolist()
            raise EsperError(f"action {a} is not legal now (legal: {legal})")
        decision = self.space.decode(a, self._candidates)
        acc_before = trainer.last["val_acc"]
        params_before = trainer.host.param_count()["seeds"]
        trainer.apply(decision)
        trainer.end_epoch(decision)
        self.actions_taken += a != 0
        for i in range(trainer.cfg.controller.decide_every):
            if trainer.done:
                break
            trainer.train_epoch()
            if i < trainer.cfg.controller.decide_every - 1:
                trainer.end_epoch(_WAIT)
        params_after = trainer.host.param_count()
        r = self.config.reward
        reward = (
            trainer.last["val_acc"]
            - acc_before
            - r.param_cost * (params_after["seeds"] - params_before) / max(params_after["host"], 1)
            - r.action_cost * (a != 0)
        )
        terminated = trainer.done
        if terminated:
            trainer.end_epoch(_WAIT)
        return self._observe(), float(reward), terminated, False, self._info()

    # ---- helpers ---------------------------------------------------------------------------
    def make_trainer(self, task_index: int, train_seed: int) -> Trainer:
        """A fresh Trainer for task ``task_index`` of the current split, seeded ``train_seed``."""
        self.task = self.config.tasks[task_index]
        base = self.config.run
        data = load_task(self.task)
        training: dict[str, Any] = {"seed": train_seed, "eval_test": False}  # test scored once, at the end
        if data.host_init is not None and self.config.task_hosts:
            # A task that ships a (damaged) pre-trained host: start from it, frozen, so the
            # only way to the missing capacity is a seed in the right slot.
            training.update(host_init="task", freeze_host=True)
        update: dict[str, Any] = {"task": self.task, "training": base.training.model_copy(update=training)}
        if self.task.host is not None:
            update["host"] = self.task.host
        run = base.model_copy(update=update)
        loss_fn = None
        if self.config.distill is not None:
            from esper_ray.tolaria.distill import make_distillation

            loss_fn = make_distillation(self.config.distill, data, run)
        return Trainer(run, data, run_id=f"episode-{train_seed}", loss_fn=loss_fn)

    def _live(self) -> Trainer:
        if self.trainer is None:
            raise EsperError("step() before reset()")
        return self.trainer

    def _observe(self) -> dict[str, np.ndarray]:
        trainer = self._live()
        trainer.refresh_candidates()
        if self.config.shuffle_candidates and self.config.split == "train":
            for entry in trainer.candidates:  # a newcomer mid-episode gets a random place too
                self._order.setdefault(entry.content_hash, float(self.np_random.random()))
            trainer.order_candidates(key=lambda e: self._order[e.content_hash])
        obs = trainer.observe()
        self._candidates = obs.candidates
        self._mask = self.space.mask(trainer.legal_actions(), obs.candidates).astype(np.float32)
        self._actions.mask = self._mask
        return {"observations": self.encoder.encode(obs), "action_mask": self._mask.copy()}

    def _info(self) -> EnvInfo:
        t = self._live()
        summary: EnvInfo = {
            "task": t.data.name,
            "epoch": t.epoch,
            "val_acc": t.last["val_acc"],
            "test_acc": t.last["test_acc"] if t.done else None,  # scored once, at the end
            "start_val_acc": self.start_acc,
            "seed_params": t.host.param_count()["seeds"],
            "actions": self.actions_taken,
            "germinated_slots": [e["slot"] for e in t.events if e.get("kind") == EventKind.GERMINATE],
            "ground_truth_slot": t.data.meta.get("ground_truth_slot", ""),
        }
        return summary

    def encode_action(self, action: ControllerAction, obs: Observation) -> int:
        """The index of ``action`` at the decision point ``obs`` (of this episode's host)."""
        return self.space.encode(action, obs.candidates)

    def action_masks(self) -> np.ndarray:
        """The current mask (the convention of sb3-contrib's MaskablePPO, for convenience)."""
        return self._mask.copy()
