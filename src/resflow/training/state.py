"""The trainer's checkpoints: its state written as a :class:`~resflow.checkpoint.TrainingState`
(``last.pt``, ``best.pt`` and the metrics they match) and read back to resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from resflow.checkpoint import CheckpointError, TrainingState, load_checkpoint, save_checkpoint
from resflow.config import to_dict
from resflow.data import DataSplit
from resflow.flow import Flow
from resflow.io import atomic_write_text
from resflow.models import config_from_dict, config_to_dict
from resflow.runs import RunFolder
from resflow.train_config import TrainConfig
from resflow.training.distributed import Distributed
from resflow.training.ema import EMA


class Checkpointing:
    """The checkpoint methods of :class:`~resflow.training.Trainer` (its attributes are
    set there)."""

    model: Flow
    model_config: Any
    cfg: TrainConfig
    data: DataSplit
    run: RunFolder
    dist: Distributed
    device: torch.device
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    step: int
    saved_step: int | None
    best: float
    best_step: int
    stale: int
    stopped_early: bool
    history: list[dict[str, float]]

    if TYPE_CHECKING:

        def _init_lazy_state(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """The run's state as a checkpoint holds it (:class:`TrainingState`)."""
        assert self.ema is not None
        return TrainingState(
            model=self.model.state_dict(),
            model_config=to_dict(config_to_dict(self.model_config)),
            train_config=to_dict(self.cfg),
            optimizer=self.opt.state_dict(),
            scheduler=self.sched.state_dict(),
            ema=self.ema.state_dict(),
            step=self.step,
            best=self.best,
            best_step=self.best_step,
            stale=self.stale,
            stopped_early=self.stopped_early,
            history=self.history,
            rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            data={"name": self.data.name, "levels": self.data.levels},
        ).to_checkpoint()

    def _load(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``: weights, optimizer, schedule, EMA,
        progress and random states."""
        state = TrainingState.from_checkpoint(load_checkpoint(path, map_location=self.device), path)
        saved = config_from_dict(state.model_config)
        if saved != self.model_config:
            raise ValueError(
                f"{path} was trained with a different model config; use another out_dir "
                "or the same preset/options"
            )
        self._init_lazy_state()  # create lazily-shaped buffers before loading
        try:
            self.model.load_state_dict(state.model)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{path} does not fit its model config ({first})") from None
        self.opt.load_state_dict(state.optimizer)
        self.sched.load_state_dict(state.scheduler)
        assert self.ema is not None
        self.ema.load_state_dict(state.ema)
        self.step = state.step
        self.best = state.best
        self.best_step = state.best_step
        self.stale = state.stale
        self.stopped_early = state.stopped_early
        self.history = state.history
        self.saved_step = self.step
        torch.set_rng_state(state.rng.cpu())
        if state.cuda_rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in state.cuda_rng])
        self.dist.reseed(self.cfg.seed, self.step)

    def _restore_best(self) -> None:
        """Load the weights (and EMA) of ``best.pt``: an early-stopped run ends there."""
        self.dist.barrier()  # rank 0 has written it
        state = load_checkpoint(self.run.best, map_location=self.device)
        self.model.load_state_dict(state["model"])
        assert self.ema is not None
        self.ema.load_state_dict(state["ema"])

    def _save(self, path: Path) -> None:
        """Write a checkpoint (and the metrics it matches) -- never non-finite weights."""
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            self._diverged(f"the weights became non-finite ({bad[0]})")
        if not self.dist.is_main:  # the same state as rank 0's, which writes it
            self.saved_step = self.step if path == self.run.last else self.saved_step
            return
        save_checkpoint(self.state_dict(), path)
        if path == self.run.last:
            self.saved_step = self.step
            lines = "".join(json.dumps(h) + "\n" for h in self.history)
            atomic_write_text(self.run.metrics, lines)

    def _diverged(self, what: str) -> None:
        raise self._divergence(what, self.step)

    def _divergence(self, what: str, step: int) -> FloatingPointError:
        """The error of a run that became non-finite at ``step`` (the step's number
        before it was counted)."""
        if self.saved_step is None:
            where = "no checkpoint was written yet"
        else:
            where = f"{self.run.last} holds the last finite state (step {self.saved_step})"
        return FloatingPointError(
            f"{what} at step {step}; nothing non-finite was saved: {where}. Lower the "
            "learning rate (--lr) or check the data"
        )
