"""Off-policy machinery: n-step transitions, the replay buffer, the tanh-Gaussian policy and SAC's
targets, TD3's clipped double-Q target, delayed updates and deterministic actor against independent
computations; SAC / SAC-Lag / TD3-Lag end to end on a real local Ray cluster."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from saferl.actors import np_policy
from saferl.actors.replay import ReplayBuffer, n_step_transitions
from saferl.cluster import rundir
from saferl.cluster.session import train
from saferl.config import load_config
from saferl.learners.base import EnvSpec
from saferl.learners.networks import DeterministicTanhPolicy, TanhGaussianPolicy, flat_params
from saferl.learners.sac_lag import SACLag, SACLagParams
from saferl.learners.td3_lag import DDPGLag, DDPGLagParams, TD3Lag, TD3LagParams


def rollout_batch(rng, T=7, N=3, d=2, a=1):
    term = rng.random((T, N)) < 0.15
    trunc = ~term & (rng.random((T, N)) < 0.1)
    ended = np.argwhere(term | trunc)
    return {"obs": rng.normal(size=(T, N, d)).astype(np.float32), "act": rng.normal(size=(T, N, a)).astype(np.float32),
            "reward": rng.normal(size=(T, N)).astype(np.float32), "cost": rng.random((T, N)).astype(np.float32),
            "terminated": term, "truncated": trunc, "last_obs": rng.normal(size=(N, d)).astype(np.float32),
            "final_idx": ended, "final_obs": rng.normal(size=(len(ended), d)).astype(np.float32)}


def n_step_by_hand(b, t, i, n, gamma):
    """The definition, one transition at a time."""
    T = len(b["reward"])
    finals = {(int(s), int(e)): o for (s, e), o in zip(b["final_idx"], b["final_obs"])}
    r = c = 0.0
    for k in range(n):
        s = t + k
        if s >= T:
            break
        r += gamma ** k * b["reward"][s, i]
        c += gamma ** k * b["cost"][s, i]
        last = s
        if b["terminated"][s, i] or b["truncated"][s, i]:
            break
    nxt = finals.get((last, i), b["obs"][last + 1, i] if last + 1 < T else b["last_obs"][i])
    disc = 0.0 if b["terminated"][last, i] else gamma ** (last - t + 1)
    return r, c, disc, nxt


@pytest.mark.parametrize("n", [1, 3])
def test_n_step_transitions_match_the_definition(n):
    rng = np.random.default_rng(n)
    b = rollout_batch(rng)
    out = n_step_transitions(b, n, 0.9)
    T, N = b["reward"].shape
    for t in range(T):
        for i in range(N):
            r, c, disc, nxt = n_step_by_hand(b, t, i, n, 0.9)
            j = t * N + i
            assert out["reward"][j] == pytest.approx(r, abs=1e-5)
            assert out["cost"][j] == pytest.approx(c, abs=1e-5)
            assert out["discount"][j] == pytest.approx(disc, abs=1e-6)
            np.testing.assert_allclose(out["next_obs"][j], nxt)


def test_replay_ring_buffer_keeps_the_newest_and_resumes():
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(capacity=30, n_step=1, gamma=0.9, seed=1)
    batches = [rollout_batch(rng, T=4, N=3) for _ in range(4)]  # 48 transitions into 30 slots
    assert buf.add(*batches) == 30
    kept = np.concatenate([n_step_transitions(b, 1, 0.9)["obs"] for b in batches])[-30:]
    assert {tuple(x) for x in buf.data["obs"]} == {tuple(x) for x in kept}
    clone = ReplayBuffer(30, 1, 0.9, seed=99)
    clone.load_state_dict(buf.state_dict())
    a, b = buf.sample(2, 5), clone.sample(2, 5)
    assert a["obs"].shape == (2, 5, 2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_tanh_gaussian_log_prob_and_numpy_export():
    torch.manual_seed(0)
    pol = TanhGaussianPolicy(3, 2, [16, 16])
    obs = torch.randn(64, 3)
    dist = pol.dist(obs)
    u = dist.sample()
    a, logp = pol.sample(obs, u)
    ref = torch.distributions.TransformedDistribution(dist, [torch.distributions.TanhTransform()])
    torch.testing.assert_close(logp, ref.log_prob(a).sum(-1), atol=2e-3, rtol=1e-4)
    state = pol.export_numpy()
    mu, log_std = np_policy.mean_and_log_std(state, obs.numpy())
    np.testing.assert_allclose(mu, dist.loc.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.exp(log_std), dist.scale.detach().numpy(), rtol=1e-5)
    action, _, _ = np_policy.act(state, obs.numpy(), np.random.default_rng(0), deterministic=True)
    np.testing.assert_allclose(action, torch.tanh(dist.loc).detach().numpy(), atol=1e-5)


def critic_loss_by_hand(learner, b, a2, bonus):
    """Σ_j mean (Q_Rj(s, tanh u) − y_R)² + mean (Q_C(s, tanh u) − y_C)² for twin reward critics and
    discount 0.9, written out network by network: y_R = r + 0.9 (min(Q̄_R1, Q̄_R2)(s', a') + bonus)."""
    x2, x = torch.cat([b["next_obs"], a2], -1), torch.cat([b["obs"], torch.tanh(b["act"])], -1)
    q_bar = torch.minimum(learner.q_r_target.qs[0](x2), learner.q_r_target.qs[1](x2)).squeeze(-1)
    y_r = b["reward"] + 0.9 * (q_bar + bonus)
    y_c = b["cost"] + 0.9 * learner.q_c_target.qs[0](x2).squeeze(-1)
    return sum(((q(x).squeeze(-1) - y_r) ** 2).mean() for q in learner.q_r.qs) + \
        ((learner.q_c.qs[0](x).squeeze(-1) - y_c) ** 2).mean()


def test_sac_critic_targets_are_the_soft_bellman_backup():
    """One step's critic loss equals the loss written out from eq 5 with the same sampled a'."""
    env = EnvSpec(obs_dim=3, act_dim=2, act_low=[-1, -1], act_high=[1, 1], max_episode_steps=10)
    learner = SACLag(SACLagParams(hidden=[16], init_alpha=0.3), env, 5.0, torch.device("cpu"), seed=0)
    learner.multiplier.value = 0.7
    b = {"obs": torch.randn(8, 3), "act": torch.randn(8, 2), "reward": torch.randn(8), "cost": torch.rand(8),
         "discount": torch.full((8,), 0.9), "next_obs": torch.randn(8, 3)}
    torch.manual_seed(5)
    with torch.no_grad():
        a2, logp2 = learner.policy.sample(b["next_obs"])
        expected = critic_loss_by_hand(learner, b, a2, -0.3 * logp2)
    torch.manual_seed(5)
    out = learner.step(b)
    assert out["loss_q"] == pytest.approx(expected.item(), rel=1e-5)
    assert out["alpha"] == pytest.approx(0.3, rel=1e-6)


@pytest.mark.slow
def test_sac_learns_the_pendulum(ray_session, run_root):
    """Unconstrained SAC through env hosts and the replay actor improves SafeGBPO's Pendulum."""
    over = ["total_env_steps=4800", "algo_params.warmup_steps=960", "algo_params.hidden=[64, 64]",
            "schedule.log_every=4", f"run_root={run_root}"]
    m = pd.read_csv(train(load_config("sac/SafeGBPOPendulum-v0", over)) / "metrics.csv")
    assert m["replay/size"].iloc[-1] == 4800
    ret = m["episode/return"].dropna()
    assert ret.iloc[-1] > ret.iloc[0] + 50, ret.tolist()


# slow: test_training.py's per-family resume test (fac_sis) checks a replay buffer's bit-identical
# resume in the default run
@pytest.mark.slow
def test_sac_resume_restores_buffer_and_learner(ray_session, run_root):
    cfg = load_config("sac/SafeGBPOPendulum-v0", ["total_env_steps=1920", "algo_params.warmup_steps=384",
                                                  "algo_params.hidden=[32]", "algo_params.batch_size=64",
                                                  "schedule.checkpoint_every=4", "schedule.log_every=1",
                                                  "algo_params.cost_normalize=true", f"run_root={run_root}"])
    part = train(cfg, stop_after=4)
    saved = rundir.load_checkpoint(part, cfg)
    assert saved["replay"]["size"] == 4 * cfg.steps_per_iteration
    assert saved["replay"]["cost_norm"]["count"] == 4 * cfg.steps_per_iteration  # the normaliser's statistics
    train(cfg, run_dir=part)
    m = pd.read_csv(part / "metrics.csv")
    assert m["replay/size"].tolist() == [cfg.steps_per_iteration * (i + 1) for i in range(len(m))]
    assert m["iteration"].tolist() == list(range(1, len(m) + 1))


@pytest.mark.slow
def test_sac_lag_dual_phase_raises_the_multiplier(ray_session, run_root):
    """Slow: TD3-Lag's run below covers the off-policy dual phase on Ray by default, and SAC-Lag's
    multiplier rule is checked step by step in test_off_policy_multiplier_takes_one_adam_step…"""
    cfg = load_config("sac_lag/SafeGBPOPendulum-v0", ["total_env_steps=1920", "algo_params.warmup_steps=960",
                                                      "algo_params.hidden=[32]", "algo_params.batch_size=64",
                                                      f"run_root={run_root}"])
    m = pd.read_csv(train(cfg) / "metrics.csv")
    costs = m["episode/cost"].dropna()
    assert (costs > 0).any(), "the unsafe pendulum should violate under random actions"
    assert m["lagrange_multiplier"].iloc[-1] > 0


def td3_learner(**kw):
    env = EnvSpec(obs_dim=3, act_dim=2, act_low=[-1, -1], act_high=[1, 1], max_episode_steps=10)
    return TD3Lag(TD3LagParams(hidden=[16], **kw), env, 5.0, torch.device("cpu"), seed=0)


def random_minibatch(n=8):
    return {"obs": torch.randn(n, 3), "act": torch.randn(n, 2), "reward": torch.randn(n), "cost": torch.rand(n),
            "discount": torch.full((n,), 0.9), "next_obs": torch.randn(n, 3)}


def test_td3_critic_targets_are_clipped_double_q_with_smoothing():
    """One step's critic loss equals the loss written out from TD3's target (clipped double Q on
    the smoothed target action) with the same smoothing noise."""
    learner = td3_learner(target_noise=0.3, noise_clip=0.4)
    with torch.no_grad():  # targets distinct from the online nets, so a mix-up would show
        for p in [*learner.policy_target.parameters(), *learner.q_r_target.parameters(),
                  *learner.q_c_target.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    b = random_minibatch()
    torch.manual_seed(5)
    with torch.no_grad():
        mu_bar = torch.tanh(learner.policy_target.net(b["next_obs"]))
        eps = (0.3 * torch.randn(8, 2)).clamp(-0.4, 0.4)
        a2 = (mu_bar + eps).clamp(-1, 1)
        expected = critic_loss_by_hand(learner, b, a2, 0.0)
    torch.manual_seed(5)
    out = learner.step(b)
    assert out["loss_q"] == pytest.approx(expected.item(), rel=1e-5)


def test_td3_actor_and_targets_move_only_every_policy_delay_steps():
    learner = td3_learner(policy_delay=3)
    learner.multiplier.value = 0.5
    snap = lambda m: flat_params(m).clone()  # noqa: E731
    for i in range(1, 7):
        pol, pol_t, q_t, q = (snap(learner.policy), snap(learner.policy_target), snap(learner.q_r_target),
                              snap(learner.q_r))
        out = learner.step(random_minibatch())
        delayed = i % 3 == 0
        assert ("loss_pi" in out) == delayed
        assert not torch.equal(q, flat_params(learner.q_r)), "the critics step every time"
        for before, module in [(pol, learner.policy), (pol_t, learner.policy_target), (q_t, learner.q_r_target)]:
            assert torch.equal(before, flat_params(module)) != delayed, (i, module)


def test_ddpg_is_one_critic_without_smoothing_or_delay():
    env = EnvSpec(obs_dim=3, act_dim=2, act_low=[-1, -1], act_high=[1, 1], max_episode_steps=10)
    learner = DDPGLag(DDPGLagParams(hidden=[16]), env, 5.0, torch.device("cpu"), seed=0)
    assert len(learner.q_r.qs) == 1
    b = random_minibatch()
    torch.testing.assert_close(learner.target_action(b["next_obs"]), learner.policy_target(b["next_obs"]))
    assert "loss_pi" in learner.step(b)


def test_deterministic_actor_numpy_export_and_exploration():
    torch.manual_seed(0)
    pol = DeterministicTanhPolicy(3, 2, [16, 16], exploration_noise=0.3)
    with torch.no_grad():
        pol.net[-1].weight.mul_(300.0)  # some actions saturate, to exercise the clipping
    obs = torch.randn(256, 3)
    state = pol.export_numpy()
    mu = pol(obs).detach().numpy()
    action, u, _ = np_policy.act(state, obs.numpy(), np.random.default_rng(0), deterministic=True)
    np.testing.assert_allclose(action, mu, atol=1e-5)
    action, u, _ = np_policy.act(state, obs.numpy(), np.random.default_rng(1))
    ref = np.clip(mu + 0.3 * np.random.default_rng(1).standard_normal(mu.shape), -1, 1)
    np.testing.assert_allclose(action, ref, atol=1e-5)
    assert np.abs(action).max() == 1.0
    np.testing.assert_allclose(np.tanh(u), action, atol=2e-6)  # the stored u replays the executed action
    assert np.isfinite(u).all()


def test_td3_lag_dual_phase_raises_the_multiplier(ray_session, run_root):
    cfg = load_config("td3_lag/SafeGBPOPendulum-v0", ["total_env_steps=1920", "algo_params.warmup_steps=960",
                                                      "algo_params.hidden=[32]", "algo_params.batch_size=64",
                                                      f"run_root={run_root}"])
    m = pd.read_csv(train(cfg) / "metrics.csv")
    assert m["replay/size"].iloc[-1] == 1920
    assert np.isfinite(m["loss_q"].dropna()).all() and m["loss_pi"].notna().any()
    assert (m["episode/cost"].dropna() > 0).any(), "the unsafe pendulum should violate"
    assert m["lagrange_multiplier"].iloc[-1] > 0


@pytest.mark.slow
def test_sac_lag_brings_the_cost_below_the_limit(ray_session, run_root):
    """On the point/hazard task heading for the goal costs ≈ 24 per episode; with a limit of 8
    SAC-Lag's PID multiplier rises until the policy steers around the hazard."""
    cfg = load_config("sac_lag/PointHazard-D1-v0", [f"run_root={run_root}", "cost_limit=8", "schedule.log_every=1"])
    m = pd.read_csv(train(cfg) / "metrics.csv")
    ep = m.dropna(subset=["episode/cost"])
    third = len(ep) // 3
    assert ep["episode/cost"].iloc[third:2 * third].mean() > cfg.limit  # it first learned the unsafe way ...
    assert ep["episode/cost"].iloc[-third:].mean() <= cfg.limit, ep["episode/cost"].tolist()  # ... then not
    assert m["lagrange_multiplier"].max() > 1


def test_sac_actor_alpha_and_targets_move_only_every_policy_delay_steps():
    """OmniSafe's SAC runs its DDPG loop: with policy_delay 2 the actor, α and the targets move on
    every 2nd gradient step, the critics on every one."""
    env = EnvSpec(obs_dim=3, act_dim=2, act_low=[-1, -1], act_high=[1, 1], max_episode_steps=10)
    learner = SACLag(SACLagParams(hidden=[16], policy_delay=2), env, 5.0, torch.device("cpu"), seed=0)
    snap = lambda m: flat_params(m).clone()  # noqa: E731
    for i in range(1, 7):
        pol, q_t, q, alpha = snap(learner.policy), snap(learner.q_r_target), snap(learner.q_r), learner.log_alpha.item()
        out = learner.step(random_minibatch())
        delayed = i % 2 == 0
        assert ("loss_pi" in out) == delayed and not torch.equal(q, flat_params(learner.q_r))
        assert torch.equal(pol, flat_params(learner.policy)) != delayed
        assert torch.equal(q_t, flat_params(learner.q_r_target)) != delayed
        assert (alpha == learner.log_alpha.item()) != delayed


@pytest.mark.parametrize("cls,params", [(SACLag, SACLagParams), (TD3Lag, TD3LagParams), (DDPGLag, DDPGLagParams)])
def test_off_policy_multiplier_takes_one_adam_step_per_gradient_step(cls, params):
    """OmniSafe's off-policy rule by default: no λ step in the warm-up phases, then at each dual
    phase one Adam step (lr 1e-5) per gradient step since the last phase, on the 50-episode J_C;
    the count of pending steps is checkpointed."""
    from tests.test_lagrange_multipliers import adam_by_hand

    env = EnvSpec(obs_dim=3, act_dim=2, act_low=[-1, -1], act_high=[1, 1], max_episode_steps=10)
    learner = cls(params(hidden=[8], lagrange={"warmup": 2}), env, 25.0, torch.device("cpu"), seed=0)
    assert learner.multiplier.p.per_gradient_step and learner.multiplier.p.window == 50
    block = {k: v.unsqueeze(0).repeat(7, *([1] * v.dim())).numpy() for k, v in random_minibatch().items()}
    for _ in range(2):  # warm-up: λ reported, unchanged
        learner.update([block])
        assert learner.phase("dual", {"episode_costs": [125.0]}) == {"lagrange_multiplier": pytest.approx(0.001)}
    learner.update([block, block])  # 14 gradient steps
    sd = learner.state_dict()
    assert sd["dual_steps_due"] == 14
    lam = learner.phase("dual", {"episode_costs": [125.0]})["lagrange_multiplier"]
    assert lam == pytest.approx(adam_by_hand([125.0] * 14, 25.0, lr=1e-5, init=0.001)[-1], rel=1e-5)
    assert lam == pytest.approx(0.001 + 14e-5, rel=1e-3)
    assert learner.phase("dual", {"episode_costs": []}) == {"lagrange_multiplier": pytest.approx(lam)}  # 0 steps due


@pytest.mark.parametrize("cls,params", [(SACLag, SACLagParams), (TD3Lag, TD3LagParams)])
def test_init_reaches_actor_and_critics(cls, params):
    """``init: kaiming_uniform`` (OmniSafe's weight_initialization_mode) gives every layer of the
    actor and the critics PyTorch's own nn.Linear draw: non-zero biases, weights within
    ±1/√fan_in; the orthogonal default keeps zero biases."""
    env = EnvSpec(obs_dim=3, act_dim=2, act_low=[-1, -1], act_high=[1, 1], max_episode_steps=10)
    for init in ("orthogonal", "kaiming_uniform"):
        learner = cls(params(hidden=[16], init=init), env, 5.0, torch.device("cpu"), seed=0)
        linears = [m for net in (learner.policy, learner.q_r, learner.q_c) for m in net.modules()
                   if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 2 * (1 + len(learner.q_r.qs) + 1)
        for lin in linears:
            bound = 1 / np.sqrt(lin.in_features)
            if init == "orthogonal":
                assert (lin.bias == 0).all()
            else:
                assert (lin.bias != 0).all() and lin.weight.abs().max() <= bound and lin.bias.abs().max() <= bound
    with pytest.raises(ValueError, match="init"):
        params(init="xavier")


class OmniSafeNormalizer:
    """OmniSafe 0.5's ``Normalizer`` as its source reads (Chan, Golub & LeVeque's pairwise update of
    mean and sum of squares, unbiased variance, std floored at 0.01; the first push returns the raw
    data), with ``CostNormalize``'s clip of 5, written out one push at a time."""

    def __init__(self):
        self.first, self.count, self.mean, self.sumsq = True, 0, 0.0, 0.0

    def normalize(self, data: np.ndarray) -> np.ndarray:
        data = np.asarray(data, np.float64)
        if self.first:
            self.mean, self.count, self.first = data.mean(), len(data), False
            self.sumsq = ((data - self.mean) ** 2).sum()
        else:
            count = self.count + len(data)
            delta = data.mean() - self.mean
            self.mean += delta * len(data) / count
            self.sumsq += ((data - data.mean()) ** 2).sum() + delta ** 2 * self.count * len(data) / count
            self.count = count
        if self.count <= 1:
            return data
        std = max(np.sqrt(self.sumsq / (self.count - 1)), 1e-2)
        return np.clip((data - self.mean) / std, -5, 5)


def test_cost_normalisation_is_omnisafes_per_env_step():
    """``cost_normalize``: the replay stores each cost normalised as OmniSafe's CostNormalize does
    with the hosts' envs as one vector env, step after step, across iterations and a resume;
    skipped steps stay out of the statistics; rewards and the rest are untouched."""
    rng = np.random.default_rng(0)
    ref, buf = OmniSafeNormalizer(), ReplayBuffer(10_000, 1, 0.99, 0, cost_normalize=True)
    stored = []
    for it in range(4):
        hosts = [rollout_batch(rng, T=6, N=3) for _ in range(2)]
        for b in hosts:
            b["cost"] = (rng.random(b["cost"].shape) < 0.2).astype(np.float32) * rng.integers(1, 3, b["cost"].shape)
            b["valid"] = np.ones(b["cost"].shape, bool)
        hosts[1]["valid"][4:, 2] = False  # a skipped episode's steps
        hosts[1]["cost"][4:, 2] = 0.0
        want = np.zeros((6, 6))
        for t in range(6):
            cost = np.concatenate([hosts[0]["cost"][t], hosts[1]["cost"][t]])
            valid = np.concatenate([hosts[0]["valid"][t], hosts[1]["valid"][t]])
            want[t, valid] = ref.normalize(cost[valid])
        if it == 2:  # resume from a checkpoint of the buffer
            sd = buf.state_dict()
            buf = ReplayBuffer(10_000, 1, 0.99, 0, cost_normalize=True)
            buf.load_state_dict(sd)
        before = buf.size
        buf.add(*hosts)
        got = buf.data["cost"][before:buf.size]
        # n_step_transitions flattens each host's [T, N] in turn and drops invalid steps
        expect = np.concatenate([want[:, :3].reshape(-1), want[:, 3:].reshape(-1)[hosts[1]["valid"].reshape(-1)]])
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(buf.data["reward"][before:buf.size][:18], hosts[0]["reward"].reshape(-1))
        stored.append(got)
    assert np.abs(np.concatenate(stored)).max() <= 5.0 and ref.count == 4 * 6 * 6 - 4 * 2
    plain = ReplayBuffer(100, 1, 0.99, 0)
    plain.add(hosts[0])
    np.testing.assert_array_equal(plain.data["cost"][:18], hosts[0]["cost"].reshape(-1))


def test_cost_normalisation_of_fragments_of_different_lengths():
    """Hosts whose fragments differ in length cannot be lined up step by step: each host's steps
    are merged in turn, as a vector env of its own envs would push them."""
    rng = np.random.default_rng(1)
    ref, buf = OmniSafeNormalizer(), ReplayBuffer(1_000, 1, 0.99, 0, cost_normalize=True)
    hosts = [rollout_batch(rng, T=6, N=3), rollout_batch(rng, T=4, N=2)]
    want = [np.stack([ref.normalize(b["cost"][t]) for t in range(len(b["cost"]))]) for b in hosts]
    buf.add(*hosts)
    np.testing.assert_allclose(buf.data["cost"][:buf.size], np.concatenate([w.reshape(-1) for w in want]),
                               rtol=1e-5, atol=1e-6)
    assert buf.cost_norm.count == 6 * 3 + 4 * 2
