"""moue_core: the model family, counting, data and the single-trial training function.

Pure torch and single-device: nothing here imports ray, mlflow, optuna or plotly. Attributes load
lazily, so ``import moue_core.config`` / ``moue_core.trial_config`` / ``moue_core.counting`` (pure Python)
never import torch:
search spaces and spec validation count parameters without it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "moue_core.config",
    "Topology": "moue_core.topology",
    "ConfigError": "moue_core.errors",
    "CONVENTION": "moue_core.counting",
    "Counts": "moue_core.counting",
    "count": "moue_core.counting",
    "check_counts": "moue_core.counting",
    "MoUEModel": "moue_core.model",
    "ModelOutput": "moue_core.model",
    "RouterStats": "moue_core.moe",
    "LayerwiseMoEModel": "moue_core.convert",
    "WindowSchedule": "moue_core.convert",
    "convert_layerwise": "moue_core.convert",
    "layerwise_config": "moue_core.convert",
    "upcycle_dense": "moue_core.convert",
    "DataConfig": "moue_core.trial_config",
    "TrainConfig": "moue_core.trial_config",
    "TrialConfig": "moue_core.trial_config",
    "ConvertConfig": "moue_core.trial_config",
    "TrialResult": "moue_core.train",
    "train": "moue_core.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moue_core' has no attribute {name!r}")
