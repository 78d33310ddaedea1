"""Training: optimizer setup, EMA, atomic checkpoints and the training loop."""

from resflow.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from resflow.training.ema import EMA
from resflow.training.trainer import TrainConfig, Trainer, TrainResult

__all__ = [
    "EMA",
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_checkpoint",
    "save_checkpoint",
]
