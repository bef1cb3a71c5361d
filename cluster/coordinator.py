"""The coordinator: creates the actors of a run, runs its iterations, and owns the schedule.

One iteration:
  sampling algorithms   weights (one object, broadcast by reference) -> env hosts roll out
                        -> the learner updates on their batches
  off-policy            weights (uniform actions during warm-up) -> env hosts roll out -> the
                        replay-buffer actor -> utd × steps minibatches -> the learner
  gradient algorithms   weights -> gradient workers back-propagate through their shard
                        -> the learner combines the shard gradients and steps
  model-based           real windows -> world-model actor (fit on its ``world_model`` phase)
                        -> gradients through the model -> the learner steps
then every schedule phase whose interval divides the iteration count runs (e.g. ``dual`` for
the Lagrange multiplier on the learner).
All schedule state lives here and in checkpoints, never inside a learner's inner loop.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray

from saferl.actors.env_host import EnvHost, make_vec_env
from saferl.actors.gradient_worker import GradientWorker, ModelGradientWorker, make_diff_env
from saferl.actors.learner import LearnerActor
from saferl.actors.replay import ReplayBuffer
from saferl.actors.world_model import WorldModelActor
from saferl.cluster import rundir
from saferl.cluster.metrics import MetricsLogger
from saferl.config import ConfigError, RunConfig
from saferl.learners.base import EnvSpec

HEALTH_TIMEOUT_S = 5.0  # an actor that does not answer a ping in this long counts as not alive


@dataclass
class ScheduleState:
    iteration: int = 0
    env_steps: int = 0
    gradient_steps: int = 0  # off-policy minibatch updates so far (the clock of schedule.step_phases)
    phase_runs: dict = field(default_factory=dict)  # phase -> times run
    pending_costs: dict = field(default_factory=dict)  # phase -> episode costs since its last run


def sg_python(cfg: RunConfig) -> str:
    """The Safety-Gymnasium interpreter: config, $SAFERL_SG_PYTHON, or the .venv-sg that
    deploy/setup.sh puts beside the main .venv."""
    path = cfg.resources.sg_python or os.environ.get("SAFERL_SG_PYTHON") or str(
        Path(sys.prefix).parent / ".venv-sg" / "bin" / "python")
    if not Path(path).is_file():
        raise ConfigError(f"config error: resources.sg_python: Safety-Gymnasium interpreter {path} "
                          "does not exist (run deploy/setup.sh, or set SAFERL_SG_PYTHON)")
    return path


def host_options(cfg: RunConfig) -> dict:
    opts = {"num_cpus": cfg.resources.num_cpus_per_host}
    if cfg.task_spec.kind == "safety_gymnasium":
        opts["runtime_env"] = {"py_executable": sg_python(cfg)}
    return opts


class Coordinator:
    def __init__(self, cfg: RunConfig, run_dir: Path, console=None, resume: dict | None = None):
        self.cfg, self.run_dir, self.console = cfg, Path(run_dir), console
        self.kind = cfg.algo_spec.kind
        self.state = ScheduleState(**resume["schedule"]) if resume else ScheduleState()
        res = cfg.resources
        self.n_envs = res.num_env_hosts * res.envs_per_host
        self._make_actors()
        if resume:
            ray.get(self.learner.load_state_dict.remote(resume["learner"]))
            if self.kind == "gradient":
                ray.get([w.set_state.remote(sd) for w, sd in zip(self.hosts, resume["workers"])])
            if self.world_model is not None:
                ray.get(self.world_model.load_state_dict.remote(resume["world_model"]))
            if resume.get("replay") is not None:
                ray.get(self.replay.load_state_dict.remote(resume["replay"]))
        self.logger = MetricsLogger(self.run_dir, cfg)
        self._episodes: list[dict] = []  # finished since the last logged row
        self._learner: tuple[float, int] = (0.0, 0)  # this iteration's learner seconds, updates
        self._checkpointed = self.state.iteration if resume else None

    # -- actors ----------------------------------------------------------------------------------
    def _make_actors(self) -> None:
        cfg, res = self.cfg, self.cfg.resources
        seed = cfg.seed * 1000 + self.state.iteration  # fresh env streams after a resume
        if cfg.algo_spec.uses_env_hosts:
            host_cls = ray.remote(EnvHost).options(**host_options(cfg))
            self.hosts = [host_cls.remote(cfg.task, res.envs_per_host, seed, i)
                          for i in range(res.num_env_hosts)]
            spec = ray.get(self.hosts[0].spec.remote())
        else:
            spec = self._env_spec()
        spec = EnvSpec.of(spec).model_dump()
        learner_cls = ray.remote(LearnerActor).options(num_cpus=1, num_gpus=res.num_gpus_per_learner)
        self.learner = learner_cls.remote(cfg.algo, cfg.algo_params, spec, cfg.limit, cfg.seed, cfg.device)
        self.world_model = self.replay = None
        self.act_dim = spec["act_dim"]
        if self.kind == "offpolicy":
            self.step_every = {k: cfg.schedule.step_phases.get(k, 1) for k in cfg.algo_spec.step_phases}
            self.offpolicy = ray.get(self.learner.offpolicy_setup.remote())
            o = self.offpolicy
            self.replay = ray.remote(ReplayBuffer).options(num_cpus=0).remote(
                o["capacity"], o["n_step"], o["gamma"], cfg.seed)
        if self.kind == "gradient":
            setup = ray.get(self.learner.gradient_setup.remote())
            self.horizon, self.stochastic = setup["horizon"], setup["stochastic"]
            opts = {"num_cpus": res.num_cpus_per_host, "num_gpus": res.num_gpus_per_host}
            args = [(cfg.task, i * res.envs_per_host, res.envs_per_host, self.n_envs, cfg.seed, setup["arch"])
                    for i in range(res.num_env_hosts)]
            if cfg.algo_spec.world_model:
                wm = cfg.learner_params().world_model
                self.world_model = ray.remote(WorldModelActor).options(**opts).remote(
                    spec["obs_dim"], spec["act_dim"], wm.model_dump(), cfg.seed, cfg.device)
                worker_cls = ray.remote(ModelGradientWorker).options(**opts)
                self.hosts = [worker_cls.remote(*a, wm.hidden, cfg.device) for a in args]
            else:
                worker_cls = ray.remote(GradientWorker).options(**opts)
                self.hosts = [worker_cls.remote(*a, cfg.device) for a in args]
        self.episode_steps = spec["max_episode_steps"]

    def steps_of(self, iteration: int) -> int:
        """Env steps of iteration ``iteration`` (0-based). A gradient iteration is one window of
        every env; an episode's last window is shorter when h does not divide T."""
        if self.cfg.algo_spec.uses_env_hosts:
            return self.cfg.steps_per_iteration
        T, h = self.episode_steps, self.horizon
        k = iteration % math.ceil(T / h)
        return self.n_envs * min(h, T - k * h)

    def _env_spec(self) -> dict:
        if self.cfg.algo_spec.world_model:  # the real task may be non-differentiable
            vec = make_vec_env(self.cfg.task, 1)
            return {k: getattr(vec, k) for k in EnvSpec.model_fields if hasattr(vec, k)}
        env = make_diff_env(self.cfg.task)
        return {k: getattr(env, k) for k in EnvSpec.model_fields if hasattr(env, k)}

    # -- one iteration ---------------------------------------------------------------------------
    def _sample(self) -> tuple[dict, list]:
        per_env = self.cfg.steps_per_iteration // self.n_envs
        policy = self.learner.numpy_policy.remote()  # one object in the store, read by every host
        refs = [h.rollout.options(num_returns=2).remote(policy, per_env) for h in self.hosts]
        update = self.learner.update.remote([b for b, _ in refs])
        return self._host_summaries(self._timed_update(update, [s for _, s in refs]), refs)

    def _offpolicy(self) -> tuple[dict, list]:
        """Uniform actions until ``warmup_steps``; then utd × (steps this iteration) minibatches,
        drawn after this iteration's transitions are in (Ray runs an actor's calls in order)."""
        st, o = self.state, self.offpolicy
        per_env = self.cfg.steps_per_iteration // self.n_envs
        warm = st.env_steps < o["warmup_steps"]
        policy = {"uniform": True, "act_dim": self.act_dim} if warm else self.learner.numpy_policy.remote()
        refs = [h.rollout.options(num_returns=2).remote(policy, per_env) for h in self.hosts]
        size = self.replay.add.remote(*[b for b, _ in refs])
        metrics = {}
        steps = self.steps_of(st.iteration)
        if st.env_steps + steps >= o["warmup_steps"]:
            n = max(1, round(o["utd"] * steps))
            sample = self.replay.sample.remote(n, o["batch_size"])
            clock = {"first_step": st.gradient_steps + 1, "every": self.step_every} if self.step_every else None
            metrics = self._timed_update(self.learner.update.remote([sample], clock), [size], n)
            st.gradient_steps += n
        metrics["replay/size"] = ray.get(size)
        return self._host_summaries(metrics, refs)

    def _host_summaries(self, metrics: dict, refs: list) -> tuple[dict, list]:
        summaries = ray.get([s for _, s in refs])
        metrics["time/host_inference_s"] = float(np.mean([s["inference_s"] for s in summaries]))
        metrics["time/host_env_s"] = float(np.mean([s["env_s"] for s in summaries]))
        return metrics, [ep for s in summaries for ep in s["episodes"]]

    def _gradients(self) -> tuple[dict, list]:
        weights = self.learner.policy_state.remote()
        refs = [w.compute.options(num_returns=2).remote(weights, self.state.iteration, self.horizon,
                                                        self.stochastic) for w in self.hosts]
        update = self.learner.update.remote([r for r, _ in refs])
        metrics = self._timed_update(update, [s for _, s in refs])
        summaries = ray.get([s for _, s in refs])
        return metrics, [ep for s in summaries for ep in s["episodes"]]

    def _model_gradients(self) -> tuple[dict, list]:
        """Algorithm 3: real window -> world model data (and fit, when scheduled) -> gradients
        through the model from the same start states."""
        it, metrics = self.state.iteration, {}
        weights = self.learner.policy_state.remote()
        refs = [w.collect.options(num_returns=2).remote(weights, it, self.horizon, self.stochastic)
                for w in self.hosts]
        ray.get(self.world_model.add.remote(*[t for t, _ in refs]))
        metrics.update(self._maybe_run_phase("world_model", it + 1, []))
        model = self.world_model.weights.remote()
        results = [w.compute.remote(weights, model, it, self.stochastic) for w in self.hosts]
        metrics.update(self._timed_update(self.learner.update.remote(results), results))
        return metrics, [ep for s in ray.get([s for _, s in refs]) for ep in s["episodes"]]

    def _timed_update(self, update: ray.ObjectRef, inputs: list, n_updates: int = 1) -> dict:
        """The learner's result, timing its share: from when ``inputs`` (the refs its update
        waits on, or small ones finished with them) are ready to when the update returns.
        ``n_updates``: the learner's updates in it (off-policy: minibatches)."""
        ray.wait(inputs, num_returns=len(inputs), fetch_local=False)
        t0 = time.perf_counter()
        out = ray.get(update)
        self._learner = (time.perf_counter() - t0, n_updates)
        return out

    def _maybe_run_phase(self, name: str, iteration: int, episodes: list) -> dict:
        """Run phase ``name`` if its interval divides ``iteration``. The ``dual`` signal is the
        mean cost of the episodes finished since the phase last ran."""
        st = self.state
        st.pending_costs.setdefault(name, []).extend(ep["cost"] for ep in episodes)
        if iteration % self.cfg.phase_every(name):
            return {}
        costs = st.pending_costs[name]
        actor = self.world_model if name == "world_model" else self.learner
        out = ray.get(actor.phase.remote(name, {"episode_cost": float(np.mean(costs)) if costs else None}))
        st.phase_runs[name] = st.phase_runs.get(name, 0) + 1
        st.pending_costs[name] = []
        return out

    def iterate(self) -> dict:
        t0 = time.perf_counter()
        st = self.state
        self._learner = (0.0, 0)
        if self.kind == "sampling":
            metrics, episodes = self._sample()
        elif self.kind == "offpolicy":
            metrics, episodes = self._offpolicy()
        elif self.world_model is not None:
            metrics, episodes = self._model_gradients()
        else:
            metrics, episodes = self._gradients()
        steps = self.steps_of(st.iteration)
        st.iteration += 1
        st.env_steps += steps
        for name in self.cfg.algo_spec.phases:
            if name != "world_model":  # runs inside the model-based iteration
                metrics.update(self._maybe_run_phase(name, st.iteration, episodes))
        self._episodes += episodes
        dt = time.perf_counter() - t0
        learner_s, updates = self._learner
        if updates:  # learner updates per second of learner time (off-policy: minibatches)
            metrics.update({"time/learner_s": learner_s, "learner/updates": updates,
                            "time/learner_updates_per_s": updates / max(learner_s, 1e-9)})
        return {"iteration": st.iteration, "env_steps": st.env_steps, **metrics,
                "cost_limit": self.cfg.limit, "time/iteration_s": dt, "time/env_steps_per_s": steps / dt}

    def _actors(self) -> list:
        return [a for a in [*self.hosts, self.learner, self.world_model, self.replay] if a is not None]

    def _health(self) -> dict:
        """Actors answering a ping (there is no restart logic yet, so no restart counts)."""
        actors = self._actors()
        pings = [a.__ray_ready__.remote() for a in actors]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=HEALTH_TIMEOUT_S)
        alive = 0
        for ref in ready:
            try:
                ray.get(ref)
                alive += 1
            except ray.exceptions.RayError:
                pass
        return {"health/actors_alive": alive, "health/actors": len(actors)}

    def _episode_stats(self) -> dict:
        """Summary of the episodes finished since the last logged row."""
        eps, self._episodes = self._episodes, []
        if not eps:
            return {}
        cost = np.array([e["cost"] for e in eps])
        return {"episode/return": float(np.mean([e["return"] for e in eps])), "episode/cost": float(cost.mean()),
                "episode/length": float(np.mean([e["length"] for e in eps])), "episode/count": len(eps),
                "episode/violation_rate": float(np.mean(cost > self.cfg.limit))}

    # -- the run ---------------------------------------------------------------------------------
    def total_iterations(self) -> int:
        steps = it = 0
        while steps < self.cfg.total_env_steps:
            steps, it = steps + self.steps_of(it), it + 1
        return max(1, it)

    def checkpoint(self) -> Path:
        self._checkpointed = self.state.iteration
        payload = {"algo": self.cfg.algo, "task": self.cfg.task, "config": self.cfg.model_dump(mode="json"),
                   "schedule": asdict(self.state), "learner": ray.get(self.learner.state_dict.remote())}
        if self.kind == "gradient":  # where each shard's episodes are, so a resume continues them
            payload["workers"] = ray.get([w.get_state.remote() for w in self.hosts])
        if self.world_model is not None:
            payload["world_model"] = ray.get(self.world_model.state_dict.remote())
        if self.replay is not None and self.offpolicy["replay_in_checkpoint"]:
            payload["replay"] = ray.get(self.replay.state_dict.remote())
        return rundir.save_checkpoint(self.run_dir, self.state.iteration, payload,
                                      self.cfg.schedule.keep_checkpoints)

    def run(self, stop_after: int | None = None) -> dict:
        """Iterate to the budget (or ``stop_after`` more iterations); checkpoint on schedule and
        at the end. Returns the last logged row."""
        total = self.total_iterations()
        sched = self.cfg.schedule
        last: dict = {}
        done = 0
        while self.state.iteration < total and (stop_after is None or done < stop_after):
            row = self.iterate()
            done += 1
            last = row
            if self.state.iteration % sched.log_every == 0 or self.state.iteration == total:
                row.update(self._episode_stats())
                row.update(self._health())
                self.logger.log(self.state.env_steps, row)
                self._progress(row, total)
            if self.state.iteration % sched.checkpoint_every == 0:
                self.checkpoint()
        if self._checkpointed != self.state.iteration:
            self.checkpoint()
        return last

    def _progress(self, row: dict, total: int) -> None:
        if self.console is None:
            return
        parts = [f"it {row['iteration']}/{total}", f"steps {row['env_steps']:,}"]
        for key, label in (("episode/return", "return"), ("episode/cost", "cost"),
                           ("lagrange_multiplier", "λ"), ("time/env_steps_per_s", "steps/s")):
            if key in row:
                parts.append(f"{label} {row[key]:.3g}" + (f" (limit {row['cost_limit']:.3g})"
                                                          if key == "episode/cost" else ""))
        self.console.print(" | ".join(parts))

    def close(self) -> None:
        self.logger.close()
        for actor in self._actors():
            ray.kill(actor)
