"""One iteration per algorithm kind: the actors it needs, and how it collects data and updates.

  SamplingIteration     weights (one object, broadcast by reference) -> env hosts roll out
                        -> the learner updates on their batches
  OffPolicyIteration    weights (uniform actions during warm-up) -> env hosts roll out -> the
                        replay-buffer actor -> utd × steps minibatches -> the learner
  GradientIteration     weights -> gradient workers back-propagate through their shard
                        -> the learner combines the shard gradients and steps
  ModelBasedIteration   real windows -> world-model actor (fit on its ``world_model`` phase)
                        -> gradients through the model -> the learner steps

The coordinator owns the schedule, checkpoints, logging and the run loop. An iteration that runs
a schedule phase inside its own collect step (the world model's fit; the dual phase between
rollouts and update with ``schedule.dual_before_update``) names it in ``phases_in_collect`` and
asks the coordinator's ``run_phase`` for it, so when a phase runs is still decided in one place.
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from saferl.actors import inference
from saferl.actors.env_host import EnvHost, make_vec_env
from saferl.actors.gradient_worker import GradientWorker, ModelGradientWorker, make_diff_env
from saferl.actors.learner import LearnerActor
from saferl.actors.replay import ReplayBuffer
from saferl.actors.world_model import WorldModelActor
from saferl.cluster.faults import stream_seed
from saferl.cluster.placement import colocate, host_options
from saferl.config import RunConfig
from saferl.learners.base import EnvSpec

# run_phase(name, iteration, episodes) -> the phase's metrics ({} when its interval does not divide)
PhaseRunner = Callable[[str, int, list], dict]


def with_safeguard_failures(metrics: dict, summaries: list[dict]) -> dict:
    """``health/safeguard_failures``: safeguard solves that fell back so far, over the hosts' /
    workers' processes (a restarted one starts again from 0)."""
    metrics["health/safeguard_failures"] = int(sum(s.get("safeguard_failures", 0) for s in summaries))
    return metrics


def episodes_of(summaries: list[dict]) -> list[dict]:
    return [ep for s in summaries for ep in s["episodes"]]


class KindIteration(ABC):
    """The actors of one algorithm kind and its collect step. ``hosts`` are env hosts or
    gradient workers; ``replay``, ``world_model`` and ``inference`` are None where the kind has none."""

    phases_in_collect: frozenset[str] = frozenset()

    def __init__(self, cfg: RunConfig, state, run_phase: PhaseRunner):
        self.cfg, self.state, self.run_phase = cfg, state, run_phase
        res = cfg.resources
        self.n_envs = res.num_env_hosts * res.envs_per_host
        self.hosts: list = []
        # Ray actor handles (typed Any: Ray's handles are not typed by method), None where the kind has none
        self.learner: Any = None
        self.replay: Any = None
        self.world_model: Any = None
        self.inference: Any = None
        self.placement_group: Any = None
        self.learner_time: tuple[float, int] = (0.0, 0)  # this iteration's learner seconds, updates
        self._make_actors()

    @abstractmethod
    def _make_actors(self) -> None:
        """Create ``hosts``, ``learner`` and the kind's other actors; set ``spec`` (EnvSpec dump)."""

    @abstractmethod
    def collect(self) -> tuple[dict, list]:
        """Collect one iteration's data and update the learner on it: (metrics, finished episodes)."""

    def steps_of(self, iteration: int) -> int:
        """Env steps of iteration ``iteration`` (0-based)."""
        return self.cfg.steps_per_iteration

    def total_iterations(self) -> int:
        """Iterations to the budget (the last one may pass it)."""
        steps = it = 0
        while steps < self.cfg.total_env_steps:
            steps, it = steps + self.steps_of(it), it + 1
        return max(1, it)

    def actors(self) -> list:
        return [a for a in [*self.hosts, self.learner, self.world_model, self.replay, self.inference]
                if a is not None]

    def checkpoint_state(self) -> dict:
        """Kind-specific parts of a checkpoint besides the learner and the hosts' states."""
        return {}

    def load_checkpoint_state(self, resume: dict) -> None:
        """Put the kind's actors back to a checkpoint's ``resume`` (the learner is loaded by the caller)."""
        if resume.get("workers"):  # env hosts' / gradient workers' states, where they have one
            ray.get([w.set_state.remote(sd) for w, sd in zip(self.hosts, resume["workers"]) if sd is not None])

    def learner_options(self) -> dict:
        return {"num_cpus": 1, "num_gpus": self.cfg.resources.num_gpus_per_learner}

    def _make_learner(self, spec: dict, options: dict):
        self.spec = EnvSpec.of(spec).model_dump()
        cfg = self.cfg
        return ray.remote(LearnerActor).options(**options).remote(
            cfg.algo, cfg.algo_params, self.spec, cfg.limit, cfg.seed, cfg.device)

    def timed_update(self, update: ray.ObjectRef, inputs: list, n_updates: int = 1) -> dict:
        """The learner's result, timing its share: from when ``inputs`` (the refs its update
        waits on, or small ones finished with them) are ready to when the update returns.
        ``n_updates``: the learner's updates in it (off-policy: minibatches)."""
        ray.wait(inputs, num_returns=len(inputs), fetch_local=False)
        t0 = time.perf_counter()
        out = ray.get(update)
        self.learner_time = (time.perf_counter() - t0, n_updates)
        return out


# -- env hosts: sampling and off-policy --------------------------------------------------------------
class EnvHostIteration(KindIteration):
    """Env hosts roll out with the learner's weights, or the inference server acts for them."""

    def _make_actors(self) -> None:
        cfg, res = self.cfg, self.cfg.resources
        seed = cfg.seed * 1000 + self.state.iteration  # fresh env streams after a resume
        host_cls = ray.remote(EnvHost).options(**host_options(cfg), max_restarts=res.max_actor_restarts)
        self.hosts = [host_cls.remote(cfg.task, res.envs_per_host, seed, i, on_invalid=cfg.checks.on_invalid)
                      for i in range(res.num_env_hosts)]
        spec = ray.get(self.hosts[0].spec.remote())
        if res.inference == "server":  # one batched forward for every host, on its GPU if granted
            self.inference = ray.remote(inference.InferenceServer).options(
                num_cpus=1, num_gpus=res.inference_gpus, max_restarts=res.max_actor_restarts
            ).remote(spec["act_low"], spec["act_high"], cfg.device)
        self.learner = self._make_learner(spec, self.learner_options())

    def rollouts(self, policy) -> list:
        """Each host's (batch, summary) refs for this iteration."""
        per_env = self.cfg.steps_per_iteration // self.n_envs
        if self.inference is None:
            return [h.rollout.options(num_returns=2).remote(policy, per_env) for h in self.hosts]
        return inference.rollout(self.hosts, self.inference, policy, per_env, stream_seed(self.cfg.seed, self.state))

    def host_summaries(self, metrics: dict, refs: list) -> tuple[dict, list]:
        summaries = ray.get([s for _, s in refs])
        metrics["time/host_inference_s"] = float(np.mean([s["inference_s"] for s in summaries]))
        if self.inference is not None:
            metrics["time/server_inference_s"] = ray.get(self.inference.stats.remote())["inference_s"]
        metrics["time/host_env_s"] = float(np.mean([s["env_s"] for s in summaries]))
        metrics["health/skipped_episodes"] = int(sum(s.get("skipped_episodes", 0) for s in summaries))
        metrics["health/clipped_action_frac"] = float(np.mean([s.get("clipped_action_frac", 0.0) for s in summaries]))
        return with_safeguard_failures(metrics, summaries), episodes_of(summaries)


class SamplingIteration(EnvHostIteration):
    """Rollouts, then the update on them. With ``schedule.dual_before_update`` the dual phase
    runs in between, on this iteration's episodes (the update then waits for the summaries)."""

    def __init__(self, cfg: RunConfig, state, run_phase: PhaseRunner):
        self.phases_in_collect = frozenset({"dual"} if cfg.schedule.dual_before_update else ())
        super().__init__(cfg, state, run_phase)

    def collect(self) -> tuple[dict, list]:
        policy = self.learner.numpy_policy.remote()  # one object in the store, read by every host
        refs = self.rollouts(policy)
        batches = [b for b, _ in refs]
        if not self.phases_in_collect:
            update = self.learner.update.remote(batches)
            return self.host_summaries(self.timed_update(update, [s for _, s in refs]), refs)
        metrics, episodes = self.host_summaries({}, refs)
        metrics.update(self.run_phase("dual", self.state.iteration + 1, episodes))
        return {**self.timed_update(self.learner.update.remote(batches), batches), **metrics}, episodes


class OffPolicyIteration(EnvHostIteration):
    """Uniform actions until ``warmup_steps``; then utd × (steps this iteration) minibatches,
    drawn after this iteration's transitions are in (Ray runs an actor's calls in order). With
    ``schedule.pipeline`` the next iteration's rollouts are launched before this update, with the
    weights from before it, so the hosts step while the learner trains; they are the next
    iteration's data (``pending``, kept in checkpoints, so a resumed run continues the same way)."""

    def _make_actors(self) -> None:
        super()._make_actors()
        cfg = self.cfg
        # the off-policy phases' intervals count minibatch updates (schedule.step_phases)
        self.step_every = {k: cfg.schedule.step_phases.get(k, 1) for k in cfg.algo_spec.step_phases}
        self.offpolicy = o = ray.get(self.learner.offpolicy_setup.remote())
        self.replay = ray.remote(ReplayBuffer).options(num_cpus=0).remote(
            o["capacity"], o["n_step"], o["gamma"], cfg.seed, o["cost_normalize"])
        self.pending: list | None = None  # (batch, summary) refs of the next iteration's rollouts
        self.iterations = self.total_iterations()

    def launch(self, env_steps: int) -> list:
        """Rollouts of an iteration starting at ``env_steps``, with the learner's current weights
        (uniform actions before ``warmup_steps``)."""
        if env_steps < self.offpolicy["warmup_steps"]:
            return self.rollouts({"uniform": True, "act_dim": self.spec["act_dim"]})
        return self.rollouts(self.learner.numpy_policy.remote())

    def collect(self) -> tuple[dict, list]:
        refs, self.pending = self.pending or self.launch(self.state.env_steps), None
        try:
            return self._collect(refs)
        except BaseException:
            self.pending = None  # a retried iteration collects afresh
            raise

    def _collect(self, refs: list) -> tuple[dict, list]:
        st, o = self.state, self.offpolicy
        size = self.replay.add.remote(*[b for b, _ in refs])
        # the learner sees this iteration's rollouts before its update (FAC-SIS: the index loss's
        # on-policy transitions; per-episode safe-action violations)
        per_episode = (self.learner.observe_rollouts.remote(*[b for b, _ in refs])
                       if o.get("observe_rollouts") else None)
        replay_size = ray.get(size)  # a dead host fails the iteration before any update
        metrics = {}
        steps = self.steps_of(st.iteration)
        if self.cfg.schedule.pipeline and st.iteration + 1 < self.iterations:
            self.pending = self.launch(st.env_steps + steps)  # asked of the learner before this update
        if st.env_steps + steps >= o["warmup_steps"]:
            n = max(1, round(o["utd"] * steps))
            sample = self.replay.sample.remote(n, o["batch_size"])
            clock = {"first_step": st.gradient_steps + 1, "every": self.step_every} if self.step_every else None
            metrics = self.timed_update(self.learner.update.remote([sample], clock), [size], n)
            st.gradient_steps += n
        metrics["replay/size"] = replay_size
        metrics, episodes = self.host_summaries(metrics, refs)
        if per_episode is not None:
            extra = ray.get(per_episode)
            if len(extra) != len(episodes):
                raise RuntimeError(f"learner counted {len(extra)} finished episodes, the hosts {len(episodes)}")
            episodes = [{**ep, **x} for ep, x in zip(episodes, extra)]  # same episodes; only means are logged
        return metrics, episodes

    def checkpoint_state(self) -> dict:
        out = {"pending": [tuple(ray.get(list(r))) for r in self.pending]} if self.pending else {}
        if self.offpolicy["replay_in_checkpoint"]:
            out["replay"] = ray.get(self.replay.state_dict.remote())
        return out

    def load_checkpoint_state(self, resume: dict) -> None:
        super().load_checkpoint_state(resume)
        if resume.get("replay") is not None:
            ray.get(self.replay.load_state_dict.remote(resume["replay"]))
        if resume.get("pending"):
            self.pending = [(ray.put(b), ray.put(s)) for b, s in resume["pending"]]


# -- gradient workers: analytic gradients, through the simulator or a world model ---------------------
class GradientIteration(KindIteration):
    """Gradient workers back-propagate through their shard's window; the learner combines them.
    CGPO (eq 18) first proposes its step and every worker re-rolls its window with it."""

    def _env_spec(self) -> dict:
        return EnvSpec.of_env(make_diff_env(self.cfg.task)).model_dump()

    def _make_actors(self) -> None:
        cfg, res = self.cfg, self.cfg.resources
        # The learner, its gradient workers and world model exchange weights and gradients every
        # iteration: one placement group keeps them on one node when they fit there.
        opts = {"num_cpus": res.num_cpus_per_host, "num_gpus": res.num_gpus_per_host,
                "max_restarts": res.max_actor_restarts}
        group = [self.learner_options()]
        group += [opts] * (res.num_env_hosts + bool(cfg.algo_spec.world_model))
        placed, self.placement_group = colocate(group)
        self.learner = self._make_learner(self._env_spec(), placed[0])
        self.episode_steps = self.spec["max_episode_steps"]
        setup = ray.get(self.learner.gradient_setup.remote())
        self.horizon, self.stochastic = setup["horizon"], setup["stochastic"]
        self.ratio_test = setup.get("ratio_test", False)
        args = [(cfg.task, i * res.envs_per_host, res.envs_per_host, self.n_envs, cfg.seed, setup["arch"])
                for i in range(res.num_env_hosts)]
        self._make_workers(args, placed[1:])

    def _make_workers(self, args: list, placed: list) -> None:
        self.hosts = [ray.remote(GradientWorker).options(**o).remote(*a, self.cfg.device) for a, o in zip(args, placed)]

    def steps_of(self, iteration: int) -> int:
        """A gradient iteration is one window of every env; an episode's last window is shorter
        when h does not divide T."""
        T, h = self.episode_steps, self.horizon
        k = iteration % math.ceil(T / h)
        return self.n_envs * min(h, T - k * h)

    def load_checkpoint_state(self, resume: dict) -> None:
        ray.get([w.set_state.remote(sd) for w, sd in zip(self.hosts, resume["workers"]) if sd is not None])

    def collect(self) -> tuple[dict, list]:
        weights = self.learner.policy_state.remote()
        refs = [w.compute.options(num_returns=2).remote(weights, self.state.iteration, self.horizon,
                                                        self.stochastic) for w in self.hosts]
        update, evaluations = self.update_after_ratio_test([r for r, _ in refs])
        metrics = self.timed_update(update, [s for _, s in refs] + evaluations)
        summaries = ray.get([s for _, s in refs])
        return with_safeguard_failures(metrics, summaries), episodes_of(summaries)

    def update_after_ratio_test(self, results: list) -> tuple[ray.ObjectRef, list]:
        """The learner's update of the workers' ``results`` and the refs it waits on besides them.
        For CGPO (eq 18) the learner first proposes its step, every worker re-rolls its window
        forward only with it, and the update gets those evaluations: nothing is committed before
        every worker answered, so a worker lost on the way fails the attempt as before."""
        if not self.ratio_test:
            return self.learner.update.remote(results), []
        trial = self.learner.propose.remote(results)
        evaluations = [w.evaluate.remote(trial) for w in self.hosts]
        return self.learner.update.remote(results, None, evaluations), evaluations


class ModelBasedIteration(GradientIteration):
    """Algorithm 3 (MB-CGPO): real window -> world model data (and fit, when scheduled) ->
    gradients through the model from the same start states."""

    phases_in_collect = frozenset({"world_model"})

    def _env_spec(self) -> dict:
        # the real task may be non-differentiable
        return EnvSpec.of_env(make_vec_env(self.cfg.task, 1)).model_dump()

    def _make_workers(self, args: list, placed: list) -> None:
        cfg = self.cfg
        wm = cfg.learner_params().world_model
        self.world_model = ray.remote(WorldModelActor).options(**placed[-1]).remote(
            self.spec["obs_dim"], self.spec["act_dim"], wm.model_dump(), cfg.seed, cfg.device)
        worker_cls = ray.remote(ModelGradientWorker)
        self.hosts = [worker_cls.options(**o).remote(*a, wm.hidden, cfg.device) for a, o in zip(args, placed[:-1])]

    def load_checkpoint_state(self, resume: dict) -> None:
        super().load_checkpoint_state(resume)
        ray.get(self.world_model.load_state_dict.remote(resume["world_model"]))

    def collect(self) -> tuple[dict, list]:
        it, metrics = self.state.iteration, {}
        weights = self.learner.policy_state.remote()
        refs = [w.collect.options(num_returns=2).remote(weights, it, self.horizon, self.stochastic)
                for w in self.hosts]
        ray.get(self.world_model.add.remote(*[t for t, _ in refs]))
        metrics.update(self.run_phase("world_model", it + 1, []))
        model = self.world_model.weights.remote()
        results = [w.compute.remote(weights, model, it, self.stochastic) for w in self.hosts]
        update, evaluations = self.update_after_ratio_test(results)
        metrics.update(self.timed_update(update, results + evaluations))
        return metrics, episodes_of(ray.get([s for _, s in refs]))


def iteration_class(algo_spec) -> type[KindIteration]:
    """The iteration class of an algorithm's kind (``registry.AlgoSpec``)."""
    if algo_spec.kind == "gradient":
        return ModelBasedIteration if algo_spec.world_model else GradientIteration
    return {"sampling": SamplingIteration, "offpolicy": OffPolicyIteration}[algo_spec.kind]


def make_iteration(cfg: RunConfig, state, run_phase: PhaseRunner) -> KindIteration:
    """The iteration of ``cfg``'s algorithm kind, with its actors created."""
    return iteration_class(cfg.algo_spec)(cfg, state, run_phase)
