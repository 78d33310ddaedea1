"""A certificate for a trained model: is it the invertible density it claims to be?

For every residual block ``x + g(x)``:

* the Lipschitz bound actually enforced: a certified upper bound on the operator norm
  of each constrained weight *as used in the forward pass* (``W / max(1, sigma / c)``)
  from :mod:`resflow.layers.residual.spectral_bounds` -- exact for a dense weight (its
  largest singular value), for a convolution whose operator on its input shape is
  small enough (its Gram matrix), and for mixed norms with a closed form; a safe
  bound otherwise (circular convolution, Riesz--Thorin interpolation), marked so. The
  block's bound is their product (the activations are 1-Lipschitz) and must be
  ``< 1``. The model is certified first (:func:`refresh_lipschitz`), as at every use;
* the worst inverse error ``|f^-1(f(x)) - x|`` on test data, block by block;

and, for data of at most :data:`EXACT_DIMS` dimensions, the gap between the model's
estimated log-density and the exact one (full Jacobians). Used by ``resflow check``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from resflow.flow import Flow, non_finite_weights
from resflow.layers.residual.block import InverseNotConvergedError, ResidualBlock
from resflow.layers.residual.lipschitz_layers import LipschitzConv2d
from resflow.layers.residual.logdet import EXACT_ESTIMATOR
from resflow.layers.residual.mixed_norms import is_exact_pair
from resflow.layers.residual.model_estimators import evaluation_estimators
from resflow.layers.residual.norms import NormOrder
from resflow.layers.residual.spectral import LipschitzLayer, refresh_lipschitz
from resflow.layers.residual.spectral_bounds import conv_spectral_norm

EXACT_DIMS = 16
"""Data dimension up to which the exact log-density is computed."""
INVERSE_TOL = 1e-4
"""Largest acceptable inverse error relative to ``1 + |x|``."""


@dataclass
class LayerNorm:
    """A certified bound ``norm`` on one constrained weight, against its ``coeff``."""

    name: str
    coeff: float
    norm: float
    method: str


@dataclass
class BlockReport:
    """One residual block: ``bound`` (product of its layers' bounds) on ``Lip(g)``."""

    name: str
    bound: float
    inverse_error: float
    layers: list[LayerNorm] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.bound < 1.0 and self.inverse_error <= INVERSE_TOL


@dataclass
class Certificate:
    """What :func:`certify` found; :attr:`passed` is ``True`` when every check holds."""

    blocks: list[BlockReport]
    n_examples: int
    density_gap: tuple[float, float, float] | None = None  # mean, stderr, max |gap|
    density_note: str = ""
    round_trip: float | None = None  # worst |f(f^-1(z)) - z| of the whole model
    round_trip_formula: str = "|f(f^-1(z)) - z|"  # or |f^-1(f(x)) - x| (noise augmentation)
    non_finite: list[str] = field(default_factory=list)  # weights holding NaN or inf

    @property
    def round_trip_ok(self) -> bool:
        """Reported for every family; a failure only when the inverse broke down
        (non-finite or not converged): float32 logits alone reach 1e-3 near 0 and 1."""
        return self.round_trip is None or math.isfinite(self.round_trip)

    @property
    def density_ok(self) -> bool:
        if self.density_gap is None:
            return True
        mean, se, _ = self.density_gap
        return abs(mean) <= 3 * se + 1e-3

    @property
    def passed(self) -> bool:
        if self.non_finite:
            return False
        return all(b.ok for b in self.blocks) and self.density_ok and self.round_trip_ok

    def lines(self) -> list[str]:
        if self.non_finite:
            out = [f"FAIL weights: {len(self.non_finite)} tensor(s) hold NaN or inf values, "
                   "so no check can run"]  # fmt: skip
            out += [f"       {name}" for name in self.non_finite[:10]]
            if len(self.non_finite) > 10:
                out.append(f"       ... and {len(self.non_finite) - 10} more")
            return [*out, "certificate: FAILED"]
        out = [f"{len(self.blocks)} residual block(s), inverse checked on {self.n_examples} "
               "test example(s)"]  # fmt: skip
        for b in self.blocks:
            mark = "ok  " if b.ok else "FAIL"
            out.append(
                f"{mark} {b.name}: Lip(g) <= {b.bound:.6f}, inverse error {b.inverse_error:.2e}"
            )
            for layer in b.layers:
                out.append(
                    f"       {layer.name}: ||W|| <= {layer.norm:.6f} (coeff {layer.coeff}, "
                    f"{layer.method})"
                )
        if self.round_trip is not None:
            mark = "ok  " if self.round_trip_ok else "FAIL"
            out.append(
                f"{mark} whole model: worst round trip {self.round_trip_formula} = "
                f"{self.round_trip:.2e} on the latents of {self.n_examples} example(s)"
            )
        if self.density_gap is None:
            out.append(f"log-density: {self.density_note}")
        else:
            mean, se, worst = self.density_gap
            mark = "ok  " if self.density_ok else "FAIL"
            out.append(
                f"{mark} log-density estimate - exact: {mean:+.2e} +- {se:.1e} nats "
                f"(worst {worst:.2e})"
            )
        out.append("certificate: PASSED" if self.passed else "certificate: FAILED")
        return out


@torch.no_grad()
def enforced_norm(m: LipschitzLayer) -> tuple[float, str]:
    """``(bound, method)``: a certified upper bound on ``||W_constrained||_{p->q}`` for
    the weight the forward pass uses, and how it was obtained."""
    w = m.constrained_weight().detach()
    if m.v.numel() == 0:
        return float("nan"), "never used: input shape unknown"
    p, q = m._float_orders()
    learned = isinstance(m.domain, NormOrder) or isinstance(m.codomain, NormOrder)
    at = f" at learned p={p:.4g}, q={q:.4g}" if learned else ""
    if (p, q) == (2.0, 2.0) and isinstance(m, LipschitzConv2d):
        size = (int(m.v.shape[2]), int(m.v.shape[3]))
        bound = conv_spectral_norm(w, size, (int(m.padding[0]), int(m.padding[1])))
        return float(bound.value), bound.method + at
    value = m.certified_norm(w)
    assert value is not None
    if (p, q) == (2.0, 2.0):
        return float(value), "exact (SVD)" + at
    if is_exact_pair(p, q):
        return float(value), "exact (closed form)" + at
    return float(value), "bound (no closed form: interpolation / inclusion)" + at


def _block_inputs(
    model: Flow, x: Tensor, labels: Tensor | None
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Each residual block's input and context in one pass of ``model`` on ``x``."""
    inputs: dict[str, tuple[Tensor, Tensor | None]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, ResidualBlock):

            def hook(mod: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                context = args[1] if len(args) > 1 else kwargs.get("context")
                inputs[name] = (args[0].detach(), None if context is None else context.detach())

            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(x, labels)
    finally:
        for h in handles:
            h.remove()
    return inputs


def certify(
    model: Flow, data: Tensor, n_examples: int = 256, labels: Tensor | None = None
) -> Certificate:
    """Certify the Lipschitz layers of ``model`` (eval mode) and check it on up to
    ``n_examples`` of ``data`` (with their ``labels`` for a class-conditional model, or
    their contexts ``[N, k]`` for a model with ``context_features``)."""
    model.eval()
    bad = non_finite_weights(model)
    if bad:  # a diverged or damaged model: a failed certificate, whatever its family
        return Certificate([], 0, non_finite=bad)
    refresh_lipschitz(model)
    x = data[:n_examples]
    conditional = model.n_classes is not None or model.context_features
    y = None if labels is None or not conditional else labels[:n_examples]
    torch.manual_seed(0)
    inputs = _block_inputs(model, x, y)
    reports = []
    for name, m in model.named_modules():
        if not isinstance(m, ResidualBlock):
            continue
        norms = []
        for lname, layer in m.g.named_modules():
            if isinstance(layer, LipschitzLayer):
                value, method = enforced_norm(layer)
                norms.append(LayerNorm(f"g.{lname}", layer.coeff, value, method))
        bound = math.prod(n.norm for n in norms) if norms else 0.0
        recorded = inputs.get(name)
        error = float("nan")
        if recorded is not None:
            xin, cin = recorded
            try:
                with torch.no_grad():
                    out, _ = m(xin, cin)
                    back = m.inverse(out, cin)
                error = float(((back - xin).abs() / (1 + xin.abs())).max())
            except InverseNotConvergedError:
                error = math.inf
        reports.append(BlockReport(name, bound, error, norms))
    cert = Certificate(reports, len(x))
    torch.manual_seed(2)
    with torch.no_grad():
        z, _ = model(x, y)
        try:
            cert.round_trip = float(model.round_trip_error(z, y).max())
            cert.round_trip_formula = model.round_trip_formula()
        except InverseNotConvergedError:
            cert.round_trip = math.inf
    if model.dim > EXACT_DIMS:
        cert.density_note = f"exact check skipped (D = {model.dim} > {EXACT_DIMS})"
        return cert
    torch.manual_seed(1)
    with torch.no_grad():
        estimated = model.log_prob(x, y).double()
    torch.manual_seed(1)
    with evaluation_estimators(model, lambda b: EXACT_ESTIMATOR), torch.no_grad():
        exact = model.log_prob(x, y).double()
    gap = estimated - exact
    se = float(gap.std() / math.sqrt(len(gap))) if len(gap) > 1 else 0.0
    cert.density_gap = (float(gap.mean()), se, float(gap.abs().max()))
    return cert
