"""Shared fixtures: one real local Ray instance for the whole session (starting Ray costs
seconds), and the repository root."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SG_PYTHON = ROOT / ".venv-sg" / "bin" / "python"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, logging_level="error", include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def run_root(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return str(tmp_path / "runs")


def needs_sg():
    return pytest.mark.skipif(not SG_PYTHON.exists() and not os.environ.get("SAFERL_SG_PYTHON"),
                              reason="Safety-Gymnasium interpreter missing: run deploy/setup.sh")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch intra-op thread in the test process: its problems are tiny, so on a small machine
    more threads only contend with each other and with Ray's actors (which run with one too)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def float64():
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
