"""Bad input (issue #9): NaN/Inf from environments caught at the env host (abort with one line, or
skip the episode and mask it out of the batch), non-finite learner updates skipped, mismatched
checkpoints refused, and what ``saferl submit`` uploads and forwards."""
from __future__ import annotations

import csv
import sys
import types

import numpy as np
import pytest
import ray
import torch

from saferl import registry
from saferl.actors.env_host import EnvDataError, EnvHost
from saferl.cli import main
from saferl.config import ConfigError, load_config
from saferl.envs.function_env import FunctionEnv
from saferl.learners.networks import GaussianPolicy

ENV_MODULE = "_saferl_bad_input_envs"  # importable in every process that ran _install()
HORIZON, BAD_STEP = 8, 5


class NanEnv(FunctionEnv):
    """FunctionEnv whose step ``nan_at_step`` (0-based, of every episode) gives a NaN reward, an
    Inf cost, or a NaN next observation (``nan_at_step = HORIZON - 1``: the final observation)."""
    max_episode_steps = HORIZON

    def __init__(self, field: str = "reward", nan_at_step: int = BAD_STEP):
        super().__init__()
        self.field, self.k = field, nan_at_step

    def initial_state(self, n, generator):
        return torch.cat([super().initial_state(n, generator), torch.zeros(n, 1)], 1)  # (x, t)

    def observe(self, state):
        obs = state[:, :1].clone()
        if self.field == "obs":
            obs[state[:, 1] == self.k + 1] = float("nan")
        return obs

    def step(self, state, action):
        x, t = state[:, :1], state[:, 1]
        value = self.f(x[:, 0])
        rew, cost = value.clone(), value.clone()
        if self.field == "reward":
            rew[t == self.k] = float("nan")
        if self.field == "cost":
            cost[t == self.k] = float("inf")
        return torch.cat([x + 0.2 * action, (t + 1)[:, None]], 1), rew, cost


TASKS = {"NanReward-v0": {"field": "reward"}, "NanCost-v0": {"field": "cost"},
         "NanObs-v0": {"field": "obs"}, "NanFinalObs-v0": {"field": "obs", "nan_at_step": HORIZON - 1}}


def _install() -> None:
    """Register the test tasks in this process (the driver, or inside an actor)."""
    mod = sys.modules.setdefault(ENV_MODULE, types.ModuleType(ENV_MODULE))
    mod.NanEnv = NanEnv
    for name, kwargs in TASKS.items():
        registry.register_task(registry.TaskSpec(name, "torch", f"{ENV_MODULE}:NanEnv", 8.0, HORIZON,
                                                 kwargs=kwargs))


class NanHost(EnvHost):
    """An env host that knows the test tasks (this module is pickled by value to Ray workers)."""

    def __init__(self, *args, **kwargs):
        _install()
        super().__init__(*args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def test_tasks():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _install()
    yield
    for name in TASKS:
        registry.TASKS.pop(name, None)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def gaussian_policy(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return GaussianPolicy(1, 1, [8], init_log_std=0.5).export_numpy()  # wide: some actions leave [-1, 1]


# -- 1. environments ---------------------------------------------------------------------------
@pytest.mark.parametrize("task, message", [
    ("NanReward-v0", f"env error: NanReward-v0 host 0 env 0 step {BAD_STEP}: reward is nan"),
    ("NanCost-v0", f"env error: NanCost-v0 host 0 env 0 step {BAD_STEP}: cost is inf"),
    ("NanObs-v0", f"env error: NanObs-v0 host 0 env 0 step {BAD_STEP}: observation is not finite"),
    ("NanFinalObs-v0", f"env error: NanFinalObs-v0 host 0 env 0 step {HORIZON - 1}: final observation is not finite"),
])
def test_abort_names_env_and_step(task, message):
    host = EnvHost(task, 3, seed=0)
    with pytest.raises(EnvDataError) as err:
        host.rollout(gaussian_policy(), 2 * HORIZON)
    assert str(err.value) == message
    with pytest.raises(EnvDataError):
        host.evaluate(gaussian_policy(), episodes=2)


@pytest.mark.parametrize("task", list(TASKS))
def test_skip_episode_masks_the_partial_episode(task):
    host = EnvHost(task, 2, seed=0, on_invalid="skip_episode")
    T = 2 * HORIZON + 3
    batch, summary = host.rollout(gaussian_policy(), T)
    k = TASKS[task].get("nan_at_step", BAD_STEP)
    # every episode goes bad at step k: its steps 0..k are masked, the env reset after step k
    bad_end = [t for t in range(T) if t % (k + 1) == k]
    valid = np.ones(T, bool)
    valid[: bad_end[-1] + 1] = False
    for i in range(2):
        np.testing.assert_array_equal(batch["valid"][:, i], valid)
    for key in ("obs", "act", "logp", "reward", "cost", "last_obs", "final_obs"):
        assert np.isfinite(batch[key]).all(), key
    assert (batch["reward"][~batch["valid"]] == 0).all() and (batch["obs"][~batch["valid"]] == 0).all()
    assert batch["terminated"][~batch["valid"]].all() and not batch["truncated"][~batch["valid"]].any()
    assert len(batch["final_idx"]) == 0 and summary["episodes"] == []
    assert summary["skipped_episodes"] == 2 * len(bad_end)
    assert 0 < summary["clipped_action_frac"] < 1  # the Gaussian's actions outside [-1, 1] (clipped by the env)


def test_skip_episode_keeps_good_episodes():
    """An episode that ends before the bad step is reported; the skipped ones are not."""
    host = EnvHost("NanFinalObs-v0", 2, seed=0, on_invalid="skip_episode")
    batch, summary = host.rollout(gaussian_policy(), HORIZON - 1)
    assert batch["valid"].all() and summary["skipped_episodes"] == 0
    batch, summary = host.rollout(gaussian_policy(), 1)  # the last step: its final obs is NaN
    assert not batch["valid"][0].any() and summary["skipped_episodes"] == 2 and summary["episodes"] == []
    assert np.isfinite(host.obs).all()


def test_squashed_policy_counts_no_clipping():
    host = EnvHost("FunctionEnv-v0", 2, seed=0)
    pol = GaussianPolicy(1, 1, [8], squash=True).export_numpy()
    _, summary = host.rollout(pol, 5)
    assert summary["clipped_action_frac"] == 0 and summary["skipped_episodes"] == 0


def _cfg(task: str, run_root: str, on_invalid: str, tmp_path) -> str:
    path = tmp_path / "nan.yaml"
    path.write_text(f"algo: ppo_lag\ntask: {task}\ntotal_env_steps: 64\nsteps_per_iteration: 32\n"
                    f"run_root: {run_root}\nresources: {{envs_per_host: 2}}\nchecks: {{on_invalid: {on_invalid}}}\n"
                    "logging: {tensorboard: false, ray_metrics: false}\n"
                    "algo_params: {hidden: [8], epochs: 1, minibatch_size: 32}\n")
    return str(path)


def test_abort_reaches_the_user_as_one_line(ray_session, run_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("saferl.cluster.iterations.EnvHost", NanHost)
    assert main(["train", _cfg("NanReward-v0", run_root, "abort", tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"env error: NanReward-v0 host 0 env 0 step {BAD_STEP}: reward is nan"


def test_skip_episode_run_counts_and_trains_on_finite_data(ray_session, run_root, tmp_path, monkeypatch):
    monkeypatch.setattr("saferl.cluster.iterations.EnvHost", NanHost)
    assert main(["train", _cfg("NanReward-v0", run_root, "skip_episode", tmp_path)]) == 0
    (metrics,) = list(__import__("pathlib").Path(run_root).rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    # 2 envs; NaN at episode step 5: fragment steps 5, 11 | 1, 7, 13
    assert [int(float(r["health/skipped_episodes"])) for r in rows] == [4, 6]
    assert all(0 < float(r["health/clipped_action_frac"]) < 1 for r in rows)
    (ckpt,) = sorted(metrics.parent.glob("checkpoints/*"))[-1:]
    sd = torch.load(ckpt, weights_only=False)["learner"]
    flat = list(_tensors(sd))
    assert flat and all(torch.isfinite(v).all() for v in flat)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_config_rejects_unknown_policy():
    with pytest.raises(ConfigError, match=r"checks.on_invalid"):
        load_config({"algo": "ppo_lag", "task": "FunctionEnv-v0", "checks": {"on_invalid": "ignore"}})


# -- 2. learners ---------------------------------------------------------------------------------
def _learner(algo: str, **params):
    from saferl.learners.base import EnvSpec

    spec = EnvSpec(obs_dim=1, act_dim=1, act_low=[-1.0], act_high=[1.0], max_episode_steps=HORIZON)
    cls = registry.get_algo(algo).load()
    return cls(cls.Params(**{"hidden": [8], **params}), spec, 8.0, torch.device("cpu"), 0)


def _snapshot(*modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _same(before, modules) -> bool:
    return all(torch.equal(a, p) for a, p in zip(before, [p for m in modules for p in m.parameters()]))


def test_ppo_lag_skips_a_nan_update():
    learner = _learner("ppo_lag", epochs=2, minibatch_size=8)
    host = EnvHost("FunctionEnv-v0", 2, seed=0)
    batch, _ = host.rollout(learner.numpy_policy(), 8)
    batch = {k: v.copy() for k, v in batch.items()}
    batch["reward"][-1] = np.nan  # GAE carries it to every step of both envs
    modules = (learner.policy, learner.v_r, learner.v_c)
    before = _snapshot(*modules)
    out = learner.update([batch])
    assert _same(before, modules), "a NaN batch changed the parameters"
    assert out["health/skipped_updates"] == 8  # 2 epochs × 2 minibatches × (policy + critic)
    batch["reward"][-1] = 0.0
    out = learner.update([batch])
    assert out["health/skipped_updates"] == 0 and not _same(before, modules)


def test_sac_lag_skips_a_nan_critic_step():
    from saferl.actors.replay import n_step_transitions

    learner = _learner("sac_lag", batch_size=4)
    host = EnvHost("FunctionEnv-v0", 2, seed=0)
    batch, _ = host.rollout({"uniform": True, "act_dim": 1}, 4)
    tr = n_step_transitions(batch, 1, 0.99)
    tr["reward"][0] = np.nan
    block = {k: v[None] for k, v in tr.items()}  # one minibatch of 8
    critics = (learner.q_r, learner.q_c)
    before = _snapshot(*critics)
    out = learner.update([block])
    assert _same(before, critics) and out["health/skipped_updates"] == 1
    assert all(torch.isfinite(p).all() for p in learner.policy.parameters())


def _skip_episode_batch(seed: int = 0) -> dict:
    """A rollout with skipped (invalid) episodes next to valid ones: NaN reward at episode step 5."""
    host = EnvHost("NanReward-v0", 2, seed=seed, on_invalid="skip_episode")
    host.rollout(gaussian_policy(), 3)  # the envs' episodes now start 3 steps apart from the fragment
    batch, _ = host.rollout(gaussian_policy(), 2 * HORIZON)
    assert 0 < batch["valid"].sum() < batch["valid"].size
    return batch


def test_replay_drops_invalid_steps():
    from saferl.actors.replay import n_step_transitions

    batch = _skip_episode_batch()
    tr = n_step_transitions(batch, 3, 0.9)
    assert len(tr["obs"]) == batch["valid"].sum()
    np.testing.assert_array_equal(tr["obs"], batch["obs"][batch["valid"]])


@pytest.mark.parametrize("algo", ["ppo_lag", "trpo_lag", "focops"])
def test_on_policy_learners_ignore_invalid_steps(algo):
    """What the skipped steps hold (zeros from the host, or anything else) changes nothing."""
    batch = _skip_episode_batch()
    noisy = {k: v.copy() for k, v in batch.items()}
    bad = ~batch["valid"]
    rng = np.random.default_rng(0)
    for key in ("obs", "act", "logp", "reward", "cost"):
        noisy[key][bad] = rng.normal(0, 100, noisy[key][bad].shape)
    params = []
    for b in (batch, noisy):
        torch.manual_seed(0)
        learner = _learner(algo)
        learner.update([b])
        params.append([p.detach().clone() for p in learner.policy.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b)


# -- 3. checkpoints ------------------------------------------------------------------------------
def test_shape_mismatch_is_one_line(tmp_path):
    from saferl.cluster import rundir

    small, big = _learner("ppo_lag"), _learner("ppo_lag", hidden=[16])
    with pytest.raises(RuntimeError) as err:
        big.load_state_dict(small.state_dict())
    msg = str(rundir.state_error(tmp_path / "ckpt_0000001.pt", err.value))
    assert "\n" not in msg and msg.startswith(f"checkpoint error: {tmp_path}/ckpt_0000001.pt does not fit this run: ")
    assert "tensor net.0.weight has shape [8, 1] there, [16, 1] in this run's model" in msg


def test_resume_with_other_shapes_is_refused(ray_session, run_root, tmp_path, capsys):
    over = ["total_env_steps=32", "steps_per_iteration=32", f"run_root={run_root}", "algo_params.hidden=[8]",
            "algo_params.epochs=1", "logging.tensorboard=false", "logging.ray_metrics=false",
            "resources.envs_per_host=2"]
    assert main(["train", "ppo_lag/FunctionEnv-v0", *[a for o in over for a in ("--set", o)]]) == 0
    (run,) = list(__import__("pathlib").Path(run_root).iterdir())
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "algo_params.hidden=[16]",
                 "--set", "total_env_steps=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"checkpoint error: {run}/checkpoints/ckpt_0000001.pt does not fit this run: tensor ")
    assert "\n" not in err


# -- 4. saferl submit ----------------------------------------------------------------------------
class _FakeClient:
    def __init__(self):
        self.jobs: list[dict] = []

    def submit_job(self, **kwargs) -> str:
        self.jobs.append(kwargs)
        return "raysubmit_test"


def _submitted(monkeypatch, argv: list[str]) -> dict:
    from contextlib import contextmanager

    client = _FakeClient()

    @contextmanager
    def fake(address, job_id=None):
        yield client

    monkeypatch.setattr("saferl.cluster.jobs._client", fake)
    assert main(["submit", "ppo_lag/FunctionEnv-v0", "--address", "http://127.0.0.1:9", *argv]) == 0
    (job,) = client.jobs
    return job["runtime_env"]


def test_submit_sends_no_secrets_unless_named(monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("WANDB_API_KEY", "k")
    env = _submitted(monkeypatch, [])
    assert "env_vars" not in env and "hunter2" not in repr(env)
    env = _submitted(monkeypatch, ["--env", "WANDB_API_KEY"])
    assert env["env_vars"] == {"WANDB_API_KEY": "k"}


def test_submit_upload_excludes_outputs_and_venvs(monkeypatch, capsys):
    from fnmatch import fnmatch

    env = _submitted(monkeypatch, [])
    assert env["working_dir"] == str(__import__("saferl.config").config.REPO_ROOT)
    for path in (".venv", ".venv-sg", ".venv2", "runs", "ckpt_0000001.pt", "tb", "wandb", ".git"):
        assert any(fnmatch(path, pat) for pat in env["excludes"]), path
    for path in ("configs", "saferl", "envs", "safegbpo_zonotopes.json"):
        assert not any(fnmatch(path, pat) for pat in env["excludes"]), path


def test_submit_to_an_unreachable_cluster_is_one_line(capsys):
    from saferl.cluster import jobs

    with socket_nobody_listens() as port:
        assert main(["submit", "ppo_lag/FunctionEnv-v0", "--address", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err == f"cluster error: cannot reach Ray at http://127.0.0.1:{port} (connection refused)\n"
    assert jobs.CONNECT_TIMEOUT_S <= 10


def socket_nobody_listens():
    """A local port that was free a moment ago (bound, then closed: connections are refused)."""
    import socket
    from contextlib import contextmanager

    @contextmanager
    def port():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        yield p

    return port()
