"""What the trainer reports: test and validation figures with the EMA weights, samples,
TensorBoard logs and the final result of a run."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from resflow.data import DataSplit
from resflow.evaluation import (
    EvalResult,
    decode,
    density_note,
    evaluate,
    image_grid,
    save_image_grid,
)
from resflow.flow import Flow
from resflow.layers.base import after_optimizer_step, preserved_transient_state
from resflow.layers.hooks import Classifier, implements
from resflow.train_config import TrainConfig
from resflow.training import distributed as ddp
from resflow.training.distributed import Distributed
from resflow.training.ema import EMA

Weights = Literal["ema", "raw"]


def _check_weights(weights: str) -> None:
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")


class Reporting:
    """The evaluation and sampling methods of :class:`~resflow.training.Trainer` (its
    attributes are set there)."""

    model: Flow
    cfg: TrainConfig
    data: DataSplit
    dist: Distributed
    device: torch.device
    out: Path
    ema: EMA | None
    step: int
    stopped_early: bool
    history: list[dict[str, float]]

    if TYPE_CHECKING:

        def _init_lazy_state(self) -> None: ...

    def evaluate(
        self,
        max_examples: int | None = None,
        progress: bool = False,
        split: str = "test",
        weights: Weights = "ema",
    ) -> EvalResult:
        """Test (or ``split="valid"``: validation) metric with the EMA weights (or
        ``weights="raw"``: the optimizer's), 20 exact terms + unbiased tail by default."""
        self._init_lazy_state()
        assert self.ema is not None
        _check_weights(weights)
        if split not in ("test", "valid"):
            raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
        data = self.data.test if split == "test" else self.data.valid
        if data is None:
            raise ValueError("the data have no validation split (set n_valid)")
        test = data if max_examples is None else data[:max_examples]
        uses_labels = self.model.n_classes or implements(self.model, Classifier)  # accuracy
        labels = getattr(self.data, f"{split}_labels") if uses_labels else None
        if self.model.context_features:  # a conditional model: its data's contexts
            labels = getattr(self.data, f"{split}_context")
        if labels is not None:
            labels = labels[: len(test)]
        with torch.random.fork_rng(), preserved_transient_state(self.model):
            torch.manual_seed(self.cfg.seed + 17 + 1009 * self.dist.rank)
            with self._weights(weights):
                if self.dist.enabled:  # each rank a slice, the results combined
                    result = ddp.sharded(
                        lambda a, b: evaluate(
                            self.model,
                            test[a:b],
                            self.cfg.eval_batch_size,
                            progress=progress and self.dist.is_main,
                            labels=None if labels is None else labels[a:b],
                        ),
                        len(test),
                        self.dist,
                    )
                else:
                    result = evaluate(
                        self.model, test, self.cfg.eval_batch_size, progress=progress, labels=labels
                    )
        return result

    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        denoise: bool = False,
        guidance: float | None = None,
        weights: Weights = "ema",
    ) -> Tensor:
        """``n`` samples from the EMA model (``weights="raw"``: the optimizer's weights;
        a class-conditional model: classes ``0, 1, ..., K-1, 0, ...`` in turn; a
        conditional one: the test contexts in turn).
        ``denoise`` (a model trained with noise augmentation) and ``guidance`` (a
        class-conditional one) are those of :func:`resflow.evaluation.decode`."""
        self._init_lazy_state()
        assert self.ema is not None
        _check_weights(weights)
        k = self.model.n_classes
        labels = torch.arange(n, device=self.device) % k if k else None
        if self.model.context_features:  # the test contexts in turn
            contexts = self.data.test_context
            assert contexts is not None
            labels = contexts[torch.arange(n) % len(contexts)].to(self.device)
        with torch.random.fork_rng(), preserved_transient_state(self.model):
            torch.manual_seed(self.cfg.seed + 29)
            with self._weights(weights):
                self.model.eval()
                after_optimizer_step(self.model)
                z = self.model.sample_latent(n, temperature, labels)
                out = decode(self.model, z, labels, denoise, guidance)
                self.model.train()
        return out

    def _weights(self, weights: Weights) -> AbstractContextManager[None]:
        """Inside: the model holds the EMA weights (``"ema"``) or its own (``"raw"``)."""
        assert self.ema is not None
        return self.ema.swapped(self.model) if weights == "ema" else nullcontext()

    def averaged_model(self) -> Flow:
        """A copy of the model with the EMA weights, in eval mode and ready to use (the
        weights :meth:`evaluate`, :meth:`sample` and ``best.pt`` use); :attr:`model`
        keeps training with the raw weights."""
        self._init_lazy_state()
        assert self.ema is not None
        with self.ema.swapped(self.model), preserved_transient_state(self.model):
            model = copy.deepcopy(self.model)
        model.eval()
        after_optimizer_step(model)
        return model

    def _save_samples(self, writer: Any) -> None:
        levels = self.model.levels or 256
        imgs = self.sample(self.cfg.n_samples)
        save_image_grid(imgs, self.out / "samples" / f"step{self.step:07d}.png", levels)
        if writer is not None:
            grid = image_grid(imgs, levels)
            fmt = "HW" if grid.ndim == 2 else "HWC"
            writer.add_image("samples", grid, self.step, dataformats=fmt)

    def _final_result(self, final: dict[str, Any] | None) -> EvalResult | None:
        """The test figure of the history record ``final`` (the last evaluation, or the
        best one of a run stopped early), if it describes the weights the run ends with."""
        cfg = self.cfg
        result = None
        if final is not None and (final["step"] == self.step or self.stopped_early):
            n = len(self.data.test)
            n = n if cfg.eval_max is None else min(cfg.eval_max, n)
            unit, note = _eval_unit(self.model), density_note(self.model)
            result = EvalResult(final["test"], final["test_stderr"], n, unit, note,
                                final.get("test_accuracy"))  # fmt: skip
            for label, (mean, stderr) in final.get("test_extra", {}).items():
                result.extra[label] = EvalResult(mean, stderr, n, unit)
        return result


def _writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep training usable without it
        return None
    return SummaryWriter(str(path))


def _eval_unit(model: Flow) -> str:
    return "bits/dim" if model.levels is not None else "nats"
