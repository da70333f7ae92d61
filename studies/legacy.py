"""The module names of sweeps saved before moue was one package, for resuming them.

Until 2026-12-02 the four folders installed as top-level packages (``studies``, ``analysis``,
``search_spaces``, ``moue_core``); Tune's saved state of a sweep (``tuner.pkl``, the searcher,
the trials) pickles our callbacks, the study and the search space's functions by those module
paths. :func:`install` lets such a state unpickle: it adds, at the end of ``sys.meta_path``, a
finder that answers those names, and only those, with the ``moue`` modules they became
(``studies.callbacks`` is ``moue.studies.callbacks``, ``moue_core.config`` is ``moue.config``).
At the end, so a module of the user's own of one of those names still wins. ``moue run`` and
``moue sweep --resume`` install it before restoring a sweep; nothing else does.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

__all__ = ["LEGACY", "install"]

LEGACY = {"studies": "moue.studies", "analysis": "moue.analysis", "search_spaces": "moue.search_spaces",
          "moue_core": "moue"}


class _LegacyNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``studies.callbacks`` -> the module ``moue.studies.callbacks`` itself (so a class unpickles
    as the class moue uses); a package (``studies``, ``search_spaces.spaces``) -> a stand-in whose
    attributes are the package's and whose ``__path__`` is empty, so its submodules come here too
    rather than load a second time from the folder under their old names."""

    def __init__(self) -> None:
        self._specs: dict[str, object] = {}

    @staticmethod
    def _current(fullname: str) -> str | None:
        head, _, rest = fullname.partition(".")
        return LEGACY[head] + ("." + rest if rest else "") if head in LEGACY else None

    def find_spec(self, fullname, path=None, target=None):
        current = self._current(fullname)
        found = importlib.util.find_spec(current) if current is not None else None
        if found is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=found.submodule_search_locations is not None)

    def create_module(self, spec):
        module = importlib.import_module(self._current(spec.name))
        if hasattr(module, "__path__"):  # a package: a stand-in
            stand_in = types.ModuleType(spec.name, f"the old name of {module.__name__} (studies.legacy)")
            stand_in.__getattr__ = lambda name, _m=module: getattr(_m, name)
            return stand_in
        self._specs[spec.name] = module.__spec__  # the import system sets __spec__ to the alias's
        return module

    def exec_module(self, module) -> None:
        if module.__name__ != module.__spec__.name:  # the moue module under its old name
            module.__spec__ = self._specs.pop(module.__spec__.name)
        else:
            module.__path__ = []  # a stand-in's submodules: here, not from the folder


_FINDER = _LegacyNames()


def install() -> None:
    """Let ``studies.*`` / ``analysis.*`` / ``search_spaces.*`` / ``moue_core.*`` pickles load."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
