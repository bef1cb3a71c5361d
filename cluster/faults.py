"""Faults: restart, restore, retry. A dead env host / gradient worker / world model is restarted
by Ray (``resources.max_actor_restarts``); ``ActorFaults`` notices the restart (a new process id),
restores the actor and retries the iteration, at most ``resources.iteration_attempts`` times,
waiting up to ``resources.restart_timeout_s`` for restarts. The learner and the replay buffer
are not restarted (their state is the run's, saved only in checkpoints): their death stops the
run with the command that resumes it.

An actor died or is unreachable (ActorDiedError, ActorUnavailableError), or a batch it made was
lost with its node: the task consuming it fails fetching it, before running (ObjectLostError and
subclasses, raised as RayTaskError(ObjectReconstructionFailedError)), so the attempt can be retried.
"""
from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable

import numpy as np
import ray

ACTOR_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


def first_line(err: BaseException | None) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def stream_seed(seed: int, state) -> int:
    """A seed for fresh env / sampling streams, from the run's seed, the iteration and the
    restart count (reproducible, and new after every restart)."""
    return int(np.random.SeedSequence([seed, state.iteration, state.restarts]).generate_state(1)[0])


class ActorFaults:
    """The fault handling of one run's actors. ``state`` is the coordinator's schedule state
    (its ``restarts`` are counted here; a failed attempt's changes are undone in place)."""

    def __init__(self, cfg, run_dir, state, console, *, hosts: list, learner, replay=None, world_model=None,
                 inference=None, gradient: bool = False):
        self.cfg, self.run_dir, self.state, self.console = cfg, run_dir, state, console
        self.hosts, self.learner, self.replay = hosts, learner, replay
        self.world_model, self.inference, self.gradient = world_model, inference, gradient
        self._actor_pids: list | None = None  # the restorable actors' process ids at the last check
        self._snapshot: dict | None = None  # gradient workers' and world model's state after the last iteration

    def run(self, collect: Callable[[], tuple]) -> tuple:
        """One iteration's ``collect()`` (collection and update). When an env host, gradient worker
        or world model dies, the attempt's partial batch is discarded (the learner's update depends
        on every shard, so it never ran), the schedule state is put back, the restarted actor
        restored and the iteration retried, at most ``resources.iteration_attempts`` times."""
        err: BaseException | None = None
        attempts = self.cfg.resources.iteration_attempts
        for _ in range(attempts):
            saved = copy.deepcopy(self.state)
            try:  # an actor may also die while being restored
                self.recover(rollback=err is not None)
                out = collect()
            except ACTOR_ERRORS as e:
                self.raise_if_unrestorable(e)
                err = e
                saved.restarts = self.state.restarts
                vars(self.state).update(vars(saved))  # in place: callers hold the state
                continue
            with contextlib.suppress(*ACTOR_ERRORS):  # died just now: the next iteration restores the last snapshot
                self._snapshot = self._snapshot_state()
            return out
        raise RuntimeError(f"iteration {self.state.iteration + 1} failed {attempts} times "
                           f"(resources.iteration_attempts): "
                           f"actors kept dying; last error: {first_line(err)}") from err

    def restorable_states(self) -> tuple[list, dict | None]:
        """The hosts' / gradient workers' states and the world model's, for a checkpoint. One that
        died since the last iteration is restarted and restored first (``recover``), so a kill while
        checkpointing counts as a restart instead of failing the run."""
        err: BaseException | None = None
        for _ in range(self.cfg.resources.iteration_attempts):
            try:
                self.recover(rollback=False)
                return self.actor_states()
            except ACTOR_ERRORS as e:
                self.raise_if_unrestorable(e)
                err = e
        raise RuntimeError(f"checkpoint at iteration {self.state.iteration} failed "
                           f"{self.cfg.resources.iteration_attempts} times (resources.iteration_attempts): "
                           f"actors kept dying; last error: {first_line(err)}") from err

    @property
    def actor_pids(self) -> list | None:
        """The restorable actors' process ids (env hosts or gradient workers first, in order) as of
        the last attempt's start; None before the first (``saferl bench soak`` kills by them)."""
        return self._actor_pids

    def recover(self, rollback: bool) -> None:
        """Before each attempt: find restarted actors (a new process id), count them and restore
        them; after a failed attempt (``rollback``) also put the survivors back."""
        pids = self.pids()
        if self._actor_pids is None:  # the first iteration of this run (or of this resumed run)
            self._actor_pids, self._snapshot = pids, self._snapshot_state()
            return
        restarted = [i for i, (old, new) in enumerate(zip(self._actor_pids, pids)) if old != new]
        self._actor_pids = pids
        if not restarted and not rollback:
            return
        st = self.state
        st.restarts += len(restarted)
        if restarted and self.console is not None:
            self.console.print(f"it {st.iteration}: {len(restarted)} actor(s) restarted after dying; "
                               "restored, retrying")
        if not self.gradient:
            # a restarted host came back reset with its creation seed: give it a fresh stream instead
            seed = stream_seed(self.cfg.seed, st)
            ray.get([self.hosts[i].reset.remote(seed) for i in restarted if i < len(self.hosts)])
            return
        snap = self._snapshot  # the state after the last completed iteration
        assert snap is not None  # taken with the first pids
        refs = [w.set_state.remote(sd) for w, sd in zip(self.hosts, snap["workers"])]
        if self.world_model is not None:
            refs.append(self.world_model.load_state_dict.remote(snap["world_model"]))
        ray.get(refs)

    def restorable(self) -> list:
        """The actors Ray restarts and this object restores (not the learner or replay). The
        inference server is counted but needs nothing back: it gets the weights every iteration."""
        return [*self.hosts, *[a for a in (self.world_model, self.inference) if a is not None]]

    def pids(self) -> list[int]:
        """The restorable actors' process ids; waits for restarting ones to answer again. A call
        sent before a death was noticed fails and the next one waits. An actor on a lost node is
        *unavailable* (unreachable, not yet known dead) until Ray notices the node is gone, seconds
        later: those calls are retried until ``resources.restart_timeout_s``."""
        res = self.cfg.resources
        deadline, died = time.monotonic() + res.restart_timeout_s, 0
        last: BaseException | None = None
        while died < 5 and time.monotonic() < deadline:
            try:
                return ray.get([a.pid.remote() for a in self.restorable()],
                               timeout=max(deadline - time.monotonic(), 0.1))
            except ray.exceptions.GetTimeoutError as err:
                last = err
                break
            except ACTOR_ERRORS as err:
                last = err
                died += not isinstance(err, ray.exceptions.ActorUnavailableError)
                time.sleep(0.5)
        why = (f"was not restarted (its resources.max_actor_restarts={res.max_actor_restarts} used up?)" if died >= 5
               else f"did not answer within resources.restart_timeout_s={res.restart_timeout_s:g}")
        raise RuntimeError(f"an env host / gradient worker / world model died and {why}: "
                           f"{first_line(last) if last else 'timed out'}") from last

    def actor_states(self) -> tuple[list, dict | None]:
        """The hosts' / gradient workers' states and the world model's (None without one)."""
        refs = [w.get_state.remote() for w in self.hosts]
        if self.world_model is not None:
            refs.append(self.world_model.state_dict.remote())
        out = ray.get(refs)
        return out[:len(self.hosts)], (out[-1] if self.world_model is not None else None)

    def raise_if_unrestorable(self, err: BaseException) -> None:
        """The learner and replay buffer are not restarted: when one died (e.g. with its node),
        stop with the way to go on."""
        dead = getattr(err, "actor_id", None)
        if dead is None or isinstance(err, ray.exceptions.ActorUnavailableError):  # may come back
            return
        for name, actor in (("learner", self.learner), ("replay buffer", self.replay)):
            if actor is None or dead != actor._actor_id.hex():
                continue
            if getattr(err, "actor_init_failed", False):  # its constructor raised: say why
                cause = next((ln.strip() for ln in reversed(str(err).splitlines()) if ln.strip()), "")
                raise RuntimeError(f"the {name} actor failed to start: {cause}") from err
            raise RuntimeError(f"the {name} actor died (was its node lost?) and is not restarted: "
                               f"continue from the last checkpoint with `saferl train --resume "
                               f"{self.run_dir}`") from err

    def _snapshot_state(self) -> dict | None:
        """Gradient workers' episode state and the world model (weights, optimiser, data), held
        here so a restarted one (or a failed attempt's survivors) can be put back; env hosts hold
        nothing that needs it."""
        if not self.gradient:
            return None
        workers, world_model = self.actor_states()
        return {"workers": workers, "world_model": world_model}
