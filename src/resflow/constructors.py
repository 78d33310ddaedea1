"""Short constructors for the everyday vector flows: the number of features, the size of
a continuous context and a few sizes in, a ready :class:`~resflow.flow.Flow` out.

Each is a thin layer over a family's config (:func:`resflow.models.build_model`), with
the field names users of other flow libraries know; every other setting keeps the
family's default, and ``**options`` passes any config field through.

>>> import torch
>>> from resflow import nsf
>>> flow = nsf(features=2, context=3, transforms=3, hidden_features=(64, 64))
>>> x, c = torch.randn(8, 2), torch.randn(8, 3)
>>> flow.log_prob(x, c).shape
torch.Size([8])
>>> flow.sample(8, context=c).shape
torch.Size([8, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from resflow.flow import Flow
from resflow.models import build_model
from resflow.models.glow import GlowVectorConfig
from resflow.models.naf import MAFConfig, NAFConfig
from resflow.models.nsf import NSFConfig
from resflow.models.realnvp import RealNVPVectorConfig
from resflow.models.residual_flow import VectorFlowConfig


def maf(
    features: int,
    context: int = 0,
    transforms: int = 5,
    hidden_features: Sequence[int] = (64, 64),
    **options: Any,
) -> Flow:
    """Masked autoregressive flow (Papamakarios et al. 2017).

    >>> import torch
    >>> maf(4, transforms=2).log_prob(torch.randn(3, 4)).shape
    torch.Size([3])
    """
    return build_model(MAFConfig(dim=features, context_features=context, n_flows=transforms,
                                 hidden=tuple(hidden_features), **options))  # fmt: skip


def naf(
    features: int,
    context: int = 0,
    transforms: int = 3,
    hidden_features: Sequence[int] = (64, 64),
    **options: Any,
) -> Flow:
    """Neural autoregressive flow with deep dense sigmoidal flows (Huang et al. 2018).

    >>> import torch
    >>> naf(2, context=1, transforms=2).log_prob(torch.randn(3, 2), torch.randn(3, 1)).shape
    torch.Size([3])
    """
    return build_model(NAFConfig(dim=features, context_features=context, n_flows=transforms,
                                 hidden=tuple(hidden_features), **options))  # fmt: skip


def nsf(
    features: int,
    context: int = 0,
    transforms: int = 5,
    hidden_features: Sequence[int] = (64, 64),
    bins: int = 8,
    bound: float = 5.0,
    autoregressive: bool = False,
    **options: Any,
) -> Flow:
    """Neural spline flow (Durkan et al. 2019): rational-quadratic spline couplings (or,
    with ``autoregressive``, spline MADEs) on ``[-bound, bound]``. ``hidden_features``
    gives the width (its first entry) and the depth (one residual block per further
    entry, at least one) of the conditioners.

    >>> nsf(3, autoregressive=True, transforms=2).sample(4).shape
    torch.Size([4, 3])
    """
    widths = tuple(hidden_features)
    return build_model(
        NSFConfig(
            dim=features,
            context_features=context,
            transform="autoregressive" if autoregressive else "coupling",
            n_flows=transforms,
            hidden=widths[0],
            blocks=max(1, len(widths) - 1),
            bins=bins,
            bound=bound,
            **options,
        )
    )


def realnvp(
    features: int,
    context: int = 0,
    transforms: int = 8,
    hidden_features: Sequence[int] = (64, 64),
    **options: Any,
) -> Flow:
    """RealNVP's affine couplings (Dinh et al. 2017).

    >>> import torch
    >>> realnvp(2, transforms=4).log_prob(torch.randn(5, 2)).shape
    torch.Size([5])
    """
    return build_model(RealNVPVectorConfig(dim=features, context_features=context,
                                           n_couplings=transforms, hidden=tuple(hidden_features),
                                           **options))  # fmt: skip


def glow(
    features: int,
    context: int = 0,
    transforms: int = 8,
    hidden_features: Sequence[int] = (64, 64),
    **options: Any,
) -> Flow:
    """Glow's steps on vectors (ActNorm, invertible linear map, affine coupling; Kingma &
    Dhariwal 2018).

    >>> glow(3, transforms=2).sample(2).shape
    torch.Size([2, 3])
    """
    return build_model(GlowVectorConfig(dim=features, context_features=context,
                                        depth=transforms, hidden=tuple(hidden_features),
                                        **options))  # fmt: skip


def residual_flow(
    features: int,
    transforms: int = 10,
    hidden_features: Sequence[int] = (64, 64),
    **options: Any,
) -> Flow:
    """Residual Flow (Chen et al. 2019): ``x + g(x)`` blocks with ``Lip(g) < 1``, exact
    log-determinant up to 16 features and the unbiased series above.

    >>> import torch
    >>> residual_flow(2, transforms=2).log_prob(torch.randn(3, 2)).shape
    torch.Size([3])
    """
    return build_model(VectorFlowConfig(dim=features, n_blocks=transforms,
                                        hidden=tuple(hidden_features), **options))  # fmt: skip
