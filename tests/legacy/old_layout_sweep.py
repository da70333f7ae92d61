"""Run ``moue`` as it ran before moue was one package: every class and function of ours says it
lives in its old module (``studies.callbacks``, ``moue_core.config``, ...), so Tune's saved state
pickles those names, as a sweep saved by that version did. Arguments: the CLI's."""
import importlib
import sys

import moue.studies.cli
import moue.studies.runner  # noqa: F401  (what the sweep pickles: callbacks, the study, plans)
from moue.studies.legacy import LEGACY

OLD = sorted(((new, old) for old, new in LEGACY.items()), key=lambda p: -len(p[0]))


def old_name(name: str) -> str:
    for new, old in OLD:
        if name == new or name.startswith(new + "."):
            return old + name[len(new):]
    return name


for name, module in list(sys.modules.items()):
    if name != "moue" and not name.startswith("moue."):
        continue
    old = old_name(name)
    importlib.import_module(old)  # sys.modules knows the old name (cloudpickle looks it up there)
    for obj in list(vars(module).values()):
        if (isinstance(obj, type) or callable(obj)) and getattr(obj, "__module__", None) == name:
            try:
                obj.__module__ = old
            except (AttributeError, TypeError):
                pass
sys.argv = ["moue", *sys.argv[1:]]
moue.studies.cli.main()
