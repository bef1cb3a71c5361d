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
the Lagrange multiplier on the learner; with ``schedule.dual_before_update`` a sampling
algorithm's dual phase runs between its rollouts and its update instead).
All schedule state lives here and in checkpoints, never inside a learner's inner loop; what
happens when an actor dies (restart, restore, retry) lives in ``cluster/faults.py``.
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
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from saferl.actors import inference
from saferl.actors.env_host import EnvDataError, EnvHost, make_vec_env
from saferl.actors.gradient_worker import GradientWorker, ModelGradientWorker, make_diff_env
from saferl.actors.learner import LearnerActor
from saferl.actors.replay import ReplayBuffer
from saferl.actors.world_model import WorldModelActor
from saferl.cluster import rundir
from saferl.cluster.faults import ActorFaults, stream_seed
from saferl.cluster.metrics import MetricsLogger, eta
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
    restarts: int = 0  # env hosts / gradient workers / world models restarted after dying


def sg_python(cfg: RunConfig) -> str:
    """The Safety-Gymnasium interpreter: config, $SAFERL_SG_PYTHON, or the .venv-sg that
    deploy/setup.sh puts beside the main .venv."""
    path = cfg.resources.sg_python or os.environ.get("SAFERL_SG_PYTHON") or str(
        Path(sys.prefix).parent / ".venv-sg" / "bin" / "python")
    if not Path(path).is_file():
        raise ConfigError(f"config error: resources.sg_python: Safety-Gymnasium interpreter {path} "
                          "does not exist (run deploy/setup.sh, or set SAFERL_SG_PYTHON)")
    return path


def _in_placement_group() -> bool:
    """This process runs in a placement group that captures its actors (a sweep trial)."""
    return ray.is_initialized() and ray.util.get_current_placement_group() is not None


def host_options(cfg: RunConfig) -> dict:
    # SPREAD: env hosts are the CPU-heavy part, so they go to as many nodes as there are; inside
    # a placement group (a `saferl sweep` trial's) they stay in it: its bundles hold them.
    opts = {"num_cpus": cfg.resources.num_cpus_per_host}
    if not _in_placement_group():
        opts["scheduling_strategy"] = "SPREAD"
    if cfg.task_spec.kind == "safety_gymnasium":
        opts["runtime_env"] = {"py_executable": sg_python(cfg)}
    elif cfg.task_spec.kind == "custom":  # its package (py_modules) and spec travel to every host
        from saferl.envs.custom import runtime_env

        opts["runtime_env"] = runtime_env(cfg.task)
    return opts


def colocate(options: list[dict]) -> tuple[list[dict], PlacementGroup | None]:
    """Actor options that place the actors given by ``options`` (each ``num_cpus`` /
    ``num_gpus``, fractions allowed) in one placement group, one bundle each: STRICT_PACK (one
    node) when some alive node's totals hold them all, else PACK (as few nodes as possible).
    Returns the options with a ``scheduling_strategy`` added, and the group (None for one actor)."""
    if len(options) < 2 or _in_placement_group():
        return options, None  # (inside a sweep trial's placement group: its bundles place them)
    bundles = [{k: v for k, v in (("CPU", o.get("num_cpus", 1)), ("GPU", o.get("num_gpus", 0))) if v}
               for o in options]
    need = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
    fits = any(all(node["Resources"].get(k, 0) >= v for k, v in need.items() if v)
               for node in ray.nodes() if node["Alive"])
    group = placement_group(bundles, strategy="STRICT_PACK" if fits else "PACK")
    return [{**o, "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)}
            for i, o in enumerate(options)], group


def env_error(err: BaseException) -> ConfigError | None:
    """A host's NaN/Inf report (``checks.on_invalid: abort``), possibly re-raised by the actors
    that consumed its batch, as the one-line error the CLI prints; None for other failures."""
    cause = err
    while isinstance(cause, ray.exceptions.RayTaskError) and cause.cause is not None:
        cause = cause.cause
    return ConfigError(str(cause)) if isinstance(cause, EnvDataError) else None


def _with_safeguard_failures(metrics: dict, summaries: list[dict]) -> dict:
    """``health/safeguard_failures``: safeguard solves that fell back so far, over the hosts' /
    workers' processes (a restarted one starts again from 0)."""
    metrics["health/safeguard_failures"] = int(sum(s.get("safeguard_failures", 0) for s in summaries))
    return metrics


class Coordinator:
    def __init__(self, cfg: RunConfig, run_dir: Path, console=None, resume: dict | None = None):
        self.cfg, self.run_dir, self.console = cfg, Path(run_dir), console
        self.kind = cfg.algo_spec.kind
        self.state = ScheduleState(**resume["schedule"]) if resume else ScheduleState()
        res = cfg.resources
        self.n_envs = res.num_env_hosts * res.envs_per_host
        # phases the collection itself runs: the world model's fit inside the model-based iteration,
        # the dual phase between rollout and update when scheduled there
        self._phases_in_collect = {"world_model"} | ({"dual"} if cfg.schedule.dual_before_update else set())
        self._make_actors()
        self.faults = ActorFaults(cfg, self.run_dir, self.state, console, hosts=self.hosts, learner=self.learner,
                                  replay=self.replay, world_model=self.world_model, inference=self.inference,
                                  gradient=not cfg.algo_spec.uses_env_hosts)
        if resume:
            try:
                ray.get(self.learner.load_state_dict.remote(resume["learner"]))
                if self.kind == "gradient" or resume.get("workers"):  # env hosts' states, where they have one
                    ray.get([w.set_state.remote(sd) for w, sd in zip(self.hosts, resume["workers"]) if sd is not None])
                if self.world_model is not None:
                    ray.get(self.world_model.load_state_dict.remote(resume["world_model"]))
                if resume.get("replay") is not None:
                    ray.get(self.replay.load_state_dict.remote(resume["replay"]))
            except (ray.exceptions.RayTaskError, KeyError) as err:  # shapes or modules of another run
                for actor in self._actors():
                    ray.kill(actor)
                raise rundir.state_error(resume.get("path", "the checkpoint"), err) from None
        self.logger = MetricsLogger(self.run_dir, cfg)
        self._episodes: list[dict] = resume.get("episodes", []) if resume else []  # finished since the last logged row
        self._learner: tuple[float, int] = (0.0, 0)  # this iteration's learner seconds, updates
        self._checkpointed = self.state.iteration if resume else None

    # -- actors ----------------------------------------------------------------------------------
    def _make_actors(self) -> None:
        cfg, res = self.cfg, self.cfg.resources
        self.inference = None
        seed = cfg.seed * 1000 + self.state.iteration  # fresh env streams after a resume
        if cfg.algo_spec.uses_env_hosts:
            host_cls = ray.remote(EnvHost).options(**host_options(cfg), max_restarts=res.max_actor_restarts)
            self.hosts = [host_cls.remote(cfg.task, res.envs_per_host, seed, i, on_invalid=cfg.checks.on_invalid)
                          for i in range(res.num_env_hosts)]
            spec = ray.get(self.hosts[0].spec.remote())
            if res.inference == "server":  # one batched forward for every host, on its GPU if granted
                self.inference = ray.remote(inference.InferenceServer).options(
                    num_cpus=1, num_gpus=res.inference_gpus, max_restarts=res.max_actor_restarts
                ).remote(spec["act_low"], spec["act_high"], cfg.device)
        else:
            spec = self._env_spec()
        spec = EnvSpec.of(spec).model_dump()
        # The learner, its gradient workers and world model exchange weights and gradients every
        # iteration: one placement group keeps them on one node when they fit there.
        learner_opts = {"num_cpus": 1, "num_gpus": res.num_gpus_per_learner}
        opts = {"num_cpus": res.num_cpus_per_host, "num_gpus": res.num_gpus_per_host,
                "max_restarts": res.max_actor_restarts}  # gradient workers and the world model
        group = [learner_opts]
        if self.kind == "gradient":
            group += [opts] * (res.num_env_hosts + bool(cfg.algo_spec.world_model))
        placed, self.placement_group = colocate(group)
        learner_cls = ray.remote(LearnerActor).options(**placed[0])
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
            self.ratio_test = setup.get("ratio_test", False)  # CGPO: re-roll the window with the step first
            args = [(cfg.task, i * res.envs_per_host, res.envs_per_host, self.n_envs, cfg.seed, setup["arch"])
                    for i in range(res.num_env_hosts)]
            worker_opts = placed[1:1 + res.num_env_hosts]  # the world model takes the last bundle
            if cfg.algo_spec.world_model:
                wm = cfg.learner_params().world_model
                self.world_model = ray.remote(WorldModelActor).options(**placed[-1]).remote(
                    spec["obs_dim"], spec["act_dim"], wm.model_dump(), cfg.seed, cfg.device)
                worker_cls = ray.remote(ModelGradientWorker)
                self.hosts = [worker_cls.options(**o).remote(*a, wm.hidden, cfg.device)
                              for a, o in zip(args, worker_opts)]
            else:
                worker_cls = ray.remote(GradientWorker)
                self.hosts = [worker_cls.options(**o).remote(*a, cfg.device) for a, o in zip(args, worker_opts)]
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
    def _rollouts(self, policy) -> list:
        """Each host's (batch, summary) refs for this iteration: the hosts act themselves, or the
        inference server acts for all of them."""
        per_env = self.cfg.steps_per_iteration // self.n_envs
        if self.inference is None:
            return [h.rollout.options(num_returns=2).remote(policy, per_env) for h in self.hosts]
        return inference.rollout(self.hosts, self.inference, policy, per_env, stream_seed(self.cfg.seed, self.state))

    def _sample(self) -> tuple[dict, list]:
        """Rollouts, then the update on them. With ``schedule.dual_before_update`` the dual phase
        runs in between, on this iteration's episodes (the update then waits for the summaries)."""
        policy = self.learner.numpy_policy.remote()  # one object in the store, read by every host
        refs = self._rollouts(policy)
        batches = [b for b, _ in refs]
        if not self.cfg.schedule.dual_before_update:
            update = self.learner.update.remote(batches)
            return self._host_summaries(self._timed_update(update, [s for _, s in refs]), refs)
        metrics, episodes = self._host_summaries({}, refs)
        metrics.update(self._maybe_run_phase("dual", self.state.iteration + 1, episodes))
        return {**self._timed_update(self.learner.update.remote(batches), batches), **metrics}, episodes

    def _offpolicy(self) -> tuple[dict, list]:
        """Uniform actions until ``warmup_steps``; then utd × (steps this iteration) minibatches,
        drawn after this iteration's transitions are in (Ray runs an actor's calls in order)."""
        st, o = self.state, self.offpolicy
        warm = st.env_steps < o["warmup_steps"]
        policy = {"uniform": True, "act_dim": self.act_dim} if warm else self.learner.numpy_policy.remote()
        refs = self._rollouts(policy)
        size = self.replay.add.remote(*[b for b, _ in refs])
        # per-episode learner metrics (FAC-SIS: safe-action violations), before this iteration's update
        per_episode = (self.learner.episode_metrics.remote(*[b for b, _ in refs])
                       if o.get("episode_metrics") else None)
        replay_size = ray.get(size)  # a dead host fails the iteration before any update
        metrics = {}
        steps = self.steps_of(st.iteration)
        if st.env_steps + steps >= o["warmup_steps"]:
            n = max(1, round(o["utd"] * steps))
            sample = self.replay.sample.remote(n, o["batch_size"])
            clock = {"first_step": st.gradient_steps + 1, "every": self.step_every} if self.step_every else None
            metrics = self._timed_update(self.learner.update.remote([sample], clock), [size], n)
            st.gradient_steps += n
        metrics["replay/size"] = replay_size
        metrics, episodes = self._host_summaries(metrics, refs)
        if per_episode is not None:
            extra = ray.get(per_episode)
            if len(extra) != len(episodes):
                raise RuntimeError(f"learner counted {len(extra)} finished episodes, the hosts {len(episodes)}")
            episodes = [{**ep, **x} for ep, x in zip(episodes, extra)]  # same episodes; only means are logged
        return metrics, episodes

    def _host_summaries(self, metrics: dict, refs: list) -> tuple[dict, list]:
        summaries = ray.get([s for _, s in refs])
        metrics["time/host_inference_s"] = float(np.mean([s["inference_s"] for s in summaries]))
        if self.inference is not None:
            metrics["time/server_inference_s"] = ray.get(self.inference.stats.remote())["inference_s"]
        metrics["time/host_env_s"] = float(np.mean([s["env_s"] for s in summaries]))
        metrics["health/skipped_episodes"] = int(sum(s.get("skipped_episodes", 0) for s in summaries))
        metrics["health/clipped_action_frac"] = float(np.mean([s.get("clipped_action_frac", 0.0) for s in summaries]))
        return _with_safeguard_failures(metrics, summaries), [ep for s in summaries for ep in s["episodes"]]

    def _gradients(self) -> tuple[dict, list]:
        weights = self.learner.policy_state.remote()
        refs = [w.compute.options(num_returns=2).remote(weights, self.state.iteration, self.horizon,
                                                        self.stochastic) for w in self.hosts]
        update, evaluations = self._update_after_ratio_test([r for r, _ in refs])
        metrics = self._timed_update(update, [s for _, s in refs] + evaluations)
        summaries = ray.get([s for _, s in refs])
        return _with_safeguard_failures(metrics, summaries), [ep for s in summaries for ep in s["episodes"]]

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
        update, evaluations = self._update_after_ratio_test(results)
        metrics.update(self._timed_update(update, results + evaluations))
        return metrics, [ep for s in ray.get([s for _, s in refs]) for ep in s["episodes"]]

    def _update_after_ratio_test(self, results: list) -> tuple[ray.ObjectRef, list]:
        """The learner's update of the workers' ``results`` and the refs it waits on besides them.
        For CGPO (eq 18) the learner first proposes its step, every worker re-rolls its window
        forward only with it, and the update gets those evaluations: nothing is committed before
        every worker answered, so a worker lost on the way fails the attempt as before."""
        if not getattr(self, "ratio_test", False):
            return self.learner.update.remote(results), []
        trial = self.learner.propose.remote(results)
        evaluations = [w.evaluate.remote(trial) for w in self.hosts]
        return self.learner.update.remote(results, None, evaluations), evaluations

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
        mean cost of the episodes finished since the phase last ran (``episode_costs``: their costs)."""
        st = self.state
        st.pending_costs.setdefault(name, []).extend(ep["cost"] for ep in episodes)
        if iteration % self.cfg.phase_every(name):
            return {}
        costs = st.pending_costs[name]
        actor = self.world_model if name == "world_model" else self.learner
        out = ray.get(actor.phase.remote(name, {"episode_cost": float(np.mean(costs)) if costs else None,
                                                "episode_costs": [float(c) for c in costs]}))
        st.phase_runs[name] = st.phase_runs.get(name, 0) + 1
        st.pending_costs[name] = []
        return out

    def _collect(self) -> tuple[dict, list]:
        if self.kind == "sampling":
            return self._sample()
        if self.kind == "offpolicy":
            return self._offpolicy()
        if self.world_model is not None:
            return self._model_gradients()
        return self._gradients()

    # -- faults: restarted actors ----------------------------------------------------------------
    def iterate(self) -> dict:
        t0 = time.perf_counter()
        st = self.state
        self._learner = (0.0, 0)
        try:
            metrics, episodes = self.faults.run(self._collect)
        except ray.exceptions.RayTaskError as err:
            one_line = env_error(err)
            if one_line is None:
                raise
            raise one_line from None
        steps = self.steps_of(st.iteration)
        st.iteration += 1
        st.env_steps += steps
        for name in self.cfg.algo_spec.phases:
            if name not in self._phases_in_collect:
                metrics.update(self._maybe_run_phase(name, st.iteration, episodes))
        self._episodes += episodes
        dt = time.perf_counter() - t0
        learner_s, updates = self._learner
        if updates:  # learner updates per second of learner time (off-policy: minibatches)
            metrics.update({"time/learner_s": learner_s, "learner/updates": updates,
                            "time/learner_updates_per_s": updates / max(learner_s, 1e-9)})
        return {"iteration": st.iteration, "env_steps": st.env_steps, **metrics, "health/restarts": st.restarts,
                "cost_limit": self.cfg.limit, "time/iteration_s": dt, "time/env_steps_per_s": steps / dt}

    def _actors(self) -> list:
        return [a for a in [*self.hosts, self.learner, self.world_model, self.replay, self.inference]
                if a is not None]

    def _health(self) -> dict:
        """Actors answering a ping (restarts are counted by ``iterate``: health/restarts)."""
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
        extra = sorted({k for e in eps for k in e} - {"return", "cost", "length"})  # learners' per-episode metrics
        return {"episode/return": float(np.mean([e["return"] for e in eps])), "episode/cost": float(cost.mean()),
                "episode/length": float(np.mean([e["length"] for e in eps])), "episode/count": len(eps),
                "episode/violation_rate": float(np.mean(cost > self.cfg.limit)),
                **{f"episode/{k}": float(np.mean([e[k] for e in eps if k in e])) for k in extra}}

    # -- the run ---------------------------------------------------------------------------------
    def total_iterations(self) -> int:
        steps = it = 0
        while steps < self.cfg.total_env_steps:
            steps, it = steps + self.steps_of(it), it + 1
        return max(1, it)

    def checkpoint(self) -> Path:
        workers, world_model = self.faults.restorable_states()  # first: it may count a restart
        self._checkpointed = self.state.iteration
        payload = {"algo": self.cfg.algo, "task": self.cfg.task, "config": self.cfg.model_dump(mode="json"),
                   "schedule": asdict(self.state), "learner": ray.get(self.learner.state_dict.remote()),
                   "episodes": self._episodes,  # not logged yet (log_every): the resumed run's next row has them
                   "workers": workers}  # where each host's / shard's episodes are (None: cannot tell)
        if world_model is not None:
            payload["world_model"] = world_model
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
        done, started = 0, time.monotonic()
        while self.state.iteration < total and (stop_after is None or done < stop_after):
            row = self.iterate()
            done += 1
            last = row
            if self.state.iteration % sched.log_every == 0 or self.state.iteration == total:
                row.update(self._episode_stats())
                row.update(self._health())
                self.logger.log(self.state.env_steps, row)
                self._progress(row, total, eta(time.monotonic() - started, done, total - self.state.iteration))
            if self.state.iteration % sched.checkpoint_every == 0:
                self.checkpoint()
        if self._checkpointed != self.state.iteration:
            self.checkpoint()
        return last

    def _progress(self, row: dict, total: int, eta_text: str) -> None:
        if self.console is None:
            return
        parts = [f"it {row['iteration']}/{total}", f"steps {row['env_steps']:,}"]
        for key, label in (("episode/return", "return"), ("episode/cost", "cost"),
                           ("lagrange_multiplier", "λ"), ("time/env_steps_per_s", "steps/s")):
            if key in row:
                parts.append(f"{label} {row[key]:.3g}" + (f" (limit {row['cost_limit']:.3g})"
                                                          if key == "episode/cost" else ""))
        self.console.print(" | ".join(parts + [eta_text]))

    def close(self) -> None:
        self.logger.close()
        for actor in self._actors():
            ray.kill(actor)
        if self.placement_group is not None:  # frees its reserved CPUs / GPUs for the next run
            remove_placement_group(self.placement_group)
