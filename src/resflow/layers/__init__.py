"""Invertible layers, all obeying the contract of :mod:`resflow.layers.base`.

Generic layers live here (ActNorm, squeeze, multi-scale plumbing, coupling,
autoregressive, elementwise transformers); the residual-flow machinery is in
:mod:`resflow.layers.residual`, preprocessing in :mod:`resflow.preprocess`.
"""

from resflow.layers.actnorm import ActNorm
from resflow.layers.base import (
    FlowLayer,
    Inverse,
    Sequential,
    after_optimizer_step,
    preserved_transient_state,
)
from resflow.layers.multiscale import (
    ConditionalPrior,
    DiagonalPrior,
    FactorOut,
    Flatten,
    SplitPrior,
)
from resflow.layers.residual import (
    EVAL_ESTIMATOR,
    EXACT_ESTIMATOR,
    TRAIN_ESTIMATOR,
    InverseNotConvergedError,
    LipschitzConv2d,
    LipschitzLinear,
    LipSwish,
    LogdetEstimator,
    NormOrder,
    ResidualBlock,
    make_activation,
    refresh_lipschitz,
    truncated_estimator,
)
from resflow.layers.squeeze import Squeeze

__all__ = [
    "ActNorm",
    "ConditionalPrior",
    "DiagonalPrior",
    "EVAL_ESTIMATOR",
    "EXACT_ESTIMATOR",
    "FactorOut",
    "Flatten",
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
    "SplitPrior",
    "Squeeze",
    "TRAIN_ESTIMATOR",
    "after_optimizer_step",
    "make_activation",
    "preserved_transient_state",
    "refresh_lipschitz",
    "truncated_estimator",
]
