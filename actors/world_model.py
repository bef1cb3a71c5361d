"""World-model actor (MB-CGPO): keeps real transitions, fits the model on the coordinator's
``world_model`` schedule, and serves its weights to gradient workers, which roll it as a
differentiable env (``learners/world_model.py``)."""
from __future__ import annotations

from saferl.actors.process import ActorProcess
from saferl.learners.networks import pick_device
from saferl.learners.world_model import ReplayFit, WorldModelParams


class WorldModelActor(ActorProcess):
    def __init__(self, obs_dim: int, act_dim: int, params: dict, seed: int, device: str = "auto"):
        self.store = ReplayFit(obs_dim, act_dim, WorldModelParams(**params), pick_device(device), seed)

    def add(self, *batches: dict) -> int:
        for b in batches:
            n = self.store.add(b)
        return n

    def phase(self, name: str, signals: dict) -> dict:
        assert name == "world_model", name
        return self.store.fit()

    def weights(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.store.model.state_dict().items()}

    def state_dict(self) -> dict:
        return {"model": self.store.model.state_dict(), "opt": self.store.opt.state_dict(),
                "data": self.store.data, "gen": self.store.gen.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.store.model.load_state_dict(sd["model"])
        self.store.opt.load_state_dict(sd["opt"])
        self.store.data = sd["data"]
        self.store.gen.set_state(sd["gen"])
