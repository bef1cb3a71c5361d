"""The on-policy update's fast paths give the same floats as the plain PyTorch they replace: the
Gaussian log-probability without a torch.distributions object, the critics' L2 gradient added by
hand, the gradient clip that skips a product with 1, foreach Adam, the per-pass minibatch gather,
and a whole PPO-Lag update (OmniSafe's options: critic norm, critic clip, entropy bonus) against a
reference loop written with torch.distributions, autograd and ``clip_grad_norm_``. Bitwise:
``torch.equal``, not a tolerance."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from saferl.actors.env_host import EnvHost
from saferl.learners.base import EnvSpec, clip_grad_norm
from saferl.learners.cuda_graph import guarded_step_on_device
from saferl.learners.networks import mlp, normal_entropy, normal_log_prob
from saferl.learners.onpolicy_base import adam, add_l2_gradient, assemble, flat, shuffled_minibatches, to_floats
from saferl.learners.ppo_lag import PPOLag
from saferl.metric_keys import SKIPPED_UPDATES

CPU = torch.device("cpu")


def test_normal_log_prob_and_entropy_are_torch_distributions_bitwise():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(37, 3, generator=g).requires_grad_()
    log_std = torch.randn(3, generator=g).requires_grad_()
    u = torch.randn(37, 3, generator=g)
    ref = torch.distributions.Normal(mu, log_std.exp())
    ref_val = ref.log_prob(u).sum(-1)
    ref_h = ref.entropy().sum(-1)
    ref_grads = torch.autograd.grad((ref_val * torch.linspace(-1, 1, 37)).sum() + ref_h.mean(), [mu, log_std])
    std = log_std.exp().expand_as(mu)  # as GaussianPolicy.mean_std gives it
    val, h = normal_log_prob(mu, std, u), normal_entropy(std)
    grads = torch.autograd.grad((val * torch.linspace(-1, 1, 37)).sum() + h.mean(), [mu, log_std])
    assert torch.equal(val, ref_val) and torch.equal(h, ref_h)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_l2_gradient_by_hand_is_autograds():
    torch.manual_seed(0)
    nets = [mlp([5, 16, 16, 1]), mlp([5, 16, 16, 1])]
    params = [w for n in nets for w in n.parameters()]
    z, y = torch.randn(32, 5), torch.randn(32)
    mse = lambda: sum(((n(z).squeeze(-1) - y) ** 2).mean() for n in nets)  # noqa: E731
    (mse() + 0.001 * sum((w ** 2).sum() for w in params)).backward()
    ref = [w.grad.clone() for w in params]
    for w in params:
        w.grad = None
    mse().backward()
    add_l2_gradient(params, 0.001)
    assert all(torch.equal(w.grad, r) for w, r in zip(params, ref))
    with torch.no_grad():  # the penalty's value as critic_update forms it
        penalty = sum(s.sum() for s in torch._foreach_mul(params, params))
        assert torch.equal(penalty, sum((w ** 2).sum() for w in params))


@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e6])
def test_clip_grad_norm_is_torchs(max_norm):
    torch.manual_seed(0)
    grads = [torch.randn(s) for s in [(16, 5), (16,), (1, 16), (1,)]]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    ref = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, r, g in zip(params, ref, grads):
        p.grad, r.grad = g.clone(), g.clone()
    torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert clip_grad_norm(params, max_norm)
    assert all(torch.equal(p.grad, r.grad) for p, r in zip(params, ref))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_grad_norm_reports_a_non_finite_norm(bad):
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    params[0].grad, params[1].grad = torch.tensor([1.0, bad, 2.0]), torch.ones(2)
    assert not clip_grad_norm(params, 1.0)


def test_foreach_adam_is_the_default_adam():
    torch.manual_seed(0)
    a = [torch.randn(s, requires_grad=True) for s in [(64, 60), (64,), (3,)]]
    b = [x.detach().clone().requires_grad_() for x in a]
    opt_a, opt_b = adam(a, 3e-4), torch.optim.Adam(b, lr=3e-4)
    for _ in range(20):
        grads = [torch.randn_like(x) for x in a]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_shuffled_minibatches_are_randperm_splits():
    data = {"x": torch.arange(10.0)[:, None].expand(10, 3), "y": torch.arange(10)}
    torch.manual_seed(3)
    mbs = shuffled_minibatches(data, 4, CPU)
    torch.manual_seed(3)
    idx = torch.randperm(10).split(4)
    assert [len(mb["y"]) for mb in mbs] == [4, 4, 2]
    assert all(torch.equal(mb["x"], data["x"][i]) and torch.equal(mb["y"], data["y"][i]) for mb, i in zip(mbs, idx))
    assert to_floats([torch.tensor(0.5), torch.tensor(1.5)]) == [0.5, 1.5] and to_floats([2.0]) == [2.0]


def reference_update(learner: PPOLag, batches: list[dict]) -> None:
    """PPO-Lag's epochs written the plain way: observations normalised per minibatch, a
    torch.distributions.Normal per minibatch, the L2 penalty through autograd, torch's
    clip_grad_norm_, default Adam, statistics read per minibatch."""
    p = learner.p
    batch = assemble(batches, CPU)
    adv, ret_r, ret_c = learner.policy_advantages(batch)
    obs, act, logp_old = flat(batch, batch["obs"]), flat(batch, batch["act"]), flat(batch, batch["logp"])
    critics = [*learner.v_r.parameters(), *learner.v_c.parameters()]
    for _ in range(p.epochs):
        for idx in torch.randperm(obs.shape[0]).split(p.minibatch_size):
            dist = learner.policy.dist(obs[idx])
            ratio = torch.exp(dist.log_prob(act[idx]).sum(-1) - logp_old[idx])
            loss = -torch.min(ratio * adv[idx], ratio.clamp(1 - p.clip, 1 + p.clip) * adv[idx]).mean()
            loss = loss - p.entropy_coef * dist.entropy().sum(-1).mean()
            learner.pi_opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(learner.policy.parameters(), p.max_grad_norm)
            learner.pi_opt.step()
            z = learner.policy.normalised(obs[idx])
            loss_v = ((learner.v_r(z).squeeze(-1) - ret_r[idx]) ** 2).mean() + \
                ((learner.v_c(z).squeeze(-1) - ret_c[idx]) ** 2).mean()
            loss_v = loss_v + p.critic_norm_coef * sum((w ** 2).sum() for w in critics)
            learner.v_opt.zero_grad()
            loss_v.backward()
            torch.nn.utils.clip_grad_norm_(critics, p.max_grad_norm)
            learner.v_opt.step()
        with torch.no_grad():
            kl = (logp_old - learner.policy.dist(obs).log_prob(act).sum(-1)).mean().item()
        if kl > p.target_kl:
            break
    learner.policy.norm.update(obs)


@pytest.mark.parametrize("max_grad_norm, entropy_coef", [(40.0, 0.0), (0.05, 0.01)])
def test_ppo_lag_update_is_the_plain_loop_bitwise(max_grad_norm, entropy_coef):
    """OmniSafe's PPO-Lag options (critic norm 0.001, critic clip, minibatch 64); a max_grad_norm
    of 0.05 clips every step."""
    host = EnvHost("FunctionEnv-v0", 4, 0)
    env = EnvSpec.of(host.spec())
    params = PPOLag.Params(hidden=[16, 16], epochs=3, minibatch_size=64, critic_norm_coef=0.001,
                           clip_critic_grad=True, max_grad_norm=max_grad_norm, entropy_coef=entropy_coef)
    fast = PPOLag(params, env, 8.0, CPU, seed=0)
    plain = copy.deepcopy(fast)
    plain.pi_opt = torch.optim.Adam(plain.policy.parameters(), lr=params.policy_lr)
    plain.v_opt = torch.optim.Adam([*plain.v_r.parameters(), *plain.v_c.parameters()], lr=params.critic_lr)
    for _ in range(2):
        batch, _ = host.rollout(fast.numpy_policy(), 50)
        torch.manual_seed(1)
        fast.update([batch])
        torch.manual_seed(1)
        reference_update(plain, [batch])
        for a, b in ((fast.policy, plain.policy), (fast.v_r, plain.v_r), (fast.v_c, plain.v_c)):
            assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -- the step a CUDA graph holds (learners/cuda_graph.py), run eagerly on the CPU ------------------

def small_ppo_lag(**kw) -> tuple[PPOLag, EnvHost]:
    host = EnvHost("FunctionEnv-v0", 4, 0)
    params = PPOLag.Params(**{"hidden": [16, 16], "epochs": 3, "minibatch_size": 64, "critic_norm_coef": 0.001,
                              "clip_critic_grad": True, **kw})
    return PPOLag(params, EnvSpec.of(host.spec()), 8.0, CPU, seed=0), host


def same_state(a, b) -> bool:
    """Networks (bitwise) and optimiser states of two on-policy learners alike."""
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(x, y) for k in ("policy", "v_r", "v_c", "q_c")
               for x, y in zip(sa.get(k, {}).values(), sb.get(k, {}).values())) \
        and all(str(sa[k]) == str(sb[k]) for k in ("pi_opt", "v_opt") if k in sa)


def paired_updates(a, b, host: EnvHost, n: int):
    """``n`` updates of ``a`` and of ``b`` on the same batches (rolled out with ``a``'s policy), the
    torch seed reset before each: yields their statistics."""
    for _ in range(n):
        batch, _ = host.rollout(a.numpy_policy(), 50)
        torch.manual_seed(1)
        x = a.update([batch])
        torch.manual_seed(1)
        yield x, b.update([batch])


def update_with_a_nan(learner: PPOLag, batch: dict, target: str) -> dict:
    """One update with row 7 of the advantages (``adv``) or the reward value targets (``ret_r``) NaN."""
    advantages = learner.policy_advantages

    def poisoned(b):
        out = dict(zip(("adv", "ret_r", "ret_c"), advantages(b)))
        out[target] = torch.where(torch.arange(len(out[target])) == 7, float("nan"), out[target])
        return out["adv"], out["ret_r"], out["ret_c"]
    learner.policy_advantages = poisoned
    torch.manual_seed(1)
    return learner.update([batch])


@pytest.mark.parametrize("max_grad_norm", [40.0, 0.05])
def test_device_step_is_the_eager_step_bitwise(max_grad_norm):
    """PPO-Lag's updates through ``device_step`` (guard on the device, step always taken and undone
    when not finite) equal ``eager_step``'s (guard read on the host): parameters, Adam moments and
    statistics, over two updates; a max_grad_norm of 0.05 clips every step."""
    eager, host = small_ppo_lag(max_grad_norm=max_grad_norm)
    device = copy.deepcopy(eager)
    device.minibatch_step = lambda loss, lane: functools.partial(device.device_step, loss)
    for a, b in paired_updates(eager, device, host, 2):
        assert same_state(eager, device) and a == b


def test_device_step_undoes_a_non_finite_step():
    """A NaN loss: the parameters and Adam's state stay as they were (a fresh optimiser's state
    stays equivalent to none: zeros), the step reports False, and a later finite step equals the
    eager path's."""
    learner, _ = small_ppo_lag()
    z = torch.randn(64, learner.env.obs_dim)
    params = list(learner.policy.parameters())
    before = [p.clone() for p in params]
    nan = learner.policy.mean_std(z)[0].sum() * float("nan")
    assert not guarded_step_on_device(learner.pi_opt, params, nan, 40.0)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(float(t.abs().sum()) == 0 for s in learner.pi_opt.state.values() for t in s.values())
    twin = copy.deepcopy(learner)
    twin.pi_opt = adam(twin.policy.parameters(), twin.p.policy_lr)  # never stepped: no state
    loss = learner.policy.mean_std(z)[0].pow(2).mean()
    assert guarded_step_on_device(learner.pi_opt, params, loss, 40.0)
    twin.descend(twin.pi_opt, twin.policy.mean_std(z)[0].pow(2).mean(), twin.policy.parameters(), 40.0)
    assert all(torch.equal(p, q) for p, q in zip(params, twin.policy.parameters()))
    assert str(learner.pi_opt.state_dict()["state"]) == str(twin.pi_opt.state_dict()["state"])


def test_device_step_counts_refused_steps_like_the_eager_step():
    """One minibatch's advantages set to NaN: both paths refuse its policy step, count it in
    ``health/skipped_updates`` and end with the same parameters."""
    eager, host = small_ppo_lag(epochs=1)
    device = copy.deepcopy(eager)
    device.minibatch_step = lambda loss, lane: functools.partial(device.device_step, loss)
    batch, _ = host.rollout(eager.numpy_policy(), 50)
    out = [update_with_a_nan(learner, batch, "adv") for learner in (eager, device)]
    assert out[0][SKIPPED_UPDATES] == out[1][SKIPPED_UPDATES] == 1 and same_state(eager, device)


@pytest.mark.parametrize("algo", ["ppo_lag", "trpo_lag", "focops"])
def test_batches_normalised_per_step_are_trained_on_as_collected(algo):
    """``obs_norm_per_step``: the learner trains on the observations as the host normalised them
    (the same update as a learner without a normaliser fed them), and its statistics then absorb
    the raw observations, as after any update."""
    from saferl.registry import get_algo

    cls = get_algo(algo).load()
    host = EnvHost("PointHazard-D1-v0", 4, 0)
    learner = cls(cls.Params(hidden=[16, 16], obs_norm_per_step=True), EnvSpec.of(host.spec()), 2.0, CPU, seed=0)
    batch, _ = host.rollout(learner.numpy_policy(), 60)
    assert "raw_obs" in batch
    plain = copy.deepcopy(learner)
    plain.policy.norm = None
    expected = copy.deepcopy(learner.policy.norm)
    expected.update(torch.as_tensor(batch["raw_obs"].reshape(-1, batch["raw_obs"].shape[-1])))
    torch.manual_seed(1)
    a = learner.update([batch])
    torch.manual_seed(1)
    b = plain.update([{k: v for k, v in batch.items() if k != "raw_obs"}])
    assert a == b
    assert all(torch.equal(x, y) for x, y in zip(learner.policy.net.state_dict().values(),
                                                 plain.policy.net.state_dict().values()))
    assert all(torch.equal(getattr(learner.policy.norm, k), getattr(expected, k)) for k in ("mean", "var", "count"))


@pytest.mark.parametrize("lane", ["thread", "process"])
@pytest.mark.parametrize("algo", ["ppo_lag", "focops", "cup", "appo", "trpo_lag", "cpo", "pcpo", "trpo_unsafe"])
def test_critics_beside_the_policy_give_the_serial_floats(algo, lane):
    """``parallel_critics`` (the critic steps on a second thread, ``CriticLane``, or in a second
    process, ``learners/critic_process.py``: beside each policy minibatch step in the PPO family,
    beside the whole policy step in the TRPO family) against the serial loop, over three updates:
    parameters, Adam moments and every statistic equal bitwise."""
    from saferl.registry import get_algo

    cls = get_algo(algo).load()
    host = EnvHost("FunctionEnv-v0", 4, 0)
    epochs = {"epochs": 3} if "epochs" in cls.Params.model_fields else {"critic_epochs": 3}
    critic_reg = {"critic_norm_coef": 0.001, "clip_critic_grad": True} if algo != "trpo_unsafe" else {}
    params = cls.Params(hidden=[16, 16], minibatch_size=32, parallel_critics=lane, **epochs, **critic_reg)
    beside = cls(params, EnvSpec.of(host.spec()), 8.0, CPU, seed=0)
    serial = copy.deepcopy(beside)
    serial.p = params.model_copy(update={"parallel_critics": False})
    try:
        for a, b in paired_updates(beside, serial, host, 3):
            assert a == b and a["loss_v"] > 0 and same_state(beside, serial)
    finally:
        if beside.critic_process is not None:
            beside.critic_process.close()
    assert (beside.critic_process is not None) == (lane == "process")


def test_a_refused_critic_step_on_the_second_thread_is_counted():
    """One minibatch's value targets NaN: its critic step is refused on the lane's thread, counted
    once in ``health/skipped_updates``, and the critics end as the serial loop's."""
    threaded, host = small_ppo_lag(epochs=1, parallel_critics=True)
    serial = copy.deepcopy(threaded)
    serial.p = threaded.p.model_copy(update={"parallel_critics": False})
    batch, _ = host.rollout(threaded.numpy_policy(), 50)
    out = [update_with_a_nan(learner, batch, "ret_r") for learner in (threaded, serial)]
    assert threaded.p.parallel_critics and out[0][SKIPPED_UPDATES] == out[1][SKIPPED_UPDATES] == 1
    assert same_state(threaded, serial)


def test_a_critic_process_that_died_is_a_one_line_error_and_the_next_update_restarts_it():
    """``parallel_critics: process``: the child killed during an update; the drain says so in one
    line, and the next update starts a fresh child from the learner's state."""
    learner, host = small_ppo_lag(epochs=1, parallel_critics="process")
    batch, _ = host.rollout(learner.numpy_policy(), 50)
    try:
        learner.update([batch])
        lane, dead = learner.critic_lane(), learner.critic_process
        dead.proc.kill()
        dead.proc.wait()
        lane.submit(torch.zeros(4, 1), torch.zeros(4), torch.zeros(4))
        with pytest.raises(RuntimeError, match=rf"^the critic process \(pid {dead.proc.pid}\) ended: exit code -9$"):
            lane.drain()
        out = learner.update([batch])
        assert learner.critic_process is not dead and learner.critic_process.alive() and out["loss_v"] > 0
    finally:
        learner.critic_process.close()
