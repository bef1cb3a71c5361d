"""One iteration class per algorithm kind (cluster/iterations.py): every registered algorithm maps
to the class that owns its actors and collect step, and the coordinator keeps nothing that only
one kind has."""
from __future__ import annotations

import inspect

import pytest

from saferl import registry
from saferl.cluster import iterations
from saferl.cluster.coordinator import Coordinator

EXPECTED = {"sampling": iterations.SamplingIteration, "offpolicy": iterations.OffPolicyIteration,
            "gradient": iterations.GradientIteration}


@pytest.mark.parametrize("name", sorted(registry.ALGORITHMS))
def test_every_algorithm_has_its_kinds_iteration(name):
    spec = registry.get_algo(name)
    cls = iterations.iteration_class(spec)
    assert cls is (iterations.ModelBasedIteration if spec.world_model else EXPECTED[spec.kind])
    assert not inspect.isabstract(cls)
    # the phases a collect step runs itself are phases the algorithm has
    if cls is iterations.ModelBasedIteration:
        assert cls.phases_in_collect <= set(spec.phases)


def test_only_sampling_runs_the_dual_phase_inside_its_collect_step():
    assert iterations.OffPolicyIteration.phases_in_collect == frozenset()
    assert iterations.GradientIteration.phases_in_collect == frozenset()


def test_the_coordinator_holds_no_kind_specific_state():
    """Actors, intervals and setups of one kind live on its iteration (``coord.loop``)."""
    source = inspect.getsource(Coordinator)
    for name in ("step_every", "offpolicy", "horizon", "stochastic", "ratio_test", "EnvHost", "GradientWorker",
                 "ReplayBuffer", "WorldModelActor", "self.hosts", "self.replay"):
        assert name not in source, name
