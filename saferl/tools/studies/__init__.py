"""Runnable studies that reproduce the seed papers' evidence (``saferl study NAME``).

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> Path``
(the output folder, holding a table, a plot and the raw numbers). ``STUDIES`` maps the CLI
name to the module path; modules are imported only when their study runs.
"""
from __future__ import annotations

import importlib

STUDIES = {
    "gbe": "saferl.tools.studies.gbe",
    "cgpo-table1": "saferl.tools.studies.cgpo_table1",
    "cgpo-radius": "saferl.tools.studies.cgpo_radius",
    "cgpo-gradients": "saferl.tools.studies.cgpo_gradients",
    "safeguards": "saferl.tools.studies.safeguards",
    "robustness": "saferl.tools.studies.robustness",
    "sis-feasibility": "saferl.tools.studies.sis_feasibility",
    "strpo-ablation": "saferl.tools.studies.strpo_ablation",
}


def load(name: str):
    return importlib.import_module(STUDIES[name])
