"""saferl: distributed safe reinforcement learning on Ray.

Kept import-light on purpose: the Safety-Gymnasium interpreter imports ``saferl.actors.env_host``
and has neither torch nor pydantic.
"""
from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout (and in a Ray job's uploaded working_dir) the design card's top-level
# folders (cluster/, actors/, learners/, envs/) sit beside this package rather than inside it;
# make them resolve as saferl.cluster, saferl.actors, ... exactly as the installed mapping does.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "cluster" / "__init__.py").is_file():
    __path__.append(str(_root))

# The Python API (saferl/api.py), imported on first use: `import saferl` alone loads nothing heavy.
_API = ("train", "load", "evaluate_run", "make_config", "Run", "Policy")


def __getattr__(name: str):
    if name in _API:
        from saferl import api

        return getattr(api, name)
    if name == "sweep":  # `saferl sweep` from Python (saferl/cluster/sweep.py)
        from saferl.cluster.sweep import run_sweep

        return run_sweep
    raise AttributeError(f"module 'saferl' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API, "sweep"])
