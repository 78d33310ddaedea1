"""Autoregressive layers: ``y_d = T(x_d; theta_d(x_<d, context))`` (MAF, IAF, NAF).

The conditioner (e.g. :class:`~resflow.nets.made.MADE`) computes the parameters of
all dimensions in one pass, the parameters of dimension ``d`` depending only on the
dimensions before ``d`` in its order. The Jacobian is then triangular in that order:
``log|det dy/dx| = sum_d log T'(x_d)``, and the data -> latent direction (density
evaluation) costs one pass. The inverse (sampling) goes dimension by dimension:
``D`` passes, each recomputing the parameters from the ``x`` found so far.

References:
    Papamakarios, Pavlakou & Murray (2017), Masked autoregressive flow for density
    estimation.
    Germain, Gregor, Murray & Larochelle (2015), MADE: masked autoencoder for
    distribution estimation.
    Huang, Krueger, Lacoste & Courville (2018), Neural autoregressive flows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from resflow.layers.base import FlowLayer
from resflow.layers.transformers import Transformer


class Autoregressive(FlowLayer):
    """``y_d = T(x_d; conditioner(x, context)[:, :, d])`` on vectors ``[B, D]``.

    Arguments:
        conditioner: an autoregressive module called as ``conditioner(x)`` (no
            context) or ``conditioner(x, context)``, returning ``[B, n_params * D]``
            (reshaped to ``[B, n_params, D]``) or ``[B, n_params, D]``; output ``d``
            must depend only on the inputs before ``d`` in the order.
        transformer: the elementwise map (``Affine()`` gives MAF).
        order: the autoregressive order, ``order[k]`` = the input dimension that comes
            ``k``-th; by default ``conditioner.order`` (MADE exposes it), else natural.

    Example:
        >>> from resflow.layers.transformers import Affine
        >>> from resflow.nets.made import MADE
        >>> layer = Autoregressive(MADE(3, (16,), n_params=2, order="reversed"), Affine())
        >>> x = torch.randn(5, 3)
        >>> y, logdet = layer(x)
        >>> torch.allclose(layer.inverse(y), x, atol=1e-6)
        True
    """

    def __init__(
        self,
        conditioner: nn.Module,
        transformer: Transformer,
        order: Sequence[int] | Tensor | None = None,
    ) -> None:
        super().__init__()
        self.conditioner = conditioner
        self.transformer = transformer
        self._order = None if order is None else torch.as_tensor(order, dtype=torch.long)

    @property
    def order(self) -> Tensor | None:
        """The order used by :meth:`inverse` (``None``: natural)."""
        if self._order is not None:
            return self._order
        return getattr(self.conditioner, "order", None)

    def _params(self, x: Tensor, context: Tensor | None) -> Tensor:
        out = self.conditioner(x) if context is None else self.conditioner(x, context)
        n, d = self.transformer.n_params, x.shape[1]
        if out.dim() == 2 and out.shape == (x.shape[0], n * d):
            return out.unflatten(1, (n, d))
        if out.shape == (x.shape[0], n, d):
            return out
        raise ValueError(
            f"the conditioner returned shape {tuple(out.shape)}, expected "
            f"[B, n_params * D] = {(x.shape[0], n * d)} or [B, n_params, D] = "
            f"{(x.shape[0], n, d)}"
        )

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2:
            raise ValueError(f"Autoregressive expects vectors [B, D], got {tuple(x.shape)}")
        order = self.order
        if order is not None and len(order) != x.shape[1]:
            raise ValueError(f"the order has {len(order)} dimensions, the input {x.shape[1]}")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        y, logdet = self.transformer(x, self._params(x, context))
        return y, logdet.sum(1)

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Invert dimension by dimension in the conditioner's order.

        At step ``k`` the dimensions ``order[:k]`` of ``x`` are final (the others are
        zero), so the parameters of ``d = order[k]``, which depend on those only, are
        final too: ``x_d = T^{-1}(y_d; theta_d)`` and its ``log|dx_d/dy_d|`` are exact.
        """
        self._check(y)
        dims = y.shape[1]
        order = self.order
        steps = range(dims) if order is None else order.tolist()
        x = torch.zeros_like(y)
        logdet = y.new_zeros(y.shape[0])
        position = torch.arange(dims, device=y.device)
        for d in steps:
            params = self._params(x, context)[:, :, d : d + 1]
            x_d, logdet_d = self.transformer.inverse(y[:, d : d + 1], params)
            x = torch.where(position == d, x_d, x)
            logdet = logdet + logdet_d[:, 0]
        return x, logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_logdet(y, context)[0]
