"""Shared fixtures: one real local Ray instance for the whole session (starting Ray costs
seconds), and the repository root."""
from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import textwrap
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


def check_with_stand_in(tmp_path: Path, script: str, task: str, *flags: str) -> tuple[Path, list[str]]:
    """``saferl benchmark reference --algo sac_lag --task TASK FLAGS`` with its reference interpreter
    replaced by ``script`` (run by this Python; it saves its argv as argv.json): the output folder and
    the argv the reference got, checked to name OmniSafe's algorithm and the task's cost limit."""
    from saferl.cli import main

    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n{script}")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "check"
    assert main(["benchmark", "reference", "--algo", "sac_lag", "--task", task, *flags,
                 "--reference-python", str(fake), "--out", str(out)]) == 0
    sent = json.loads((out / "argv.json").read_text())
    assert sent[sent.index("--algo") + 1] == "SACLag" and "lagrange_cfgs.cost_limit=25.0" in sent
    return out, sent


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


@contextlib.contextmanager
def temporary_package(tmp_path: Path, monkeypatch, name: str, envs_source: str):
    """A package ``name`` (its ``envs.py`` = ``envs_source``) in a temporary folder outside the
    repository, importable in this process only; afterwards its modules and the custom tasks it
    registered are forgotten. Yields the package's folder."""
    from saferl import registry

    root = tmp_path / "userpkgs"
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (root / name / "envs.py").write_text(textwrap.dedent(envs_source))
    monkeypatch.syspath_prepend(str(root))
    yield root / name
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]
    for task in [t for t in registry.TASKS if t.startswith(name)]:
        registry.TASKS.pop(task)
        registry.TASK_RUNTIME_ENVS.pop(task, None)
