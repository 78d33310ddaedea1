"""resflow: Residual Flows and friends for exact-likelihood density modelling.

The public API in a few names: ``Flow``, ``Trainer``, ``TrainConfig``, ``evaluate``,
``get_preset``, ``build_model``, ``load_data``, ``load_model``; the everyday vector
flows in one call (``maf``, ``naf``, ``nsf``, ``realnvp``, ``glow``, ``residual_flow``)
and any vector flow as a torch distribution (``as_distribution``).

>>> import torch
>>> from resflow import build_model, get_preset, load_data
>>> data = load_data("8gaussians", n_train=64, n_test=32)
>>> model = build_model(get_preset("toy2d")).eval()
>>> model.log_prob(data.test[:4]).shape
torch.Size([4])
>>> model.sample(3).shape
torch.Size([3, 2])
"""

from resflow.config import ConfigError
from resflow.constructors import glow, maf, naf, nsf, realnvp, residual_flow
from resflow.data import DataConfig, DataSplit, load_data
from resflow.evaluation import EvalResult, bits_per_dim, evaluate, interpolate, save_image_grid
from resflow.flow import Flow
from resflow.flow_distribution import FlowDistribution, as_distribution
from resflow.layers.base import after_optimizer_step
from resflow.layers.residual.logdet import EstimatorConfig
from resflow.layers.residual.spectral import refresh_lipschitz
from resflow.models import MODELS, PRESETS, build_model, count_parameters, get_preset
from resflow.models.iresnet import IResNetConfig, IResNetVectorConfig
from resflow.models.residual_flow import ImageFlowConfig, VectorFlowConfig
from resflow.runs import RunFolder, load_model
from resflow.train_config import TrainConfig
from resflow.training import Trainer
from resflow.version import __version__

__all__ = [
    "__version__",
    "MODELS",
    "PRESETS",
    "ConfigError",
    "DataConfig",
    "DataSplit",
    "EstimatorConfig",
    "EvalResult",
    "Flow",
    "FlowDistribution",
    "IResNetConfig",
    "IResNetVectorConfig",
    "ImageFlowConfig",
    "RunFolder",
    "TrainConfig",
    "Trainer",
    "VectorFlowConfig",
    "after_optimizer_step",
    "as_distribution",
    "bits_per_dim",
    "build_model",
    "count_parameters",
    "evaluate",
    "get_preset",
    "glow",
    "interpolate",
    "load_data",
    "load_model",
    "maf",
    "naf",
    "nsf",
    "realnvp",
    "refresh_lipschitz",
    "residual_flow",
    "save_image_grid",
]
