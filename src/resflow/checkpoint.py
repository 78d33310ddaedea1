"""Atomic checkpoints of plain data (loadable with ``torch.load(weights_only=True)``).

A checkpoint records the version of its layout (``format``) and a SHA-256 checksum of
its weights (``checksum``: the model's state and the EMA's shadow weights), so that a
damaged or edited file is refused when it is loaded, and a file written by a newer
resflow is refused in one line. Checkpoints without a checksum (resflow 0.1) load as
before.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from resflow.io import atomic_write

FORMAT = 2
"""The newest checkpoint layout this version reads and writes (1: resflow 0.1)."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a resflow checkpoint."""


def weights_checksum(state: dict[str, Any]) -> str:
    """SHA-256 of the weights of a checkpoint: every tensor of ``state["model"]`` and of
    the EMA's shadow weights, with its name, dtype and shape, in name order."""
    h = hashlib.sha256()
    parts = [("model", state.get("model") or {})]
    ema = state.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("shadow"), dict):
        parts.append(("ema", ema["shadow"]))
    for part, tensors in parts:
        for name in sorted(tensors):
            t = tensors[name]
            if not isinstance(t, torch.Tensor):
                h.update(f"{part}.{name}={t!r};".encode())
                continue
            t = t.detach().cpu().contiguous()
            h.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with the checksum of its weights to ``path`` atomically
    (:func:`resflow.io.atomic_write`): a crash never leaves a half-written checkpoint."""
    state = {**state, "checksum": weights_checksum(state)}
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``),
    checking its format and the checksum of its weights."""
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
    version = state.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path} is not a resflow checkpoint (format {version!r})")
    if version > FORMAT:
        raise CheckpointError(
            f"{path} was written by a newer resflow (checkpoint format {version}; this "
            f"version reads formats up to {FORMAT}): upgrade resflow to load it"
        )
    expected = state.get("checksum")
    if expected is not None and (
        not isinstance(state["model"], dict) or weights_checksum(state) != expected
    ):
        raise CheckpointError(
            f"{path} is damaged or was edited: the checksum of its weights does not match "
            "the one recorded when it was saved"
        )
    return state
