"""Vertical slices on a real local Ray cluster: gradient workers, BPTT-Lag, PPO-Lag, the dual
schedule, checkpoints and resume."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from saferl.actors.gradient_worker import GradientWorker
from saferl.cluster import rundir
from saferl.cluster.session import train
from saferl.config import ConfigError, load_config
from saferl.learners.networks import GaussianPolicy, flat_params, set_flat_params
from saferl.learners.window_base import combine

POLICY = dict(obs_dim=1, act_dim=1, hidden=[8, 8], init_log_std=-1.0, squash=True, normalise_obs=False)
ARCH = {"policy": POLICY, "critic_hidden": None}


def policy_state(seed=0):
    torch.manual_seed(seed)
    pol = GaussianPolicy(**POLICY)
    return pol, {"policy": {k: v.clone() for k, v in pol.state_dict().items()}}


def window(worker, weights, iteration, h):
    return worker.compute(weights, iteration, h)[0]


def test_gradient_worker_matches_finite_differences():
    torch.set_default_dtype(torch.float64)
    try:
        pol, state = policy_state()
        worker = GradientWorker("FunctionEnv-v0", 0, 16, 16, seed=3, arch=ARCH, device="cpu")
        out = window(worker, state, 0, 100)
        theta = flat_params(pol)
        rng = np.random.default_rng(0)
        for _ in range(3):  # directional derivatives along random unit directions
            d = torch.tensor(rng.normal(size=theta.shape[0]))
            d /= d.norm()
            vals = []
            for sign in (1, -1):
                set_flat_params(pol, theta + sign * 1e-6 * d)
                worker.t = worker.horizon  # restart the same episode
                worker.episode = -1
                vals.append(window(worker, {"policy": pol.state_dict()}, 0, 100)["l_c"])
            fd = (vals[0] - vals[1]) / 2e-6
            assert fd == pytest.approx(float(np.dot(out["q"], d.numpy())), rel=1e-5, abs=1e-8)
    finally:
        torch.set_default_dtype(torch.float32)


def test_sharded_workers_give_the_single_worker_gradient():
    _, state = policy_state(1)
    whole = window(GradientWorker("FunctionEnv-v0", 0, 12, 12, 5, ARCH, "cpu"), state, 4, 20)
    shards = [window(GradientWorker("FunctionEnv-v0", o, 4, 12, 5, ARCH, "cpu"), state, 4, 20) for o in (0, 4, 8)]
    est = combine(shards)
    assert est["l_c"] == pytest.approx(whole["l_c"], rel=1e-6)
    np.testing.assert_allclose(est["g"], whole["g"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(est["q"], whole["q"], rtol=1e-4, atol=1e-6)


def metrics(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def test_bptt_lag_satisfies_the_constraint(ray_session, run_root):
    cfg = load_config("bptt_lag/FunctionEnv-v0", ["total_env_steps=192000", f"run_root={run_root}"])
    m = metrics(train(cfg))
    assert m["j_c"].iloc[0] > 8.0, "the constraint should bind at the start"
    assert (m["j_c"].iloc[-5:] <= 8.0).all(), m["j_c"].tolist()


def test_ppo_lag_improves_return():
    """16,000 env steps of the shipped config (learner and env host in this process; the Ray path
    of the same config is exercised by the resume and dual-schedule tests below)."""
    from tests.inprocess import column, run_in_process

    rows = run_in_process("ppo_lag/FunctionEnv-v0", 1e6, 8)
    ret = column(rows, "return")
    assert (column(rows, "lam") == 0).all()
    assert ret[-2:].mean() > ret[:2].mean() + 2.0, ret.round(2).tolist()


@pytest.mark.parametrize("limit,init,direction,before", [(1.0, 0.0, +1, True), (100.0, 2.0, -1, False)])
def test_dual_schedule_moves_the_multiplier(ray_session, run_root, monkeypatch, limit, init, direction, before):
    """The dual phase every 2 iterations moves λ toward the limit; with ``dual_before_update`` an
    update uses the λ its own iteration's phase set (OmniSafe's order), without it the previous one."""
    from saferl.cluster.iterations import KindIteration

    used = []  # the λ each update reports having used, before the phases' metrics are merged in
    timed_update = KindIteration.timed_update

    def record(self, update, inputs, n_updates=1):
        out = timed_update(self, update, inputs, n_updates)
        used.append(out["lagrange_multiplier"])
        return out

    monkeypatch.setattr(KindIteration, "timed_update", record)
    cfg = load_config("ppo_lag/FunctionEnv-v0", [
        "total_env_steps=8000", f"cost_limit={limit}", f"algo_params.lagrange.init={init}",
        "algo_params.lagrange.lr=0.001", "schedule.phases.dual=2", f"schedule.dual_before_update={before}",
        f"run_root={run_root}"])
    run = train(cfg)
    lam = metrics(run)["lagrange_multiplier"].to_numpy()  # logged after each iteration's phases
    assert lam[0] == init, "dual every 2 iterations: unchanged after the first"
    steps = np.diff(np.concatenate([[init], lam[1::2]]))  # the changes made by each dual step
    assert len(steps) == 2 and np.all(direction * steps > 0), lam
    assert used == pytest.approx(list(lam) if before else [init, *lam[:-1]], rel=1e-12, abs=0)
    ckpt = rundir.load_checkpoint(run, cfg)
    assert ckpt["schedule"]["phase_runs"]["dual"] == 2


def assert_same_state(a, b, where="learner"):
    """Checkpointed state, compared exactly (tensors, arrays, numbers, RNG states)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=where)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


@pytest.mark.parametrize("name, over", [
    # optimiser, observation normaliser, PID multiplier, the hosts' episodes and sampling streams
    ("ppo_lag/FunctionEnv-v0", ["total_env_steps=4000", "steps_per_iteration=800", "schedule.phases.dual=2",
                                "algo_params.lagrange.kind=pid"]),
    # replay buffer, critics, α, λ, and the step-phase clock of the safety index (third timescale)
    pytest.param("fac_sis/PointHazard-D1-v0", ["total_env_steps=960", "steps_per_iteration=240",
                                               "algo_params.warmup_steps=480", "algo_params.hidden=[32,32]",
                                               "algo_params.batch_size=32", "schedule.step_phases.safety_index=4"],
                 marks=pytest.mark.slow),
    # schedule.pipeline: the next iteration's rollouts in flight at the checkpoint (kept in it), the
    # switch from uniform warm-up actions to the policy, the replay buffer
    ("sac_lag/PointHazard-D1-v0", ["total_env_steps=1920", "steps_per_iteration=480", "algo_params.warmup_steps=480",
                                   "algo_params.hidden=[16,16]", "algo_params.batch_size=32", "schedule.pipeline=true",
                                   "schedule.log_every=1"]),
    # the adaptive trust-region radius and the gradient workers' episodes
    # (12 iterations of 2 × 16 envs × h = 10 steps: past the first episode end at T = 100)
    pytest.param("cgpo/FunctionEnv-v0", ["total_env_steps=3840", "resources.envs_per_host=16"],
                 marks=pytest.mark.slow),
])
def test_resume_continues_identically_per_family(ray_session, run_root, name, over):
    """A run stopped after 2 iterations and resumed from its checkpoint ends in the same state as
    the uninterrupted run, with the same metrics (timings aside). The sampling family runs by
    default; the off-policy and gradient families (three Ray runs each) are slow. Each learner's
    own state round trip is tested by default in its module (``test_state_dict_resumes_identically``
    and the like)."""
    over = [*over, "schedule.checkpoint_every=2"]
    full = train(load_config(name, over + [f"run_root={run_root}/a"]))
    cfg = load_config(name, over + [f"run_root={run_root}/b"])
    part = train(cfg, stop_after=2)
    train(rundir.load_run_config(part), run_dir=part)
    a, b = rundir.load_checkpoint(full, cfg), rundir.load_checkpoint(part, cfg)
    assert a["schedule"] == b["schedule"] and a["schedule"]["iteration"] > 2
    assert_same_state(a["learner"], b["learner"])
    assert_same_state(a["workers"], b["workers"], "workers")
    assert_same_state(a.get("replay"), b.get("replay"), "replay")
    ma, mb = metrics(full), metrics(part)
    assert list(ma["iteration"]) == list(mb["iteration"])
    cols = [c for c in ma.columns if not c.startswith("time/")]
    pd.testing.assert_frame_equal(ma[cols], mb[cols])


def test_checkpoint_mismatch_and_corruption_are_refused(tmp_path):
    cfg = load_config("bptt_lag/FunctionEnv-v0", [f"run_root={tmp_path}"])
    run = rundir.new_run_dir(cfg)
    rundir.save_checkpoint(run, 1, {"algo": "ppo_lag", "task": cfg.task}, keep=2)
    with pytest.raises(ConfigError, match="is for algo 'ppo_lag'"):
        rundir.load_checkpoint(run, cfg)
    (run / "checkpoints" / "ckpt_0000002.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot be read"):
        rundir.load_checkpoint(run, cfg)


def test_atomic_checkpoints_keep_the_last_n(tmp_path):
    cfg = load_config("bptt_lag/FunctionEnv-v0", [f"run_root={tmp_path}"])
    run = rundir.new_run_dir(cfg)
    for i in range(1, 6):
        rundir.save_checkpoint(run, i, {"algo": cfg.algo, "task": cfg.task, "i": i}, keep=3)
    (run / "checkpoints" / "ckpt_0000009.pt.tmp").write_bytes(b"half-written")  # a killed write
    assert [p.name for p in rundir.checkpoints(run)] == [f"ckpt_000000{i}.pt" for i in (3, 4, 5)]
    assert rundir.load_checkpoint(run, cfg)["i"] == 5


def test_metrics_reach_tensorboard_and_offline_wandb(ray_session, run_root, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("ppo_lag/FunctionEnv-v0", ["total_env_steps=4000", "logging.wandb=true",
                                                  f"run_root={run_root}"])
    run = train(cfg)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"episode/return", "episode/cost", "lagrange_multiplier"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("episode/cost")] == [2000, 4000]
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    history = [r for r in wandb_records(offline[0]) if r.WhichOneof("record_type") == "history"]
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in history]
    assert [r["_step"] for r in rows] == [2000, 4000]
    keys = {"episode/return", "episode/cost", "episode/violation_rate", "cost_limit", "lagrange_multiplier",
            "loss_pi", "kl", "time/env_steps_per_s", "time/learner_updates_per_s", "health/actors_alive"}
    assert keys <= set(rows[-1]), sorted(keys - set(rows[-1]))
    assert rows[-1]["cost_limit"] == 8.0 and rows[-1]["env_steps"] == 4000
    csv = metrics(run)  # the same numbers as the run directory's CSV
    assert [r["episode/cost"] for r in rows] == pytest.approx(csv["episode/cost"].tolist())


def wandb_records(path):
    """The protobuf records of an offline ``run-*.wandb`` file: a ``:W&B`` header (7 bytes),
    then LevelDB-log framing (32 KiB blocks; chunks of crc32, length, type = full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_evaluate_a_gradient_run(ray_session, run_root):
    from saferl.tools.evaluate import evaluate

    cfg = load_config("bptt_lag/FunctionEnv-v0", ["total_env_steps=12800", f"run_root={run_root}"])
    result = evaluate(train(cfg), episodes=6)
    assert result["episodes"] == 6 and result["cost_limit"] == 8.0 and result["iteration"] == 2
    assert result["cost_mean"] == pytest.approx(result["return_mean"])  # FunctionEnv: r ≡ c


def test_per_step_normaliser_through_ray(ray_session, run_root):
    """``obs_norm_per_step`` end to end: the hosts normalise as they collect, the learner's
    statistics count every valid step once (1e-4 is the prior)."""
    cfg = load_config("ppo_lag/FunctionEnv-v0", ["total_env_steps=4000", "algo_params.obs_norm_per_step=true",
                                                  f"run_root={run_root}"])
    run = train(cfg)
    count = rundir.load_checkpoint(run, cfg)["learner"]["policy"]["norm.count"]
    assert float(count) == pytest.approx(4000 + 1e-4)
    assert np.isfinite(metrics(run)["loss_pi"]).all()
