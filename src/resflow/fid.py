"""Sample quality: the Fréchet Inception Distance (Heusel et al. 2017).

``FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` between Gaussians fitted to
Inception-v3 pool features (2048-D) of real and generated images; the paper reports
46.37 for its CIFAR-10 Residual Flow.

The distance itself (:func:`frechet_distance`) is plain torch and always available.
The Inception features come from ``pytorch-fid`` (the reference port of the TensorFlow
FID network) -- an optional extra, ``pip install 'resflow[fid]'``, that needs
torchvision (which does not import with every CPU build of torch; a GPU machine has
it) and downloads its weights once (about 100 MB) into torch's hub cache. Where the
extra or the weights are missing, :func:`inception_features` raises
:class:`FIDUnavailableError` with a message saying which and what to do.
"""

from __future__ import annotations

import torch
from torch import Tensor

FID_EXTRA = "pip install 'resflow[fid]' (pytorch-fid and torchvision)"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class FIDUnavailableError(ImportError):
    """The optional FID extra or its Inception weights are missing (the message says how
    to get them)."""


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean [F], covariance [F, F])`` of ``features [N, F]`` in float64 (unbiased)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features [N >= 2, F], got {list(features.shape)}")
    f = features.double()
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def _sqrt_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, sigma1)`` and
    ``N(mu2, sigma2)``: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^(1/2) S2 S1^(1/2))^(1/2))``.

    ``tr((S1 S2)^(1/2))`` is computed as the trace of the square root of the symmetric
    ``S1^(1/2) S2 S1^(1/2)`` (same eigenvalues), in float64, so it stays real and stable
    for singular covariances (fewer samples than features)."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (*mu1.shape, *mu1.shape):
        raise ValueError(
            f"mismatched statistics: means {list(mu1.shape)}, {list(mu2.shape)}; "
            f"covariances {list(s1.shape)}, {list(s2.shape)}"
        )
    r1 = _sqrt_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    value = float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)
    return max(value, 0.0)


def fid_from_features(a: Tensor, b: Tensor) -> float:
    """FID between two sets of features ``[N, F]`` and ``[M, F]``."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def inception_network(device: str | torch.device | None = None) -> torch.nn.Module:
    """pytorch-fid's Inception-v3 (pool features), in eval mode on ``device`` (default:
    cuda if available); :class:`FIDUnavailableError` where the extra or weights are missing."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        from pytorch_fid.inception import InceptionV3
    except Exception as e:  # ImportError, or torchvision failing to import
        raise FIDUnavailableError(
            f"FID needs the optional extra: {FID_EXTRA}; it could not be imported here "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e})"
        ) from e
    try:
        net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    except Exception as e:  # no network: URLError, OSError, RuntimeError from torch.hub
        hub = torch.hub.get_dir()
        raise FIDUnavailableError(
            f"cannot get the Inception weights for FID ({type(e).__name__}: {e}); connect "
            f"to the internet once, or copy {WEIGHTS_FILE} into {hub}/checkpoints"
        ) from e
    return net.eval().to(device)


@torch.no_grad()
def inception_features(
    images: Tensor,
    levels: int = 256,
    batch_size: int = 100,
    device: str | None = None,
    net: torch.nn.Module | None = None,
) -> Tensor:
    """Inception-v3 pool features ``[N, 2048]`` of integer images ``[N, C, H, W]`` in
    ``0..levels-1`` (grayscale repeated to RGB; resized to 299x299 by the network);
    ``net``: an :func:`inception_network` (default: a new one on ``device``)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {list(images.shape)}")
    net = net if net is not None else inception_network(device)
    dev = next(net.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(dev).float() / (levels - 1)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        out.append(net(x.clamp(0, 1))[0].flatten(1).double().cpu())
    return torch.cat(out)


def fid(
    samples: Tensor,
    reference: Tensor,
    levels: int = 256,
    batch_size: int = 100,
    device: str | None = None,
    net: torch.nn.Module | None = None,
) -> float:
    """FID between generated ``samples`` and ``reference`` images (integer ``[N, C, H, W]``
    in ``0..levels-1``). The paper's protocol uses 50,000 samples against the training
    set; fewer samples bias FID upwards."""
    net = net if net is not None else inception_network(device)
    fa = inception_features(samples, levels, batch_size, net=net)
    fb = inception_features(reference, levels, batch_size, net=net)
    return fid_from_features(fa, fb)


__all__ = [
    "FIDUnavailableError",
    "feature_statistics",
    "fid",
    "fid_from_features",
    "frechet_distance",
    "inception_features",
    "inception_network",
]
