"""Invertible layers, all obeying the contract of :mod:`resflow.layers.base`."""

from resflow.layers.activations import LipSwish, make_activation
from resflow.layers.actnorm import ActNorm
from resflow.layers.base import FlowLayer, Inverse, Sequential
from resflow.layers.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    NormOrder,
    refresh_lipschitz,
)
from resflow.layers.logdet import (
    EVAL_ESTIMATOR,
    EXACT_ESTIMATOR,
    TRAIN_ESTIMATOR,
    LogdetEstimator,
    truncated_estimator,
)
from resflow.layers.residual import InverseNotConvergedError, ResidualBlock

__all__ = [
    "ActNorm",
    "EVAL_ESTIMATOR",
    "EXACT_ESTIMATOR",
    "FlowLayer",
    "Inverse",
    "InverseNotConvergedError",
    "LipSwish",
    "LipschitzConv2d",
    "LipschitzLinear",
    "LogdetEstimator",
    "NormOrder",
    "ResidualBlock",
    "Sequential",
    "TRAIN_ESTIMATOR",
    "make_activation",
    "refresh_lipschitz",
    "truncated_estimator",
]
