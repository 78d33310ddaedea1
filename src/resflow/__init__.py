"""resflow: Residual Flows and friends for exact-likelihood density modelling.

The public API in a few names::

    from resflow import Flow, Trainer, TrainConfig, evaluate, get_preset, load_data, load_model
"""

from resflow.data import DataSplit, load_data
from resflow.evaluation import EvalResult, bits_per_dim, evaluate, interpolate, save_image_grid
from resflow.flow import Flow
from resflow.layers.lipschitz import refresh_lipschitz
from resflow.models.presets import PRESETS, get_preset
from resflow.models.residual_flow import (
    EstimatorConfig,
    ImageFlowConfig,
    VectorFlowConfig,
    build_model,
    count_parameters,
)
from resflow.run import load_model
from resflow.training import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "DataSplit",
    "EstimatorConfig",
    "EvalResult",
    "Flow",
    "ImageFlowConfig",
    "TrainConfig",
    "Trainer",
    "VectorFlowConfig",
    "bits_per_dim",
    "build_model",
    "count_parameters",
    "evaluate",
    "get_preset",
    "interpolate",
    "load_data",
    "load_model",
    "refresh_lipschitz",
    "save_image_grid",
]
