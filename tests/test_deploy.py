"""The deployment files parse and carry what their formats and the project need (no cluster,
no image build: `docker build -f deploy/Dockerfile .` is far too slow for a test)."""
from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_cluster_launcher_config():
    cfg = load("cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"] in ("aws", "gcp", "azure")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert len(types) >= 3
    for name, node in types.items():
        assert "node_config" in node and "resources" in node, name
    workers = [n for n in types if n != cfg["head_node_type"]]
    assert any(types[n]["resources"].get("GPU", 0) >= 1 for n in workers), "a GPU worker type"
    assert any(not types[n]["resources"].get("GPU") for n in workers), "a CPU worker type"
    for n in workers:
        assert types[n]["max_workers"] >= types[n].get("min_workers", 0)
    # every node builds both interpreters, and Ray runs from the main one
    assert any("deploy/setup.sh" in c for c in cfg["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any(".venv/bin/ray start" in c for c in cfg[key]), key
    assert any("--head" in c for c in cfg["head_start_ray_commands"])


def test_kuberay_rayjob():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert re.match(r"python -m saferl\.cli train \S+", spec["entrypoint"])
    cluster = spec["rayClusterSpec"]
    req = (ROOT / "deploy" / "requirements-main.txt").read_text()
    assert re.search(rf"^ray\[[a-z,]+\]=={re.escape(cluster['rayVersion'])}$", req, re.M), \
        "rayVersion != the pinned ray"
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    assert "rayStartParams" in head and groups
    pods = [head["template"]] + [g["template"] for g in groups]
    for g in groups:
        assert g["groupName"] and "rayStartParams" in g
        assert g.get("minReplicas", 0) <= g["replicas"] <= g["maxReplicas"]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["image"] and container["name"]
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "a GPU worker group"


def test_dockerfile_builds_both_interpreters():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert re.match(r"FROM (python:3\.11|debian)", lines[0])
    assert any(ln.startswith("COPY ") for ln in lines)
    runs = " ".join(ln for ln in lines if ln.startswith("RUN") or not ln.split()[0].isupper())
    assert "deploy/setup.sh" in runs
    assert "/opt/saferl/.venv/bin" in text and "SAFERL_SG_PYTHON=/opt/saferl/.venv-sg/bin/python" in text
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".venv-sg" in ignored  # the host's environments never enter the image
