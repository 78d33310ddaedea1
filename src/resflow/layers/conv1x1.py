"""Invertible 1x1 convolution (Glow, Kingma & Dhariwal 2018, §3.2).

A learned ``C x C`` matrix ``W`` mixes the channels at every pixel: ``y = W x`` per
position, ``log|det| = H * W * log|det W|``. On vectors ``[B, C]`` it is an invertible
linear map (``H * W = 1``). ``W`` starts as a random rotation (QR of a Gaussian
matrix, drawn from torch's global generator, so the model seed fixes it).

With ``lu=True`` (Glow's LU-decomposed form) ``W = P L (U + diag(sign * exp(log_s)))``
with ``P`` a fixed permutation, ``L`` unit lower triangular and ``U`` strictly upper
triangular: ``log|det W| = sum(log_s)`` costs ``O(C)`` instead of ``O(C^3)``, and ``W``
can never become singular. Without it, ``log|det W|`` comes from ``slogdet``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.base import FlowLayer


class InvertibleConv1x1(FlowLayer):
    """``y = W x`` over the channels (see the module docstring).

    Arguments:
        num_channels: ``C``.
        lu: LU parameterization (Glow's faster variant).
        init: ``"rotation"`` (Glow: a random rotation) or ``"permutation"`` (a random
            permutation, ``L U = I``: neural spline flows' linear layers).
    """

    perm: Tensor
    sign_s: Tensor
    lower_mask: Tensor

    def __init__(self, num_channels: int, lu: bool = True, init: str = "rotation") -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        if init not in ("rotation", "permutation"):
            raise ValueError(f"unknown init {init!r}; choose 'rotation' or 'permutation'")
        self.num_channels = c = num_channels
        self.lu = lu
        if init == "permutation":  # P fixed at random, L U = I (neural spline flows)
            w0 = torch.eye(c, dtype=torch.float64)[torch.randperm(c)].T
        else:
            w0, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
        if not lu:
            self.weight = nn.Parameter(w0.float())
            return
        p, lower, upper = torch.linalg.lu(w0)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(c, c), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(s.abs()).float())

    def extra_repr(self) -> str:
        return f"{self.num_channels}, lu={self.lu}"

    def matrix(self) -> Tensor:
        """The ``C x C`` matrix ``W``."""
        if not self.lu:
            return self.weight
        eye = torch.eye(self.num_channels, dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ lower @ upper

    def log_abs_det(self) -> Tensor:
        """``log|det W|``."""
        if self.lu:
            return self.log_s.sum()
        return torch.linalg.slogdet(self.weight)[1]

    def inverse_matrix(self) -> Tensor:
        """``W^{-1}`` (triangular solves in the LU form); a clear error if singular."""
        if self.lu:
            eye = torch.eye(self.num_channels, dtype=self.log_s.dtype, device=self.log_s.device)
            lower = self.lower * self.lower_mask + eye
            upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
            # W^-1 = U^-1 L^-1 P^T
            l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
            u_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
            return u_inv @ l_inv @ self.perm.T
        inv, info = torch.linalg.inv_ex(self.weight)
        if int(info) != 0 or not torch.isfinite(inv).all():
            raise FloatingPointError("the 1x1 convolution's matrix is singular: no inverse")
        return inv

    def _check(self, x: Tensor) -> None:
        if x.dim() not in (2, 4) or x.shape[1] != self.num_channels:
            c = self.num_channels
            raise ValueError(
                f"InvertibleConv1x1({c}) expects [B, {c}] or [B, {c}, H, W], got {tuple(x.shape)}"
            )

    @staticmethod
    def _mix(w: Tensor, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return x @ w.T
        return F.conv2d(x, w[:, :, None, None])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        logdet = self.log_abs_det() * x[0, 0].numel()
        return self._mix(self.matrix(), x), logdet.expand(x.shape[0])

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(y)
        logdet = -self.log_abs_det() * y[0, 0].numel()
        return self._mix(self.inverse_matrix(), y), logdet.expand(y.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_logdet(y, context)[0]
