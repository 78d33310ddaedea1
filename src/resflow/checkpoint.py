"""Atomic checkpoints of plain data (loadable with ``torch.load(weights_only=True)``),
and the one definition of what a checkpoint holds (:class:`TrainingState`).

A checkpoint records the version of its layout (``format``) and a SHA-256 checksum of
its weights (``checksum``: the model's state and the EMA's shadow weights), so that a
damaged or edited file is refused when it is loaded, and a file written by a newer
resflow is refused in one line. Checkpoints without a checksum (resflow 0.1) load as
before.
"""

from __future__ import annotations

import hashlib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from resflow.io import atomic_write

FORMAT = 2
"""The newest checkpoint layout this version reads and writes (1: resflow 0.1)."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a resflow checkpoint."""


MODEL_KEYS = ("model", "model_config")
"""What every checkpoint holds: the model's ``state_dict`` and its registered config (as
:func:`resflow.models.config_to_dict` writes it); enough to rebuild the model."""


@dataclass
class TrainingState:
    """Everything a checkpoint holds, in the order it is written: the model
    (:data:`MODEL_KEYS`) and the state of the run that resumes from it. The trainer
    writes it (:meth:`to_checkpoint`), :func:`load_checkpoint` verifies it and the
    trainer and :mod:`resflow.runs` read it back. Besides these fields a file holds
    ``format`` (:data:`FORMAT`) and ``checksum`` (:func:`weights_checksum`).

    Attributes:
        model: the model's ``state_dict``.
        model_config: its registered config, as plain data.
        train_config: the training settings, as plain data.
        optimizer, scheduler, ema: the ``state_dict`` of each (``ema["shadow"]``: the
            EMA weights, by parameter name).
        step, best, best_step, stale, stopped_early, history: the loop's progress.
        rng, cuda_rng: torch's random states (CPU, and every CUDA device).
        data: the name and levels of the data trained on.
    """

    model: dict[str, Any]
    model_config: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ema: dict[str, Any]
    step: int
    best: float
    history: list[dict[str, Any]]
    rng: torch.Tensor
    train_config: dict[str, Any] | None = None
    best_step: int = 0
    stale: int = 0
    stopped_early: bool = False
    cuda_rng: list[torch.Tensor] = field(default_factory=list)
    data: dict[str, Any] | None = None

    ORDER = ("model", "model_config", "train_config", "optimizer", "scheduler", "ema", "step",
             "best", "best_step", "stale", "stopped_early", "history", "rng", "cuda_rng",
             "data")  # fmt: skip

    def to_checkpoint(self) -> dict[str, Any]:
        """The plain data :func:`save_checkpoint` writes (format first)."""
        return {"format": FORMAT, **{name: getattr(self, name) for name in self.ORDER}}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], path: str | Path) -> TrainingState:
        """The state of a loaded checkpoint (older files lack the optional fields); a
        :class:`CheckpointError` if it lacks what resuming needs."""
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{path} cannot be resumed: it lacks {', '.join(missing)}")
        values = {f.name: state[f.name] for f in fields(cls) if f.name in state}
        out = cls(**values)
        out.step, out.best = int(out.step), float(out.best)
        out.best_step, out.stale = int(out.best_step), int(out.stale)
        out.stopped_early, out.history = bool(out.stopped_early), list(out.history)
        out.cuda_rng = out.cuda_rng or []
        return out


RESUME_KEYS = tuple(
    f.name for f in fields(TrainingState) if f.default is MISSING and f.default_factory is MISSING
)
"""What resuming a run needs; the other fields of :class:`TrainingState` have defaults
(checkpoints of older versions lack them)."""


def ema_weights(state: dict[str, Any]) -> dict[str, Any] | None:
    """The EMA's shadow weights of a loaded checkpoint, by parameter name (``None``: none
    recorded)."""
    ema = state.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("shadow"), dict):
        return ema["shadow"]  # type: ignore[no-any-return]
    return None


def weights_checksum(state: dict[str, Any]) -> str:
    """SHA-256 of the weights of a checkpoint: every tensor of ``state["model"]`` and of
    the EMA's shadow weights, with its name, dtype and shape, in name order."""
    h = hashlib.sha256()
    parts = [("model", state.get("model") or {})]
    shadow = ema_weights(state)
    if shadow is not None:
        parts.append(("ema", shadow))
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
    if not isinstance(state, dict) or any(k not in state for k in MODEL_KEYS):
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
