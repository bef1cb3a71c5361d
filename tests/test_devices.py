"""Device-agnostic code paths, run on every device this machine has (CPU everywhere; CUDA too when
a GPU is present): the safeguard layer, the tasks gradient workers build, and a SHAC window."""
from __future__ import annotations

import pytest
import torch

from saferl.actors.gradient_worker import GradientWorker, make_diff_env

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("task", ["SafeGBPOPendulum-BP-v0", "SafeGBPOQuadrotor-RMHyp-v0"])
def test_safeguarded_step_stays_on_the_device_and_is_safe(task, device):
    env = make_diff_env(task, device)
    gen = torch.Generator().manual_seed(0)
    state = env.initial_state(32, gen)
    assert state.device.type == device
    action = (torch.rand(32, env.act_dim, generator=gen) * 2 - 1).to(device).requires_grad_()
    nxt, reward, cost = env.step(state, action)
    assert nxt.device.type == reward.device.type == cost.device.type == device
    assert (cost == 0).all()  # the safeguard keeps every next state in the RCI set
    reward.sum().backward()
    assert action.grad.device.type == device and torch.isfinite(action.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_worker_window_on_the_device(device):
    arch = {"policy": dict(obs_dim=3, act_dim=1, hidden=[16], init_log_std=-1.0, squash=True,
                           normalise_obs=True), "critic_hidden": [16], "gamma": 0.95}
    worker = GradientWorker("SafeGBPOPendulum-RM-v0", 0, 4, 4, seed=0, arch=arch, device=device)
    assert worker.env.rci_H.device.type == device
    from saferl.learners.analytic import TimeValue
    from saferl.learners.networks import GaussianPolicy

    weights = {"policy": GaussianPolicy(**arch["policy"]).state_dict(),
               "v_r": TimeValue(3, [16], 240).state_dict(), "v_c": TimeValue(3, [16], 240).state_dict()}
    result, _ = worker.compute(weights, 0, 8)
    assert result["g"].shape == result["q"].shape and float(result["traj"]["cost"].sum()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_onpolicy_learner_updates_on_the_device(device):
    """PPO-Lag's update with the running observation normaliser, whose moments come from the
    learner's own batch (tensors on the device) — and from gradient workers as numpy arrays."""
    import numpy as np

    from saferl.actors.learner import LearnerActor
    from saferl.config import load_config
    from saferl.tools.bench_local import _learner_inputs, task_spec

    cfg = load_config({"algo": "ppo_lag", "task": "FunctionEnv-v0", "steps_per_iteration": 256,
                       "resources": {"num_env_hosts": 1, "envs_per_host": 4}})
    spec = task_spec(cfg)
    learner = LearnerActor(cfg.algo, cfg.algo_params, spec, cfg.limit, 0, device)
    inputs, _, _ = _learner_inputs(cfg, spec, np.random.default_rng(0))
    stats = learner.update(inputs)
    assert np.isfinite(stats["loss_pi"]) and learner.learner.policy.norm.mean.device.type == device
    norm = learner.learner.policy.norm
    before = norm.mean.clone()
    norm.update_moments(10, np.ones(spec["obs_dim"]), np.ones(spec["obs_dim"]))
    assert (norm.mean > before).all()


GRAPHED = ["ppo_lag", "ppo", "cppo_pid", "rcpo", "pdo", "appo", "cup"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; this machine has none")
@pytest.mark.parametrize("algo", GRAPHED)
def test_cuda_graph_step_is_the_eager_step(algo):
    """On a GPU the PPO family's minibatch steps replay as a CUDA graph (``cuda_graph``, on by
    default): two updates give the parameters and statistics of the eager path, bitwise, with a
    minibatch left over (run outside the graph); one NaN advantage is refused by both alike."""
    import numpy as np

    from saferl.actors.learner import LearnerActor
    from saferl.config import load_config
    from saferl.tools.bench_local import _learner_inputs, task_spec

    def learner(graph: bool) -> LearnerActor:
        cfg = load_config(f"{algo}/FunctionEnv-v0", ["steps_per_iteration=256", "resources.envs_per_host=4",
                                                      "algo_params.minibatch_size=48", "algo_params.epochs=3",
                                                      f"algo_params.cuda_graph={str(graph).lower()}"])
        return LearnerActor(cfg.algo, cfg.algo_params, task_spec(cfg), cfg.limit, 0, "cuda"), cfg

    (graphed, cfg), (eager, _) = learner(True), learner(False)
    rng = np.random.default_rng(0)
    for poison in (False, False, True):
        inputs, _, _ = _learner_inputs(cfg, task_spec(cfg), rng)
        if poison:
            inputs[0]["reward"][3, 1] = np.nan
        out = []
        for actor in (graphed, eager):
            torch.manual_seed(1)
            out.append(actor.update(inputs))
        a, b = graphed.learner.state_dict(), eager.learner.state_dict()
        diff = max(float((x - y).abs().max()) for k in ("policy", "v_r", "v_c")
                   for x, y in zip(a[k].values(), b[k].values()))
        assert diff == 0.0, f"{algo}: max |graph − eager| = {diff:.3g}"
        np.testing.assert_equal(out[0], out[1])  # NaN statistics equal NaN
