"""What one optimizer step is made of: AdamW, the warm-up schedule, the precision of the
forward pass and the order of the batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from resflow.train_config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW: the decay ``lr * wd * w`` is applied to every trainable weight directly,
    outside Adam's adaptive update (the paper's intended optimizer). Torch's fused
    kernel updates all parameters at once where it exists (CPU and CUDA): on a model of
    many small layers the per-parameter loop costs more than the arithmetic."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=fused or None)  # fmt: skip


def precision_context(precision: str, device: torch.device) -> Callable[[], Any]:
    """The context of a training forward pass at ``precision`` (see
    ``TrainConfig.precision``); a clear error where the device lacks it."""
    if precision == "tf32":
        if device.type != "cuda":
            raise ValueError(
                f"--precision tf32 needs a CUDA device (TensorFloat-32 is an NVIDIA matrix "
                f"mode); this run is on {device.type}"
            )
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision != "bf16":
        return contextlib.nullcontext
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU has no bfloat16 arithmetic; use fp32")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--precision bf16 needs a CPU or CUDA device, not {device.type}")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def make_scheduler(opt: torch.optim.Optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up: ``lr * min((step + 1) / warmup, 1)``."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / max(warmup, 1), 1.0))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Indices of the batch at ``step``: epoch-wise permutations seeded by ``(seed, epoch)``."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return perm[i * batch_size : (i + 1) * batch_size]
