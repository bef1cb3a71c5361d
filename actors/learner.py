"""Learner actor: hosts one algorithm's learner on the device Ray granted it."""
from __future__ import annotations

import sys
from typing import Any

from saferl import registry
from saferl.actors.process import ActorProcess
from saferl.batch import NumpyPolicy
from saferl.learners.base import EnvSpec
from saferl.learners.networks import pick_device


def _fetched(items: list) -> list:
    """A list of Ray references fetched here (the data goes from the hosts straight to the learner),
    values as they are. Ray is looked up, not imported: in a process without Ray (``saferl bench
    learner``/``device`` on a machine without it) there are no references."""
    ray = sys.modules.get("ray")
    return ray.get(items) if ray is not None and isinstance(items[0], ray.ObjectRef) else items


class LearnerActor(ActorProcess):
    def __init__(self, algo: str, params: dict, env_spec: dict, cost_limit: float, seed: int,
                 device: str = "auto"):
        # Ray hides GPUs that were not granted (CUDA_VISIBLE_DEVICES), so "auto" means: the grant.
        cls = registry.get_algo(algo).load()
        self.device = pick_device(device)
        self.learner = cls(cls.Params(**params), EnvSpec(**env_spec), cost_limit, self.device, seed)

    def device_name(self) -> str:
        return str(self.device)

    def policy_state(self):
        return self.learner.policy_state()

    def numpy_policy(self) -> NumpyPolicy:
        return self.learner.numpy_policy()

    def gradient_setup(self) -> dict:
        """What gradient workers need: network shapes and the window length h."""
        return self.learner.gradient_setup()

    def offpolicy_setup(self) -> dict:
        """What the coordinator needs for the replay buffer and the update-to-data schedule."""
        return self.learner.offpolicy_setup()

    def propose(self, results: list) -> dict | None:
        """The step the next ``update`` of these worker results takes, without taking it (CGPO's
        ratio test: the workers re-roll their windows with it first)."""
        return self.learner.propose(_fetched(results))

    def update(self, batches: list, clock: dict | None = None, evaluations: list | None = None) -> dict:
        """``batches``: host batches or worker results, or Ray references to them (a list of
        references is resolved here, so the data goes from the hosts straight to the learner).
        ``clock`` (off-policy): the first minibatch's global gradient step and the step phases'
        intervals, from the coordinator's schedule."""
        batches = _fetched(batches)
        extras: dict[str, Any] = {}
        if clock is not None:
            extras["clock"] = clock
        if evaluations is not None:  # the workers' re-rolls of ``propose``'s step (CGPO)
            extras["evaluations"] = _fetched(evaluations)
        return self.learner.update(batches, **extras)

    def observe_rollouts(self, *batches: dict) -> list[dict]:
        """This iteration's rollout batches, before its update (off-policy learners whose
        ``offpolicy_setup`` sets ``observe_rollouts``): one dict of learner metrics per finished episode."""
        return self.learner.observe_rollouts(list(batches))

    def phase(self, name: str, signals: dict) -> dict:
        return self.learner.phase(name, signals)

    def state_dict(self) -> dict:
        return self.learner.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.learner.load_state_dict(sd)
