"""Hybrid models (Residual Flows paper, section 5 and Table 4): one flow that is both a
density model ``p(x)`` and a classifier ``p(y | x)`` sharing its representation.

A classifier branch taps the flow after every squeeze and at the end of the last
scale: ``3x3 conv -> ActNorm -> ReLU -> global average pool`` (``head_channels``
features each), concatenated into a linear softmax classifier. The training objective
(:class:`resflow.training.objectives.Hybrid`) maximizes

    lambda * log p(x) + log p(y | x),   lambda in {0, 1/D, 1}

(``density_weight`` and ``per_dim``): ``lambda = 0`` trains a pure classifier whose
features are the flow's, ``1/D`` weighs the density per dimension. Following the paper,
the hybrid CIFAR-10 preset replaces the logit transform with mean/std normalization
(``normalize_mean`` / ``normalize_std``).

Registered as ``residual-flow-hybrid`` with presets ``hybrid-digits`` (CPU, minutes),
``hybrid-mnist`` and ``hybrid-cifar10`` (the paper's settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from resflow.config import ConfigError, param
from resflow.flow import Flow
from resflow.layers.actnorm import ActNorm
from resflow.layers.base import FlowLayer, Sequential, Shape
from resflow.layers.multiscale import FactorOut, Flatten
from resflow.layers.residual.block import ResidualBlock
from resflow.layers.squeeze import Squeeze
from resflow.models.registry import register_model, register_preset
from resflow.models.residual_flow import ImageFlowConfig, build_image_flow
from resflow.preprocess import LogitTransform, Normalize
from resflow.train_config import TrainConfig


class ClassifierHead(nn.Module):
    """``3x3 conv -> ActNorm -> ReLU -> global average pool``: ``[B, C, H, W] -> [B, width]``."""

    def __init__(self, channels: int, width: int = 256) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.norm = ActNorm(width)

    def forward(self, h: Tensor) -> Tensor:
        return torch.relu(self.norm(self.conv(h))[0]).mean((2, 3))


def find_taps(layers: FlowLayer, shape: Shape) -> list[tuple[nn.Module, str, Shape]]:
    """Where the classifier reads the flow: ``(module, "output" | "input", feature
    shape)`` for the output of every :class:`Squeeze` after the first residual block
    (the end of each scale but the last) and the input of the :class:`Flatten` that
    ends the last scale, in the order of the forward pass."""
    taps: list[tuple[nn.Module, str, Shape]] = []
    seen_block = False

    def walk(layer: nn.Module, shape: Shape) -> Shape:
        nonlocal seen_block
        if isinstance(layer, Sequential):
            for sub in layer.layers:
                shape = walk(sub, shape)
            return shape
        if isinstance(layer, FactorOut):
            inner = walk(layer.inner, layer.half)
            return (layer.n_out + inner[0],)
        out = layer.output_shape(shape)  # type: ignore[operator]
        if isinstance(layer, ResidualBlock):
            seen_block = True
        elif isinstance(layer, Squeeze) and seen_block:
            taps.append((layer, "output", tuple(out)))
        elif isinstance(layer, Flatten) and len(shape) == 3:
            taps.append((layer, "input", tuple(shape)))
        return out

    walk(layers, shape)
    return taps


class HybridFlow(Flow):
    """A :class:`Flow` with a classifier on its intermediate representations.

    ``log_prob`` / ``bits_per_dim`` / ``sample`` are the flow's; :meth:`log_prob_and_logits`
    gives ``log p(x)`` and the class logits from one forward pass, so the
    classification loss back-propagates into the flow's blocks.

    Args:
        flow: the density model (a multi-scale image flow).
        n_labels: number of classes of the classifier.
        head_channels: features of each branch (paper: 256).
        density_weight: ``lambda`` of ``lambda log p(x) + log p(y|x)`` (before ``per_dim``).
        per_dim: divide ``density_weight`` by ``D`` (the paper's ``lambda = 1/D``).
    """

    def __init__(
        self,
        flow: Flow,
        n_labels: int,
        head_channels: int = 256,
        density_weight: float = 1.0,
        per_dim: bool = True,
    ) -> None:
        super().__init__(flow.layers, flow.shape, flow.base, flow.latent_shape, flow.levels,
                         flow.n_classes)  # fmt: skip
        taps = find_taps(self.layers, self.shape)
        if not taps:
            raise ValueError("a hybrid model needs a multi-scale flow (no squeeze or flatten)")
        if n_labels < 2:
            raise ValueError(f"a classifier needs >= 2 classes, got {n_labels}")
        self.n_labels = n_labels
        self.density_weight = float(density_weight)
        self.per_dim = per_dim
        self.heads = nn.ModuleList(ClassifierHead(s[0], head_channels) for _, _, s in taps)
        self.classifier = nn.Linear(head_channels * len(taps), n_labels)
        self._features: dict[int, Tensor] | None = None
        for i, (module, where, _) in enumerate(taps):
            if where == "output":
                module.register_forward_hook(partial(HybridFlow._tap_output, self, i))
            else:
                module.register_forward_pre_hook(partial(HybridFlow._tap_input, self, i))

    @property
    def lam(self) -> float:
        """The weight ``lambda`` of ``log p(x)`` in the objective."""
        return self.density_weight / (self.dim if self.per_dim else 1)

    def _tap_output(self, i: int, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._features is not None:
            self._features[i] = output[0]

    def _tap_input(self, i: int, module: nn.Module, inputs: Any) -> None:
        if self._features is not None:
            self._features[i] = inputs[0]

    def log_prob_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p(x) [B], class logits [B, n_labels])`` from one forward pass."""
        self._features = {}
        try:
            z, logdet = Flow.forward(self, x)
            features = self._features
        finally:
            self._features = None
        log_p = self.base.log_prob(z, None) + logdet
        pooled = [head(features[i]) for i, head in enumerate(self.heads)]
        return log_p, self.classifier(torch.cat(pooled, 1))

    def logits(self, x: Tensor) -> Tensor:
        """Class logits ``[B, n_labels]``."""
        return self.log_prob_and_logits(x)[1]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self._features is None and not all(bool(h.norm.initialized) for h in self.heads):
            self.log_prob_and_logits(x)  # data-dependent init of the heads' ActNorm
        return super().forward(x, context)


@dataclass
class HybridConfig(ImageFlowConfig):
    """A multi-scale Residual Flow with a classifier branch (see the module docstring)."""

    n_labels: int = param(10, ge=2, le=100_000, help="classes of the classifier")
    head_channels: int = param(256, ge=1, le=65536, help="features of each classifier branch")
    density_weight: float = param(1.0, ge=0, help="lambda of lambda log p(x) + log p(y|x)")
    per_dim: bool = param(True, help="divide density_weight by D (the paper's lambda = 1/D)")
    normalize_mean: tuple[float, ...] | None = param(
        None, help="per-channel mean: mean/std normalization instead of the logit transform"
    )
    normalize_std: tuple[float, ...] | None = param(None, gt=0, help="per-channel std")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.normalize_mean is None) != (self.normalize_std is None):
            raise ConfigError("normalize_mean and normalize_std are given together")
        c = self.image_shape[0]
        for name in ("normalize_mean", "normalize_std"):
            value = getattr(self, name)
            if value is not None and len(value) not in (1, c):
                raise ConfigError(f"{name}: expected 1 or {c} values, got {len(value)}")


def build_hybrid(cfg: HybridConfig) -> HybridFlow:
    flow = build_image_flow(cfg)
    if cfg.normalize_mean is not None and cfg.normalize_std is not None:
        c = cfg.image_shape[0]
        mean = tuple(cfg.normalize_mean) * (c // len(cfg.normalize_mean))
        std = tuple(cfg.normalize_std) * (c // len(cfg.normalize_std))
        body = flow.layers
        assert isinstance(body, Sequential)
        i = next(i for i, m in enumerate(body.layers) if isinstance(m, LogitTransform))
        body.layers[i] = Normalize(mean, std)
    return HybridFlow(flow, cfg.n_labels, cfg.head_channels, cfg.density_weight, cfg.per_dim)


register_model(
    "residual-flow-hybrid",
    config=HybridConfig,
    build=build_hybrid,
    kind="image",
    family="residual-flow",
    description="Residual Flow + classifier: lambda log p(x) + log p(y|x) (paper section 5)",
)

register_preset(
    "hybrid-digits",
    "residual-flow-hybrid",
    HybridConfig(
        image_shape=(1, 8, 8),
        levels=17,
        n_blocks=(2, 2),
        hidden=32,
        logit_alpha=1e-3,
        fc_end=False,
        head_channels=32,
    ),  # fmt: skip
    train=TrainConfig(lr=2e-3, batch_size=64, warmup=50),
    description="8x8 digits, hybrid (lambda = 1/D), minutes on CPU",
    default_for=("digits",),
)
register_preset(
    "hybrid-mnist",
    "residual-flow-hybrid",
    HybridConfig(image_shape=(1, 28, 28), n_blocks=(16, 16, 16), logit_alpha=1e-6, fc_end=False),
    description="MNIST hybrid, paper architecture without the fully connected tail",
    default_for=("mnist",),
)
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
register_preset(
    "hybrid-cifar10",
    "residual-flow-hybrid",
    HybridConfig(
        image_shape=(3, 32, 32),
        n_blocks=(16, 16, 16),
        horizontal_flip=True,
        fc_end=False,
        normalize_mean=_CIFAR_MEAN,
        normalize_std=_CIFAR_STD,
    ),  # fmt: skip
    description="CIFAR-10 hybrid, mean/std normalization instead of the logit (paper)",
    default_for=("cifar10",),
)


def hybrid_lambda(model: Flow) -> float | None:
    """``lambda`` of a hybrid model, ``None`` for any other flow."""
    return model.lam if isinstance(model, HybridFlow) else None


__all__ = ["ClassifierHead", "HybridConfig", "HybridFlow", "build_hybrid", "find_taps"]
