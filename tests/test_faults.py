"""Faults on a real local Ray cluster: an env host, a gradient worker or the world-model actor is
killed (SIGKILL) during a run; Ray restarts it, the coordinator restores it and retries the
iteration, the run finishes its budget and ``health/restarts`` counts the restart."""
from __future__ import annotations

import os
import signal
import time

import pandas as pd
import pytest
import ray

from saferl.cluster import rundir
from saferl.cluster.coordinator import Coordinator
from saferl.config import ConfigError, load_config


def coordinator(name: str, run_root: str, overrides: list[str]) -> Coordinator:
    cfg = load_config(name, [f"run_root={run_root}", "schedule.checkpoint_every=100", *overrides])
    return Coordinator(cfg, rundir.new_run_dir(cfg))


def kill(actor) -> int:
    pid = ray.get(actor.pid.remote())
    os.kill(pid, signal.SIGKILL)
    return pid


def run_with_kill(coord: Coordinator, actor) -> pd.DataFrame:
    """Two iterations, a kill between iterations, then the rest of the budget; returns metrics.csv."""
    try:
        total = coord.total_iterations()
        coord.run(stop_after=2)
        kill(actor)
        coord.run()
        assert coord.state.iteration == total
        assert coord.state.restarts >= 1
        m = pd.read_csv(coord.run_dir / "metrics.csv")
        ckpt = rundir.load_checkpoint(coord.run_dir, coord.cfg)  # the count survives a resume
        assert ckpt["schedule"]["restarts"] == coord.state.restarts
    finally:
        coord.close()
    assert m["iteration"].tolist() == list(range(1, total + 1)), "one row per iteration, none repeated"
    assert m["health/restarts"].iloc[0] == 0 and m["health/restarts"].iloc[-1] >= 1
    assert m["env_steps"].iloc[-1] >= coord.cfg.total_env_steps
    return m


def test_env_host_killed_is_restarted(ray_session, run_root):
    coord = coordinator("ppo_lag/FunctionEnv-v0", run_root,
                        ["total_env_steps=10000", "steps_per_iteration=2000",
                         "resources.num_env_hosts=2", "resources.envs_per_host=10"])
    run_with_kill(coord, coord.loop.hosts[1])


def kill_during(coord: Coordinator, actor, iteration: int) -> list[int]:
    """Kill ``actor`` as iteration ``iteration`` (0-based) starts its calls; returns the
    iteration of every attempt, so a retry shows as a repeat."""
    attempts, collect = [], coord.collect

    def counted():
        attempts.append(coord.state.iteration)
        if attempts.count(iteration) == 1 and attempts[-1] == iteration:
            kill(actor)
        return collect()

    coord.collect = counted
    return attempts


def test_env_host_killed_mid_iteration(ray_session, run_root):
    coord = coordinator("ppo_lag/FunctionEnv-v0", run_root,
                        ["total_env_steps=40000", "steps_per_iteration=10000",
                         "resources.num_env_hosts=2", "resources.envs_per_host=10"])
    attempts = kill_during(coord, coord.loop.hosts[0], 2)
    try:
        coord.run()
        assert coord.state.iteration == coord.total_iterations() and coord.state.restarts == 1
    finally:
        coord.close()
    assert attempts.count(2) == 2, f"the third iteration should be retried once: {attempts}"


def test_gradient_worker_killed_is_restored(ray_session, run_root):
    coord = coordinator("bptt_lag/FunctionEnv-v0", run_root,
                        ["total_env_steps=4800", "resources.num_env_hosts=2", "resources.envs_per_host=4"])
    coord.run(stop_after=2)
    before = ray.get([w.get_state.remote() for w in coord.loop.hosts])
    kill(coord.loop.hosts[1])
    coord.faults.recover(rollback=False)  # what the next iteration does first
    after = ray.get([w.get_state.remote() for w in coord.loop.hosts])
    assert [s["episode"] for s in after] == [s["episode"] for s in before]  # restored, not restarted at -1
    assert coord.state.restarts == 1
    attempts = kill_during(coord, coord.loop.hosts[0], 3)  # the survivor of a failed attempt is rolled back
    try:
        coord.run()
        assert coord.state.restarts == 2
        last = ray.get([w.get_state.remote() for w in coord.loop.hosts])
    finally:
        coord.close()
    assert attempts == [2, 3, 3, 4, 5], attempts
    total = coord.total_iterations()  # one full-horizon episode per iteration, none skipped
    assert [s["episode"] for s in last] == [total - 1] * 2


def test_world_model_killed_is_restored(ray_session, run_root):
    coord = coordinator("mb_cgpo/FunctionEnvFloor-v0", run_root,
                        ["total_env_steps=1120", "resources.envs_per_host=16", "schedule.log_every=1",
                         "algo_params.world_model.fit_steps=5", "algo_params.critic_iterations=1"])
    coord.run(stop_after=2)
    n = len(ray.get(coord.loop.world_model.state_dict.remote())["data"]["obs"])
    assert n > 0
    kill(coord.loop.world_model)
    coord.faults.recover(rollback=False)
    assert len(ray.get(coord.loop.world_model.state_dict.remote())["data"]["obs"]) == n  # its data is back
    run_with_kill(coord, coord.loop.world_model)


def test_retry_settings_are_config_fields(ray_session, run_root):
    """resources.iteration_attempts and resources.restart_timeout_s: validated as one line, and
    the coordinator retries and waits by them."""
    for field in ("iteration_attempts=0", "restart_timeout_s=-1"):
        with pytest.raises(ConfigError, match=f"^config error: resources.{field.split('=')[0]}: ") as info:
            load_config("ppo_lag/FunctionEnv-v0", [f"resources.{field}"])
        assert "\n" not in str(info.value)
    coord = coordinator("ppo_lag/FunctionEnv-v0", run_root,
                        ["total_env_steps=8000", "steps_per_iteration=2000", "resources.num_env_hosts=2",
                         "resources.envs_per_host=10", "resources.iteration_attempts=1"])
    try:
        coord.run(stop_after=1)
        coord.cfg.resources.restart_timeout_s = 0.5  # not before: it also bounds the hosts' start-up
        kill_during(coord, coord.loop.hosts[1], 1)
        with pytest.raises(RuntimeError, match=r"iteration 2 failed 1 times \(resources.iteration_attempts\)"):
            coord.run()  # one attempt: the kill is not retried
        coord.loop.hosts[0].rollout.remote({"uniform": True, "act_dim": coord.loop.spec["act_dim"]}, 50_000)
        t = time.perf_counter()  # the host answers after its long rollout: not within 0.5 s
        with pytest.raises(RuntimeError, match=r"did not answer within resources.restart_timeout_s=0.5: "):
            coord.faults.pids()
        assert time.perf_counter() - t < 5
    finally:
        coord.close()


def test_learner_death_stops_with_the_resume_command(ray_session, run_root):
    """The learner is not restarted (its state is the run's): one clear error, not retries."""
    coord = coordinator("ppo_lag/FunctionEnv-v0", run_root,
                        ["total_env_steps=8000", "steps_per_iteration=2000", "resources.envs_per_host=10"])
    try:
        coord.run(stop_after=1)
        kill(coord.loop.learner)
        with pytest.raises(RuntimeError, match=r"the learner actor died .*`saferl train --resume "):
            coord.run()
        assert coord.state.iteration == 1
    finally:
        coord.close()


def test_a_learner_that_fails_to_start_says_why(ray_session, run_root):
    """A learner whose construction raises is not reported as a lost node: the cause, one line."""
    with pytest.raises(RuntimeError, match=r"^the learner actor failed to start: .*algo_params.unsafe_policy: "
                                           r"sTRPO needs a stage-1 policy"):
        coord = coordinator("strpo/FunctionEnv-v0", run_root, ["total_env_steps=2000", "steps_per_iteration=1000"])
        try:
            coord.run()
        finally:
            coord.close()


def test_an_exception_inside_an_actor_call_is_one_line(ray_session, run_root):
    """An exception raised inside a remote call (here a learner-like update whose result another
    call consumed) stops the run with one line naming the call and the exception; the remote
    traceback goes to RUN_DIR/error.log, and the line says how to resume."""
    @ray.remote
    def update(_):
        raise ValueError("minibatch_size 4096 exceeds the batch\nsecond line")

    @ray.remote
    def consume(x):
        return x

    coord = coordinator("ppo_lag/FunctionEnv-v0", run_root, ["total_env_steps=8000", "steps_per_iteration=2000"])
    try:
        coord.run(stop_after=1)  # ends with a checkpoint
        coord.loop.collect = lambda: ray.get(consume.remote(update.remote(0)))
        with pytest.raises(ConfigError, match=r"^run error: iteration 2: \S*update failed: ValueError: minibatch_size "
                                              r"4096 exceeds the batch \(traceback: \S*error.log; `saferl train "
                                              r"--resume \S*` continues from its last checkpoint\)$"):
            coord.run()
        assert "second line" in (coord.run_dir / "error.log").read_text()
    finally:
        coord.close()
