"""`pip install .` (a wheel, not the editable checkout) is a whole saferl: every subpackage (the
studies included) and the shipped configs as package data, found without the source tree."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from saferl.config import CONFIG_DIR, REPO_ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _pip(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, check=True, capture_output=True, text=True)


def _project() -> dict:
    if not (REPO_ROOT / "pyproject.toml").is_file():
        pytest.skip("needs a source checkout")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_pyproject_lists_every_subpackage_and_the_configs():
    """Every folder with Python files under a mapped folder is a listed package, and the configs'
    package-data patterns cover every shipped YAML (the wheel build below checks the same slowly)."""
    setup = _project()["tool"]["setuptools"]
    packages = set(setup["packages"])
    for name, folder in setup["package-dir"].items():
        for init in (REPO_ROOT / folder).rglob("*.py"):
            parts = init.parent.relative_to(REPO_ROOT / folder).parts
            assert ".".join((name, *parts)) in packages, f"{init.parent} is not in pyproject's packages"
    assert setup["package-dir"]["saferl.configs"] == CONFIG_DIR.relative_to(REPO_ROOT).as_posix()
    shipped = {p for pattern in setup["package-data"]["saferl.configs"] for p in CONFIG_DIR.glob(pattern)}
    assert shipped == set(CONFIG_DIR.glob("**/*.yaml"))


@pytest.mark.slow  # builds and installs a wheel: half a minute or more
def test_the_wheel_installs_every_subpackage_and_the_configs(tmp_path):
    # the build's inputs only (no runs/, no build outputs in the shared tree)
    project = _project()
    src = tmp_path / "src"
    for folder in sorted(set(project["tool"]["setuptools"]["package-dir"].values())):
        shutil.copytree(REPO_ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy(REPO_ROOT / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(src), "-w", str(tmp_path / "dist"),
         cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("saferl-*.whl")

    # A fresh venv holding saferl from the wheel only; torch, ray, ... come from this interpreter's
    # site-packages through a .pth line (its own .pth files, the editable install's among them,
    # are not run from there, so the checkout never joins sys.path).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _pip("--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", "-q", str(wheel), cwd=tmp_path)

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*cmd: str) -> str:
        out = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    probe = run(str(venv / "bin" / "python"), "-c", (
        "import saferl, saferl.tools.studies.benchmark as b; from saferl.config import CONFIG_DIR, load_config\n"
        "cfg = load_config('ppo_lag/SafetyPointGoal1-v0')\n"
        "print(saferl.__file__, b.__file__, CONFIG_DIR, len(list(CONFIG_DIR.glob('**/*.yaml'))), sep='\\n')\n"
        "print(cfg.algo, cfg.task, cfg.learner_params().epochs, load_config('quickstart').task)"))
    init, studies, config_dir, n_files, loaded = probe.strip().splitlines()
    for path in (init, studies, config_dir):
        assert Path(path).is_relative_to(site / "saferl"), path
    assert int(n_files) == len(list(CONFIG_DIR.glob("**/*.yaml")))  # every shipped config, defaults included
    epochs = __import__("saferl.config").config.load_config("ppo_lag/SafetyPointGoal1-v0").learner_params().epochs
    assert loaded.split() == ["ppo_lag", "SafetyPointGoal1-v0", str(epochs), "PointHazard-D1-v0"]

    listing = run(str(venv / "bin" / "saferl"), "list")
    assert "config files for " in listing and "SafetyPointGoal1-v0" in listing.split("config files for ")[1]
    assert "cgpo-table1" in run(str(venv / "bin" / "saferl"), "study", "--help")
