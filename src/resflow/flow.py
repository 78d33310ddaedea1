"""A normalizing flow: invertible layers (data -> latent) plus a base distribution."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from resflow.distributions import StandardNormal
from resflow.layers.base import FlowLayer, Sequential, check_finite, is_stochastic, shared_scope
from resflow.layers.hooks import Penalty, implementers
from resflow.value_checks import require


class Flow(nn.Module):
    """``log p(x) = log p_base(f(x)) + log|det df/dx|`` for ``f`` = the layers in order.

    For discrete data (``levels`` set) the first layer is a dequantizer, whose logdet
    carries the ``-D log(levels)`` term, so ``log_prob`` is (an estimate of a lower
    bound on) the discrete log-likelihood ``log P(x)`` in nats and ``bits_per_dim`` is
    ``-log P(x) / (D ln 2)``.

    Args:
        layers: a flow layer (or list of layers, composed in order) mapping data to
            latent.
        shape: event shape of the data (``(D,)`` or ``(C, H, W)``).
        base: base distribution with ``log_prob(z)`` and ``sample(n, temperature)``;
            default standard normal over the latent shape.
        latent_shape: event shape of the latent (default: ``layers.output_shape(shape)``).
        levels: quantization levels of discrete data (256 for 8-bit images); ``None``
            for continuous data.
        n_classes: for a class-conditional model, the number of classes: ``context``
            is then a tensor of class indices ``[B]`` (required), which the layers and
            the base receive as one-hot vectors ``[B, n_classes]``.
        context_features: for a model conditioned on a continuous vector, its size
            ``k``: ``context`` is then a real tensor ``[B, k]`` (required), passed to the
            layers as it is.
    """

    def __init__(
        self,
        layers: FlowLayer | list[FlowLayer],
        shape: tuple[int, ...],
        base: nn.Module | None = None,
        latent_shape: tuple[int, ...] | None = None,
        levels: int | None = None,
        n_classes: int | None = None,
        context_features: int = 0,
    ) -> None:
        super().__init__()
        self.layers = layers if isinstance(layers, FlowLayer) else Sequential(layers)
        self.shape = tuple(shape)
        if latent_shape is None:
            latent_shape = self.layers.output_shape(self.shape)
        self.latent_shape = tuple(latent_shape)
        self.levels = levels
        if n_classes is not None and n_classes < 2:
            raise ValueError(f"a class-conditional model needs >= 2 classes, got {n_classes}")
        self.n_classes = n_classes
        if context_features < 0 or (context_features and n_classes is not None):
            raise ValueError(
                f"context_features must be >= 0 and excludes n_classes, got {context_features}"
            )
        self.context_features = context_features
        self.base = base if base is not None else StandardNormal(self.latent_shape)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's parameters (float32 unless moved)."""
        for t in itertools.chain(self.parameters(), self.buffers()):  # stops at the first
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def _check(self, x: Tensor, context: Tensor | None) -> Tensor:
        """``x`` checked (type, shape, values) and, for discrete data, cast to the model's
        dtype; clear errors instead of wrong numbers or deep tracebacks."""
        if not isinstance(x, Tensor):
            raise TypeError(
                f"expected a torch.Tensor, got {type(x).__module__}.{type(x).__name__} "
                "(convert with torch.as_tensor)"
            )
        if x.is_complex():
            raise TypeError(f"expected real data, got a {x.dtype} tensor")
        if x.dim() == 0 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"expected data of shape [B, {', '.join(map(str, self.shape))}], "
                f"got {list(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError("empty batch: expected at least one example")
        dtype = self.dtype
        if not x.is_floating_point():
            if self.levels is None:
                raise TypeError(f"expected floating-point data for this model, got {x.dtype}")
            x = x.to(dtype)
        elif x.dtype != dtype:
            raise TypeError(
                f"the data are {x.dtype} but the model is {dtype}: convert one of them "
                f"(x.to({dtype}) or model.to({x.dtype}))"
            )
        check_finite(x)
        if context is not None and context.shape[0] != x.shape[0]:
            raise ValueError(f"context has batch size {context.shape[0]}, the data {x.shape[0]}")
        return x

    def condition(self, context: Tensor | None, n: int) -> Tensor | None:
        """The context the layers see: for a class-conditional model, class indices
        ``[n]`` checked and turned into one-hot ``[n, n_classes]``; for a model with
        ``context_features`` a real ``[n, k]`` tensor, checked; else unchanged."""
        if self.context_features:
            return self._check_vector_context(context, n)
        if self.n_classes is None:
            return context
        k = self.n_classes
        if context is None:
            raise ValueError(
                f"this model is class-conditional ({k} classes): pass the labels "
                "(context = a tensor of class indices)"
            )
        if context.dim() != 1 or context.shape[0] != n:
            raise ValueError(f"expected {n} class labels of shape [{n}], got {list(context.shape)}")
        if context.is_floating_point() or context.is_complex():
            raise TypeError(f"class labels must be integers, got {context.dtype}")
        if len(context):

            def error() -> ValueError:
                bad = context[(context < 0) | (context >= k)][0]
                return ValueError(
                    f"class label {int(bad)} is out of range: this model has {k} classes"
                )

            require((context.min() < 0) | (context.max() >= k), error)
        onehot = torch.nn.functional.one_hot(context.long(), k)
        return onehot.to(device=context.device, dtype=self.dtype)

    def _check_vector_context(self, context: Tensor | None, n: int) -> Tensor:
        k = self.context_features
        if context is None:
            raise ValueError(f"this model is conditional: pass a context of shape [{n}, {k}]")
        if not isinstance(context, Tensor) or not context.is_floating_point():
            kind = context.dtype if isinstance(context, Tensor) else type(context).__name__
            raise TypeError(f"the context must be a real tensor [{n}, {k}], got {kind}")
        if tuple(context.shape) != (n, k):
            raise ValueError(f"expected a context of shape [{n}, {k}], got {list(context.shape)}")
        check_finite(context, "context")
        return context.to(self.dtype)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z, logdet)`` for data ``x``."""
        x = self._check(x, context)
        with shared_scope(self):
            return self.layers(x, self.condition(context, x.shape[0]))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Data ``x`` for latent ``z``."""
        with shared_scope(self):
            return self.layers.inverse(z, self.condition(context, z.shape[0]))

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x)`` (``log p(x | y)`` for a class-conditional model) per sample (an
        unbiased estimate for stochastic logdets, a lower-bound estimate for
        stochastic layers)."""
        z, logdet = self(x, context)
        return self.base.log_prob(z, self.condition(context, x.shape[0])) + logdet

    def bits_per_dim(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``-log p(x) / (D ln 2)`` per sample (for discrete data ``log p`` already
        holds the dequantizer's ``-D log(levels)``)."""
        return -self.log_prob(x, context) / (self.dim * math.log(2))

    def penalty(self) -> Tensor:
        """The sum of every sub-module's ``penalty()`` (regularizers a family adds to
        the training loss, e.g. RealNVP's L2 on weight-norm scales); 0 if none."""
        total = torch.zeros((), dtype=self.dtype)
        for m in implementers(self, Penalty):
            if m is not self:
                total = total + m.penalty()
        return total

    def _latent(self, n: int, temperature: float, context: Tensor | None = None) -> Tensor:
        if n < 1:
            raise ValueError(f"the number of samples must be >= 1, got {n}")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
        return self.base.sample(n, temperature, self.condition(context, n))

    def sample_latent(
        self, n: int, temperature: float = 1.0, context: Tensor | None = None
    ) -> Tensor:
        """``n`` latents from the base (for a class-conditional model, given labels)."""
        return self._latent(n, temperature, context)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        """``n`` samples ``f^{-1}(z)``, ``z ~ base`` scaled by ``temperature`` (for a
        class-conditional model ``context`` holds the ``n`` class labels)."""
        return self.inverse(self._latent(n, temperature, context), context)

    @torch.no_grad()
    def round_trip_error(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Per sample, ``max |f(f^{-1}(z)) - z|``: how exactly the inverse inverts.

        Leading stochastic layers (the dequantizer) are left out: they are no bijection,
        so the round trip is taken through the deterministic layers after them. When
        stochastic layers remain (noise augmentation inside the flow, which appends fresh
        noise in every forward pass), the round trip is taken the other way, ``max
        |f^{-1}(f(x)) - x|`` at ``x = f^{-1}(z)``, which holds exactly for them.
        """
        layers = list(self.layers.layers) if isinstance(self.layers, Sequential) else [self.layers]
        while layers and is_stochastic(layers[0]):
            layers = layers[1:]
        body = Sequential(layers)
        ctx = self.condition(context, z.shape[0])
        x = body.inverse(z, ctx)
        if body.stochastic:
            err = (body.inverse(body(x, ctx)[0], ctx) - x).abs()
        else:
            err = (body(x, ctx)[0] - z).abs()
        return err.flatten(1).max(1).values

    def round_trip_formula(self) -> str:
        """The round trip :meth:`round_trip_error` measures, as text."""
        layers = list(self.layers.layers) if isinstance(self.layers, Sequential) else [self.layers]
        while layers and is_stochastic(layers[0]):
            layers = layers[1:]
        return "|f^-1(f(x)) - x|" if Sequential(layers).stochastic else "|f(f^-1(z)) - z|"

    def rsample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        """Like :meth:`sample`, but differentiable in the parameters (reparameterized;
        residual blocks differentiate their fixed point implicitly)."""
        return self.inverse(self._latent(n, temperature, context), context)

    def sample_and_log_prob(
        self, n: int, temperature: float = 1.0, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(x, log p(x))`` for ``n`` samples in one inverse pass, differentiable in
        the parameters (for reverse-KL / variational inference). ``log p`` is that of
        the model at temperature 1: ``log p_base(z) - log|det dx/dz|``."""
        z = self._latent(n, temperature, context)
        ctx = self.condition(context, n)
        with shared_scope(self):
            x, logdet_inv = self.layers.inverse_and_logdet(z, ctx)
        return x, self.base.log_prob(z, ctx) - logdet_inv


def non_finite_weights(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters and floating-point buffers that hold NaN or
    infinite values (a diverged or damaged model)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [n for n, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with non-finite weights: it cannot give finite samples or
    densities. A ``FloatingPointError`` naming the first such tensor."""
    bad = non_finite_weights(model)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise FloatingPointError(
            f"the model has non-finite weights ({bad[0]}{more}): it cannot produce finite "
            "output; use another checkpoint (--which last) or retrain"
        )
