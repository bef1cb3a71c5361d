"""Let numpy 1.x unpickle arrays that numpy 2 pickled (numpy + stdlib only).

numpy 2 renamed ``numpy.core`` to ``numpy._core``, and its pickles name functions by their new
module path (``numpy._core.multiarray._reconstruct``; with pickle protocol 5, which Ray uses,
``numpy._core.numeric._frombuffer``). The Safety-Gymnasium interpreter runs numpy 1.26, so an
array sent by Ray from the main (numpy 2) interpreter fails there with
``ModuleNotFoundError: No module named 'numpy._core.numeric'`` (numpy 1.26 ships stubs for only a
few ``numpy._core`` submodules, not ``numeric``). :func:`alias_numpy2_modules` registers every
``numpy._core.<name>`` as an alias of ``numpy.core.<name>`` in ``sys.modules``. Call it before
anything numpy-2-pickled is loaded, e.g. at import time of a Ray actor's module: Ray unpickles a
method's arguments after the actor's module is imported.

numpy 2 loads numpy 1 pickles, but a contiguous array pickled with protocol 5 (every array Ray
sends back from the SG interpreter) names ``numpy.core.numeric._frombuffer``, and numpy 2 warns
on that: ``DeprecationWarning: numpy.core.numeric is deprecated and has been renamed to
numpy._core.numeric...`` (an error under ``-W error`` / pytest ``filterwarnings = error``). The
opt-in :func:`pickle_arrays_as_numpy2` makes the numpy-1 side write the numpy 2 name instead.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

import numpy as np

__all__ = ["alias_numpy2_modules", "pickle_arrays_as_numpy2"]

_OLD, _NEW = "numpy.core", "numpy._core"


class _Numpy2CoreAliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves a not-yet-aliased ``numpy._core.<name>`` to the module ``numpy.core.<name>``."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_NEW + "."):
            return None
        old = _OLD + fullname[len(_NEW):]
        if importlib.util.find_spec(old) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(_OLD + spec.name[len(_NEW):])

    def exec_module(self, module):  # the aliased module is already executed
        pass


def alias_numpy2_modules() -> None:
    """Under numpy 1.x alias ``numpy._core[.<name>]`` to ``numpy.core[.<name>]``; no-op under 2."""
    if int(np.__version__.split(".")[0]) >= 2:
        return
    import numpy.core  # noqa: F401  (imports multiarray, numeric, umath, _multiarray_umath, ...)

    # numpy 1.26 already has a small numpy._core package of stubs; older 1.x has none.
    if _NEW not in sys.modules:
        try:
            importlib.import_module(_NEW)
        except ImportError:
            sys.modules[_NEW] = sys.modules[_OLD]
    for name, module in list(sys.modules.items()):
        if name.startswith(_OLD + ".") and module is not None:
            sys.modules.setdefault(_NEW + name[len(_OLD):], module)
    # Submodules numpy.core has not imported yet are aliased on first import.
    if not any(isinstance(f, _Numpy2CoreAliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Numpy2CoreAliasFinder())


def pickle_arrays_as_numpy2() -> None:
    """Under numpy 1.x, pickle arrays with numpy 2's module name for ``_frombuffer``; no-op under 2.

    Afterwards this process's array pickles load warning-free in numpy 2, and in numpy 1 only
    where :func:`alias_numpy2_modules` has run (it runs here first). Opt-in for that reason.
    """
    if int(np.__version__.split(".")[0]) >= 2:
        return
    alias_numpy2_modules()
    from numpy.core import numeric

    # pickle finds a function by __module__ + __qualname__ and checks the lookup gives the same
    # object, which the alias guarantees.
    numeric._frombuffer.__module__ = _NEW + ".numeric"
