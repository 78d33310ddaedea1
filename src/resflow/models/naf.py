"""Masked autoregressive flows (MAF) and neural autoregressive flows (NAF): configs,
builders, presets.

Registered as ``maf`` and ``naf`` (vectors: 2-D and tabular data). Both stack
``n_flows`` autoregressive layers, each a MADE conditioner
(:class:`~resflow.nets.made.MADE`) feeding an elementwise transformer, with the order
reversed from one layer to the next (:class:`~resflow.layers.permutation.Reverse`):

* MAF: ``y_d = x_d * exp(c tanh(h_d / c)) + t_d``
  (:class:`~resflow.layers.transformers.Affine` with a soft-clamped log-scale,
  ``c = scale_clamp = 3``), optionally with batch normalization between layers as in the
  MAF paper;
* NAF: ``y_d = DDSF(x_d; theta_d) + slope_floor * x_d`` or the same with ``DSF``
  (:mod:`resflow.layers.sigmoidal`), a monotone neural network whose parameters come
  from the MADE, soft-clamped to ``(-param_bound, param_bound)``.

Far from the data. A MADE is asymptotically linear in its input, so its outputs grow
without bound away from the training data. The papers' maps then break down there:
MAF's ``exp(h)`` overflows (``log p(x) = -inf`` and a ``NaN`` inverse at a few times the
data's radius), and a sigmoidal flow with extreme parameters has plateaus whose slope
underflows (``dy/dx ~ e^-80``: no float can invert it). Hence the two departures from
the papers, each a no-op near zero: MAF soft-clamps its log-scale (each layer's scale in
``(e^-3, e^3)``), NAF soft-clamps its conditioned parameters and adds a linear term, so
that ``dy/dx >= slope_floor`` everywhere. Every finite input then has a finite
log-density and a finite, accurate round trip (``tests/test_densities.py``). Setting
``scale_clamp = 0`` or ``param_bound = slope_floor = 0`` gives the papers' maps.

The conditioner's last layer starts at zero, so a MAF starts at the identity and a NAF
at the fixed increasing map of zero parameters. Density evaluation is one pass per
layer; sampling inverts dimension by dimension (``D`` passes per layer; NAF also
bisects each step).

References:
    Papamakarios, Pavlakou & Murray (2017), Masked autoregressive flow for density
    estimation.
    Huang, Krueger, Lacoste & Courville (2018), Neural autoregressive flows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from resflow.config import param
from resflow.flow import Flow
from resflow.layers.autoregressive import Autoregressive
from resflow.layers.base import FlowLayer, Sequential
from resflow.layers.batchnorm import BatchNormFlow
from resflow.layers.permutation import Reverse
from resflow.layers.sigmoidal import DDSF, DSF
from resflow.layers.transformers import Affine, Transformer
from resflow.models.configs import MAX_WIDTH, VectorModelConfig
from resflow.models.registry import register_model, register_preset
from resflow.nets.made import MADE
from resflow.train_config import TrainConfig

SigmoidKind = Literal["ddsf", "dsf"]


@dataclass
class AutoregressiveConfig(VectorModelConfig):
    """What MAF and NAF share: MADE conditioners in alternating (or random) orders."""

    dim: int = param(2, ge=1, le=100_000, help="data dimension")
    n_flows: int = param(5, ge=1, le=1024, help="autoregressive layers")
    hidden: tuple[int, ...] = param((100, 100), ge=1, le=MAX_WIDTH, help="MADE widths")
    activation: str = param("relu", help="MADE hidden activation")
    residual: bool = param(False, help="residual MADE (equal widths)")
    order: Literal["alternate", "random"] = param(
        "alternate", help="natural/reversed orders in turn, or random orders"
    )
    batch_norm: bool = param(False, help="batch normalization after each layer")
    seed: int = param(0, help="seed of the random orders")


@dataclass
class MAFConfig(AutoregressiveConfig):
    """MAF: affine autoregressive layers (defaults: the MAF paper's 5 layers)."""

    scale_clamp: float = param(
        3.0, ge=0, le=50, help="log-scale soft clamp c: c tanh(h / c) (0: exp(h), the paper)"
    )


@dataclass
class NAFConfig(AutoregressiveConfig):
    """NAF: sigmoidal autoregressive layers (defaults: NAF-DDSF(5), 16 sigmoid units)."""

    transformer: SigmoidKind = param("ddsf", help="dense (ddsf) or plain (dsf) sigmoidal flow")
    sigmoid_units: int = param(16, ge=1, le=4096, help="sigmoid units per sigmoidal layer")
    sigmoid_layers: int = param(2, ge=1, le=64, help="dense sigmoidal layers (ddsf)")
    activation: str = param("elu", help="MADE hidden activation")
    param_bound: float = param(
        8.0, ge=0, le=1000, help="soft clamp of the conditioned parameters (0: none, the paper)"
    )
    slope_floor: float = param(
        0.1, ge=0, le=1, help="linear term: dy/dx >= slope_floor (0: none, the paper)"
    )


def _transformer(cfg: AutoregressiveConfig) -> Transformer:
    if isinstance(cfg, MAFConfig):
        return Affine("exp", clamp=cfg.scale_clamp or None)
    assert isinstance(cfg, NAFConfig)
    bound = cfg.param_bound or None
    if cfg.transformer == "dsf":
        return DSF(cfg.sigmoid_units, bound=bound, slope_floor=cfg.slope_floor)
    return DDSF(cfg.sigmoid_units, cfg.sigmoid_layers, bound=bound, slope_floor=cfg.slope_floor)


def build_autoregressive_flow(cfg: AutoregressiveConfig) -> Flow:
    """``n_flows`` x (MADE -> transformer [-> batch norm]), orders alternating."""
    if cfg.dim < 2 and cfg.order == "random":
        raise ValueError("a random order needs dim >= 2")
    layers: list[FlowLayer] = []
    for i in range(cfg.n_flows):
        transformer = _transformer(cfg)
        order = "random" if cfg.order == "random" else "natural"
        made = MADE(
            cfg.dim,
            cfg.hidden,
            transformer.n_params,
            order=order,
            seed=cfg.seed + i,
            activation=cfg.activation,
            residual=cfg.residual,
            context_features=cfg.context_features,
        )
        layers.append(Autoregressive(made, transformer))
        if cfg.batch_norm and i < cfg.n_flows - 1:
            layers.append(BatchNormFlow(cfg.dim))
        if cfg.order == "alternate" and i < cfg.n_flows - 1 and cfg.dim > 1:
            layers.append(Reverse(cfg.dim))
    return Flow(Sequential(layers), (cfg.dim,), context_features=cfg.context_features)


register_model(
    "maf",
    config=MAFConfig,
    build=build_autoregressive_flow,
    kind="vector",
    description="masked autoregressive flow (Papamakarios et al. 2017)",
)
register_model(
    "naf",
    config=NAFConfig,
    build=build_autoregressive_flow,
    kind="vector",
    description="neural autoregressive flow, DSF/DDSF (Huang et al. 2018)",
)

# ---- presets -------------------------------------------------------------------------------
_TOY = TrainConfig(lr=5e-3, batch_size=500, weight_decay=0.0, warmup=50, ema_decay=0.995)
register_preset(
    "naf-toy2d",
    "naf",
    NAFConfig(dim=2, n_flows=3, hidden=(64, 64)),
    train=_TOY,
    description="2-D densities (e.g. the grid of Gaussians) in minutes on CPU",
    default_for=("vector",),
)
register_preset(
    "maf-toy2d",
    "maf",
    MAFConfig(dim=2, n_flows=5, hidden=(64, 64)),
    train=_TOY,
    description="2-D densities in minutes on CPU (the affine baseline)",
    default_for=("vector",),
)

# The tabular benchmarks (POWER, GAS, HEPMASS, MINIBOONE, BSDS300): dimension and the
# conditioner widths (BSDS300, 63-D, gets wider MADEs as in the MAF paper).
_TABULAR = {
    "power": (6, 100),
    "gas": (8, 100),
    "hepmass": (21, 512),
    "miniboone": (43, 512),
    "bsds300": (63, 1024),
}
_TABULAR_TRAIN = TrainConfig(
    steps=100_000,
    lr=1e-3,
    batch_size=512,
    weight_decay=0.0,
    warmup=100,
    eval_every=1000,
    ema_decay=0.999,
    patience=10,
    eval_batch_size=4096,
)
# Differences from the authors' code, for the descriptions (CW-Huang/NAF with torchkit;
# gpapamak/maf): MAF's count with its 5 batch norms, and its per-dataset MADE settings.
_MAF_AUTHORS = {
    "power": "60,120",
    "gas": "63,160",
    "hepmass": "1,477,540",
    "miniboone": "1,646,940",
    "bsds300": "6,222,060",
}
_MAF_MADE = {"gas": "tanh MADE", "bsds300": "at 2x1024; they also trained 2x512"}
_TRAIN_DIFF = (
    "AdamW 1e-3 (0.9, 0.99) at batch 512 with warm-up, clipping at 1, EMA and early stopping "
    "after 10 checks of 1000 steps (theirs: "
)
_NAF_DIFF = (
    "; differs from the paper: parameters soft-clamped to 8 and a 0.1 x slope "
    "(param_bound=slope_floor=0 for the paper's map); from the authors' code: their MADE (1 "
    "hidden layer by default, a scale and bias per unit, the output weight-normalised) feeds a "
    "1x1 convolution shared by all dimensions, their DDSF has 1 layer by default, and their "
    "flow ends with an elementwise affine layer; "
    + _TRAIN_DIFF
    + "Adam 1e-4 (0.9, 0.999) at batch 100, clipping at 5, no averaging by default, "
    "patience 30 epochs)"
)
_MAF_DIFF = (
    "the log-scale soft-clamped to 3 (scale_clamp=0 for the paper's map), batch norm with a "
    "running average in training and after 4 of the 5 layers (theirs: batch statistics, "
    "training-set statistics at evaluation, after all 5), the MADEs' last layer zero at init; "
    + _TRAIN_DIFF
    + "Adam 1e-4 (0.9, 0.999) at batch 100, L2 1e-6, patience 30 epochs)"
)
for _name, (_dim, _width) in _TABULAR.items():
    register_preset(
        f"naf-{_name}",
        "naf",
        NAFConfig(dim=_dim, n_flows=5, hidden=(_width, _width)),
        train=_TABULAR_TRAIN,
        description=f"{_name.upper()}: NAF-DDSF(5), MADE 2x{_width}, DDSF 2 layers x 16 units"
        + _NAF_DIFF,
        default_for=(_name,),
    )
    register_preset(
        f"maf-{_name}",
        "maf",
        MAFConfig(dim=_dim, n_flows=5, hidden=(_width, _width), batch_norm=True),
        train=_TABULAR_TRAIN,
        description=f"{_name.upper()}: MAF(5) with batch norm, MADE 2x{_width}; differs from the "
        f"authors' code (gpapamak/maf; {_MAF_AUTHORS[_name]} parameters"
        + (f", {_MAF_MADE[_name]}" if _name in _MAF_MADE else "")
        + "): "
        + _MAF_DIFF,
        default_for=(_name,),
    )
