"""Placement on a simulated multi-node cluster (``ray.cluster_utils.Cluster``: several raylets in
this machine): env hosts SPREAD over nodes; a gradient algorithm's learner and workers share one
node (its STRICT_PACK placement group) and fall back to PACK when no node holds them all.

This module starts its own cluster, so it shuts down the session's in-process Ray first and, as
conftest's ``ray_session`` is session-scoped (set up once), starts a fresh local one again at the
end for the tests after it."""
from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util import placement_group_table

from saferl.cluster import rundir
from saferl.cluster.coordinator import Coordinator
from saferl.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cluster():
    was_up = ray.is_initialized()
    ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        workers = [c.add_node(num_cpus=2) for _ in range(2)]
        ray.init(address=c.address, logging_level="error")
        c.wait_for_nodes()
        try:
            yield c, [w.node_id for w in workers]
        finally:
            ray.shutdown()
            c.shutdown()
            if was_up:  # as conftest's ray_session started it
                ray.init(num_cpus=4, logging_level="error", include_dashboard=False)


def run(cfg, tmp_path, check) -> dict:
    coord = Coordinator(cfg, rundir.new_run_dir(cfg))
    try:
        out = check(coord)
        last = coord.run()
    finally:
        coord.close()
    assert last["env_steps"] >= cfg.total_env_steps
    return out


def test_env_hosts_spread_over_nodes(cluster, tmp_path):
    cfg = load_config("ppo_lag/FunctionEnv-v0", [
        "total_env_steps=2400", "steps_per_iteration=1200", "resources.num_env_hosts=3",
        "resources.envs_per_host=4", "resources.num_cpus_per_host=0.5", f"run_root={tmp_path}"])
    nodes = run(cfg, tmp_path, lambda c: ray.get([h.node_id.remote() for h in c.hosts]))
    # one host on each of the three nodes (Ray's default policy packs these half-CPU hosts on two)
    assert len(set(nodes)) == 3


def test_learner_and_gradient_workers_share_a_node(cluster, tmp_path):
    _, worker_nodes = cluster
    over = ["total_env_steps=1600", "resources.envs_per_host=4", f"run_root={tmp_path}"]
    # 1 + 2 × 0.5 CPUs: fits one 2-CPU worker node -> STRICT_PACK
    cfg = load_config("bptt_lag/FunctionEnv-v0", over + ["resources.num_cpus_per_host=0.5"])

    def placed(c):
        table = placement_group_table(c.placement_group)
        return table["strategy"], ray.get([h.node_id.remote() for h in c.hosts]), table

    strategy, nodes, table = run(cfg, tmp_path, placed)
    assert strategy == "STRICT_PACK"
    bundle_nodes = set(table["bundles_to_node_id"].values())  # bundle 0 holds the learner
    assert len(bundle_nodes) == 1 and set(nodes) == bundle_nodes and nodes[0] in worker_nodes

    # 1 + 2 × 1 CPUs: no node has 3 -> PACK over two nodes, and the run still completes
    cfg = load_config("bptt_lag/FunctionEnv-v0", over + ["resources.num_cpus_per_host=1"])
    strategy, nodes, table = run(cfg, tmp_path, placed)
    assert strategy == "PACK"
    assert set(nodes) <= set(table["bundles_to_node_id"].values())
    assert len(ray.util.placement_group_table()) == 2 and all(
        g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())
