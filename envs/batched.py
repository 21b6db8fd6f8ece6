"""``esper/Morphogenesis-v0`` as a vector env: N episodes whose host epochs train as one batch.

``BatchedMorphogenesisEnv`` (a ``gymnasium.vector.VectorEnv``) runs N episodes of
``MorphogenesisEnv``. Each episode is a real ``MorphogenesisEnv`` object doing its own
bookkeeping through its own public ``reset`` and ``step`` (seed lifecycles, candidates,
legality, observation, mask, reward, info), so the batched env observes and rewards exactly as
N single envs do, whatever their observation format. What is shared is the arithmetic of the
training epochs: each episode's ``Trainer.train_epoch`` is replaced by a request to the
``tolaria.batched.HostStacks``, which train the epochs of every episode that asked for one as
one batch per host skeleton (host weights stacked along a leading axis; see that module).

How the N ``step`` calls meet at an epoch: each episode runs in its own worker thread, one at a
time (strict hand-off, never two at once, so no locking is needed anywhere else). The vector
env starts every episode's call; each runs until it needs an epoch trained (it hands control
back) or it finishes. When every episode has either finished or is waiting, the stack trains all
the waiting epochs at once and hands control back to each in turn; and so on until all finish.
The probe telemetry meets the same way: an episode whose observation needs fresh probe signals
pauses in ``Observer.probe`` (the forward and backward on its probe batch), and the stacks
compute the probes of all such episodes as one batch (``HostStack.probe``); the kernel fits on
the results (``telemetry.SlotProbe``, LAPACK per matrix on the CPU) stay per episode. A thread
switch costs tens of microseconds against milliseconds of training per epoch.

Autoreset: gymnasium's ``NEXT_STEP`` mode, the one RLlib's ``SingleAgentEnvRunner`` (Ray 2.60)
expects: the step after an episode terminated resets that episode (its action is ignored) and
returns the new episode's first observation with reward 0. Episodes reset independently; a
resetting episode's warm-up epoch trains in the same batch as the others' epochs.

Episodes may draw hosts of different skeletons (input shape, depth, layer widths: a task
distribution such as configs/tamiyo.yaml's): the MLP hosts are grouped into one stack per
skeleton (``tolaria.batched.HostStacks``) and each stack trains as one batch. Hosts other than
the MLP, and distillation, train one episode after the other (the env calls
``Trainer.train_epoch`` itself for them): the same results, without the batched speed.

``gymnasium.make_vec("esper/Morphogenesis-v0", num_envs=N, vectorization_mode="vector_entry_point",
**env_config)`` builds it (``envs/__init__.py`` registers the entry point), and so does RLlib
with ``gym_env_vectorize_mode="vector_entry_point"`` (``vector_env_settings``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

from envs.morphogenesis import EnvConfig, MorphogenesisEnv
from esper_ray.config import validate_model
from esper_ray.contracts import EsperError
from esper_ray.tolaria.batched import HostStacks, batchable
from esper_ray.tolaria.trainer import Trainer, resolve_device


class MaskedMultiDiscrete(gym.spaces.MultiDiscrete):
    """The batched action space; ``sample()`` draws, per episode, only actions legal now."""

    masks: list[np.ndarray] | None = None

    def sample(self, mask: Any = None, probability: Any = None) -> np.ndarray:
        if mask is None and probability is None and self.masks is not None:
            rng = self.np_random
            return np.array([rng.choice(np.flatnonzero(m)) for m in self.masks], dtype=self.dtype)
        return super().sample(mask=mask, probability=probability)


class _Worker:
    """One episode's thread: runs calls handed to it, pausing whenever it needs an epoch trained."""

    def __init__(self, index: int):
        self.index = index
        self.go = threading.Semaphore(0)
        self.back = threading.Semaphore(0)
        self.job: Callable[[], Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.waiting = False  # paused for an epoch or a probe
        self.request: tuple[str, Any] = ("epoch", None)  # what it paused for: ("epoch", None), ("probe", trainer)
        self.reply: Any = None  # the answer to a probe request
        self.failed: BaseException | None = None  # the batched work it waited for failed
        self.thread = threading.Thread(target=self._loop, name=f"esper-episode-{index}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.go.acquire()
            job = self.job
            if job is None:
                return
            try:
                self.result, self.error = job(), None
            except BaseException as err:  # handed to the caller's thread, raised there
                self.result, self.error = None, err
            self.job = None
            self.back.release()

    def resume(self) -> None:
        """Let the thread run until it pauses for an epoch or finishes its call (caller's thread)."""
        self.go.release()
        self.back.acquire()

    def pause(self, kind: str, payload: Any = None) -> Any:
        """In the worker's thread: hand control back until the batched work asked for (an epoch, a
        probe) has run; its reply (a probe's activations and gradients)."""
        self.request = (kind, payload)
        self.waiting = True
        self.back.release()
        self.go.acquire()
        if self.failed is not None:
            err, self.failed = self.failed, None
            raise err
        reply, self.reply = self.reply, None
        return reply

    def stop(self) -> None:
        self.job = None
        self.go.release()


class BatchedMorphogenesisEnv(VectorEnv):
    """N episodes of ``esper/Morphogenesis-v0`` trained together; see the module docstring."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, config: EnvConfig | dict[str, Any] | None = None, **fields: Any):
        self._closed_workers = True  # nothing to stop until the workers exist
        self.envs: list[MorphogenesisEnv] = []  # (close() may run on an env whose __init__ raised)
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise EsperError(f"batched env: num_envs must be an integer >= 1, got {num_envs!r}")
        if not isinstance(config, EnvConfig):
            config = validate_model(EnvConfig, {**dict(config or {}), **fields}, "env config")
        resolve_device(config.run.training.device)  # a GPU asked for where none exists: one line, now
        self.config = config
        self.num_envs = num_envs
        self.envs = [MorphogenesisEnv(config) for _ in range(num_envs)]
        self.stacks = HostStacks(num_envs)
        self._workers = [_Worker(i) for i in range(num_envs)]
        self._closed_workers = False
        self._loop = [False] * num_envs  # per row: trains with Trainer.train_epoch (not batchable)
        self._trainers: list[Trainer | None] = [None] * num_envs
        for i, env in enumerate(self.envs):
            # per instance (the class is untouched): this env's runs train through the stacks
            env.make_trainer = self._trainer_maker(i, env.make_trainer)  # type: ignore[method-assign,assignment]
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._space = MaskedMultiDiscrete(np.full(num_envs, self.envs[0].layout.n_actions))
        self.action_space = self._space
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self._started = False

    # ---- hooks into each episode --------------------------------------------------------------
    def _trainer_maker(self, row: int, make: Callable[[int, int], Trainer]) -> Callable[[int, int], Trainer]:
        def make_trainer(task_index: int, train_seed: int) -> Trainer:
            trainer = make(task_index, train_seed)
            why = batchable(trainer)
            self._loop[row] = bool(why)
            if why:
                self.stacks.detach(row)  # its previous run's row, if it had one
            else:
                self.stacks.attach(row, trainer)
            worker = self._workers[row]

            def train_epoch() -> dict[str, float]:
                if threading.current_thread() is worker.thread:
                    worker.pause("epoch")
                else:  # the episode called on its own, outside a batched step (e.g. a checker)
                    self._train([row])
                return trainer.last

            trainer.train_epoch = train_epoch  # type: ignore[method-assign]  # per instance; the class is untouched
            if not why:
                self._batch_probe(trainer, worker)
            self._trainers[row] = trainer
            return trainer

        return make_trainer

    def _run(self, jobs: dict[int, Callable[[], Any]]) -> dict[int, Any]:
        """Run each episode's call, training the epochs they ask for together; their results."""
        workers = self._workers
        for i, job in jobs.items():
            workers[i].job = job
            workers[i].resume()
        while True:
            waiting = [i for i in jobs if workers[i].waiting]
            if not waiting:
                break
            error = None
            try:
                self._serve(waiting)
            except BaseException as err:
                error = err
            self._resume(waiting, error)
            if error is not None:
                self._drain(jobs, error)
                raise error
        for i in jobs:
            failure = workers[i].error
            if failure is not None:
                raise failure
        return {i: workers[i].result for i in jobs}

    def _resume(self, rows: list[int], error: BaseException | None) -> None:
        """Hand control back to each of these paused episodes in turn (with the error of their
        batched epoch, if it failed), until each pauses again or finishes its call."""
        for i in rows:
            self._workers[i].waiting = False
            self._workers[i].failed = error
            self._workers[i].resume()

    def _drain(self, jobs: dict[int, Callable[[], Any]], error: BaseException) -> None:
        """After a failed batched epoch: let every episode still paused finish (each raises
        ``error``), so no thread is left waiting."""
        while paused := [i for i in jobs if self._workers[i].waiting]:
            self._resume(paused, error)

    def _batch_probe(self, trainer: Trainer, worker: _Worker) -> None:
        """Route the run's probe (``Observer.probe``: the forward and backward on the probe batch)
        through the batched step, so the stack computes the probes of every episode that needs one
        at once; the kernel fits on their results stay per episode. A run whose observer has no
        probe to route keeps its own."""
        observer = getattr(trainer, "observer", None)
        own = getattr(observer, "probe", None)
        if observer is None or own is None:
            return

        def probe(host: Any) -> Any:
            if threading.current_thread() is worker.thread and host is trainer.host:
                return worker.pause("probe", trainer)
            return own(host)

        observer.probe = probe

    def _serve(self, rows: list[int]) -> None:
        """The batched work the paused episodes of ``rows`` wait for: their epochs, their probes."""
        workers = self._workers
        probes = [i for i in rows if workers[i].request[0] == "probe"]
        self._train([i for i in rows if workers[i].request[0] == "epoch"])
        if probes:
            trainers = [workers[i].request[1] for i in probes]
            xs = [t.observer.probe_x for t in trainers]
            ys = [t.observer.probe_y for t in trainers]
            for i, reply in zip(probes, self.stacks.probe(probes, xs, ys), strict=True):
                workers[i].reply = reply

    def _train(self, rows: list[int]) -> None:
        """One epoch of these episodes' runs: the MLP hosts batched per skeleton, others one by one."""
        self.stacks.train_epochs([i for i in rows if not self._loop[i]])
        for i in rows:
            trainer = self._trainers[i]
            if self._loop[i] and trainer is not None:
                Trainer.train_epoch(trainer)

    # ---- gym API ------------------------------------------------------------------------------
    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None):
        """Reset every episode (``seed``: an int gives episode i ``seed + i``; or one per episode).
        ``options`` go to every episode, or per episode as ``{"per_env": [options_0, ...]}``."""
        super().reset(seed=seed if isinstance(seed, int) else None)
        seeds = (
            [None if seed is None else seed + i for i in range(self.num_envs)] if not isinstance(seed, list) else seed
        )
        if len(seeds) != self.num_envs:
            raise EsperError(f"batched env reset: {len(seeds)} seeds for {self.num_envs} episodes")
        per_env = (options or {}).get("per_env")
        opts = per_env if per_env is not None else [options] * self.num_envs
        results = self._run(
            {i: partial(self.envs[i].reset, seed=seeds[i], options=opts[i]) for i in range(self.num_envs)}
        )
        self._needs_reset[:] = False
        self._started = True
        obs = [results[i][0] for i in range(self.num_envs)]
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            infos = self._add_info(infos, results[i][1], i)
        self._update_masks()
        return self._batch(obs), infos

    def step(self, actions):
        if not self._started:
            raise EsperError("batched env: step() before reset()")
        actions = np.asarray(actions).reshape(-1)
        if actions.shape[0] != self.num_envs:
            raise EsperError(f"batched env step: {actions.shape[0]} actions for {self.num_envs} episodes")
        for i, env in enumerate(self.envs):  # every action checked before any episode moves
            if self._needs_reset[i]:
                continue
            a = int(actions[i])
            mask = env.action_masks()
            if not 0 <= a < mask.shape[0] or mask[a] == 0:
                raise EsperError(f"episode {i}: action {a} is not legal now (legal: {np.flatnonzero(mask).tolist()})")
        jobs = {}
        for i, env in enumerate(self.envs):
            if self._needs_reset[i]:
                jobs[i] = lambda env=env: env.reset()
            else:
                jobs[i] = lambda env=env, a=int(actions[i]): env.step(a)
        results = self._run(jobs)
        obs, infos = [], {}
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        for i in range(self.num_envs):
            if self._needs_reset[i]:
                o, info = results[i]
                self._needs_reset[i] = False
            else:
                o, r, term, trunc, info = results[i]
                rewards[i], terminated[i], truncated[i] = r, term, trunc
                self._needs_reset[i] = term or trunc
            obs.append(o)
            infos = self._add_info(infos, info, i)
        self._update_masks()
        return self._batch(obs), rewards, terminated, truncated, infos

    def close_extras(self, **kwargs: Any) -> None:
        if not self._closed_workers:
            self._closed_workers = True
            for w in self._workers:
                w.stop()
            for w in self._workers:
                w.thread.join(timeout=5)
        for env in self.envs:
            env.close()

    # ---- helpers ------------------------------------------------------------------------------
    def _batch(self, obs: list[Any]) -> Any:
        out = create_empty_array(self.single_observation_space, self.num_envs)
        return concatenate(self.single_observation_space, obs, out)

    def _update_masks(self) -> None:
        self._space.masks = [env.action_masks() for env in self.envs]

    def action_masks(self) -> np.ndarray:
        """Each episode's current mask, stacked (N, actions)."""
        return np.stack([env.action_masks() for env in self.envs])

    def host_grouping(self) -> dict[str, Any]:
        """How the episodes' current hosts train: rows per host stack (one skeleton each, largest
        first), episodes trained one by one (hosts that do not batch), seed groups vmapped so far."""
        return {
            "stack_rows": sorted((s.attached for s in self.stacks.stacks.values()), reverse=True),
            "not_batched": sum(self._loop),
            "grouped_seed_calls": self.stacks.grouped_calls,
        }

    @property
    def trainers(self) -> list[Trainer | None]:
        """Each episode's current Trainer (None before its first reset)."""
        return list(self._trainers)


BATCHED_ENV_ID = "esper-morphogenesis-batched"
"""The id ``vector_env_settings`` registers ``make_env`` under in Ray's env registry."""


def make_env(env_config: dict[str, Any]) -> gym.Env | VectorEnv:
    """RLlib's env creator: the single env, or, when RLlib asks for its vector entry point (it adds
    ``num_envs`` to the env config), a ``BatchedMorphogenesisEnv`` of that many episodes."""
    fields = dict(env_config)
    num_envs = fields.pop("num_envs", None)
    return MorphogenesisEnv(fields) if num_envs is None else BatchedMorphogenesisEnv(num_envs, fields)


def vector_env_settings(
    env_config: dict[str, Any], num_envs: int, *, local: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keyword arguments of RLlib's ``AlgorithmConfig.environment(...)`` and ``.env_runners(...)``
    that run ``num_envs`` episodes per env runner: N > 1 through this module's batched env (RLlib's
    ``gym_env_vectorize_mode="vector_entry_point"``), N = 1 the single env as it is. ``local``: the
    envs run in this process (no remote env runners), so a host device this machine lacks is one
    ``EsperError`` line now, not an error from inside RLlib's sampling (a remote runner may sit on
    another machine: it is checked there)."""
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise EsperError(f"num_envs_per_env_runner must be an integer >= 1, got {num_envs!r}")
    if local:
        resolve_device(validate_model(EnvConfig, env_config, "env config").run.training.device)
    if num_envs == 1:
        return {"env": MorphogenesisEnv, "env_config": env_config}, {"num_envs_per_env_runner": 1}
    # RLlib takes an env class or a registered id, not a bare function: register the creator under an
    # id of its own (Ray's registry carries it to remote env runners, which have not imported ``envs``).
    from ray.tune.registry import register_env

    register_env(BATCHED_ENV_ID, make_env)
    return {"env": BATCHED_ENV_ID, "env_config": env_config}, {
        "num_envs_per_env_runner": num_envs,
        "gym_env_vectorize_mode": "vector_entry_point",
    }
