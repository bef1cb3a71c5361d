"""The coordinator: runs a run's iterations and owns the schedule, checkpoints and logging.

What one iteration does, and which actors it needs, depends on the algorithm's kind and lives in
``cluster/iterations.py`` (sampling, off-policy, analytic gradients, model-based). After an
iteration's collect step, every schedule phase whose interval divides the iteration count runs
(e.g. ``dual`` for the Lagrange multiplier on the learner); a phase the collect step runs itself
(``phases_in_collect``) is decided here too, through ``run_phase``. All schedule state lives here
and in checkpoints, never inside a learner's inner loop; what happens when an actor dies
(restart, restore, retry) lives in ``cluster/faults.py``.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray.util.placement_group import remove_placement_group

from saferl.actors.env_host import EnvDataError
from saferl.cluster import rundir
from saferl.cluster.faults import ActorFaults, first_line
from saferl.cluster.iterations import make_iteration
from saferl.cluster.metrics import MetricsLogger, eta
from saferl.config import ConfigError, RunConfig
from saferl.metric_keys import COST_LIMIT, EPISODE_COST, EPISODE_COUNT, EPISODE_RETURN, LAGRANGE_MULTIPLIER

HEALTH_TIMEOUT_S = 5.0  # an actor that does not answer a ping in this long counts as not alive


@dataclass
class ScheduleState:
    iteration: int = 0
    env_steps: int = 0
    gradient_steps: int = 0  # off-policy minibatch updates so far (the clock of schedule.step_phases)
    phase_runs: dict = field(default_factory=dict)  # phase -> times run
    pending_costs: dict = field(default_factory=dict)  # phase -> episode costs since its last run
    restarts: int = 0  # env hosts / gradient workers / world models restarted after dying


def env_error(err: BaseException) -> ConfigError | None:
    """A host's NaN/Inf report (``checks.on_invalid: abort``), possibly re-raised by the actors
    that consumed its batch, as the one-line error the CLI prints; None for other failures."""
    cause = err
    while isinstance(cause, ray.exceptions.RayTaskError) and cause.cause is not None:
        cause = cause.cause
    return ConfigError(str(cause)) if isinstance(cause, EnvDataError) else None


def task_error(err: ray.exceptions.RayTaskError, run_dir: Path, iteration: int) -> ConfigError:
    """Any other failure inside an actor's call (a learner's update, a host's rollout) as one line
    naming the call and the exception; the full remote traceback goes to ``RUN_DIR/error.log``."""
    inner = err.cause or err  # Ray hands the original exception of the innermost call
    trace = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # without the terminal colours
    calls = re.findall(r"ray::([\w.]+)\(", trace)
    call = calls[-1] if calls else "an actor call"
    log = Path(run_dir) / "error.log"
    log.write_text(f"iteration {iteration}\n{trace}\n")
    resume = (f"; `saferl train --resume {run_dir}` continues from its last checkpoint"
              if rundir.checkpoints(run_dir) else "; no checkpoint was written yet")
    return ConfigError(f"run error: iteration {iteration}: {call} failed: "
                       f"{type(inner).__name__}: {first_line(inner)} (traceback: {log}{resume})")


class Coordinator:
    """One run: its kind's iteration (``loop``: the actors and the collect step), the schedule
    state, fault handling, the metrics log and checkpoints."""

    def __init__(self, cfg: RunConfig, run_dir: Path, console=None, resume: dict | None = None):
        self.cfg, self.run_dir, self.console = cfg, Path(run_dir), console
        self.kind = cfg.algo_spec.kind
        self.state = ScheduleState(**resume["schedule"]) if resume else ScheduleState()
        self.loop = make_iteration(cfg, self.state, self.run_phase)
        loop = self.loop
        self.faults = ActorFaults(cfg, self.run_dir, self.state, console, hosts=loop.hosts, learner=loop.learner,
                                  replay=loop.replay, world_model=loop.world_model, inference=loop.inference,
                                  gradient=not cfg.algo_spec.uses_env_hosts)
        if resume:
            try:
                ray.get(loop.learner.load_state_dict.remote(resume["learner"]))
                loop.load_checkpoint_state(resume)
            except (ray.exceptions.RayTaskError, KeyError) as err:  # shapes or modules of another run
                for actor in loop.actors():
                    ray.kill(actor)
                raise rundir.state_error(resume.get("path", "the checkpoint"), err) from None
        self.logger = MetricsLogger(self.run_dir, cfg)
        self._episodes: list[dict] = resume.get("episodes", []) if resume else []  # finished since the last logged row
        self._checkpointed = self.state.iteration if resume else None

    def steps_of(self, iteration: int) -> int:
        """Env steps of iteration ``iteration`` (0-based)."""
        return self.loop.steps_of(iteration)

    # -- the schedule ----------------------------------------------------------------------------
    def run_phase(self, name: str, iteration: int, episodes: list) -> dict:
        """Run phase ``name`` if its interval divides ``iteration``. The ``dual`` signal is the
        mean cost of the episodes finished since the phase last ran (``episode_costs``: their costs)."""
        st = self.state
        st.pending_costs.setdefault(name, []).extend(ep["cost"] for ep in episodes)
        if iteration % self.cfg.phase_every(name):
            return {}
        costs = st.pending_costs[name]
        actor = self.loop.world_model if name == "world_model" else self.loop.learner
        out = ray.get(actor.phase.remote(name, {"episode_cost": float(np.mean(costs)) if costs else None,
                                                "episode_costs": [float(c) for c in costs]}))
        st.phase_runs[name] = st.phase_runs.get(name, 0) + 1
        st.pending_costs[name] = []
        return out

    def collect(self) -> tuple[dict, list]:
        """One attempt at this iteration's collect step (retried by ``faults`` when an actor dies)."""
        return self.loop.collect()

    def iterate(self) -> dict:
        t0 = time.perf_counter()
        st = self.state
        self.loop.learner_time = (0.0, 0)
        try:
            metrics, episodes = self.faults.run(self.collect)
        except ray.exceptions.RayTaskError as err:
            raise (env_error(err) or task_error(err, self.run_dir, st.iteration + 1)) from None
        steps = self.steps_of(st.iteration)
        st.iteration += 1
        st.env_steps += steps
        for name in self.cfg.algo_spec.phases:
            if name not in self.loop.phases_in_collect:
                metrics.update(self.run_phase(name, st.iteration, episodes))
        self._episodes += episodes
        dt = time.perf_counter() - t0
        learner_s, updates = self.loop.learner_time
        if updates:  # learner updates per second of learner time (off-policy: minibatches)
            metrics.update({"time/learner_s": learner_s, "learner/updates": updates,
                            "time/learner_updates_per_s": updates / max(learner_s, 1e-9)})
        return {"iteration": st.iteration, "env_steps": st.env_steps, **metrics, "health/restarts": st.restarts,
                COST_LIMIT: self.cfg.limit, "time/iteration_s": dt, "time/env_steps_per_s": steps / dt}

    def _health(self) -> dict:
        """Actors answering a ping (restarts are counted by ``iterate``: health/restarts)."""
        actors = self.loop.actors()
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

    def episode_stats(self) -> dict:
        """Summary of the episodes finished since the last logged row."""
        eps, self._episodes = self._episodes, []
        if not eps:
            return {}
        cost = np.array([e["cost"] for e in eps])
        extra = sorted({k for e in eps for k in e} - {"return", "cost", "length"})  # learners' per-episode metrics
        return {EPISODE_RETURN: float(np.mean([e["return"] for e in eps])), EPISODE_COST: float(cost.mean()),
                "episode/length": float(np.mean([e["length"] for e in eps])), EPISODE_COUNT: len(eps),
                "episode/violation_rate": float(np.mean(cost > self.cfg.limit)),
                **{f"episode/{k}": float(np.mean([e[k] for e in eps if k in e])) for k in extra}}

    # -- the run ---------------------------------------------------------------------------------
    def total_iterations(self) -> int:
        return self.loop.total_iterations()

    def checkpoint(self) -> Path:
        workers, world_model = self.faults.restorable_states()  # first: it may count a restart
        self._checkpointed = self.state.iteration
        payload = {"algo": self.cfg.algo, "task": self.cfg.task, "config": self.cfg.model_dump(mode="json"),
                   "schedule": asdict(self.state), "learner": ray.get(self.loop.learner.state_dict.remote()),
                   "episodes": self._episodes,  # not logged yet (log_every): the resumed run's next row has them
                   "workers": workers}  # where each host's / shard's episodes are (None: cannot tell)
        if world_model is not None:
            payload["world_model"] = world_model
        payload.update(self.loop.checkpoint_state())
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
                row.update(self.episode_stats())
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
        for key, label in ((EPISODE_RETURN, "return"), (EPISODE_COST, "cost"),
                           (LAGRANGE_MULTIPLIER, "λ"), ("time/env_steps_per_s", "steps/s")):
            if key in row:
                parts.append(f"{label} {row[key]:.3g}" + (f" (limit {row['cost_limit']:.3g})"
                                                          if key == EPISODE_COST else ""))
        self.console.print(" | ".join(parts + [eta_text]))

    def close(self) -> None:
        self.logger.close()
        for actor in self.loop.actors():
            ray.kill(actor)
        if self.loop.placement_group is not None:  # frees its reserved CPUs / GPUs for the next run
            remove_placement_group(self.loop.placement_group)
