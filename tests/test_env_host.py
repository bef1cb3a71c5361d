"""Env-host protocol through the isolated Safety-Gymnasium interpreter (a real Ray actor), the
torch adapter's auto-reset, and a Safety-Gymnasium training + evaluation round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import ray

from saferl.actors.env_host import EnvHost
from saferl.batch import ROLLOUT_FIELDS
from saferl.cli import main
from saferl.cluster.placement import host_options
from saferl.cluster.session import train
from saferl.config import load_config
from saferl.learners.networks import GaussianPolicy
from tests.conftest import needs_sg

SG_TASK = "SafetyPointGoal1-v0"


def sg_host(n: int, seed: int, index: int = 0):
    cfg = load_config({"algo": "ppo_lag", "task": SG_TASK, "steps_per_iteration": n,
                       "resources": {"envs_per_host": n}})
    return ray.remote(EnvHost).options(**host_options(cfg)).remote(SG_TASK, n, seed, index)


@needs_sg()
def test_safety_gymnasium_host_protocol(ray_session):
    host = sg_host(3, seed=7)
    spec = ray.get(host.spec.remote())
    assert (spec["obs_dim"], spec["act_dim"], spec["max_episode_steps"]) == (60, 2, 1000)
    first = ray.get(host.reset.remote(11))
    assert first.shape == (3, 60) and first.dtype == np.float32
    assert not np.allclose(first[0], first[1]), "envs of a host get different seeds"
    np.testing.assert_array_equal(ray.get(host.reset.remote(11)), first)  # seeding reproducible
    obs, rew, cost, term, trunc, _info = ray.get(host.step.remote(np.zeros((3, 2), np.float32)))
    assert obs.shape == (3, 60) and rew.shape == cost.shape == term.shape == trunc.shape == (3,)
    assert cost.dtype == np.float32 and (cost >= 0).all()

    policy = GaussianPolicy(60, 2, [16]).export_numpy()
    batch_ref, summary_ref = host.rollout.options(num_returns=2).remote(policy, 1001)
    batch, summary = ray.get([batch_ref, summary_ref])
    assert batch["obs"].shape == (1001, 3, 60) and batch["cost"].shape == (1001, 3)
    # the episode started by the step above ends at its 1000th step: auto-reset, final obs kept
    assert batch["truncated"][998].all() and not batch["truncated"][997].any()
    assert sorted(map(tuple, batch["final_idx"])) == [(998, 0), (998, 1), (998, 2)]
    assert not np.allclose(batch["final_obs"][0], batch["obs"][999, 0]), "next obs is a fresh reset"
    assert [ep["length"] for ep in summary["episodes"]] == [1000] * 3
    total_cost = batch["cost"][:999].sum(0)
    np.testing.assert_allclose(sorted(ep["cost"] for ep in summary["episodes"]),
                               sorted(total_cost + cost), rtol=1e-5)
    ray.kill(host)


def test_torch_task_host_auto_resets_at_the_horizon():
    host = EnvHost("FunctionEnv-v0", 4, seed=0)
    policy = GaussianPolicy(1, 1, [8]).export_numpy()
    batch, summary = host.rollout(policy, 150)
    assert tuple(batch) == ROLLOUT_FIELDS  # the named record (saferl/batch.py), nothing more
    assert batch["obs"].shape == (150, 4, 1) and batch["final_idx"].shape == (4, 2) and batch["valid"].all()
    assert batch["truncated"][99].all() and batch["truncated"].sum() == 4
    assert [ep["length"] for ep in summary["episodes"]] == [100] * 4
    np.testing.assert_allclose([ep["return"] for ep in summary["episodes"]], batch["reward"][:100].sum(0),
                               rtol=1e-5)


@needs_sg()
def test_ppo_lag_on_safety_gymnasium_trains_and_evaluates(ray_session, run_root, capsys):
    cfg = load_config(f"ppo_lag/{SG_TASK}", [
        "total_env_steps=4000", "steps_per_iteration=2000", "resources.num_env_hosts=2",
        "resources.envs_per_host=2", "algo_params.epochs=2", f"run_root={run_root}"])
    run = train(cfg)
    assert (run / "metrics.csv").is_file() and list((run / "tb").iterdir())
    assert main(["eval", str(run), "--episodes", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 2 and result["cost_limit"] == 25.0
    assert 0.0 <= result["violation_rate"] <= 1.0 and result["iteration"] == 2


def test_per_step_normalising_rollout_uses_the_statistics_of_every_step():
    """``obs_norm_per_step`` (OmniSafe's ObsNormalize): each step's observations are merged into
    the statistics before the policy acts on them, so obs[t] is normalised with the moments of all
    observations up to and including step t (and the policy's prior, 1e-4 of a sample); the raw
    ones come as ``raw_obs``, the last observations are normalised with the final statistics."""
    host = EnvHost("PointHazard-D1-v0", 4, seed=0)
    spec = host.spec()
    policy = GaussianPolicy(spec["obs_dim"], spec["act_dim"], [8], norm_per_step=True).export_numpy()
    assert policy["obs_norm_per_step"] and policy["obs_count"] == pytest.approx(1e-4)
    batch, _ = host.rollout(policy, 30)
    raw, z = batch["raw_obs"], batch["obs"]
    assert raw.shape == z.shape == (30, 4, spec["obs_dim"]) and batch["valid"].all()

    def normalised(obs, seen):  # the prior (mean 0, var 1, 1e-4 samples) merged with all seen at once
        n, c0 = len(seen), 1e-4
        m, v = seen.mean(0), seen.var(0)
        mean, var = m * n / (c0 + n), (c0 + v * n + m ** 2 * c0 * n / (c0 + n)) / (c0 + n)
        return np.clip((obs - mean) / np.sqrt(var + 1e-8), -10, 10)

    for t in (0, 1, 10, 29):
        np.testing.assert_allclose(z[t], normalised(raw[t], raw[:t + 1].reshape(-1, spec["obs_dim"]).astype(float)),
                                   atol=1e-4)
    np.testing.assert_allclose(batch["last_obs"], normalised(host.obs, raw.reshape(-1, spec["obs_dim"]).astype(float)),
                               atol=1e-4)
    plain, _ = EnvHost("PointHazard-D1-v0", 4, seed=0).rollout({**policy, "obs_norm_per_step": False}, 30)
    assert "raw_obs" not in plain and np.array_equal(plain["obs"][0], raw[0])  # same start, raw kept as obs
