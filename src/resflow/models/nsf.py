"""Neural spline flows (Durkan, Bekasov, Murray & Papamakarios, NeurIPS 2019).

A flow of ``n_flows`` steps, each an invertible linear layer (a fixed random
permutation and an LU-parameterised matrix starting at the identity) followed by a
rational-quadratic spline layer (:class:`~resflow.layers.splines.RationalQuadraticSpline`,
``K`` bins on ``[-B, B]``, identity outside), and one more linear layer at the end; a
standard normal base. The spline layer is a coupling (RQ-NSF (C): parity masks
alternating between steps, a residual MLP conditioner) or autoregressive (RQ-NSF (AR):
a residual MADE), both from the shared parts. The splines' unconstrained parameters are
soft-clamped (``param_bound``), so that far from the data no bin becomes flat enough to
lose the inverse to float32 rounding (``param_bound=0``: the paper's map).

>>> import torch
>>> from resflow.models import build_model
>>> model = build_model(NSFConfig(dim=3, n_flows=2, hidden=16, blocks=1, bins=4))
>>> model.log_prob(torch.randn(5, 3)).shape
torch.Size([5])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from resflow.config import ConfigError, param
from resflow.flow import Flow
from resflow.layers.autoregressive import Autoregressive
from resflow.layers.base import FlowLayer, Sequential
from resflow.layers.conv1x1 import InvertibleConv1x1
from resflow.layers.coupling import AlternateMask, Coupling
from resflow.layers.permutation import Permutation
from resflow.layers.splines import RationalQuadraticSpline
from resflow.models.configs import MAX_WIDTH, VectorModelConfig
from resflow.models.registry import register_model, register_preset
from resflow.nets.conditioners import ResidualMLP
from resflow.nets.made import MADE
from resflow.train_config import TrainConfig

SplineLayer = Literal["coupling", "autoregressive"]
LinearKind = Literal["lu", "permutation"]


@dataclass
class NSFConfig(VectorModelConfig):
    """Neural spline flow for vectors (defaults: the paper's POWER model, RQ-NSF (C))."""

    transform: SplineLayer = param("coupling", help="spline coupling (C) or autoregressive (AR)")
    n_flows: int = param(10, ge=1, le=1024, help="flow steps (linear layer + spline layer)")
    hidden: int = param(256, ge=1, le=MAX_WIDTH, help="width of the conditioner")
    blocks: int = param(2, ge=1, le=64, help="residual blocks of the conditioner")
    bins: int = param(8, ge=1, le=256, help="spline bins K")
    bound: float = param(3.0, gt=0, le=1e6, help="splines on [-B, B], identity outside")
    dropout: float = param(0.0, ge=0, lt=1, help="dropout in the coupling conditioner")
    linear: LinearKind = param("lu", help="permutation + LU linear layer, or permutation only")
    param_bound: float = param(
        3.0, ge=0, le=1e6, help="soft clamp of the spline parameters (0: none, the paper)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transform == "coupling" and self.dim < 2:
            raise ConfigError("dim: a coupling needs dim >= 2 (use transform=autoregressive)")
        if self.transform == "autoregressive" and self.dropout > 0:
            raise ConfigError("dropout: the residual MADE has no dropout; set dropout=0")


def _linear(cfg: NSFConfig) -> FlowLayer:
    if cfg.linear == "permutation":
        return Permutation(torch.randperm(cfg.dim))  # the model's seed fixes it
    return InvertibleConv1x1(cfg.dim, lu=True, init="permutation")


def _spline_layer(cfg: NSFConfig, i: int) -> FlowLayer:
    spline = RationalQuadraticSpline(cfg.bins, cfg.bound, clamp=cfg.param_bound or None)
    if cfg.transform == "coupling":
        net = partial(ResidualMLP, hidden=cfg.hidden, blocks=cfg.blocks, dropout=cfg.dropout,
                      context_features=cfg.context_features)  # fmt: skip
        return Coupling.build((cfg.dim,), AlternateMask(reverse=i % 2 == 0), spline, net)
    made = MADE(cfg.dim, (cfg.hidden,) * (cfg.blocks + 1), spline.n_params, residual=True,
                activation="relu", context_features=cfg.context_features)  # fmt: skip
    return Autoregressive(made, spline)


def build_nsf(cfg: NSFConfig) -> Flow:
    """``n_flows`` x (linear -> spline layer) -> linear, on a standard normal base."""
    layers: list[FlowLayer] = []
    for i in range(cfg.n_flows):
        layers += [_linear(cfg), _spline_layer(cfg, i)]
    layers.append(_linear(cfg))
    return Flow(Sequential(layers), (cfg.dim,), context_features=cfg.context_features)


def published(cfg: NSFConfig, data_name: str) -> str | None:
    """The paper's test log-likelihood of this variant on a tabular benchmark."""
    figure = PAPER_LOG_LIKELIHOOD.get((cfg.transform, data_name))
    tag = "C" if cfg.transform == "coupling" else "AR"
    return None if figure is None else f"RQ-NSF ({tag}) in its paper: {figure}"


register_model(
    "nsf",
    config=NSFConfig,
    build=build_nsf,
    kind="vector",
    published=published,
    description="neural spline flow, rational-quadratic coupling or autoregressive "
    "(Durkan et al. 2019)",
)

_TOY = TrainConfig(steps=3000, lr=5e-3, batch_size=512, weight_decay=0.0, warmup=100,
                   eval_every=500, ema_decay=0.99)  # fmt: skip
register_preset(
    "nsf-toy2d",
    "nsf",
    NSFConfig(dim=2, n_flows=4, hidden=64, blocks=2, bins=8, bound=5.0),
    train=_TOY,
    description="2-D densities in minutes on CPU (RQ-NSF (C), splines on [-5, 5])",
    default_for=("vector",),
)
register_preset(
    "nsf-ar-toy2d",
    "nsf",
    NSFConfig(dim=2, transform="autoregressive", n_flows=4, hidden=64, blocks=2, bound=5.0),
    train=_TOY,
    description="2-D densities in minutes on CPU (RQ-NSF (AR), splines on [-5, 5])",
)

# The paper's tabular models (its appendix's table of hyperparameters: dimension, batch,
# learning rate, flow steps, residual blocks, hidden width, bins, dropout, training
# steps), the same for the coupling and the autoregressive variant, and its test
# log-likelihoods (nats, +- two standard errors).
_TABULAR = {
    "power": (6, 512, 5e-4, 10, 2, 256, 8, 0.0, 400_000),
    "gas": (8, 512, 5e-4, 10, 2, 256, 8, 0.1, 400_000),
    "hepmass": (21, 256, 5e-4, 20, 1, 128, 8, 0.2, 400_000),
    "miniboone": (43, 128, 3e-4, 10, 1, 32, 4, 0.2, 200_000),
    "bsds300": (63, 512, 5e-4, 20, 1, 128, 8, 0.2, 400_000),
}
PAPER_LOG_LIKELIHOOD = {
    ("coupling", "power"): "0.64 +- 0.01",
    ("coupling", "gas"): "13.09 +- 0.02",
    ("coupling", "hepmass"): "-14.75 +- 0.03",
    ("coupling", "miniboone"): "-9.67 +- 0.47",
    ("coupling", "bsds300"): "157.54 +- 0.28",
    ("autoregressive", "power"): "0.66 +- 0.01",
    ("autoregressive", "gas"): "13.09 +- 0.02",
    ("autoregressive", "hepmass"): "-14.01 +- 0.03",
    ("autoregressive", "miniboone"): "-9.22 +- 0.48",
    ("autoregressive", "bsds300"): "157.31 +- 0.28",
}
_DIFF = (
    "; differs from the paper: the spline parameters soft-clamped to 3 (param_bound=0 for "
    "the paper's map); from the authors' code (bayesiains/nsf): AdamW (0.9, 0.99) at a "
    "constant rate after a short warm-up, with EMA and early stopping on the validation "
    "split (theirs: Adam with cosine annealing, the best validation checkpoint), clipping "
    "at 5 as theirs, no unconditional spline on the coupling's identity half"
)
for _name, (_dim, _batch, _lr, _steps, _blocks, _hidden, _bins, _drop, _n) in _TABULAR.items():
    _train = TrainConfig(steps=_n, lr=_lr, batch_size=_batch, weight_decay=0.0, warmup=100,
                         grad_clip=5.0, eval_every=1000, patience=20,
                         eval_batch_size=4096)  # fmt: skip
    for _kind, _tag in (("coupling", "c"), ("autoregressive", "ar")):
        _cfg = NSFConfig(
            dim=_dim,
            transform=_kind,  # type: ignore[arg-type]
            n_flows=_steps,
            hidden=_hidden,
            blocks=_blocks,
            bins=_bins,
            dropout=_drop if _kind == "coupling" else 0.0,
        )
        register_preset(
            f"nsf-{_tag}-{_name}",
            "nsf",
            _cfg,
            train=_train,
            description=f"{_name.upper()}: RQ-NSF ({_tag.upper()}), {_steps} steps, {_blocks} "
            f"residual block(s) of {_hidden}, {_bins} bins on [-3, 3], dropout "
            f"{_cfg.dropout:g}; the paper's test log-likelihood "
            f"{PAPER_LOG_LIKELIHOOD[(_kind, _name)]}"
            + _DIFF
            + ("" if _kind == "coupling" else f", no dropout in the MADE (theirs: {_drop:g})"),
            default_for=(_name,) if _kind == "coupling" else (),
        )
