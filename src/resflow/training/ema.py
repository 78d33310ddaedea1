"""Exponential moving average (Polyak averaging) of model parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    """``shadow <- d * shadow + (1 - d) * param`` after each step.

    ``d = min(decay, (1 + t) / (10 + t))`` at update ``t``: the paper's 0.999 once
    ``t`` is in the thousands, but short runs are not stuck near the initial weights.
    Only trainable parameters are averaged; buffers (norm estimates, ActNorm flags)
    are the live model's. Use :meth:`swapped` to evaluate or sample with the average.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.n_updates = 0
        self.shadow: dict[str, Tensor] = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = [(p, self.shadow[n]) for n, p in model.named_parameters() if n in self.shadow]
        params, shadows = [p for p, _ in pairs], [s for _, s in pairs]
        d = min(self.decay, (1.0 + self.n_updates) / (10.0 + self.n_updates))
        torch._foreach_lerp_(shadows, params, 1.0 - d)
        self.n_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n])

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model``."""
        live = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in live:
                        p.copy_(live[n])

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "n_updates": self.n_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        missing = set(self.shadow) - set(shadow)
        if missing:
            raise ValueError(
                f"EMA state lacks {len(missing)} parameter(s), e.g. {sorted(missing)[:3]}"
            )
        for n in self.shadow:
            self.shadow[n].copy_(shadow[n])
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.n_updates = int(state["n_updates"])  # type: ignore[call-overload]
