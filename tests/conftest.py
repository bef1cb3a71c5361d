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
