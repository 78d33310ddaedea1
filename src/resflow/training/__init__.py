"""Training: the loop (``trainer``), what a step is made of (``optim``), checkpoints
(``state``; their layout is :class:`resflow.checkpoint.TrainingState`), evaluation and
samples during training (``reporting``), objectives, EMA, and data-parallel training
(``distributed`` over ``process_group``)."""

from resflow.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from resflow.train_config import TrainConfig
from resflow.training.ema import EMA
from resflow.training.objectives import Batch, MaximumLikelihood, Objective
from resflow.training.trainer import Trainer, TrainResult

__all__ = [
    "EMA",
    "Batch",
    "CheckpointError",
    "MaximumLikelihood",
    "Objective",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_checkpoint",
    "save_checkpoint",
]
