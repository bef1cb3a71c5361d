"""``saferl benchmark reference --check-update``: saferl's side, the comparison and the CLI's
plumbing with a stand-in reference (OmniSafe itself is never a test dependency; the results
page records the real check). Also SAC-Lag's ``cost_target``, which the check exposed."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from saferl.tools.studies import reference_update as ru
from tests.conftest import check_with_stand_in

TASK = "SafetyHopperVelocity-v1"  # a shipped sac_lag config (the defaults), no env is built


def test_the_noise_queue_feeds_rsample_in_order_and_is_restored():
    original = torch.distributions.Normal.rsample
    dist = torch.distributions.Normal(torch.zeros(2), torch.full((2,), 2.0))
    with ru.queued_normal_noise([torch.ones(2), -torch.ones(2)]):
        assert dist.rsample().tolist() == [2.0, 2.0] and dist.rsample().tolist() == [-2.0, -2.0]
        with pytest.raises(RuntimeError, match="exhausted"):
            dist.rsample()
    assert torch.distributions.Normal.rsample is original


def test_saferl_against_itself_is_the_same_update_and_a_rounding_change_grows():
    _, ours = ru.saferl_side("sac_lag", [], TASK, 200)
    _, again = ru.saferl_side("sac_lag", [], TASK, 200)
    _, perturbed = ru.saferl_side("sac_lag", [], TASK, 200, ru.PERTURBATION)
    result = ru.compare(ours, again, perturbed)
    assert result["same_update"] and result["worst_early"] == 0.0
    assert ours["noise_used"] == 300  # one draw per critic step, one per actor step (policy_delay 2)
    assert 0 < result["control"][1] <= 1e-5  # rounding-sized at first, then it grows
    assert result["control"][200] > 100 * result["control"][1]


def test_a_different_update_is_reported_as_one():
    _, ours = ru.saferl_side("sac_lag", [], TASK, 5)
    _, other = ru.saferl_side("sac_lag", ["algo_params.cost_target=sample"], TASK, 5)
    result = ru.compare(ours, other, ours)
    assert not result["same_update"]
    assert result["differences"][1]["cost_critic"] > 1e-3 and result["differences"][1]["actor"] == 0.0


@pytest.mark.parametrize("target, same", [("mean", True), ("sample", False)])
def test_sac_lag_cost_target_mean_bootstraps_without_noise(target, same):
    """With ``cost_target: mean`` the cost critic's step does not depend on the policy's draw
    at s' (OmniSafe's target); with ``sample`` it does (FSRL's)."""
    from saferl.learners.base import EnvSpec
    from saferl.learners.sac_lag import SACLag, SACLagParams

    spec = EnvSpec(obs_dim=3, act_dim=2, act_low=[-1, -1], act_high=[1, 1], max_episode_steps=10)
    g = torch.Generator().manual_seed(0)
    batch = {"obs": torch.randn(8, 3, generator=g), "act": torch.randn(8, 2, generator=g),
             "reward": torch.rand(8, generator=g), "cost": torch.rand(8, generator=g),
             "discount": torch.full((8,), 0.99), "next_obs": torch.randn(8, 3, generator=g)}
    q_c = []
    for noise in (torch.zeros(8, 2), torch.ones(8, 2)):
        learner = SACLag(SACLagParams(hidden=[16], policy_delay=2, cost_target=target), spec, 5.0,
                         torch.device("cpu"), seed=0)
        with ru.queued_normal_noise([noise]):
            learner.step(batch)
        q_c.append([p.detach().clone() for p in learner.q_c.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*q_c)) is same


STAND_IN = textwrap.dedent('''\
    """Stands in for the reference interpreter: a reference whose update never moves anything."""
    import json, sys, torch
    argv = sys.argv[2:]
    d = torch.load(argv[argv.index("--input") + 1])
    snaps = {k: d["init"] for k in d["checkpoints"]}
    torch.save({"snapshots": snaps, "noise_used": 0}, argv[argv.index("--out") + 1])
    open("argv.json", "w").write(json.dumps(argv))
''')


def test_check_update_cli_writes_the_table_and_the_verdict(tmp_path):
    out, _ = check_with_stand_in(tmp_path, STAND_IN, TASK, "--check-update", "--update-steps", "3")
    table = (out / "update_check.md").read_text()
    assert "| 1 |" in table and "| 3 |" in table and "**the updates differ**" in table
    assert "configs/sac_lag/" in table and str(tmp_path) not in table.split("\n")[2]
    saved = json.loads((out / "update_check.json").read_text())
    assert saved["same_update"] is False and saved["noise_used"] == [4, 0]


def test_check_update_of_an_algorithm_it_does_not_cover_is_a_one_line_error(tmp_path, capsys):
    from saferl.cli import main

    rc = main(["benchmark", "reference", "--algo", "ppo_lag", "--check-update", "--reference-python",
               sys.executable, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "--check-update compares sac_lag" in err and len(err.strip().splitlines()) == 1, err
