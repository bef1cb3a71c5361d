"""Placement on a simulated multi-node cluster (``ray.cluster_utils.Cluster``: several raylets in
this machine): env hosts SPREAD over nodes; a gradient algorithm's learner and workers share one
node (its STRICT_PACK placement group) and fall back to PACK when no node holds them all; a run
survives losing a node (its env hosts are re-created on the surviving nodes).

This module starts its own cluster, so it shuts down the session's in-process Ray first and, as
conftest's ``ray_session`` is session-scoped (set up once), starts a fresh local one again at the
end for the tests after it."""
from __future__ import annotations

import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util import placement_group_table

from saferl.cluster import rundir
from saferl.cluster.coordinator import Coordinator
from saferl.config import load_config


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
    nodes = run(cfg, tmp_path, lambda c: ray.get([h.node_id.remote() for h in c.loop.hosts]))
    # one host on each of the three nodes (Ray's default policy packs these half-CPU hosts on two)
    assert len(set(nodes)) == 3


def test_learner_and_gradient_workers_share_a_node(cluster, tmp_path):
    _, worker_nodes = cluster
    over = ["total_env_steps=1600", "resources.envs_per_host=4", f"run_root={tmp_path}"]
    # 1 + 2 × 0.5 CPUs: fits one 2-CPU worker node -> STRICT_PACK
    cfg = load_config("bptt_lag/FunctionEnv-v0", over + ["resources.num_cpus_per_host=0.5"])

    def placed(c):
        table = placement_group_table(c.loop.placement_group)
        return table["strategy"], ray.get([h.node_id.remote() for h in c.loop.hosts]), table

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


@pytest.mark.slow  # losing one actor's process is covered by test_faults.py
def test_run_survives_losing_a_node(cluster, tmp_path):
    """A worker node holding an env host (not the learner) is removed between iterations: Ray
    re-creates the host on a surviving node, the coordinator counts and re-seeds it, and the run
    finishes its budget. A fresh 2-CPU node replaces the lost one for the other tests."""
    c, worker_nodes = cluster
    cfg = load_config("ppo_lag/FunctionEnv-v0", [
        "total_env_steps=6000", "steps_per_iteration=1200", "resources.num_env_hosts=3",
        "resources.envs_per_host=4", "resources.num_cpus_per_host=0.5", "schedule.checkpoint_every=100",
        f"run_root={tmp_path}"])
    coord, victim = Coordinator(cfg, rundir.new_run_dir(cfg)), None
    try:
        total = coord.total_iterations()
        coord.run(stop_after=2)
        learner_node = ray.get(coord.loop.learner.node_id.remote())
        host_nodes = ray.get([h.node_id.remote() for h in coord.loop.hosts])
        victim = next(n for n in worker_nodes if n in host_nodes and n != learner_node)
        c.remove_node(next(n for n in c.worker_nodes if n.node_id == victim))
        coord.run()  # the surviving nodes' 3 CPUs hold the learner (1) and the three hosts (1.5)
        moved = ray.get([h.node_id.remote() for h in coord.loop.hosts])
        assert coord.state.iteration == total and coord.state.restarts >= 1
        ckpt = rundir.load_checkpoint(coord.run_dir, cfg)
    finally:
        coord.close()
        if victim is not None:
            worker_nodes[worker_nodes.index(victim)] = c.add_node(num_cpus=2).node_id
            c.wait_for_nodes()
    assert victim not in moved and set(moved) <= set(host_nodes) | {learner_node}
    assert ckpt["schedule"]["iteration"] == total and ckpt["schedule"]["restarts"] == coord.state.restarts
    m = pd.read_csv(coord.run_dir / "metrics.csv")
    assert m["iteration"].tolist() == list(range(1, total + 1)), "one row per iteration, none repeated"
    assert m["health/restarts"].iloc[1] == 0 and m["health/restarts"].iloc[-1] >= 1
