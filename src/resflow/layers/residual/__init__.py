"""The residual-flow machinery: the invertible residual block ``x + g(x)``, its
log-determinant estimators, Lipschitz-constrained layers, Jacobian passes and
Lipschitz activations (i-ResNet, Behrmann et al. 2019; Residual Flows, Chen et al. 2019).
"""

from resflow.layers.residual.activations import LipSwish, make_activation
from resflow.layers.residual.block import InverseNotConvergedError, ResidualBlock
from resflow.layers.residual.lipschitz_layers import LipschitzConv2d, LipschitzLinear
from resflow.layers.residual.logdet import (
    EVAL_ESTIMATOR,
    EXACT_ESTIMATOR,
    TRAIN_ESTIMATOR,
    LogdetEstimator,
    truncated_estimator,
)
from resflow.layers.residual.norms import NormOrder
from resflow.layers.residual.spectral import refresh_lipschitz

__all__ = [
    "EVAL_ESTIMATOR",
    "EXACT_ESTIMATOR",
    "InverseNotConvergedError",
    "LipSwish",
    "LipschitzConv2d",
    "LipschitzLinear",
    "LogdetEstimator",
    "NormOrder",
    "ResidualBlock",
    "TRAIN_ESTIMATOR",
    "make_activation",
    "refresh_lipschitz",
    "truncated_estimator",
]
