"""The Python API (saferl/api.py): import cost, config overrides, train -> metrics -> load ->
act -> evaluate, and the quickstart notebook executed end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saferl.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "examples" / "quickstart.ipynb"


def test_import_saferl_stays_light():
    """The Safety-Gymnasium interpreter imports saferl: the API loads only on first use."""
    code = ("import sys, saferl; heavy = [m for m in ('saferl.api', 'torch', 'ray', 'pandas', 'pydantic') "
            "if m in sys.modules]; assert not heavy, heavy; saferl.make_config; "
            "assert 'saferl.api' in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_make_config_merges_fields_and_names_bad_ones():
    import saferl

    cfg = saferl.make_config("ppo_lag/FunctionEnv-v0", ["seed=4"], total_env_steps=6000,
                             algo_params={"hidden": [8]}, resources__envs_per_host=10,
                             **{"schedule.checkpoint_every": 3})
    assert (cfg.seed, cfg.total_env_steps, cfg.resources.envs_per_host,
            cfg.schedule.checkpoint_every) == (4, 6000, 10, 3)
    assert cfg.resources.num_env_hosts == 1  # the rest of the section is the config file's
    assert cfg.learner_params().hidden == [8] and cfg.algo_params["minibatch_size"] == 250
    for fields, name in (({"resources": {"num_env_hosts": -1}}, "resources.num_env_hosts"),
                         ({"algo_params__clip": -1}, "algo_params.clip"), ({"sed": 1}, "sed")):
        with pytest.raises(ConfigError, match=f"^config error: {name}"):
            saferl.make_config("ppo_lag/FunctionEnv-v0", **fields)


def test_train_load_act_evaluate(ray_session, run_root):
    import saferl

    run = saferl.train("ppo_lag/FunctionEnv-v0", total_env_steps=4000, seed=3, run_root=run_root,
                       algo_params={"hidden": [8], "epochs": 2}, logging={"tensorboard": False}, eval_episodes=6)
    assert run.run_dir.parent == Path(run_root) and run.config.seed == 3
    m = run.metrics
    assert isinstance(m, pd.DataFrame) and m["env_steps"].tolist() == [2000, 4000]
    ev = run.evaluation
    assert ev["episodes"] == 6 and ev["iteration"] == 2 and ev["cost_limit"] == 8.0
    assert json.loads((run.run_dir / "eval.json").read_text())["return_mean"] == ev["return_mean"]
    assert saferl.Run.open(run.run_dir).evaluation["costs"] == ev["costs"]

    policy = saferl.load(run.run_dir)
    assert (policy.obs_dim, policy.act_dim, policy.iteration) == (1, 1, 2)
    obs = np.linspace(-2, 2, 7, dtype=np.float32)[:, None]
    act = policy.act(obs)
    assert act.shape == (7, 1) and act.dtype == np.float32
    assert ((act >= -1) & (act <= 1)).all()
    np.testing.assert_allclose(policy(obs[3]), act[3], rtol=1e-5, atol=1e-7)  # one observation, no batch axis
    with pytest.raises(ValueError, match=r"expected \[1\] or \[n, 1\]"):
        policy.act(np.zeros(3))
    # in-process evaluation = `saferl eval`'s env host on Ray: the same seed, the same episodes
    local = policy.evaluate(6)
    assert local["returns"] == ev["returns"] and local["costs"] == ev["costs"]
    # the stochastic policy differs from the deterministic mean
    assert not np.array_equal(policy.act(obs, deterministic=False), act)


def _code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_quickstart_notebook_runs(ray_session, tmp_path, monkeypatch):
    """Every code cell of docs/examples/quickstart.ipynb, in order, in one namespace (its
    assertions included), with the run written under a temporary folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ns: dict = {}
    for i, src in enumerate(_code_cells(NOTEBOOK)):
        try:
            exec(compile(src, f"{NOTEBOOK.name}[cell {i}]", "exec"), ns)
        except Exception as err:
            raise AssertionError(f"notebook cell {i} failed: {err!r}\n{src}") from err
    assert (tmp_path / "runs").is_dir() and ns["run"].run_dir.is_relative_to("runs")
    assert len(ns["m"]) == 2 and ns["again"]["episodes"] == 5
