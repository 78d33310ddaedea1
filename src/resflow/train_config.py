"""Training settings as typed data (defaults: the Residual Flows paper, Appendix E).

It sits below the models so that every preset can recommend its own settings as a
:class:`TrainConfig`; :mod:`resflow.training` uses it and the CLI makes its flags from
these fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from resflow.config import Config, param


@dataclass
class TrainConfig(Config):
    """Optimisation settings (defaults: the paper's, Appendix E)."""

    steps: int = param(1000, ge=1, help="optimizer steps in total")
    batch_size: int = param(
        64, ge=1, help="training examples per optimizer step, over all processes together"
    )
    update_freq: int = param(
        1,
        ge=1,
        help="micro-batches accumulated into one optimizer step (gradient accumulation: "
        "the same step in less memory)",
    )
    lr: float = param(1e-3, gt=0, help="AdamW learning rate")
    weight_decay: float = param(5e-4, ge=0, help="decoupled weight decay")
    betas: tuple[float, float] = param((0.9, 0.99), ge=0, lt=1, help="Adam betas")
    warmup: int = param(1000, ge=0, help="steps of linear learning-rate warm-up")
    grad_clip: float = param(1.0, ge=0, help="gradient-norm clipping (0: none)")
    ema_decay: float = param(0.999, ge=0, lt=1, help="EMA decay of the weights used to evaluate")
    eval_every: int = param(500, ge=1, help="steps between test evaluations")
    eval_batch_size: int = param(256, ge=1, help="examples per evaluation batch")
    eval_max: int | None = param(None, ge=1, help="test examples in periodic evaluations")
    patience: int = param(
        0,
        ge=0,
        help="stop after this many evaluations without a better validation score (0: never)",
    )
    checkpoint_every: int = param(100, ge=1, help="steps between last.pt checkpoints")
    sample_every: int = param(0, ge=0, help="steps between sample grids (0: never)")
    n_samples: int = param(64, ge=1, help="samples per grid")
    log_every: int = param(10, ge=1, help="steps between logged metrics")
    seed: int = param(0, help="seed of the model initialisation, data order and noise")
    device: str = param("cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    tensorboard: bool = param(True, help="write TensorBoard logs to <run>/tb")
    progress: bool = param(True, help="show progress bars")
    precision: Literal["fp32", "tf32", "bf16"] = param(
        "fp32",
        help="training arithmetic: fp32; tf32 (CUDA matrix products in TensorFloat-32); "
        "bf16 (autocast to bfloat16 where the device has it; residual blocks stay fp32)",
    )
    compile: bool = param(
        False,
        help="fuse the residual blocks' elementwise kernels, and the 2-D models' exact "
        "log-determinant, with torch.compile (the first steps compile; without a working "
        "compiler: a warning and the unfused kernels)",
    )
