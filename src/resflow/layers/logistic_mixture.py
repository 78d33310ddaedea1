"""Flow++'s elementwise transformer: the CDF of a mixture of logistics, on the logit
scale, followed by an affine map (Ho et al. 2019, §3.2):

    y = logit( F(x) ) * exp(a) + b,      F(x) = sum_k pi_k sigmoid((x - mu_k) / s_k),

with ``pi`` on the simplex (a softmax of logits) and ``s_k > 0``. ``F`` is a
strictly increasing map onto ``(0, 1)``, so ``y`` is a strictly increasing map of the
real line onto itself (its tails are those of the widest component, slope
``exp(a) / s_max``). Everything is evaluated in log space, so neither ``y`` nor the
log-derivative saturates in float32 where ``F`` rounds to 0 or 1:

* ``log F = logsumexp_k(log pi_k + logsigmoid(z_k))`` and, because
  ``1 - sigmoid(z) = sigmoid(-z)``, ``log(1 - F) = logsumexp_k(log pi_k +
  logsigmoid(-z_k))`` with ``z_k = (x - mu_k) / s_k``; ``logit F`` is their difference;
* ``log F'(x) = logsumexp_k(log pi_k - log s_k + logsigmoid(z_k) + logsigmoid(-z_k))``
  and ``log dy/dx = log F' - log F - log(1 - F) + a``.

The inverse is the shared vectorized bisection of
:class:`~resflow.layers.transformers.MonotoneTransformer` (with its implicit-function
gradient), started from a bracket that always holds the root: ``F`` is a convex
combination of the component CDFs, so the root of ``logit F(x) = w`` lies between the
smallest and the largest component quantile ``mu_k + s_k w``.

References:
    Ho, Chen, Srinivas, Duan & Abbeel (2019), Flow++: improving flow-based generative
    models with variational dequantization and architecture design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from resflow.layers.transformers import MonotoneTransformer


class LogisticMixtureCDF(MonotoneTransformer):
    """``y = logit(MixLogCDF(x; pi, mu, s)) * exp(a) + b`` (see the module docstring).

    ``params`` along dim 1: ``a``, ``b``, then ``components`` logits of ``pi``,
    ``components`` means ``mu`` and ``components`` log-scales ``log s``
    (:attr:`n_params` ``= 2 + 3 * components``). At zero parameters (a zero-initialised
    conditioner) every component is the standard logistic, so ``F = sigmoid`` and the
    map is the identity.

    Arguments:
        components: number of logistic components (Flow++: 32 on CIFAR-10).
        min_log_scale: floor of ``log s`` (Flow++: -7), which keeps the components
            from collapsing to steps.
        tanh_scale: ``a = tanh(a_raw)`` (Flow++'s code), so the affine scale stays in
            ``(1/e, e)``; ``False`` uses ``a_raw`` as it is.

    Example:
        >>> T = LogisticMixtureCDF(components=4)
        >>> x = torch.linspace(-30, 30, 7)[None]
        >>> params = torch.zeros(1, T.n_params, 7)
        >>> y, logdet = T(x, params)  # the identity at zero parameters
        >>> bool(torch.allclose(y, x, atol=1e-5)), float(logdet.abs().max()) < 1e-5
        (True, True)
        >>> x_back, _ = T.inverse(y, params)
        >>> bool(torch.allclose(x_back, x, atol=1e-5))
        True
    """

    def __init__(
        self, components: int = 32, min_log_scale: float = -7.0, tanh_scale: bool = True
    ) -> None:
        super().__init__()
        if components < 1:
            raise ValueError(f"need at least one component, got {components}")
        self.components = components
        self.min_log_scale = min_log_scale
        self.tanh_scale = tanh_scale
        self.n_params = 2 + 3 * components

    def extra_repr(self) -> str:
        return f"components={self.components}, min_log_scale={self.min_log_scale}"

    def _unpack(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(a, b, log pi, mu, log s)``; the last three ``[B, K, ...]``."""
        k = self.components
        a = params[:, 0]
        a = torch.tanh(a) if self.tanh_scale else a
        log_pi = F.log_softmax(params[:, 2 : 2 + k], dim=1)
        mu = params[:, 2 + k : 2 + 2 * k]
        log_s = params[:, 2 + 2 * k : 2 + 3 * k].clamp(min=self.min_log_scale)
        return a, params[:, 1], log_pi, mu, log_s

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        self.check_params(x, params)
        a, b, log_pi, mu, log_s = self._unpack(params)
        z = (x.unsqueeze(1) - mu) * torch.exp(-log_s)
        log_sig, log_sig_neg = F.logsigmoid(z), F.logsigmoid(-z)
        log_cdf = torch.logsumexp(log_pi + log_sig, dim=1)
        log_sf = torch.logsumexp(log_pi + log_sig_neg, dim=1)  # log(1 - F)
        log_pdf = torch.logsumexp(log_pi - log_s + log_sig + log_sig_neg, dim=1)
        y = (log_cdf - log_sf) * torch.exp(a) + b
        return y, log_pdf - log_cdf - log_sf + a

    def bracket(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """Between the smallest and the largest component quantile of the target (see
        the module docstring), widened a little against rounding."""
        a, b, _, mu, log_s = self._unpack(params)
        w = ((y - b) * torch.exp(-a)).unsqueeze(1)
        quantiles = mu + torch.exp(log_s) * w
        lo, hi = quantiles.min(1).values, quantiles.max(1).values
        margin = 1e-3 * (1.0 + torch.maximum(lo.abs(), hi.abs()))
        return lo - margin, hi + margin
