"""moue_core: the model family, counting, data and the single-trial training function.

Pure torch and single-device: nothing here imports ray, mlflow, optuna or plotly.
"""

from moue_core.config import ModelConfig
from moue_core.convert import LayerwiseMoEModel, WindowSchedule, convert_layerwise, layerwise_config
from moue_core.counting import CONVENTION, Counts, check_counts, count
from moue_core.errors import ConfigError
from moue_core.model import ModelOutput, MoUEModel
from moue_core.moe import RouterStats
from moue_core.topology import Topology

__all__ = [
    "CONVENTION",
    "ConfigError",
    "Counts",
    "LayerwiseMoEModel",
    "ModelConfig",
    "ModelOutput",
    "MoUEModel",
    "RouterStats",
    "Topology",
    "WindowSchedule",
    "check_counts",
    "convert_layerwise",
    "count",
    "layerwise_config",
]
