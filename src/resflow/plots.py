"""Figures: learning curves and 2-D densities beside their data (PNG, matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from resflow.flow import Flow  # noqa: E402
from resflow.io import atomic_write  # noqa: E402


def _save(fig: Any, axes: Any, path: str | Path) -> None:
    """Bare, square ``axes``; write ``fig`` to ``path`` atomically as PNG and close it."""
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)


def plot_learning_curve(history: list[dict[str, float]], path: str | Path, unit: str) -> None:
    """Training loss (the estimator's value) and the test metric against step."""
    if not history:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [h["step"] for h in history],
        [h["loss"] for h in history],
        lw=0.8,
        alpha=0.6,
        label=f"train {unit} (estimate)",
    )
    test = [h for h in history if "test" in h]
    if test:
        ax.errorbar(
            [h["step"] for h in test],
            [h["test"] for h in test],
            yerr=[h["test_stderr"] for h in test],
            marker="o",
            label=f"test {unit} (EMA)",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)


@torch.no_grad()
def plot_density_2d(
    model: Flow,
    data: Tensor,
    path: str | Path,
    lim: float = 4.5,
    n_grid: int = 150,
    title: str = "",
) -> None:
    """Data histogram beside the model density ``exp(log p)`` on a grid."""
    if model.shape != (2,):
        raise ValueError(f"plot_density_2d needs a 2-D model, got shape {model.shape}")
    model.eval()
    ax1d = torch.linspace(-lim, lim, n_grid)
    xx, yy = torch.meshgrid(ax1d, ax1d, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    logp = torch.cat([model.log_prob(c) for c in pts.split(4096)])
    dens = logp.exp().view(n_grid, n_grid)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    d = data[:20000].cpu()
    axes[0].hist2d(
        d[:, 0].numpy(),
        d[:, 1].numpy(),
        bins=n_grid,
        range=[[-lim, lim], [-lim, lim]],
        cmap="viridis",
    )
    axes[0].set_title("data")
    axes[1].imshow(dens.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    axes[1].set_title(title or "model density")
    _save(fig, axes, path)


def plot_samples_2d(
    samples: Tensor, data: Tensor, path: str | Path, lim: float = 4.5, bins: int = 150
) -> None:
    """2-D histograms of the data beside the model's samples."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, pts, title in ((axes[0], data, "data"), (axes[1], samples, "samples")):
        p = pts[:20000].detach().float().cpu()
        ax.hist2d(p[:, 0].numpy(), p[:, 1].numpy(), bins=bins,
                  range=[[-lim, lim], [-lim, lim]], cmap="viridis")  # fmt: skip
        ax.set_title(f"{title} (n={len(p)})")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)


@torch.no_grad()
def plot_target_fit(
    target: Any, samples: Tensor, path: str | Path, n_grid: int = 200, title: str = ""
) -> None:
    """A 2-D target density ``exp(log p~)`` beside a 2-D histogram of fitted samples
    (``target``: a :class:`resflow.vi.targets.Target`)."""
    lim = float(target.lim)
    g = torch.linspace(-lim, lim, n_grid, dtype=torch.float64)
    xy = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    density = target(xy).exp().reshape(n_grid, n_grid).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(density, origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    axes[0].set_title(f"target: {target.name}")
    p = samples.detach().float().cpu().numpy()
    axes[1].hist2d(p[:, 0], p[:, 1], bins=150, range=[[-lim, lim], [-lim, lim]], cmap="viridis")
    axes[1].set_title(title or f"samples (n={len(p)})")
    _save(fig, axes, path)
