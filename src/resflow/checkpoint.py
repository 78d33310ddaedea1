"""Atomic checkpoints of plain data (loadable with ``torch.load(weights_only=True)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from resflow.io import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a resflow checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`resflow.io.atomic_write`): a crash
    never leaves a half-written checkpoint."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt or truncated ({e})"
        ) from e
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path} is not a resflow checkpoint (no model / model_config)")
    return state
