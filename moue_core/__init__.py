"""moue: hyperparameter and scaling-law studies of MoE LMs with expert pools shared across layers.

One installed package, ``moue``, from the repository's four folders (``pyproject.toml``'s
``package-dir``): ``moue`` itself is ``moue_core/`` (the model family, counting, data and the
single-trial training function: pure torch, single-device, nothing here imports ray, mlflow,
optuna or plotly), ``moue.studies`` is ``studies/`` (specs, sweeps, tracking, the CLI),
``moue.search_spaces`` is ``search_spaces/`` and ``moue.analysis`` is ``analysis/`` (loading,
fits, reports, the gate).

The Python API in a few lines (docs/API.md)::

    import moue

    runs = moue.load_runs("quickstart", tracking_uri="sqlite:////abs/path/.moue/mlflow.db")
    res = moue.fit(runs.frame, law="compute_power", n_bootstrap=1000)
    print(res.identified, res.params, res.ci)

Attributes load lazily, so ``import moue.config`` / ``moue.trial_config`` / ``moue.counting``
(pure Python) never import torch: search spaces and spec validation count parameters without it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "moue.config",
    "Topology": "moue.topology",
    "ConfigError": "moue.errors",
    "CONVENTION": "moue.counting",
    "Counts": "moue.counting",
    "count": "moue.counting",
    "check_counts": "moue.counting",
    "MoUEModel": "moue.model",
    "ModelOutput": "moue.model",
    "RouterStats": "moue.moe",
    "LayerwiseMoEModel": "moue.convert",
    "WindowSchedule": "moue.convert",
    "convert_layerwise": "moue.convert",
    "layerwise_config": "moue.convert",
    "upcycle_dense": "moue.convert",
    "DataConfig": "moue.trial_config",
    "TrainConfig": "moue.trial_config",
    "TrialConfig": "moue.trial_config",
    "ConvertConfig": "moue.trial_config",
    "TrialResult": "moue.train",
    "train": "moue.train",
    # the analysis and studies API
    "load_runs": "moue.analysis.loading",
    "fit": "moue.analysis.fitting",
    "write_report": "moue.analysis.report",
    "load_study": "moue.studies.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moue' has no attribute {name!r}")
