"""On the path of the processes of tests/test_legacy.py's old-layout sweep (its Ray workers too):
the old module names resolve, as they did when the folders installed as top-level packages."""
from moue.studies.legacy import install

install()
