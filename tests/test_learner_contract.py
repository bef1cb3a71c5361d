"""The learner contract (learners/base.py): every registered algorithm's learner implements it,
the learner actor reaches learners only through it, and a learner missing a part of it is refused
when it is built, not halfway through a run."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from saferl import registry
from saferl.learners.base import EnvSpec, Learner

CONTRACT = ("policy_state", "update", "state_dict", "load_state_dict", "phase")
SETUP = {"offpolicy": "offpolicy_setup", "gradient": "gradient_setup"}


@pytest.mark.parametrize("name", sorted(registry.ALGORITHMS))
def test_every_registered_learner_implements_the_contract(name):
    spec = registry.get_algo(name)
    cls = spec.load()
    assert issubclass(cls, Learner) and not inspect.isabstract(cls), name
    for method in CONTRACT + ((SETUP[spec.kind],) if spec.kind in SETUP else ()):
        assert callable(getattr(cls, method, None)), f"{name} lacks {method}"
    for phase in spec.phases:
        if phase != "world_model":  # the world-model actor's phase, not the learner's
            assert callable(getattr(cls, f"phase_{phase}", None)), f"{name} lacks phase_{phase}"


def test_a_learner_missing_part_of_the_contract_is_refused_when_built():
    class NoUpdate(Learner):
        def policy_state(self):
            return {}

    env = EnvSpec(obs_dim=1, act_dim=1, act_low=[-1], act_high=[1], max_episode_steps=5)
    with pytest.raises(TypeError, match="update"):
        NoUpdate(Learner.Params(), env, 1.0, torch.device("cpu"), 0)


def test_the_one_checkpoint_idiom_keeps_the_modules_and_the_rng_and_restores_them():
    """``MODULES`` (None ones skipped) and the RNG states, without a ``state_dict`` of its own."""
    class Tiny(Learner):
        MODULES = ("net", "opt", "absent")

        def __init__(self, *args):
            super().__init__(*args)
            self.net, self.absent = torch.nn.Linear(2, 1), None
            self.opt = torch.optim.Adam(self.net.parameters(), lr=0.1)

        def policy_state(self):
            return {}

        def update(self, batches, **extras):
            self.descend(self.opt, self.net(torch.randn(4, 2)).pow(2).mean(), self.net.parameters())
            return {}

    env = EnvSpec(obs_dim=2, act_dim=1, act_low=[-1], act_high=[1], max_episode_steps=5)
    a, b = (Tiny(Learner.Params(), env, 1.0, torch.device("cpu"), s) for s in (0, 1))
    a.update([])
    sd = copy.deepcopy(a.state_dict())  # a checkpoint: written out at once
    assert set(sd) == {"net", "opt", "rng"}
    a.update([])
    b.load_state_dict(sd)  # the weights, Adam's moments and the random stream of the checkpoint
    b.update([])
    assert torch.equal(a.net.weight, b.net.weight) and not torch.equal(a.net.weight, sd["net"]["weight"])


def test_the_learner_actor_uses_only_the_contract():
    """actors/learner.py calls learner methods, never reads a learner's attributes (the layers
    stay apart: a learner may rename its internals freely)."""
    import ast

    from saferl.actors import learner as actor_module

    tree = ast.parse(inspect.getsource(actor_module))
    reads = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
             and isinstance(node.value, ast.Attribute) and node.value.attr == "learner"}
    called = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Attribute)
              and node.func.value.attr == "learner"}
    assert reads == called, f"attributes read without a call: {sorted(reads - called)}"
    assert called <= set(CONTRACT) | set(SETUP.values()) | {"numpy_policy", "propose", "observe_rollouts"}
