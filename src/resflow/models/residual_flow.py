"""Residual Flow models (Chen et al. 2019) for vectors and images, built from layers.

Configs are plain dataclasses (see :mod:`resflow.models.presets` for the paper's
architectures); :func:`build_model` turns one into a :class:`resflow.flow.Flow`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from resflow.flow import Flow
from resflow.layers.actnorm import ActNorm
from resflow.layers.base import FlowLayer, Sequential
from resflow.layers.elementwise import Dequantize, LogitTransform, RandomHorizontalFlip
from resflow.layers.logdet import LogdetEstimator
from resflow.layers.multiscale import FactorOut, Flatten
from resflow.layers.residual import ResidualBlock
from resflow.layers.squeeze import Squeeze
from resflow.nets import residual_cnn, residual_mlp


@dataclass
class EstimatorConfig:
    """Log-determinant estimation of every residual block (paper defaults).

    Training: ``n_exact_terms`` + roulette over ``dist``; evaluation: ``eval_exact_terms``
    + the unbiased tail. ``train_method`` / ``eval_method`` may be ``"exact"`` (full
    Jacobian; only for small dimensions).
    """

    train_method: Literal["exact", "series"] = "series"
    eval_method: Literal["exact", "series"] = "series"
    n_exact_terms: int = 2
    eval_exact_terms: int = 20
    dist: Literal["geometric", "poisson", "none"] = "poisson"
    geom_p: float = 0.5
    poisson_lambda: float = 2.0
    n_hutchinson: int = 1
    neumann_grad: bool = True
    grad_in_forward: bool = True

    def estimators(self) -> tuple[LogdetEstimator, LogdetEstimator]:
        train = LogdetEstimator(
            method=self.train_method,
            n_exact_terms=self.n_exact_terms,
            dist=self.dist,
            n_hutchinson=self.n_hutchinson,
            neumann_grad=self.neumann_grad,
            grad_in_forward=self.grad_in_forward and self.train_method == "series",
        )
        ev = LogdetEstimator(
            method=self.eval_method,
            n_exact_terms=self.eval_exact_terms,
            dist="none" if self.dist == "none" else self.dist,
            n_hutchinson=self.n_hutchinson,
            neumann_grad=False,
            grad_in_forward=False,
        )
        return train, ev


@dataclass
class VectorFlowConfig:
    """Residual Flow for vectors / 2-D data: ``[ActNorm] -> (ResBlock -> [ActNorm]) x n``."""

    dim: int = 2
    n_blocks: int = 10
    hidden: tuple[int, ...] = (128, 128, 128)
    coeff: float = 0.98
    activation: str = "lipswish"
    actnorm: bool = True
    norm_orders: tuple[float, ...] | None = None
    learn_orders: bool = False
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)


@dataclass
class ImageFlowConfig:
    """Multi-scale Residual Flow for images (Appendix E of the paper).

    ``Dequantize -> [flip] -> Logit(alpha) -> [Squeeze] -> ActNorm -> (ResBlock ->
    ActNorm) x n_0 -> Squeeze -> [FactorOut] -> ... -> fully connected tail``.
    """

    image_shape: tuple[int, int, int] = (1, 28, 28)
    levels: int = 256
    n_blocks: tuple[int, ...] = (16, 16, 16)
    hidden: int = 512
    kernels: tuple[int, ...] = (3, 1, 3)
    coeff: float = 0.98
    activation: str = "lipswish"
    logit_alpha: float = 1e-6
    horizontal_flip: bool = False
    squeeze_first: bool = False
    factor_out: bool = False
    actnorm: bool = True
    fc_end: bool = True
    fc_blocks: int = 4
    fc_hidden: tuple[int, ...] = (128, 128)
    norm_orders: tuple[float, ...] | None = None
    learn_orders: bool = False
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)


ModelConfig = VectorFlowConfig | ImageFlowConfig


def _block(g: Any, est: EstimatorConfig) -> ResidualBlock:
    train, ev = est.estimators()
    return ResidualBlock(g, train, ev, geom_p=est.geom_p, poisson_lambda=est.poisson_lambda)


def build_vector_flow(cfg: VectorFlowConfig) -> Flow:
    layers: list[FlowLayer] = [ActNorm(cfg.dim)] if cfg.actnorm else []
    for _ in range(cfg.n_blocks):
        g = residual_mlp(
            cfg.dim, cfg.hidden, cfg.coeff, cfg.activation, True, cfg.norm_orders, cfg.learn_orders
        )
        layers.append(_block(g, cfg.estimator))
        if cfg.actnorm:
            layers.append(ActNorm(cfg.dim))
    return Flow(Sequential(layers), (cfg.dim,))


def n_scales(cfg: ImageFlowConfig) -> int:
    """Scales: at most ``len(n_blocks)``, while height and width stay >= 4 (as the paper)."""
    c, h, w = cfg.image_shape
    if cfg.squeeze_first:
        h, w = h // 2, w // 2
    n = 0
    while h >= 4 and w >= 4:
        n, h, w = n + 1, h // 2, w // 2
    return min(len(cfg.n_blocks), n)


def _scale(cfg: ImageFlowConfig, i: int, shape: tuple[int, int, int], last: int) -> FlowLayer:
    c, h, w = shape
    est = cfg.estimator
    layers: list[FlowLayer] = []
    if i == 0 and cfg.actnorm:
        layers.append(ActNorm(c))
    for b in range(cfg.n_blocks[i]):
        g = residual_cnn(
            c,
            cfg.hidden,
            cfg.kernels,
            cfg.coeff,
            cfg.activation,
            preact=not (i == 0 and b == 0),
            norm_orders=cfg.norm_orders,
            learn_orders=cfg.learn_orders,
        )
        layers.append(_block(g, est))
        if cfg.actnorm:
            layers.append(ActNorm(c))
    if i == last:
        d = c * h * w
        layers.append(Flatten(shape))
        if cfg.fc_end:
            for _ in range(cfg.fc_blocks):
                g = residual_mlp(d, cfg.fc_hidden, cfg.coeff, cfg.activation)
                layers.append(_block(g, est))
                if cfg.actnorm:
                    layers.append(ActNorm(d))
        return Sequential(layers)
    if h % 2 or w % 2:
        raise ValueError(f"scale {i} has odd size {h}x{w}: cannot squeeze; change image_shape")
    layers.append(Squeeze(2))
    squeezed = (4 * c, h // 2, w // 2)
    if cfg.factor_out:
        inner = _scale(cfg, i + 1, (2 * c, h // 2, w // 2), last)
        layers.append(FactorOut(inner, squeezed))
    else:
        layers.append(_scale(cfg, i + 1, squeezed, last))
    return Sequential(layers)


def build_image_flow(cfg: ImageFlowConfig) -> Flow:
    c, h, w = cfg.image_shape
    layers: list[FlowLayer] = [Dequantize(cfg.levels)]
    if cfg.horizontal_flip:
        layers.append(RandomHorizontalFlip())
    layers.append(LogitTransform(cfg.logit_alpha))
    shape = (c, h, w)
    if cfg.squeeze_first:
        if h % 2 or w % 2:
            raise ValueError(f"squeeze_first needs an even image size, got {h}x{w}")
        layers.append(Squeeze(2))
        shape = (4 * c, h // 2, w // 2)
    last = n_scales(cfg) - 1
    if last < 0:
        raise ValueError(f"image {h}x{w} is too small for a multi-scale model (need >= 4x4)")
    layers.append(_scale(cfg, 0, shape, last))
    return Flow(
        Sequential(layers),
        cfg.image_shape,
        latent_shape=(math.prod(cfg.image_shape),),
        levels=cfg.levels,
    )


def build_model(cfg: ModelConfig) -> Flow:
    """Build a :class:`Flow` from a vector or image config."""
    if isinstance(cfg, VectorFlowConfig):
        return build_vector_flow(cfg)
    if isinstance(cfg, ImageFlowConfig):
        return build_image_flow(cfg)
    raise TypeError(f"unknown model config type {type(cfg).__name__}")


def count_parameters(model: Any) -> int:
    """Number of parameters (as the paper counts them, frozen roulette parameters too)."""
    return sum(p.numel() for p in model.parameters())


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Plain data (for checkpoints and YAML): ``{"kind": ..., **fields}``."""
    kind = "vector" if isinstance(cfg, VectorFlowConfig) else "image"
    return {"kind": kind, **asdict(cfg)}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; unknown keys give a clear error."""
    data = dict(data)
    kind = data.pop("kind", None)
    cls = {"vector": VectorFlowConfig, "image": ImageFlowConfig}.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"model config needs kind 'vector' or 'image', got {kind!r}")
    est = EstimatorConfig(**_known(EstimatorConfig, data.pop("estimator", {}) or {}))
    kwargs = _known(cls, data)
    for k, v in kwargs.items():
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    return cls(**kwargs, estimator=est)


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s): {sorted(unknown)}")
    return {k: v for k, v in data.items() if k != "estimator"}
